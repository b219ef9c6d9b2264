//! Many threads holding against one tenant at once: group commit must never
//! reserve more than the tenant has, and refused holds must not disturb the
//! ones committed beside them.

use sandboxer_host::ledger::*;
use std::sync::Arc;
use std::sync::atomic::Ordering;

#[test]
fn concurrent_holds_never_reserve_more_than_the_balance() {
    let dir = tempfile::tempdir().unwrap();
    let options = LedgerOptions {
        default_credits: 0,
        expire_on_open: false,
    };
    let ledger = Arc::new(Ledger::open(&dir.path().join("ledger.redb"), options).unwrap());
    let balance = 100_000_000; // 100 credits
    ledger.grant("acme", balance, Some("top-up")).unwrap();
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 3_600_000;

    let threads: Vec<_> = (0..64u64)
        .map(|thread| {
            let ledger = ledger.clone();
            std::thread::spawn(move || {
                let mut held = 0u64;
                let mut refused = 0u64;
                for attempt in 0..20u64 {
                    // 0.5 to 3.5 credits: 64 × 20 attempts ask for far more than 100.
                    let amount = 500_000 + (thread * 7 + attempt * 13) % 30 * 100_000;
                    match ledger.hold(
                        "acme",
                        amount,
                        &format!("sbx-{thread}-{attempt}"),
                        "saas-stub",
                        expires,
                    ) {
                        Ok(receipt) => held += receipt.amount,
                        Err(LedgerError::InsufficientCredits {
                            available,
                            requested,
                            ..
                        }) => {
                            assert!(available < i128::from(requested));
                            refused += 1;
                        }
                        Err(error) => panic!("unexpected: {error}"),
                    }
                }
                (held, refused)
            })
        })
        .collect();
    let (mut held, mut refused) = (0u64, 0u64);
    for thread in threads {
        let (thread_held, thread_refused) = thread.join().unwrap();
        held += thread_held;
        refused += thread_refused;
    }

    let summary = ledger.summary("acme").unwrap();
    assert!(held <= balance, "reserved {held} of {balance}");
    assert_eq!(summary.held, held, "every acknowledged hold is held");
    assert_eq!(summary.available, i128::from(balance - held));
    assert!(refused > 0, "the workload asked for more than the balance");
    assert!(
        summary.available < 3_500_000,
        "holds stopped only when the balance ran low"
    );
    let report = ledger.verify().unwrap();
    assert!(report.ok, "{:?}", report.violations);

    let stats = ledger.writer_stats();
    let commits = stats.commits.load(Ordering::Relaxed);
    let operations = stats.operations.load(Ordering::Relaxed);
    assert!(
        commits < operations,
        "concurrent operations shared commits: {commits} commits for {operations} operations"
    );
}
