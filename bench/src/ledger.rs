//! `bench ledger`: durable hold+settle pairs per second through the host's
//! ledger with 1 and 64 concurrent callers, next to the same operations on
//! SQLite (WAL, synchronous=FULL) in two shapes, naive (a connection per
//! caller, one transaction per operation) and grouped (one connection behind
//! the same group-commit writer as the host's), and the fsync ceiling of
//! this disk, all measured in this run.
//!
//! Goals: at 64 callers, at least 20x naive SQLite and at least 1x grouped
//! SQLite; with one caller, at least 1x naive SQLite (one transaction per
//! operation is what one caller gets from either).

use crate::sqlite;
use crate::stats::print_rows;
use anyhow::Result;
use sandboxer_host::ledger::{Ledger, LedgerOptions};
use serde::Serialize;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

const SOLO_PAIRS: usize = 300;
const CALLERS: usize = 64;
const PAIRS_PER_CALLER: usize = 20;
const FSYNCS: usize = 500;

#[derive(Serialize)]
struct LedgerReport {
    host_pairs_per_sec_1: f64,
    host_pairs_per_sec_64: f64,
    host_operations_per_commit_64: f64,
    /// Naive SQLite: a connection per caller, one transaction per operation.
    sqlite_pairs_per_sec_1: f64,
    sqlite_pairs_per_sec_64: f64,
    /// SQLite behind the same group-commit writer as the host's ledger.
    sqlite_grouped_pairs_per_sec_1: f64,
    sqlite_grouped_pairs_per_sec_64: f64,
    fsyncs_per_sec: f64,
    host_over_sqlite_64: f64,
    host_over_sqlite_64_goal: f64,
    host_over_sqlite_grouped_64: f64,
    host_over_sqlite_grouped_64_goal: f64,
    host_over_sqlite_1: f64,
    host_over_sqlite_1_goal: f64,
}

fn expires() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 3_600_000
}

/// Pairs per second through the host ledger with `callers` threads.
fn host_pairs(callers: usize, pairs_per_caller: usize) -> Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let options = LedgerOptions {
        default_credits: 0,
        expire_on_open: false,
    };
    let ledger = Arc::new(Ledger::open(&dir.path().join("ledger.redb"), options)?);
    ledger.grant("bench", 1_000_000_000_000, Some("bench"))?;
    let before = (
        ledger.writer_stats().commits.load(Ordering::Relaxed),
        ledger.writer_stats().operations.load(Ordering::Relaxed),
    );
    let expires = expires();
    let started = Instant::now();
    let threads: Vec<_> = (0..callers)
        .map(|caller| {
            let ledger = ledger.clone();
            std::thread::spawn(move || {
                for pair in 0..pairs_per_caller {
                    let sandbox_id = format!("sbx-{caller}-{pair}");
                    ledger
                        .hold("bench", 1_000_000, &sandbox_id, "saas-stub", expires)
                        .unwrap();
                    ledger.settle(&sandbox_id, 400_000).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let commits = ledger.writer_stats().commits.load(Ordering::Relaxed) - before.0;
    let operations = ledger.writer_stats().operations.load(Ordering::Relaxed) - before.1;
    anyhow::ensure!(
        ledger.verify()?.ok,
        "the benchmark left the ledger inconsistent"
    );
    Ok((
        (callers * pairs_per_caller) as f64 / elapsed,
        operations as f64 / commits.max(1) as f64,
    ))
}

fn sqlite_pairs(callers: usize, pairs_per_caller: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ledger.sqlite");
    sqlite::grant(&mut sqlite::open(&path)?, "bench", 1_000_000_000_000)?;
    let started = Instant::now();
    let threads: Vec<_> = (0..callers)
        .map(|caller| {
            let path = path.clone();
            std::thread::spawn(move || -> Result<()> {
                let mut connection = sqlite::open(&path)?;
                for pair in 0..pairs_per_caller {
                    let sandbox_id = format!("sbx-{caller}-{pair}");
                    anyhow::ensure!(sqlite::hold(
                        &mut connection,
                        "bench",
                        1_000_000,
                        &sandbox_id
                    )?);
                    sqlite::settle(&mut connection, &sandbox_id, 400_000)?;
                }
                Ok(())
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap()?;
    }
    Ok((callers * pairs_per_caller) as f64 / started.elapsed().as_secs_f64())
}

/// Pairs per second through SQLite behind the group-commit writer.
fn sqlite_grouped_pairs(callers: usize, pairs_per_caller: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ledger.sqlite");
    sqlite::grant(&mut sqlite::open(&path)?, "bench", 1_000_000_000_000)?;
    let grouped = Arc::new(sqlite::GroupedSqlite::open(
        &path,
        sandboxer_host::ledger::MAX_BATCH,
    )?);
    let started = Instant::now();
    let threads: Vec<_> = (0..callers)
        .map(|caller| {
            let grouped = grouped.clone();
            std::thread::spawn(move || -> Result<()> {
                for pair in 0..pairs_per_caller {
                    let sandbox_id = format!("sbx-{caller}-{pair}");
                    anyhow::ensure!(grouped.submit(sqlite::SqliteJob::Hold {
                        tenant: "bench".into(),
                        amount: 1_000_000,
                        sandbox_id: sandbox_id.clone(),
                    })?);
                    grouped.submit(sqlite::SqliteJob::Settle {
                        sandbox_id,
                        actual: 400_000,
                    })?;
                }
                Ok(())
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap()?;
    }
    Ok((callers * pairs_per_caller) as f64 / started.elapsed().as_secs_f64())
}

/// Synchronous 4 KiB overwrites per second: what one-commit-per-operation
/// storage can reach at best on this disk.
fn fsync_ceiling() -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut file = std::fs::File::create(dir.path().join("fsync"))?;
    let block = [0x5Au8; 4096];
    let started = Instant::now();
    for _ in 0..FSYNCS {
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0))?;
        file.write_all(&block)?;
        file.sync_data()?;
    }
    Ok(FSYNCS as f64 / started.elapsed().as_secs_f64())
}

pub fn run() -> Result<()> {
    let fsyncs_per_sec = fsync_ceiling()?;
    let (host_1, _) = host_pairs(1, SOLO_PAIRS)?;
    let sqlite_1 = sqlite_pairs(1, SOLO_PAIRS)?;
    let grouped_1 = sqlite_grouped_pairs(1, SOLO_PAIRS)?;
    let (host_64, batch_64) = host_pairs(CALLERS, PAIRS_PER_CALLER)?;
    let sqlite_64 = sqlite_pairs(CALLERS, PAIRS_PER_CALLER)?;
    let grouped_64 = sqlite_grouped_pairs(CALLERS, PAIRS_PER_CALLER)?;
    let report = LedgerReport {
        host_pairs_per_sec_1: host_1,
        host_pairs_per_sec_64: host_64,
        host_operations_per_commit_64: batch_64,
        sqlite_pairs_per_sec_1: sqlite_1,
        sqlite_pairs_per_sec_64: sqlite_64,
        sqlite_grouped_pairs_per_sec_1: grouped_1,
        sqlite_grouped_pairs_per_sec_64: grouped_64,
        fsyncs_per_sec,
        host_over_sqlite_64: host_64 / sqlite_64,
        host_over_sqlite_64_goal: 20.0,
        host_over_sqlite_grouped_64: host_64 / grouped_64,
        host_over_sqlite_grouped_64_goal: 1.0,
        host_over_sqlite_1: host_1 / sqlite_1,
        host_over_sqlite_1_goal: 1.0,
    };
    let verdict = |ratio: f64, goal: f64| {
        let verdict = if ratio >= goal {
            "meets goal"
        } else {
            "MISSES goal"
        };
        format!("goal >= {goal:.0}x: {verdict}")
    };
    print_rows(
        "ledger: durable hold+settle pairs per second",
        &[
            (
                "fsync ceiling (4 KiB, one caller)".into(),
                format!("{fsyncs_per_sec:.0}/s"),
                "syncs, not pairs".into(),
            ),
            (
                "host ledger, 1 caller".into(),
                format!("{host_1:.0}/s"),
                String::new(),
            ),
            (
                "sqlite naive, 1 caller".into(),
                format!("{sqlite_1:.0}/s"),
                format!(
                    "host {:.2}x, {}",
                    report.host_over_sqlite_1,
                    verdict(report.host_over_sqlite_1, report.host_over_sqlite_1_goal)
                ),
            ),
            (
                "sqlite grouped, 1 caller".into(),
                format!("{grouped_1:.0}/s"),
                format!("host {:.2}x", host_1 / grouped_1),
            ),
            (
                "host ledger, 64 callers".into(),
                format!("{host_64:.0}/s"),
                format!("{batch_64:.1} operations per commit"),
            ),
            (
                "sqlite naive, 64 callers".into(),
                format!("{sqlite_64:.0}/s"),
                format!(
                    "host {:.1}x, {}",
                    report.host_over_sqlite_64,
                    verdict(report.host_over_sqlite_64, report.host_over_sqlite_64_goal)
                ),
            ),
            (
                "sqlite grouped, 64 callers".into(),
                format!("{grouped_64:.0}/s"),
                format!(
                    "host {:.2}x, {}",
                    report.host_over_sqlite_grouped_64,
                    verdict(
                        report.host_over_sqlite_grouped_64,
                        report.host_over_sqlite_grouped_64_goal
                    )
                ),
            ),
        ],
    );
    let path = crate::stats::write_report("ledger", &report)?;
    println!("\nwritten to {}", path.display());
    Ok(())
}
