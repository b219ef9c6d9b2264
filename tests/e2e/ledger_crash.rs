//! Crash safety: a child process runs a seeded ledger workload on four
//! threads and prints each operation once the ledger acknowledges it; the
//! test kills it with SIGKILL at a random moment, reopens the ledger, and
//! checks that `verify` passes and that every acknowledged operation is in
//! the journal exactly once. Fifty kills, on one ledger file that grows
//! across them.
//!
//! The child is this same test binary, re-run on `crash_workload_child`
//! with the ledger path in SANDBOXER_CRASH_LEDGER.
//!
//! The redo logs (`ledger.wal`, `state.wal`): a child killed after its
//! writes were acknowledged left them only in the log (the redb file copied
//! alone lacks them), and opening the file beside its log replays each
//! once; a log with a gap, or another database's, is refused.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sandboxer_host::ledger::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

const KILLS: usize = 50;
const CHILD_LEDGER: &str = "SANDBOXER_CRASH_LEDGER";
const CHILD_SEED: &str = "SANDBOXER_CRASH_SEED";

fn options() -> LedgerOptions {
    LedgerOptions {
        default_credits: 0,
        expire_on_open: false,
    }
}

/// The workload the killed child runs: grants, holds, settles and voids,
/// each printed as `ack <key> <entries>` after it returned.
fn child_workload(path: &str, seed: u64) {
    let ledger = std::sync::Arc::new(Ledger::open(std::path::Path::new(path), options()).unwrap());
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 86_400_000;
    let threads: Vec<_> = (0..4u64)
        .map(|thread| {
            let ledger = ledger.clone();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed * 31 + thread);
                let tenant = format!("tenant-{thread}");
                let mut open: Vec<String> = Vec::new();
                let ack = |key: String, entries: usize| {
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ack {key} {entries}").unwrap();
                    out.flush().unwrap();
                };
                for step in 0.. {
                    let id = format!("{seed}-{thread}-{step}");
                    match rng.random_range(0..4) {
                        0 => {
                            ledger
                                .grant(&tenant, rng.random_range(1..10_000_000), Some(&id))
                                .unwrap();
                            ack(format!("grant/{id}"), 1);
                        }
                        1 | 2 => match ledger.hold(
                            &tenant,
                            rng.random_range(0..2_000_000),
                            &id,
                            "saas-stub",
                            expires,
                        ) {
                            Ok(_) => {
                                ack(format!("hold/{id}"), 1);
                                open.push(id);
                            }
                            Err(LedgerError::InsufficientCredits { .. }) => {}
                            Err(error) => panic!("{error}"),
                        },
                        _ => {
                            if let Some(sandbox_id) = open.pop() {
                                if rng.random_bool(0.8) {
                                    ledger
                                        .settle(&sandbox_id, rng.random_range(0..3_000_000))
                                        .unwrap();
                                    ack(format!("settle/{sandbox_id}"), 2);
                                } else {
                                    ledger.void(&sandbox_id, "crash test").unwrap();
                                    ack(format!("void/{sandbox_id}"), 1);
                                }
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

/// Not a test of its own: the body of the child process that
/// `sigkill_at_random_points_loses_no_acknowledged_operation` kills. Run
/// normally (without SANDBOXER_CRASH_LEDGER), it only checks it is not in
/// child mode.
#[test]
fn crash_workload_child() {
    match std::env::var(CHILD_LEDGER) {
        Ok(path) => child_workload(&path, std::env::var(CHILD_SEED).unwrap().parse().unwrap()),
        Err(_) => assert!(std::env::var(CHILD_SEED).is_err()),
    }
}

#[test]
fn sigkill_at_random_points_loses_no_acknowledged_operation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut acknowledged: HashMap<String, usize> = HashMap::new();
    let mut journal_len = 0;

    for round in 0..KILLS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "ledger_crash::crash_workload_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_LEDGER, &path)
            .env(CHILD_SEED, (seed * 1000 + round as u64).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter(|line| line.starts_with("ack "))
                .collect::<Vec<_>>()
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(20..250)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for line in reader.join().unwrap() {
            let mut parts = line.split(' ').skip(1);
            let key = parts.next().unwrap().to_string();
            let entries: usize = parts.next().unwrap().parse().unwrap();
            acknowledged.insert(key, entries);
        }

        let context = format!("seed {seed}, round {round}");
        let ledger = Ledger::open(&path, options())
            .unwrap_or_else(|error| panic!("{context}: reopen: {error}"));
        let report = ledger.verify().unwrap();
        assert!(report.ok, "{context}: {:?}", report.violations);
        let entries = ledger.journal_entries(0, usize::MAX).unwrap();
        assert!(
            entries.len() >= journal_len,
            "{context}: the journal never shrinks"
        );
        journal_len = entries.len();
        let mut per_key: HashMap<&str, usize> = HashMap::new();
        for entry in &entries {
            *per_key.entry(entry.key.as_str()).or_default() += 1;
        }
        for (key, expected) in &acknowledged {
            assert_eq!(
                per_key.get(key.as_str()),
                Some(expected),
                "{context}: acknowledged {key} must be present exactly once"
            );
        }
        for (key, count) in &per_key {
            let expected = if key.starts_with("settle/") { 2 } else { 1 };
            assert_eq!(
                *count, expected,
                "{context}: {key} was written {count} times"
            );
        }
    }
    assert!(
        acknowledged.len() > KILLS,
        "the children did real work: {} acknowledged operations",
        acknowledged.len()
    );
}

const REPLAY_LEDGER: &str = "SANDBOXER_REPLAY_LEDGER";

/// Not a test of its own: the child that
/// `acknowledged_operations_of_a_killed_process_are_replayed_from_the_redo_log`
/// kills once it has said `done`.
#[test]
fn replay_child() {
    let Ok(path) = std::env::var(REPLAY_LEDGER) else {
        return;
    };
    let ledger = Ledger::open(std::path::Path::new(&path), options()).unwrap();
    for index in 0..20 {
        ledger
            .grant("replayed", 1_000 + index, Some(&format!("g{index}")))
            .unwrap();
    }
    println!("done");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn acknowledged_operations_of_a_killed_process_are_replayed_from_the_redo_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "ledger_crash::replay_child", "--nocapture"])
        .env(REPLAY_LEDGER, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|line| line.unwrap() == "done"),
        "the child granted"
    );
    child.kill().unwrap(); // SIGKILL: no closing commit
    child.wait().unwrap();
    let expected: i128 = (0..20).map(|index| 1_000 + index).sum();
    let balance = |ledger: &Ledger| ledger.summary("replayed").unwrap().balance;

    // The 20 grants were acknowledged through the redo log: the ledger file
    // alone (copied without its log) does not have them yet...
    let alone = tempfile::tempdir().unwrap();
    std::fs::copy(&path, alone.path().join("ledger.redb")).unwrap();
    let without_log = Ledger::open(&alone.path().join("ledger.redb"), options()).unwrap();
    assert_eq!(
        balance(&without_log),
        0,
        "redb alone lacks the logged grants"
    );
    drop(without_log);

    // ...and opening it beside its log replays every one, once.
    assert!(dir.path().join("ledger.wal").exists());
    let ledger = Ledger::open(&path, options()).unwrap();
    assert_eq!(balance(&ledger), expected);
    assert_eq!(ledger.journal_entries(0, usize::MAX).unwrap().len(), 20);
    assert!(ledger.verify().unwrap().ok);
    // A retried grant gets its first answer, not a second credit.
    let again = ledger.grant("replayed", 1_000, Some("g0")).unwrap();
    assert!(again.replayed, "{again:?}");
    drop(ledger);
    // Closed cleanly, then opened: nothing replayed twice.
    let ledger = Ledger::open(&path, options()).unwrap();
    assert_eq!(balance(&ledger), expected);
    drop(ledger);

    // The copy made before the replay holds no batch; the log now starts
    // after the 20 replayed ones: it is refused rather than half applied.
    std::fs::copy(
        dir.path().join("ledger.wal"),
        alone.path().join("ledger.wal"),
    )
    .unwrap();
    let gap = Ledger::open(&alone.path().join("ledger.redb"), options())
        .err()
        .expect("a log with a gap is refused")
        .to_string();
    assert!(gap.contains("batches in between are missing"), "{gap}");

    // A log beside another ledger is refused, naming both.
    let other = tempfile::tempdir().unwrap();
    drop(Ledger::open(&other.path().join("ledger.redb"), options()).unwrap());
    std::fs::copy(
        dir.path().join("ledger.wal"),
        other.path().join("ledger.wal"),
    )
    .unwrap();
    let foreign = Ledger::open(&other.path().join("ledger.redb"), options())
        .err()
        .expect("another ledger's log is refused")
        .to_string();
    assert!(
        foreign.contains("this redo log belongs to") && foreign.contains("move it away"),
        "{foreign}"
    );

    // A ledger file deleted while its log stays: the new ledger removes the
    // old log when it is made, so opening it again (still without a write)
    // works too.
    std::fs::remove_file(other.path().join("ledger.redb")).unwrap();
    drop(Ledger::open(&other.path().join("ledger.redb"), options()).unwrap());
    assert!(!other.path().join("ledger.wal").exists());
    drop(Ledger::open(&other.path().join("ledger.redb"), options()).expect("opens again"));
}

const STATE_REPLAY: &str = "SANDBOXER_STATE_REPLAY";

/// Not a test of its own: the child that
/// `acknowledged_state_writes_of_a_killed_process_are_replayed_from_the_redo_log`
/// kills once it has said `done`.
#[test]
fn state_replay_child() {
    use sandboxer_host::manager::lifecycle_events::PendingEvent;
    use sandboxer_host::state_db::{LoggedWrite, StateDb};
    let Ok(path) = std::env::var(STATE_REPLAY) else {
        return;
    };
    let state = StateDb::new(path.into());
    for index in 0..12u64 {
        let logged = LoggedWrite {
            record: None,
            events: vec![PendingEvent {
                sandbox_id: format!("sbx-{index}"),
                event_type: "sandboxer.sandbox.ready".into(),
                data: serde_json::json!({ "index": index }),
                time_ms: 1_700_000_000_000 + index,
            }],
            kv: Some((
                "stub".into(),
                vec![(format!("key-{index}"), Some(vec![index as u8; 3]))],
            )),
            disputed: None,
        };
        state.write_logged(logged, None, true).unwrap();
    }
    println!("done");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

/// The state store's half of the redo log: records, events and key-value
/// writes acknowledged as durable live in `state.wal` until redb's next
/// durable commit, and opening the store replays them with the ids they
/// first had.
#[test]
fn acknowledged_state_writes_of_a_killed_process_are_replayed_from_the_redo_log() {
    use sandboxer_host::manager::lifecycle_events;
    use sandboxer_host::runtime::kv::{DEFAULT_QUOTA_BYTES, KvSession};
    use sandboxer_host::state_db::StateDb;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "ledger_crash::state_replay_child", "--nocapture"])
        .env(STATE_REPLAY, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|line| line.unwrap() == "done"), "the child wrote");
    child.kill().unwrap(); // SIGKILL: no closing commit
    child.wait().unwrap();

    let alone = tempfile::tempdir().unwrap();
    std::fs::copy(&path, alone.path().join("state.redb")).unwrap();
    let without_log = StateDb::new(alone.path().join("state.redb"));
    assert_eq!(
        lifecycle_events::last_seq(&without_log).unwrap(),
        0,
        "redb alone lacks the logged events"
    );
    drop(without_log);

    let state = Arc::new(StateDb::new(path.clone()));
    let host = lifecycle_events::host_id(&state).unwrap();
    let events = lifecycle_events::after(&state, 0, state.durable_events().unwrap(), 100).unwrap();
    assert_eq!(events.len(), 12, "every acknowledged event, once");
    for (index, (seq, json)) in events.iter().enumerate() {
        assert_eq!(*seq, index as u64 + 1);
        let event: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(event["id"], format!("{host}-L{seq}"), "the id it first had");
        assert_eq!(event["data"]["index"], index);
    }
    let kv = KvSession::new(state.clone(), "stub".into(), DEFAULT_QUOTA_BYTES);
    for index in 0..12u8 {
        assert_eq!(
            kv.get(&format!("key-{index}")).unwrap(),
            Some(vec![index; 3])
        );
    }
    drop(kv);
    drop(state);
    // Closed cleanly, then opened: nothing is applied twice.
    let state = StateDb::new(path);
    assert_eq!(lifecycle_events::last_seq(&state).unwrap(), 12);
}

/// A hold's memo (the host's `provisioning` record, kept so that a crash
/// which loses that record cannot lose what the hold is for) is durable
/// with the hold, answered while the hold is open, kept through a replay
/// of the same step and an expiry, and dropped by a settle or a void.
#[test]
fn a_holds_memo_lasts_while_the_hold_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let ledger = Ledger::open(&path, options()).unwrap();
    ledger.grant("t1", 1_000_000, Some("g")).unwrap();
    let expires = sandboxer_host::manager::now_ms() + 3_600_000;
    let hold = |id: &str, memo: Option<&str>| Operation::Hold {
        tenant: "t1".into(),
        amount: 1_000,
        sandbox_id: id.into(),
        extension: "stub".into(),
        expires_at_ms: expires,
        memo: memo.map(str::to_string),
    };
    let memo = r#"{"id":"sbx-1","state":"provisioning"}"#;
    ledger.submit(hold("sbx-1.1", Some(memo))).unwrap();
    ledger.submit(hold("sbx-2.1", Some("two"))).unwrap();
    let memo_of = |ledger: &Ledger, id: &str| ledger.hold_record(id).unwrap().unwrap().memo;
    assert_eq!(memo_of(&ledger, "sbx-1.1").as_deref(), Some(memo));

    // A replay is the same step whatever its memo: the first answer, and
    // the first memo.
    let replayed = ledger.submit(hold("sbx-1.1", Some("another"))).unwrap();
    assert!(matches!(
        replayed,
        Receipt::Hold(HoldReceipt { replayed: true, .. })
    ));
    assert_eq!(memo_of(&ledger, "sbx-1.1").as_deref(), Some(memo));

    // Durable with the hold: a ledger opened again (replaying its redo log
    // or not) still has it, and lists it with the open holds.
    drop(ledger);
    let ledger = Ledger::open(&path, options()).unwrap();
    let open = ledger.open_holds().unwrap();
    assert_eq!(open.len(), 2);
    assert!(
        open.iter()
            .any(|hold| hold.sandbox_id == "sbx-1.1" && hold.memo.as_deref() == Some(memo))
    );

    // Settled or voided: the memo has done its work.
    ledger.settle("sbx-1.1", 400).unwrap();
    ledger.void("sbx-2.1", "create failed").unwrap();
    assert_eq!(memo_of(&ledger, "sbx-1.1"), None);
    assert_eq!(memo_of(&ledger, "sbx-2.1"), None);
    assert!(ledger.noted_holds().unwrap().is_empty());
    // Expired (the host was down past it): kept, for the sandbox may still
    // have to be recovered from it; settling it drops it.
    ledger.submit(hold("sbx-4.1", Some("four"))).unwrap();
    ledger.submit(hold("sbx-5.1", Some("five"))).unwrap();
    ledger.expire_due(expires + 1).unwrap();
    let noted = ledger.noted_holds().unwrap();
    assert_eq!(noted.len(), 2);
    assert!(noted.iter().all(|hold| hold.state == HoldState::Expired));
    assert_eq!(memo_of(&ledger, "sbx-4.1").as_deref(), Some("four"));
    // Settled, or voided (nothing left to release), it goes.
    ledger.settle("sbx-4.1", 100).unwrap();
    let voided = ledger.void("sbx-5.1", "create failed").unwrap();
    assert_eq!(voided.released, 0);
    assert!(ledger.noted_holds().unwrap().is_empty());
    assert!(ledger.verify().unwrap().ok);
    assert!(ledger.verify().unwrap().ok);
    // A hold made without a memo has none.
    ledger
        .hold("t1", 1_000, "sbx-3.1", "stub", expires)
        .unwrap();
    assert_eq!(memo_of(&ledger, "sbx-3.1"), None);
}
