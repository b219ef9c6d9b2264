//! `bench ledger`: durable hold+settle pairs per second through the host's
//! ledger with 1 and 64 concurrent callers, next to the same operations on
//! SQLite (WAL, synchronous=FULL) in two shapes, naive (a connection per
//! caller, one transaction per operation) and grouped (one connection behind
//! the same group-commit writer as the host's), and the fsync ceiling of
//! this disk, all measured in this run.
//!
//! Beside them, the PostgreSQL ledger (`PgLedger`, what `--store` uses) on
//! the throwaway cluster `cargo xtask bench` starts: 1 caller, 64 callers on
//! one `PgLedger`, and 64 callers spread over three `PgLedger`s on one
//! database, as three hosts sharing a ledger would be (each with its own
//! writer and connections; their transactions serialize on the database's
//! `ledger_meta` lock).
//!
//! Goals: at 64 callers, at least 20x naive SQLite and at least 1x grouped
//! SQLite; with one caller, at least 1x naive SQLite (one transaction per
//! operation is what one caller gets from either). PostgreSQL has no goal:
//! its ratios to the same run's SQLite baselines are reported.

use crate::pg::{self, ClusterSettings};
use crate::sqlite;
use crate::stats::print_rows;
use anyhow::Result;
use sandboxer_host::ledger::{Ledger, LedgerOptions, LedgerStore, PgLedger};
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
    /// Of the host ledger's commits, those redb made durable itself (the
    /// redo log was full); the others were made durable by their log record.
    host_durable_redb_commits_1: String,
    host_durable_redb_commits_64: String,
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
    /// `PgLedger`, one caller.
    postgres_pairs_per_sec_1: f64,
    /// `PgLedger`, 64 callers on one of them (one host).
    postgres_pairs_per_sec_64: f64,
    /// Write transactions per ledger operation, read from the cluster's
    /// transaction ids: how well one host's writer groups its callers.
    postgres_operations_per_transaction_64: f64,
    /// 64 callers spread over three `PgLedger`s on one database.
    postgres_3_hosts_pairs_per_sec_64: f64,
    postgres_3_hosts_operations_per_transaction_64: f64,
    postgres_over_sqlite_1: f64,
    postgres_over_sqlite_grouped_1: f64,
    postgres_over_sqlite_64: f64,
    postgres_over_sqlite_grouped_64: f64,
    postgres_3_hosts_over_sqlite_grouped_64: f64,
    postgres_over_host_64: f64,
    postgres_goal: &'static str,
    postgres_settings: ClusterSettings,
}

fn expires() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 3_600_000
}

/// Pairs per second through the host ledger with `callers` threads, its
/// operations per commit, and "D of C commits durable in redb".
fn host_pairs(callers: usize, pairs_per_caller: usize) -> Result<(f64, f64, String)> {
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
        ledger
            .writer_stats()
            .durable_commits
            .load(Ordering::Relaxed),
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
    let durable = ledger
        .writer_stats()
        .durable_commits
        .load(Ordering::Relaxed)
        - before.2;
    anyhow::ensure!(
        ledger.verify()?.ok,
        "the benchmark left the ledger inconsistent"
    );
    Ok((
        (callers * pairs_per_caller) as f64 / elapsed,
        operations as f64 / commits.max(1) as f64,
        format!("{durable} of {commits} commits durable in redb, the rest by the redo log"),
    ))
}

/// Pairs per second through `hosts` `PgLedger`s on a fresh database, the
/// callers (tokio tasks) spread over them round-robin, and the ledger
/// operations per write transaction. The ledger is verified afterwards.
fn postgres_pairs(hosts: usize, callers: usize, pairs_per_caller: usize) -> Result<(f64, f64)> {
    // The server's shape: two worker threads, the callers as tasks.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let url = pg::fresh_database(&format!("ledger_{hosts}_hosts_{callers}")).await?;
        let mut ledgers: Vec<Arc<dyn LedgerStore>> = Vec::new();
        for _ in 0..hosts {
            let options = LedgerOptions {
                default_credits: 0,
                expire_on_open: false,
            };
            ledgers.push(Arc::new(PgLedger::connect(&url, options).await?));
        }
        ledgers[0]
            .grant("bench", 1_000_000_000_000, Some("bench"))
            .await?;
        let expires = expires();
        let first_transaction = pg::next_transaction_id(&url).await?;
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for caller in 0..callers {
            let ledger = ledgers[caller % hosts].clone();
            tasks.spawn(async move {
                for pair in 0..pairs_per_caller {
                    let sandbox_id = format!("sbx-{caller}-{pair}");
                    ledger
                        .hold("bench", 1_000_000, &sandbox_id, "saas-stub", expires)
                        .await?;
                    ledger.settle(&sandbox_id, 400_000).await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(caller) = tasks.join_next().await {
            caller??;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let transactions = pg::next_transaction_id(&url).await? - first_transaction;
        let report = ledgers[hosts - 1].verify().await?;
        anyhow::ensure!(
            report.ok,
            "the benchmark left the PostgreSQL ledger inconsistent: {:?}",
            report.violations
        );
        let pairs = callers * pairs_per_caller;
        anyhow::ensure!(
            ledgers[0].summary("bench").await?.held == 0,
            "every hold of the PostgreSQL run is settled"
        );
        Ok((
            pairs as f64 / elapsed,
            (2 * pairs) as f64 / transactions.max(1) as f64,
        ))
    })
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
    let (host_1, _, durable_1) = host_pairs(1, SOLO_PAIRS)?;
    let sqlite_1 = sqlite_pairs(1, SOLO_PAIRS)?;
    let grouped_1 = sqlite_grouped_pairs(1, SOLO_PAIRS)?;
    let (postgres_1, _) = postgres_pairs(1, 1, SOLO_PAIRS)?;
    let (host_64, batch_64, durable_64) = host_pairs(CALLERS, PAIRS_PER_CALLER)?;
    let sqlite_64 = sqlite_pairs(CALLERS, PAIRS_PER_CALLER)?;
    let grouped_64 = sqlite_grouped_pairs(CALLERS, PAIRS_PER_CALLER)?;
    let (postgres_64, postgres_batch_64) = postgres_pairs(1, CALLERS, PAIRS_PER_CALLER)?;
    let (postgres_3_hosts_64, postgres_3_hosts_batch_64) =
        postgres_pairs(3, CALLERS, PAIRS_PER_CALLER)?;
    let postgres_settings = crate::block_on(pg::settings())?;
    let report = LedgerReport {
        host_pairs_per_sec_1: host_1,
        host_pairs_per_sec_64: host_64,
        host_operations_per_commit_64: batch_64,
        host_durable_redb_commits_1: durable_1.clone(),
        host_durable_redb_commits_64: durable_64.clone(),
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
        postgres_pairs_per_sec_1: postgres_1,
        postgres_pairs_per_sec_64: postgres_64,
        postgres_operations_per_transaction_64: postgres_batch_64,
        postgres_3_hosts_pairs_per_sec_64: postgres_3_hosts_64,
        postgres_3_hosts_operations_per_transaction_64: postgres_3_hosts_batch_64,
        postgres_over_sqlite_1: postgres_1 / sqlite_1,
        postgres_over_sqlite_grouped_1: postgres_1 / grouped_1,
        postgres_over_sqlite_64: postgres_64 / sqlite_64,
        postgres_over_sqlite_grouped_64: postgres_64 / grouped_64,
        postgres_3_hosts_over_sqlite_grouped_64: postgres_3_hosts_64 / grouped_64,
        postgres_over_host_64: postgres_64 / host_64,
        postgres_goal: "no goal: reported",
        postgres_settings: postgres_settings.clone(),
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
                durable_1,
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
                "postgres, 1 caller".into(),
                format!("{postgres_1:.0}/s"),
                format!(
                    "{:.2}x naive, {:.2}x grouped sqlite (no goal)",
                    report.postgres_over_sqlite_1, report.postgres_over_sqlite_grouped_1
                ),
            ),
            (
                "host ledger, 64 callers".into(),
                format!("{host_64:.0}/s"),
                format!("{batch_64:.1} operations per commit; {durable_64}"),
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
            (
                "postgres, 64 callers, 1 host".into(),
                format!("{postgres_64:.0}/s"),
                format!(
                    "{:.2}x grouped sqlite, {:.2}x host (no goal); \
                     {postgres_batch_64:.1} operations per transaction",
                    report.postgres_over_sqlite_grouped_64, report.postgres_over_host_64
                ),
            ),
            (
                "postgres, 64 callers, 3 hosts".into(),
                format!("{postgres_3_hosts_64:.0}/s"),
                format!(
                    "{:.2}x grouped sqlite (no goal); \
                     {postgres_3_hosts_batch_64:.1} operations per transaction",
                    report.postgres_3_hosts_over_sqlite_grouped_64
                ),
            ),
        ],
    );
    println!(
        "  postgres {}: fsync={}, synchronous_commit={}, wal_sync_method={}",
        postgres_settings.server_version,
        postgres_settings.fsync,
        postgres_settings.synchronous_commit,
        postgres_settings.wal_sync_method
    );
    let path = crate::stats::write_report("ledger", &report)?;
    println!("\nwritten to {}", path.display());
    Ok(())
}
