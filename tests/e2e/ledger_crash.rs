//! Crash safety: a child process runs a seeded ledger workload on four
//! threads and prints each operation once the ledger acknowledges it; the
//! test kills it with SIGKILL at a random moment, reopens the ledger, and
//! checks that `verify` passes and that every acknowledged operation is in
//! the journal exactly once. Fifty kills, on one ledger file that grows
//! across them.
//!
//! The child is this same test binary, re-run on `crash_workload_child`
//! with the ledger path in SANDBOXER_CRASH_LEDGER.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sandboxer_host::ledger::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
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
