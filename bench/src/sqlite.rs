//! The SQLite baselines of `bench ledger`: the same hold and settle, with
//! the same checks and the same rows (accounts, hold, journal, outbox event,
//! idempotency key), in WAL mode with `synchronous=FULL`. Two shapes:
//!
//! - naive: one connection per caller and one transaction per operation,
//!   callers contending on SQLite's lock (how a careful single-file ledger is
//!   usually built);
//! - grouped ([`GroupedSqlite`]): one connection behind the host's own
//!   group-commit writer, each operation in a savepoint of the shared
//!   transaction (a refused one rolls back alone), one commit per group:
//!   the honest baseline for the host's ledger, which does the same on redb.

use anyhow::Result;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use sandboxer_host::group_commit::GroupWriter;
use std::path::Path;
use std::time::Duration;

pub fn open(path: &Path) -> Result<Connection> {
    let connection = Connection::open(path)?;
    connection.busy_timeout(Duration::from_secs(60))?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    connection.execute_batch(
        "CREATE TABLE IF NOT EXISTS accounts(name TEXT PRIMARY KEY, debits_posted INTEGER NOT NULL DEFAULT 0,
            credits_posted INTEGER NOT NULL DEFAULT 0, debits_pending INTEGER NOT NULL DEFAULT 0,
            credits_pending INTEGER NOT NULL DEFAULT 0);
         CREATE TABLE IF NOT EXISTS holds(sandbox_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, amount INTEGER NOT NULL,
            state TEXT NOT NULL, expires_at INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS journal(seq INTEGER PRIMARY KEY AUTOINCREMENT, time_ms INTEGER, kind TEXT, debit TEXT,
            credit TEXT, amount INTEGER, key TEXT, tenant TEXT, sandbox_id TEXT);
         CREATE TABLE IF NOT EXISTS outbox(seq INTEGER PRIMARY KEY, event TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS keys(key TEXT PRIMARY KEY, receipt TEXT NOT NULL);",
    )?;
    Ok(connection)
}

fn add(transaction: &Connection, account: &str, column: &str, amount: i64) -> Result<()> {
    transaction.execute(
        "INSERT OR IGNORE INTO accounts(name) VALUES (?1)",
        params![account],
    )?;
    transaction.execute(
        &format!("UPDATE accounts SET {column} = {column} + ?2 WHERE name = ?1"),
        params![account, amount],
    )?;
    Ok(())
}

/// One journal row and its outbox event.
struct Entry<'a> {
    kind: &'a str,
    debit: &'a str,
    credit: &'a str,
    amount: i64,
    key: &'a str,
    tenant: &'a str,
    sandbox_id: &'a str,
}

fn journal(transaction: &Connection, entry: Entry) -> Result<()> {
    let Entry {
        kind,
        debit,
        credit,
        amount,
        key,
        tenant,
        sandbox_id,
    } = entry;
    transaction.execute(
        "INSERT INTO journal(time_ms, kind, debit, credit, amount, key, tenant, sandbox_id) VALUES (0, ?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![kind, debit, credit, amount, key, tenant, sandbox_id],
    )?;
    let seq = transaction.last_insert_rowid();
    let event = format!(
        r#"{{"specversion":"1.0","id":"bench-{seq}","type":"sandboxer.credits.{kind}","data":{{"amount":{amount},"tenant":"{tenant}","sandbox_id":"{sandbox_id}"}}}}"#
    );
    transaction.execute(
        "INSERT INTO outbox(seq, event) VALUES (?1, ?2)",
        params![seq, event],
    )?;
    Ok(())
}

pub fn grant(connection: &mut Connection, tenant: &str, amount: i64) -> Result<()> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    add(&transaction, "system:grants", "debits_posted", amount)?;
    add(
        &transaction,
        &format!("tenant:{tenant}"),
        "credits_posted",
        amount,
    )?;
    journal(
        &transaction,
        Entry {
            kind: "granted",
            debit: "system:grants",
            credit: &format!("tenant:{tenant}"),
            amount,
            key: "grant",
            tenant,
            sandbox_id: "",
        },
    )?;
    transaction.commit()?;
    Ok(())
}

pub fn hold(
    connection: &mut Connection,
    tenant: &str,
    amount: i64,
    sandbox_id: &str,
) -> Result<bool> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let held = hold_in(&transaction, tenant, amount, sandbox_id)?;
    transaction.commit()?;
    Ok(held)
}

/// A hold inside the caller's transaction; false when credits are short.
fn hold_in(transaction: &Connection, tenant: &str, amount: i64, sandbox_id: &str) -> Result<bool> {
    let key = format!("hold/{sandbox_id}");
    if transaction
        .query_row(
            "SELECT 1 FROM keys WHERE key = ?1",
            params![key],
            |_| Ok(()),
        )
        .optional()?
        .is_some()
    {
        return Ok(true);
    }
    let account = format!("tenant:{tenant}");
    let available: i64 = transaction
        .query_row(
            "SELECT credits_posted - debits_posted - debits_pending FROM accounts WHERE name = ?1",
            params![account],
            |row| row.get(0),
        )
        .optional()?
        .unwrap_or(0);
    if available < amount {
        return Ok(false);
    }
    transaction.execute(
        "INSERT INTO holds(sandbox_id, tenant, amount, state, expires_at) VALUES (?1, ?2, ?3, 'open', 0)",
        params![sandbox_id, tenant, amount],
    )?;
    add(transaction, &account, "debits_pending", amount)?;
    add(transaction, "system:holds", "credits_pending", amount)?;
    journal(
        transaction,
        Entry {
            kind: "held",
            debit: &account,
            credit: "system:holds",
            amount,
            key: &key,
            tenant,
            sandbox_id,
        },
    )?;
    transaction.execute(
        "INSERT INTO keys(key, receipt) VALUES (?1, ?2)",
        params![key, format!("held {amount}")],
    )?;
    Ok(true)
}

pub fn settle(connection: &mut Connection, sandbox_id: &str, actual: i64) -> Result<()> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    settle_in(&transaction, sandbox_id, actual)?;
    transaction.commit()?;
    Ok(())
}

/// A settle inside the caller's transaction.
fn settle_in(transaction: &Connection, sandbox_id: &str, actual: i64) -> Result<()> {
    let key = format!("settle/{sandbox_id}");
    if transaction
        .query_row(
            "SELECT 1 FROM keys WHERE key = ?1",
            params![key],
            |_| Ok(()),
        )
        .optional()?
        .is_some()
    {
        return Ok(());
    }
    let (tenant, amount): (String, i64) = transaction.query_row(
        "SELECT tenant, amount FROM holds WHERE sandbox_id = ?1 AND state = 'open'",
        params![sandbox_id],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    let account = format!("tenant:{tenant}");
    add(transaction, &account, "debits_pending", -amount)?;
    add(transaction, "system:holds", "credits_pending", -amount)?;
    journal(
        transaction,
        Entry {
            kind: "released",
            debit: &account,
            credit: "system:holds",
            amount,
            key: &key,
            tenant: &tenant,
            sandbox_id,
        },
    )?;
    add(transaction, &account, "debits_posted", actual)?;
    add(transaction, "revenue:saas-stub", "credits_posted", actual)?;
    journal(
        transaction,
        Entry {
            kind: "charged",
            debit: &account,
            credit: "revenue:saas-stub",
            amount: actual,
            key: &key,
            tenant: &tenant,
            sandbox_id,
        },
    )?;
    transaction.execute(
        "UPDATE holds SET state = 'settled' WHERE sandbox_id = ?1",
        params![sandbox_id],
    )?;
    transaction.execute(
        "INSERT INTO keys(key, receipt) VALUES (?1, ?2)",
        params![key, format!("charged {actual}")],
    )?;
    Ok(())
}

/// One operation for the grouped writer.
pub enum SqliteJob {
    Hold {
        tenant: String,
        amount: i64,
        sandbox_id: String,
    },
    Settle {
        sandbox_id: String,
        actual: i64,
    },
}

/// SQLite behind the host's group-commit writer: one connection, one
/// transaction per group of waiting callers.
pub struct GroupedSqlite {
    writer: GroupWriter<SqliteJob, Result<bool, String>>,
}

impl GroupedSqlite {
    pub fn open(path: &Path, max_group: usize) -> Result<Self> {
        let mut connection = open(path)?;
        let writer =
            GroupWriter::start("sqlite-writer", max_group, move |jobs: Vec<SqliteJob>| {
                commit_group(&mut connection, &jobs)
            })?;
        Ok(Self { writer })
    }

    /// Applies one operation durably: true, or false for a refused hold.
    pub fn submit(&self, job: SqliteJob) -> Result<bool> {
        self.writer
            .submit(job)
            .ok_or_else(|| anyhow::anyhow!("the SQLite writer stopped"))?
            .map_err(anyhow::Error::msg)
    }
}

/// One transaction for `jobs`, each in its own savepoint; a storage failure
/// fails the whole group, as it does in the host's writer.
fn commit_group(connection: &mut Connection, jobs: &[SqliteJob]) -> Vec<Result<bool, String>> {
    let all_failed =
        |error: &dyn std::fmt::Display| jobs.iter().map(|_| Err(error.to_string())).collect();
    let mut transaction = match connection.transaction_with_behavior(TransactionBehavior::Immediate)
    {
        Ok(transaction) => transaction,
        Err(error) => return all_failed(&error),
    };
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        let savepoint = match transaction.savepoint() {
            Ok(savepoint) => savepoint,
            Err(error) => return all_failed(&error),
        };
        let outcome = match job {
            SqliteJob::Hold {
                tenant,
                amount,
                sandbox_id,
            } => hold_in(&savepoint, tenant, *amount, sandbox_id),
            SqliteJob::Settle { sandbox_id, actual } => {
                settle_in(&savepoint, sandbox_id, *actual).map(|()| true)
            }
        };
        match outcome {
            Ok(held) => match savepoint.commit() {
                Ok(()) => results.push(Ok(held)),
                Err(error) => return all_failed(&error),
            },
            // Dropping the savepoint rolls this operation back alone.
            Err(error) => results.push(Err(format!("{error:#}"))),
        }
    }
    match transaction.commit() {
        Ok(()) => results,
        Err(error) => all_failed(&error),
    }
}
