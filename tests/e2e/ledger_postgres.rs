//! The ledger on PostgreSQL as several hosts share it: each `PgLedger` here
//! is one host's (its own connections and writer), all on one database.

use crate::pg;
use sandboxer_host::ledger::*;
use std::collections::BTreeMap;
use std::sync::Arc;

const CREDIT: u64 = 1_000_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn hosts(url: &str, count: usize) -> Vec<Arc<dyn LedgerStore>> {
    let mut hosts: Vec<Arc<dyn LedgerStore>> = Vec::new();
    for _ in 0..count {
        let options = LedgerOptions {
            default_credits: 0,
            expire_on_open: true,
        };
        hosts.push(Arc::new(PgLedger::connect(url, options).await.unwrap()));
    }
    hosts
}

#[test]
fn three_hosts_holding_at_once_never_reserve_more_than_the_tenant_has() {
    let _cluster = pg::shared();
    let url = pg::fresh_database("three_hosts");
    runtime().block_on(async {
        let hosts = hosts(&url, 3).await;
        hosts[0]
            .grant("acme", 10 * CREDIT, Some("top-up"))
            .await
            .unwrap();
        let expires = now_ms() + 3_600_000;
        let mut calls = Vec::new();
        for attempt in 0..64 {
            let host = hosts[attempt % 3].clone();
            calls.push(tokio::spawn(async move {
                host.hold(
                    "acme",
                    CREDIT,
                    &format!("sbx-{attempt}"),
                    "saas-stub",
                    expires,
                )
                .await
            }));
        }
        let mut held = 0;
        for call in calls {
            match call.await.unwrap() {
                Ok(receipt) => {
                    assert_eq!(receipt.amount, CREDIT);
                    held += 1;
                }
                Err(LedgerError::InsufficientCredits {
                    available,
                    requested,
                    ..
                }) => assert!(available < i128::from(requested), "{available} {requested}"),
                Err(other) => panic!("unexpected: {other}"),
            }
        }
        assert_eq!(held, 10, "credits for exactly 10 holds");
        for host in &hosts {
            let summary = host.summary("acme").await.unwrap();
            assert_eq!((summary.held, summary.available), (10 * CREDIT, 0));
        }
        let report = hosts[2].verify().await.unwrap();
        assert!(report.ok, "{:?}", report.violations);
        assert_eq!(report.open_holds, 10);
    });
}

#[test]
fn a_step_repeated_on_another_host_gets_the_first_answer() {
    let _cluster = pg::shared();
    let url = pg::fresh_database("replays");
    runtime().block_on(async {
        let hosts = hosts(&url, 2).await;
        let (a, b) = (&hosts[0], &hosts[1]);
        a.grant("acme", 5 * CREDIT, Some("first")).await.unwrap();
        let again = b.grant("acme", 5 * CREDIT, Some("first")).await.unwrap();
        assert!(again.replayed, "the same grant key adds once across hosts");
        let reused = b
            .grant("acme", 6 * CREDIT, Some("first"))
            .await
            .unwrap_err();
        assert!(
            reused
                .to_string()
                .starts_with("idempotency key `first` was already used for a different operation"),
            "{reused}"
        );

        let expires = now_ms() + 600_000;
        let hold = a
            .hold("acme", 2 * CREDIT, "sbx-1", "saas-stub", expires)
            .await
            .unwrap();
        let replay = b
            .hold("acme", 2 * CREDIT, "sbx-1", "saas-stub", expires)
            .await
            .unwrap();
        assert!(replay.replayed);
        assert_eq!(replay.seq, hold.seq);

        let settle = b.settle("sbx-1", 1_500_000).await.unwrap();
        let remeasured = a.settle("sbx-1", 1_900_000).await.unwrap();
        assert!(
            remeasured.replayed,
            "a re-measured settle replays the first"
        );
        assert_eq!(remeasured.charged, settle.charged);
        assert_eq!(remeasured.charge_seq, settle.charge_seq);

        let summary = a.summary("acme").await.unwrap();
        assert_eq!(summary.balance, i128::from(5 * CREDIT - 1_500_000));
        let settled = b.settle_receipt("sbx-1").await.unwrap().unwrap();
        assert_eq!(settled.charged, 1_500_000);
        assert!(a.verify().await.unwrap().ok);
        assert!(a.knows_tenant("acme").await.unwrap());
        assert!(!a.knows_tenant("nobody").await.unwrap());
        assert_eq!(a.tenant_names().await.unwrap(), ["acme"]);
        assert_eq!(a.revenue_total().await.unwrap(), 1_500_000);
        let history = b.history("acme", 10).await.unwrap();
        assert_eq!(
            history
                .iter()
                .map(|entry| entry.kind.name())
                .collect::<Vec<_>>(),
            ["charge", "release", "hold", "grant"]
        );
        assert_eq!(b.outbox_last_seq().await.unwrap(), 4);
        assert_eq!(a.outbox_after(2, 10).await.unwrap().len(), 2);
    });
}

/// Operations run on two hosts while PostgreSQL is killed and started again
/// mid-run: every acknowledged hold and settle is still there, none twice,
/// and a caller that got an error finds its answer by retrying (the keys
/// make the retry safe).
#[test]
fn a_postgresql_crash_mid_run_loses_no_acknowledged_operation_and_charges_none_twice() {
    let _cluster = pg::exclusive();
    let url = pg::fresh_database("restart_drill");
    let runtime = runtime();
    let hosts = runtime.block_on(hosts(&url, 2));
    runtime
        .block_on(hosts[0].grant("acme", 1_000 * CREDIT, Some("top-up")))
        .unwrap();
    let expires = now_ms() + 3_600_000;
    // Each worker holds then settles its sandboxes, retrying a step that
    // failed until it gets an answer; it records what was acknowledged.
    let settled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|worker| {
            let host = hosts[worker % 2].clone();
            let settled = settled.clone();
            runtime.spawn(async move {
                let mut acknowledged = BTreeMap::new();
                let mut failures = 0u32;
                for index in 0..40 {
                    let id = format!("sbx-{worker}-{index}");
                    let amount = CREDIT + (index as u64 % 7) * 1000;
                    let hold = loop {
                        match host.hold("acme", amount, &id, "saas-stub", expires).await {
                            Ok(receipt) => break receipt,
                            Err(LedgerError::Storage(_)) | Err(LedgerError::WriterStopped) => {
                                failures += 1;
                                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            }
                            Err(other) => panic!("hold {id}: {other}"),
                        }
                    };
                    let charged = amount / 2;
                    let settle = loop {
                        match host.settle(&id, charged).await {
                            Ok(receipt) => break receipt,
                            Err(LedgerError::Storage(_)) | Err(LedgerError::WriterStopped) => {
                                failures += 1;
                                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            }
                            Err(other) => panic!("settle {id}: {other}"),
                        }
                    };
                    assert_eq!(settle.charged, charged);
                    settled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    acknowledged.insert(id, (hold.amount, charged));
                }
                (acknowledged, failures)
            })
        })
        .collect();
    // Crash it once a quarter of the sandboxes are settled: mid-run
    // whatever this machine's speed.
    while settled.load(std::sync::atomic::Ordering::Relaxed) < 80 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    pg::pg_ctl(&["stop", "-m", "immediate"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    pg::pg_ctl(&["start"]);

    let mut acknowledged = BTreeMap::new();
    let mut failures = 0;
    for worker in workers {
        let (done, failed) = runtime.block_on(worker).unwrap();
        acknowledged.extend(done);
        failures += failed;
    }
    assert_eq!(acknowledged.len(), 8 * 40);
    assert!(
        failures > 0,
        "the crash cut some operations (else it tested nothing)"
    );

    runtime.block_on(async {
        let ledger = &hosts[1];
        let report = ledger.verify().await.unwrap();
        assert!(report.ok, "{:?}", report.violations);
        assert_eq!(report.open_holds, 0);
        // Exactly one charge per sandbox, of what was acknowledged.
        let entries = ledger.journal_entries(0, usize::MAX).await.unwrap();
        let mut charges: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for entry in entries
            .iter()
            .filter(|entry| entry.kind == EntryKind::Charge)
        {
            charges
                .entry(entry.sandbox_id.clone().unwrap())
                .or_default()
                .push(entry.amount);
        }
        assert_eq!(charges.len(), acknowledged.len());
        let mut total = 0;
        for (id, (_, charged)) in &acknowledged {
            assert_eq!(
                charges[id],
                [*charged],
                "{id} charged once, as acknowledged"
            );
            total += charged;
        }
        let summary = ledger.summary("acme").await.unwrap();
        assert_eq!(summary.balance, i128::from(1_000 * CREDIT - total));
    });
}

#[test]
fn hosts_starting_together_on_an_empty_database_create_the_schema_once() {
    let _cluster = pg::shared();
    let url = pg::fresh_database("starting_together");
    runtime().block_on(async {
        let options = LedgerOptions {
            default_credits: 0,
            expire_on_open: true,
        };
        let starts: Vec<_> = (0..4)
            .map(|_| {
                let (url, options) = (url.clone(), options.clone());
                tokio::spawn(async move { PgLedger::connect(&url, options).await })
            })
            .collect();
        let mut hosts: Vec<Arc<dyn LedgerStore>> = Vec::new();
        for start in starts {
            hosts.push(Arc::new(start.await.unwrap().expect("every host starts")));
        }
        hosts[0].grant("acme", CREDIT, Some("one")).await.unwrap();
        assert_eq!(
            hosts[3].summary("acme").await.unwrap().balance,
            i128::from(CREDIT)
        );
        assert!(hosts[2].verify().await.unwrap().ok);
    });
}

/// Concurrent callers of one host share transactions: every kind of
/// operation, on the same sandboxes, lands in mixed batches (a hold and its
/// settle, an extend, an expiry of holds changed earlier in the batch).
#[test]
fn mixed_concurrent_operations_on_the_same_holds_agree_with_the_rules() {
    let _cluster = pg::shared();
    let url = pg::fresh_database("mixed_batches");
    runtime().block_on(async {
        let ledger: Arc<dyn LedgerStore> = hosts(&url, 1).await.remove(0);
        ledger
            .grant("acme", 1_000 * CREDIT, Some("start"))
            .await
            .unwrap();
        let now = now_ms();
        let mut calls = Vec::new();
        for index in 0..48u64 {
            let ledger = ledger.clone();
            calls.push(tokio::spawn(async move {
                let id = format!("sbx-{index}");
                // Some holds expire almost at once, for the expiries below.
                let expires = if index % 4 == 0 {
                    now + 300
                } else {
                    now + 600_000
                };
                let hold = ledger
                    .hold("acme", CREDIT, &id, "saas-stub", expires)
                    .await
                    .unwrap();
                let outcome = match index % 4 {
                    0 => {
                        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
                        let expired = ledger.expire_due(now_ms()).await.unwrap();
                        // Another caller's expiry may have closed it first.
                        let closed = ledger.hold_record(&id).await.unwrap().unwrap();
                        assert_eq!(closed.state, HoldState::Expired, "{expired:?}");
                        "expired"
                    }
                    1 => {
                        ledger.void(&id, "changed my mind").await.unwrap();
                        let again = ledger.void(&id, "another reason").await.unwrap();
                        assert!(again.replayed);
                        "voided"
                    }
                    2 => {
                        let extended = ledger.extend(&id, CREDIT / 2, now + 900_000).await.unwrap();
                        assert_eq!(extended.amount, CREDIT + CREDIT / 2);
                        let settle = ledger.settle(&id, 2 * CREDIT).await.unwrap();
                        assert_eq!(
                            (settle.held, settle.overrun),
                            (CREDIT + CREDIT / 2, CREDIT / 2)
                        );
                        "settled above"
                    }
                    _ => {
                        let settle = ledger.settle(&id, CREDIT / 4).await.unwrap();
                        assert_eq!(settle.released, CREDIT - CREDIT / 4);
                        "settled below"
                    }
                };
                (hold.seq, outcome)
            }));
        }
        let mut outcomes = std::collections::BTreeMap::new();
        for call in calls {
            let (_, outcome) = call.await.unwrap();
            *outcomes.entry(outcome).or_insert(0) += 1;
        }
        assert_eq!(outcomes.values().sum::<i32>(), 48);
        let report = ledger.verify().await.unwrap();
        assert!(report.ok, "{:?}", report.violations);
        assert_eq!(report.open_holds, 0);
        // 12 charges of 2 and 12 of a quarter credit; nothing else spent.
        let summary = ledger.summary("acme").await.unwrap();
        assert_eq!(
            summary.balance,
            i128::from(1_000 * CREDIT - 12 * 2 * CREDIT - 12 * (CREDIT / 4))
        );
        assert_eq!(summary.held, 0);
    });
}

#[test]
fn verify_sees_a_column_that_disagrees_with_its_json() {
    let _cluster = pg::shared();
    let url = pg::fresh_database("tampered");
    runtime().block_on(async {
        let ledger: Arc<dyn LedgerStore> = hosts(&url, 1).await.remove(0);
        ledger.grant("acme", CREDIT, Some("start")).await.unwrap();
        ledger
            .hold("acme", CREDIT, "sbx-1", "saas-stub", now_ms() + 600_000)
            .await
            .unwrap();
        assert!(ledger.verify().await.unwrap().ok);
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        // The expiry scan would never see this open hold again.
        client
            .execute(
                "UPDATE ledger_holds SET state = 'voided' WHERE sandbox_id = 'sbx-1'",
                &[],
            )
            .await
            .unwrap();
        let report = ledger.verify().await.unwrap();
        assert!(!report.ok);
        assert_eq!(report.violations.len(), 1, "{:?}", report.violations);
        assert_eq!(report.violations[0].check, "copy");
        assert!(
            report.violations[0]
                .message
                .starts_with("hold sbx-1 is Open until"),
            "{}",
            report.violations[0].message
        );
    });
}
