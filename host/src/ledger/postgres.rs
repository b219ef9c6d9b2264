//! The ledger on PostgreSQL, shared by several hosts (`--store
//! postgres://…`): the same rules as the redb ledger, because the same code
//! applies every operation ([`Batch`] over [`Tables`]).
//!
//! How a batch commits:
//! 1. `BEGIN`, then `SELECT … FROM ledger_meta … FOR UPDATE`: the one lock
//!    every ledger writer of every host takes first. Writes apply one
//!    transaction after another, so a tenant's available credits are read
//!    and spent under the database's own lock, and journal sequence numbers
//!    are gap-free and committed in order (what `ledger verify` checks and
//!    the outbox cursors rely on).
//! 2. The rows the batch's operations will read are read ahead (holds, keys,
//!    accounts; open holds due, for an expiry). Under READ COMMITTED each
//!    statement sees every commit made before it, and no other writer can
//!    commit while the lock is held, so the rows are current.
//! 3. The operations run in memory over those rows. One that reads a row
//!    nobody read ahead stops the run with [`ApplyError::NotLoaded`]; the
//!    row is read and the whole batch runs again from the rows as read.
//! 4. Every changed row is written, the sequence counter moved, `COMMIT`.
//!
//! Each host groups its concurrent callers into one such transaction (its
//! own writer task), as the redb ledger's writer thread does.
//!
//! A lost connection fails the batch it was in (its callers get a storage
//! error and retry: the steps of a sandbox are idempotent by key, and so is
//! a grant given its key; a lost COMMIT says its outcome is unknown) and is
//! opened again on the next use.

use super::error::{LedgerError, storage};
use super::store::{ApplyError, Batch, Row, Tables, initial_ledger_id};
use super::types::*;
use super::verify::{self, VerifyReport, VerifySource};
use super::writer::{Job, MAX_BATCH, now_ms, run_job};
use super::{Joint, LedgerFuture, LedgerOptions, LedgerStore};
use crate::state_pg;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_postgres::{Client, NoTls, Statement, Transaction};

/// The schema, in order; each runs once, recorded in `sandboxer_migrations`.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_ledger",
        include_str!("../../migrations/postgres/0001_ledger.sql"),
    ),
    (
        "0002_state",
        include_str!("../../migrations/postgres/0002_state.sql"),
    ),
];

/// Taken (for one transaction) while migrations run, so that hosts starting
/// together apply each migration once.
const MIGRATION_LOCK: i64 = 0x5341_4e44_424f_5845; // "SANDBOXE"

const DEFAULT_CREDITS_KEY: &str = "grant/default-credits";

fn pg(error: tokio_postgres::Error) -> LedgerError {
    storage(format!("PostgreSQL: {}", describe(&error)))
}

/// A client error with the database's own words when it has them
/// (tokio-postgres shows a server error as just "db error").
pub(crate) fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => match std::error::Error::source(error) {
            Some(source) => format!("{error}: {source}"),
            None => error.to_string(),
        },
    }
}

/// A PostgreSQL address as it may be shown: without its password.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "the PostgreSQL store".into(),
    }
}

/// One connection, opened again after it is lost.
struct Connection {
    url: String,
    client: Mutex<Option<Arc<Client>>>,
}

impl Connection {
    fn with(url: &str, client: Client) -> Self {
        Self {
            url: url.to_string(),
            client: Mutex::new(Some(Arc::new(client))),
        }
    }

    async fn get(&self) -> Result<Arc<Client>, LedgerError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref()
            && !client.is_closed()
        {
            return Ok(client.clone());
        }
        let client = Arc::new(connect(&self.url).await?);
        *slot = Some(client.clone());
        Ok(client)
    }
}

/// How long a connection attempt may take before the operation fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Each session's limits, so that one stuck host cannot stop the others: a
/// writer waits at most `lock_timeout` for the ledger lock (its callers get
/// an error and retry), and PostgreSQL ends a session that sits idle inside
/// a transaction (a frozen or partitioned host holding the lock) after
/// `idle_in_transaction_session_timeout`, which releases the lock.
const SESSION_SETTINGS: &str =
    "SET lock_timeout = '10s'; SET idle_in_transaction_session_timeout = '30s'";

pub(crate) async fn connect(url: &str) -> Result<Client, LedgerError> {
    let unreachable = |error: &dyn std::fmt::Display| {
        storage(format!(
            "cannot reach the PostgreSQL store at {}: {error}",
            redacted(url)
        ))
    };
    let mut config: tokio_postgres::Config = url.parse().map_err(|error| unreachable(&error))?;
    if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err(storage(format!(
            "{} asks for sslmode=require, but sandboxer-host connects to PostgreSQL without TLS: \
             reach it over a private network or a tunnel, and drop sslmode=require",
            redacted(url)
        )));
    }
    config
        .connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|error| unreachable(&describe(&error)))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!("PostgreSQL connection closed: {error}");
        }
    });
    client
        .batch_execute(SESSION_SETTINGS)
        .await
        .map_err(|error| unreachable(&describe(&error)))?;
    Ok(client)
}

type Reply = oneshot::Sender<Result<Receipt, LedgerError>>;

/// The ledger in a PostgreSQL database.
pub struct PgLedger {
    url: String,
    reads: Connection,
    writer: mpsc::UnboundedSender<(Job, Option<Joint>, Reply)>,
}

impl PgLedger {
    /// Connects, applies the migrations this host knows that the database
    /// lacks, and starts the writer task (on the current tokio runtime).
    pub async fn connect(url: &str, options: LedgerOptions) -> Result<Self, LedgerError> {
        let mut client = connect(url).await?;
        migrate(&mut client).await?;
        let (writer, jobs) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(url.to_string(), jobs, options.default_credits));
        let ledger = Self {
            url: url.to_string(),
            reads: Connection::with(url, client),
            writer,
        };
        if options.expire_on_open {
            let now = now_ms();
            if ledger.due(now).await? {
                ledger.submit(Operation::ExpireDue { now_ms: now }).await?;
            }
        }
        Ok(ledger)
    }

    async fn send(&self, job: Job) -> Result<Receipt, LedgerError> {
        self.send_with(job, None).await
    }

    async fn send_with(&self, job: Job, joint: Option<Joint>) -> Result<Receipt, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send((job, joint, reply))
            .map_err(|_| LedgerError::WriterStopped)?;
        answer.await.map_err(|_| LedgerError::WriterStopped)?
    }

    async fn client(&self) -> Result<Arc<Client>, LedgerError> {
        self.reads.get().await
    }

    async fn due(&self, now_ms: u64) -> Result<bool, LedgerError> {
        Ok(self
            .client()
            .await?
            .query_opt(
                "SELECT 1 FROM ledger_holds WHERE state = 'open' AND expires_at_ms <= $1 LIMIT 1",
                &[&to_i64(now_ms)?],
            )
            .await
            .map_err(pg)?
            .is_some())
    }

    async fn has_key(&self, key: &str) -> Result<bool, LedgerError> {
        Ok(self
            .client()
            .await?
            .query_opt("SELECT 1 FROM ledger_keys WHERE key = $1", &[&key])
            .await
            .map_err(pg)?
            .is_some())
    }

    async fn totals(&self, account: &str) -> Result<AccountTotals, LedgerError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {TOTALS} FROM ledger_accounts WHERE account = $1"),
                &[&account],
            )
            .await
            .map_err(pg)?;
        row.map(|row| totals_from(&row, 0))
            .transpose()
            .map(Option::unwrap_or_default)
    }

    async fn json_rows<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<T>, LedgerError> {
        let rows = self.client().await?.query(sql, params).await.map_err(pg)?;
        rows.iter()
            .map(|row| serde_json::from_str(row.get::<_, &str>(0)).map_err(storage))
            .collect()
    }
}

/// The account columns, as text (numeric → u64 exactly).
const TOTALS: &str = "debits_posted::text, credits_posted::text, debits_pending::text, \
                      credits_pending::text, overrun::text";

fn totals_from(row: &tokio_postgres::Row, first: usize) -> Result<AccountTotals, LedgerError> {
    let field = |index: usize| -> Result<u64, LedgerError> {
        let text: &str = row.get(first + index);
        text.parse()
            .map_err(|_| storage(format!("an account total `{text}` is not a u64")))
    };
    Ok(AccountTotals {
        debits_posted: field(0)?,
        credits_posted: field(1)?,
        debits_pending: field(2)?,
        credits_pending: field(3)?,
        overrun: field(4)?,
    })
}

/// A stored sequence number (bigint) as the u64 it was written from.
fn seq(stored: i64) -> Result<u64, LedgerError> {
    u64::try_from(stored)
        .map_err(|_| storage(format!("a stored sequence number is negative: {stored}")))
}

fn to_i64(value: u64) -> Result<i64, LedgerError> {
    i64::try_from(value).map_err(|_| storage(format!("{value} does not fit PostgreSQL's bigint")))
}

fn limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

async fn migrate(client: &mut Client) -> Result<(), LedgerError> {
    // Everything under the lock, the migrations table too: hosts starting
    // together on an empty database would otherwise race to create it.
    let transaction = client.transaction().await.map_err(pg)?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    transaction
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS sandboxer_migrations (
                 name text PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(pg)?;
    for (name, sql) in MIGRATIONS {
        let done = transaction
            .query_opt(
                "SELECT 1 FROM sandboxer_migrations WHERE name = $1",
                &[name],
            )
            .await
            .map_err(pg)?
            .is_some();
        if !done {
            transaction
                .batch_execute(sql)
                .await
                .map_err(|error| storage(format!("PostgreSQL migration {name} failed: {error}")))?;
            transaction
                .execute(
                    "INSERT INTO sandboxer_migrations (name) VALUES ($1)",
                    &[name],
                )
                .await
                .map_err(pg)?;
        }
    }
    transaction
        .execute(
            "INSERT INTO ledger_meta (id, ledger_id, next_seq) VALUES (1, $1, 1) \
             ON CONFLICT (id) DO NOTHING",
            &[&initial_ledger_id()],
        )
        .await
        .map_err(pg)?;
    transaction.commit().await.map_err(pg)
}

// ---- the writer ----

/// The writer's statements, prepared once per connection: a batch then
/// costs one round trip per step instead of a parse and an execute each.
struct Statements {
    lock_meta: Statement,
    read_holds: Statement,
    read_keys: Statement,
    read_accounts: Statement,
    read_due: Statement,
    upsert_accounts: Statement,
    upsert_holds: Statement,
    insert_keys: Statement,
    insert_journal: Statement,
    insert_outbox: Statement,
    update_meta: Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Self, LedgerError> {
        let prepare = |sql: String| async move { client.prepare(&sql).await.map_err(pg) };
        Ok(Self {
            lock_meta: prepare(
                "SELECT ledger_id, next_seq FROM ledger_meta WHERE id = 1 FOR UPDATE".into(),
            )
            .await?,
            read_holds: prepare(
                "SELECT record FROM ledger_holds WHERE sandbox_id = ANY($1)".into(),
            )
            .await?,
            read_keys: prepare("SELECT key, stored FROM ledger_keys WHERE key = ANY($1)".into())
                .await?,
            read_accounts: prepare(format!(
                "SELECT account, {TOTALS} FROM ledger_accounts WHERE account = ANY($1)"
            ))
            .await?,
            read_due: prepare(
                "SELECT record FROM ledger_holds WHERE state = 'open' AND expires_at_ms <= $1"
                    .into(),
            )
            .await?,
            upsert_accounts: prepare(
                "INSERT INTO ledger_accounts (account, debits_posted, credits_posted, \
                     debits_pending, credits_pending, overrun) \
                 SELECT a, dp::numeric, cp::numeric, dq::numeric, cq::numeric, o::numeric \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) \
                     AS t(a, dp, cp, dq, cq, o) \
                 ON CONFLICT (account) DO UPDATE SET \
                     debits_posted = EXCLUDED.debits_posted, \
                     credits_posted = EXCLUDED.credits_posted, \
                     debits_pending = EXCLUDED.debits_pending, \
                     credits_pending = EXCLUDED.credits_pending, \
                     overrun = EXCLUDED.overrun"
                    .into(),
            )
            .await?,
            upsert_holds: prepare(
                "INSERT INTO ledger_holds (sandbox_id, state, expires_at_ms, record) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[]) \
                 ON CONFLICT (sandbox_id) DO UPDATE SET state = EXCLUDED.state, \
                     expires_at_ms = EXCLUDED.expires_at_ms, record = EXCLUDED.record"
                    .into(),
            )
            .await?,
            insert_keys: prepare(
                "INSERT INTO ledger_keys (key, stored) SELECT * FROM UNNEST($1::text[], $2::text[])"
                    .into(),
            )
            .await?,
            insert_journal: prepare(
                "INSERT INTO ledger_journal (seq, tenant, entry) \
                 SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[])"
                    .into(),
            )
            .await?,
            insert_outbox: prepare(
                "INSERT INTO ledger_outbox (seq, event) SELECT * FROM UNNEST($1::bigint[], $2::text[])"
                    .into(),
            )
            .await?,
            update_meta: prepare("UPDATE ledger_meta SET next_seq = $1 WHERE id = 1".into())
                .await?,
        })
    }
}

async fn write_loop(
    url: String,
    mut jobs: mpsc::UnboundedReceiver<(Job, Option<Joint>, Reply)>,
    default_credits: u64,
) {
    // The writer's own connection (a transaction needs `&mut Client`),
    // opened again when lost.
    let mut connection: Option<(Client, Statements)> = None;
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut batch_jobs = Vec::with_capacity(batch.len());
        let mut joints = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for (job, joint, reply) in batch {
            batch_jobs.push(job);
            joints.push(joint);
            replies.push(reply);
        }
        if connection
            .as_ref()
            .is_some_and(|(client, _)| client.is_closed())
        {
            connection = None;
        }
        if connection.is_none() {
            let connected = async {
                let client = connect(&url).await?;
                let statements = Statements::prepare(&client).await?;
                Ok::<_, LedgerError>((client, statements))
            };
            match connected.await {
                Ok(opened) => connection = Some(opened),
                Err(error) => {
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                    continue;
                }
            }
        }
        let (client, statements) = connection.as_mut().expect("connected above");
        let results = commit_batch(client, statements, &batch_jobs, joints, default_credits).await;
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

fn all_failed(jobs: &[Job], error: LedgerError) -> Vec<Result<Receipt, LedgerError>> {
    jobs.iter().map(|_| Err(error.clone())).collect()
}

async fn commit_batch(
    client: &mut Client,
    statements: &Statements,
    jobs: &[Job],
    joints: Vec<Option<Joint>>,
    default_credits: u64,
) -> Vec<Result<Receipt, LedgerError>> {
    let transaction = match client.transaction().await {
        Ok(transaction) => transaction,
        Err(error) => return all_failed(jobs, pg(error)),
    };
    match apply_batch(&transaction, statements, jobs, joints, default_credits).await {
        Ok(results) => match transaction.commit().await {
            Ok(()) => results,
            Err(error) => all_failed(
                jobs,
                storage(format!(
                    "PostgreSQL: the commit's outcome is unknown ({}): it may have been \
                     applied. Repeating a step of a sandbox, or a grant with its --key, is safe; \
                     check `credits history` before repeating a `credits add` without --key",
                    describe(&error)
                )),
            ),
        },
        Err(error) => {
            let _ = transaction.rollback().await;
            all_failed(jobs, error)
        }
    }
}

/// Runs the batch inside `transaction`; an error abandons all of it.
async fn apply_batch(
    transaction: &Transaction<'_>,
    statements: &Statements,
    jobs: &[Job],
    joints: Vec<Option<Joint>>,
    default_credits: u64,
) -> Result<Vec<Result<Receipt, LedgerError>>, LedgerError> {
    let meta = transaction
        .query_one(&statements.lock_meta, &[])
        .await
        .map_err(pg)?;
    let ledger_id: String = meta.get(0);
    let next_seq = seq(meta.get(1))?;
    let now = now_ms();

    // Operations that go with a record: the state's lock next (always after
    // the ledger's), then their records; one another host owns now is
    // refused before it runs.
    let mut joint_state = None;
    let mut fenced: HashMap<usize, String> = HashMap::new();
    if joints.iter().any(Option::is_some) {
        let outbox = state_pg::Outbox::lock(transaction).await.map_err(storage)?;
        let mut by_owner: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
        for (index, joint) in joints.iter().enumerate() {
            if let Some(joint) = joint {
                by_owner
                    .entry(joint.owner.host_id.clone())
                    .or_default()
                    .push((index, joint.record_id.clone()));
            }
        }
        for (owner, records) in by_owner {
            let ids: Vec<String> = records.iter().map(|(_, id)| id.clone()).collect();
            let others: HashMap<String, String> = state_pg::lock_records(transaction, &ids, &owner)
                .await
                .map_err(storage)?
                .into_iter()
                .collect();
            for (index, id) in records {
                if let Some(holder) = others.get(&id) {
                    fenced.insert(
                        index,
                        state_pg::SharedWriteError::Fenced {
                            id,
                            owner: holder.clone(),
                        }
                        .to_string(),
                    );
                }
            }
        }
        joint_state = Some(outbox);
    }

    let mut rows = ReadAhead::default();
    let mut wanted = wanted_rows(jobs);
    if let Some(due_at) = jobs
        .iter()
        .filter_map(|job| match job {
            Job::Apply(Operation::ExpireDue { now_ms }) => Some(*now_ms),
            _ => None,
        })
        .max()
    {
        rows.read_due(transaction, statements, due_at).await?;
        for hold in rows.holds.values().flatten() {
            wanted.insert(Row::Account(tenant_account(&hold.tenant)));
        }
    }
    loop {
        rows.read(transaction, statements, &mut wanted).await?;
        let mut batch = Batch::new(
            MemTables::new(&rows),
            ledger_id.clone(),
            next_seq,
            now,
            default_credits,
        );
        let mut results = Vec::with_capacity(jobs.len());
        let mut missing = None;
        for (index, job) in jobs.iter().enumerate() {
            if let Some(why) = fenced.get(&index) {
                results.push(Err(LedgerError::Fenced(why.clone())));
                continue;
            }
            match run_job(&mut batch, job) {
                Ok(receipt) => results.push(Ok(receipt)),
                Err(ApplyError::Refused(error)) => results.push(Err(error)),
                Err(ApplyError::Fatal(error)) => return Err(error),
                Err(ApplyError::NotLoaded(row)) => {
                    missing = Some(row);
                    break;
                }
            }
        }
        if let Some(row) = missing {
            wanted.insert(row);
            continue;
        }
        let (tables, next_seq) = batch.into_parts();
        tables.write(transaction, statements, next_seq).await?;
        if let Some(mut outbox) = joint_state {
            for ((joint, result), index) in joints.into_iter().zip(&results).zip(0..) {
                let Some(joint) = joint else { continue };
                if fenced.contains_key(&index) {
                    continue;
                }
                if let Some(write) = (joint.then)(result) {
                    // The record is locked and this host's (checked above):
                    // the write cannot be fenced.
                    state_pg::apply_write(transaction, &joint.owner, &mut outbox, write)
                        .await
                        .map_err(storage)?
                        .map_err(|error| storage(error.to_string()))?;
                }
            }
            outbox.save(transaction).await.map_err(storage)?;
        }
        return Ok(results);
    }
}

/// The rows a batch's operations are known to read before they run.
fn wanted_rows(jobs: &[Job]) -> HashSet<Row> {
    let mut wanted = HashSet::new();
    wanted.insert(Row::Key(DEFAULT_CREDITS_KEY.into()));
    wanted.insert(Row::Account(GRANTS_ACCOUNT.into()));
    wanted.insert(Row::Account(HOLDS_ACCOUNT.into()));
    wanted.insert(Row::Account(tenant_account(DEFAULT_TENANT)));
    for job in jobs {
        let Job::Apply(operation) = job else {
            continue;
        };
        if let Some(key) = operation.key() {
            wanted.insert(Row::Key(key));
        }
        match operation {
            Operation::Grant { tenant, .. } => {
                wanted.insert(Row::Account(tenant_account(tenant)));
            }
            Operation::Hold {
                tenant, sandbox_id, ..
            } => {
                wanted.insert(Row::Account(tenant_account(tenant)));
                wanted.insert(Row::Hold(sandbox_id.clone()));
            }
            Operation::Settle { sandbox_id, .. }
            | Operation::Void { sandbox_id, .. }
            | Operation::Extend { sandbox_id, .. } => {
                wanted.insert(Row::Hold(sandbox_id.clone()));
            }
            Operation::ExpireDue { .. } => {}
        }
    }
    wanted
}

/// The rows of `statement` for `names` (none asked: no round trip).
async fn read_rows(
    transaction: &Transaction<'_>,
    statement: &Statement,
    names: &[String],
) -> Result<Vec<tokio_postgres::Row>, LedgerError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    transaction.query(statement, &[&names]).await.map_err(pg)
}

/// Rows read from PostgreSQL for one batch; `None`: read, and absent.
#[derive(Default)]
struct ReadAhead {
    accounts: HashMap<String, Option<AccountTotals>>,
    holds: HashMap<String, Option<HoldRecord>>,
    keys: HashMap<String, Option<String>>,
    /// (expires at, sandbox id) of every open hold read.
    expiry: BTreeSet<(u64, String)>,
}

impl ReadAhead {
    /// Reads every wanted row not read yet, then the accounts of the holds
    /// read (a settle credits its hold's extension), until nothing is left.
    async fn read(
        &mut self,
        transaction: &Transaction<'_>,
        statements: &Statements,
        wanted: &mut HashSet<Row>,
    ) -> Result<(), LedgerError> {
        loop {
            let mut holds = Vec::new();
            let mut keys = Vec::new();
            let mut accounts = Vec::new();
            for row in wanted.drain() {
                match row {
                    Row::Hold(id) if !self.holds.contains_key(&id) => holds.push(id),
                    Row::Key(key) if !self.keys.contains_key(&key) => keys.push(key),
                    Row::Account(name) if !self.accounts.contains_key(&name) => accounts.push(name),
                    _ => {}
                }
            }
            if holds.is_empty() && keys.is_empty() && accounts.is_empty() {
                return Ok(());
            }
            // The three reads go out together (pipelined on the connection).
            let (found_holds, found_keys, found_accounts) = futures_util::future::try_join3(
                read_rows(transaction, &statements.read_holds, &holds),
                read_rows(transaction, &statements.read_keys, &keys),
                read_rows(transaction, &statements.read_accounts, &accounts),
            )
            .await?;
            for id in holds {
                self.holds.insert(id, None);
            }
            for key in keys {
                self.keys.insert(key, None);
            }
            for account in accounts {
                self.accounts.insert(account, None);
            }
            for row in found_holds {
                let record: HoldRecord =
                    serde_json::from_str(row.get::<_, &str>(0)).map_err(storage)?;
                wanted.insert(Row::Account(tenant_account(&record.tenant)));
                wanted.insert(Row::Account(revenue_account(&record.extension)));
                self.add_hold(record);
            }
            for row in found_keys {
                self.keys.insert(row.get(0), Some(row.get(1)));
            }
            for row in found_accounts {
                self.accounts
                    .insert(row.get(0), Some(totals_from(&row, 1)?));
            }
        }
    }

    /// Reads every open hold due at `now_ms` (an expiry's scan).
    async fn read_due(
        &mut self,
        transaction: &Transaction<'_>,
        statements: &Statements,
        now_ms: u64,
    ) -> Result<(), LedgerError> {
        let found = transaction
            .query(&statements.read_due, &[&to_i64(now_ms)?])
            .await
            .map_err(pg)?;
        for row in found {
            let record: HoldRecord =
                serde_json::from_str(row.get::<_, &str>(0)).map_err(storage)?;
            self.add_hold(record);
        }
        Ok(())
    }

    fn add_hold(&mut self, record: HoldRecord) {
        if record.state == HoldState::Open {
            self.expiry
                .insert((record.expires_at_ms, record.sandbox_id.clone()));
        }
        self.holds.insert(record.sandbox_id.clone(), Some(record));
    }
}

/// The rows of one run of a batch: what was read ahead, and what the run
/// changed (written at the end if the run completes).
struct MemTables<'a> {
    read: &'a ReadAhead,
    accounts: HashMap<String, AccountTotals>,
    holds: HashMap<String, HoldRecord>,
    keys: BTreeMap<String, String>,
    expiry: BTreeSet<(u64, String)>,
    appended: Vec<(JournalEntry, String, String)>,
}

impl<'a> MemTables<'a> {
    fn new(read: &'a ReadAhead) -> Self {
        Self {
            read,
            accounts: HashMap::new(),
            holds: HashMap::new(),
            keys: BTreeMap::new(),
            expiry: read.expiry.clone(),
            appended: Vec::new(),
        }
    }

    /// Writes what the run changed; the statements go out together
    /// (pipelined), each table's rows as one array.
    async fn write(
        self,
        transaction: &Transaction<'_>,
        statements: &Statements,
        next_seq: u64,
    ) -> Result<(), LedgerError> {
        let mut names = Vec::new();
        let mut columns: [Vec<String>; 5] = Default::default();
        for (name, totals) in &self.accounts {
            names.push(name.clone());
            for (column, value) in columns.iter_mut().zip([
                totals.debits_posted,
                totals.credits_posted,
                totals.debits_pending,
                totals.credits_pending,
                totals.overrun,
            ]) {
                column.push(value.to_string());
            }
        }
        let mut ids = Vec::new();
        let mut states = Vec::new();
        let mut expiries = Vec::new();
        let mut records = Vec::new();
        for (id, record) in &self.holds {
            ids.push(id.clone());
            states.push(hold_state_name(record.state));
            expiries.push(to_i64(record.expires_at_ms)?);
            records.push(serde_json::to_string(record).map_err(storage)?);
        }
        let (keys, stored): (Vec<String>, Vec<String>) = self.keys.into_iter().unzip();
        let mut seqs = Vec::new();
        let mut tenants = Vec::new();
        let mut entries = Vec::new();
        let mut events = Vec::new();
        for (entry, entry_json, event_json) in self.appended {
            seqs.push(to_i64(entry.seq)?);
            tenants.push(entry.tenant);
            entries.push(entry_json);
            events.push(event_json);
        }
        let next_seq = to_i64(next_seq)?;

        type Write<'a> = std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>,
        >;
        let mut writes: Vec<Write<'_>> = Vec::new();
        if !names.is_empty() {
            writes.push(Box::pin(async {
                transaction
                    .execute(
                        &statements.upsert_accounts,
                        &[
                            &names,
                            &columns[0],
                            &columns[1],
                            &columns[2],
                            &columns[3],
                            &columns[4],
                        ],
                    )
                    .await
            }));
        }
        if !ids.is_empty() {
            writes.push(Box::pin(async {
                transaction
                    .execute(
                        &statements.upsert_holds,
                        &[&ids, &states, &expiries, &records],
                    )
                    .await
            }));
        }
        if !keys.is_empty() {
            writes.push(Box::pin(async {
                transaction
                    .execute(&statements.insert_keys, &[&keys, &stored])
                    .await
            }));
        }
        if !seqs.is_empty() {
            writes.push(Box::pin(async {
                transaction
                    .execute(&statements.insert_journal, &[&seqs, &tenants, &entries])
                    .await
            }));
            writes.push(Box::pin(async {
                transaction
                    .execute(&statements.insert_outbox, &[&seqs, &events])
                    .await
            }));
        }
        writes.push(Box::pin(async {
            transaction
                .execute(&statements.update_meta, &[&next_seq])
                .await
        }));
        futures_util::future::try_join_all(writes)
            .await
            .map_err(pg)?;
        Ok(())
    }
}

impl Tables for MemTables<'_> {
    fn account(&self, account: &str) -> Result<Option<AccountTotals>, ApplyError> {
        if let Some(totals) = self.accounts.get(account) {
            return Ok(Some(*totals));
        }
        match self.read.accounts.get(account) {
            Some(totals) => Ok(*totals),
            None => Err(ApplyError::NotLoaded(Row::Account(account.into()))),
        }
    }

    fn put_account(&mut self, account: &str, totals: &AccountTotals) -> Result<(), ApplyError> {
        self.accounts.insert(account.into(), *totals);
        Ok(())
    }

    fn hold(&self, sandbox_id: &str) -> Result<Option<HoldRecord>, ApplyError> {
        if let Some(record) = self.holds.get(sandbox_id) {
            return Ok(Some(record.clone()));
        }
        match self.read.holds.get(sandbox_id) {
            Some(record) => Ok(record.clone()),
            None => Err(ApplyError::NotLoaded(Row::Hold(sandbox_id.into()))),
        }
    }

    fn put_hold(&mut self, record: &HoldRecord) -> Result<(), ApplyError> {
        self.holds.insert(record.sandbox_id.clone(), record.clone());
        Ok(())
    }

    fn due_holds(&self, now_ms: u64) -> Result<Vec<String>, ApplyError> {
        Ok(self
            .expiry
            .iter()
            .take_while(|(expires, _)| *expires <= now_ms)
            .map(|(_, id)| id.clone())
            .collect())
    }

    fn move_expiry(
        &mut self,
        sandbox_id: &str,
        from: Option<u64>,
        to: Option<u64>,
    ) -> Result<(), ApplyError> {
        // The row's own state and expiry carry this in PostgreSQL; the set
        // only answers `due_holds` within the batch.
        if let Some(from) = from {
            self.expiry.remove(&(from, sandbox_id.to_string()));
        }
        if let Some(to) = to {
            self.expiry.insert((to, sandbox_id.to_string()));
        }
        Ok(())
    }

    fn key(&self, key: &str) -> Result<Option<String>, ApplyError> {
        if let Some(stored) = self.keys.get(key) {
            return Ok(Some(stored.clone()));
        }
        match self.read.keys.get(key) {
            Some(stored) => Ok(stored.clone()),
            None => Err(ApplyError::NotLoaded(Row::Key(key.into()))),
        }
    }

    fn put_key(&mut self, key: &str, stored_json: &str) -> Result<(), ApplyError> {
        self.keys.insert(key.into(), stored_json.into());
        Ok(())
    }

    fn append(
        &mut self,
        entry: &JournalEntry,
        entry_json: &str,
        event_json: &str,
    ) -> Result<(), ApplyError> {
        self.appended
            .push((entry.clone(), entry_json.into(), event_json.into()));
        Ok(())
    }
}

// ---- verify ----

/// The whole ledger, read in one REPEATABLE READ transaction.
struct Snapshot {
    ledger_id: String,
    next_seq: u64,
    journal: Vec<(u64, String)>,
    /// Each journal entry's `tenant` column (seq, tenant): the index
    /// `history` and `knows_tenant` read.
    journal_tenants: Vec<(u64, String)>,
    outbox: HashMap<u64, String>,
    accounts: Vec<(String, AccountTotals)>,
    holds: Vec<(String, String)>,
    /// Each hold's `state` and `expires_at_ms` columns: what the expiry
    /// scan and `open_holds` read.
    hold_columns: HashMap<String, (String, i64)>,
}

impl Snapshot {
    /// PostgreSQL's own copies of JSON fields (the columns the queries
    /// read) must say what the JSON says.
    fn copy_violations(&self) -> Vec<verify::Violation> {
        let mut violations = Vec::new();
        let mut violation = |message: String| {
            violations.push(verify::Violation {
                check: "copy",
                message,
            })
        };
        for ((seq, json), (_, tenant)) in self.journal.iter().zip(&self.journal_tenants) {
            if let Ok(entry) = serde_json::from_str::<JournalEntry>(json)
                && &entry.tenant != tenant
            {
                violation(format!(
                    "journal entry {seq} is `{}`'s but its tenant column says `{tenant}`",
                    entry.tenant
                ));
            }
        }
        for (id, json) in &self.holds {
            let Ok(record) = serde_json::from_str::<HoldRecord>(json) else {
                continue;
            };
            let (state, expires) = &self.hold_columns[id];
            if *state != hold_state_name(record.state)
                || i64::try_from(record.expires_at_ms).ok() != Some(*expires)
            {
                violation(format!(
                    "hold {id} is {:?} until {} but its columns say {state} until {expires}",
                    record.state, record.expires_at_ms
                ));
            }
        }
        violations
    }
}

/// A hold state as the `state` column keeps it (its JSON name).
fn hold_state_name(state: HoldState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|value| value.as_str().map(str::to_string))
        .unwrap_or_default()
}

impl VerifySource for Snapshot {
    fn ledger_id(&self) -> Result<String, LedgerError> {
        Ok(self.ledger_id.clone())
    }

    fn next_seq(&self) -> Result<u64, LedgerError> {
        Ok(self.next_seq)
    }

    fn journal(
        &self,
        visit: &mut dyn FnMut(u64, &str) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError> {
        for (seq, json) in &self.journal {
            visit(*seq, json)?;
        }
        Ok(())
    }

    fn outbox_event(&self, seq: u64) -> Result<Option<String>, LedgerError> {
        Ok(self.outbox.get(&seq).cloned())
    }

    fn accounts(&self, visit: &mut dyn FnMut(&str, AccountTotals)) -> Result<(), LedgerError> {
        for (account, totals) in &self.accounts {
            visit(account, *totals);
        }
        Ok(())
    }

    fn holds(&self, visit: &mut dyn FnMut(&str, &str)) -> Result<(), LedgerError> {
        for (id, json) in &self.holds {
            visit(id, json);
        }
        Ok(())
    }
}

impl PgLedger {
    async fn snapshot(&self) -> Result<Snapshot, LedgerError> {
        // A connection of its own: a REPEATABLE READ transaction on the
        // shared read connection would hold other readers' queries in it.
        let mut client = connect(&self.url).await?;
        let transaction = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg)?;
        let meta = transaction
            .query_opt(
                "SELECT ledger_id, next_seq FROM ledger_meta WHERE id = 1",
                &[],
            )
            .await
            .map_err(pg)?;
        let (ledger_id, next_seq) = match meta {
            Some(row) => (row.get::<_, String>(0), seq(row.get(1))?),
            None => (String::new(), 1),
        };
        let mut journal = Vec::new();
        let mut journal_tenants = Vec::new();
        for row in transaction
            .query(
                "SELECT seq, entry, tenant FROM ledger_journal ORDER BY seq",
                &[],
            )
            .await
            .map_err(pg)?
        {
            let at = seq(row.get(0))?;
            journal.push((at, row.get::<_, String>(1)));
            journal_tenants.push((at, row.get::<_, String>(2)));
        }
        let outbox = transaction
            .query("SELECT seq, event FROM ledger_outbox", &[])
            .await
            .map_err(pg)?
            .iter()
            .map(|row| Ok((seq(row.get(0))?, row.get::<_, String>(1))))
            .collect::<Result<_, LedgerError>>()?;
        let mut accounts = Vec::new();
        for row in transaction
            .query(
                &format!("SELECT account, {TOTALS} FROM ledger_accounts ORDER BY account"),
                &[],
            )
            .await
            .map_err(pg)?
        {
            accounts.push((row.get::<_, String>(0), totals_from(&row, 1)?));
        }
        let mut holds = Vec::new();
        let mut hold_columns = HashMap::new();
        for row in transaction
            .query(
                "SELECT sandbox_id, record, state, expires_at_ms FROM ledger_holds",
                &[],
            )
            .await
            .map_err(pg)?
        {
            let id: String = row.get(0);
            hold_columns.insert(id.clone(), (row.get::<_, String>(2), row.get::<_, i64>(3)));
            holds.push((id, row.get::<_, String>(1)));
        }
        transaction.commit().await.map_err(pg)?;
        Ok(Snapshot {
            ledger_id,
            next_seq,
            journal,
            journal_tenants,
            outbox,
            accounts,
            holds,
            hold_columns,
        })
    }
}

impl LedgerStore for PgLedger {
    fn location(&self) -> String {
        redacted(&self.url)
    }

    fn shared(&self) -> bool {
        true
    }

    fn submit(&self, operation: Operation) -> LedgerFuture<'_, Receipt> {
        Box::pin(self.send(Job::Apply(operation)))
    }

    fn joint_commits(&self) -> bool {
        true
    }

    fn submit_joint(&self, operation: Operation, joint: Joint) -> LedgerFuture<'_, Receipt> {
        Box::pin(self.send_with(Job::Apply(operation), Some(joint)))
    }

    fn summary<'a>(&'a self, tenant: &'a str) -> LedgerFuture<'a, TenantSummary> {
        Box::pin(async move {
            check_name("tenant", tenant).map_err(LedgerError::InvalidInput)?;
            if tenant == DEFAULT_TENANT && !self.has_key(DEFAULT_CREDITS_KEY).await? {
                self.send(Job::EnsureDefaultCredits).await?;
            }
            let totals = self.totals(&tenant_account(tenant)).await?;
            Ok(TenantSummary::from_totals(tenant, &totals))
        })
    }

    fn knows_tenant<'a>(&'a self, tenant: &'a str) -> LedgerFuture<'a, bool> {
        Box::pin(async move {
            if tenant == DEFAULT_TENANT {
                return Ok(true);
            }
            Ok(self
                .client()
                .await?
                .query_opt(
                    "SELECT 1 FROM ledger_journal WHERE tenant = $1 LIMIT 1",
                    &[&tenant],
                )
                .await
                .map_err(pg)?
                .is_some())
        })
    }

    fn tenant_names(&self) -> LedgerFuture<'_, Vec<String>> {
        Box::pin(async move {
            let rows = self
                .client()
                .await?
                .query(
                    "SELECT substr(account, 8) FROM ledger_accounts \
                     WHERE account LIKE 'tenant:%' ORDER BY account COLLATE \"C\"",
                    &[],
                )
                .await
                .map_err(pg)?;
            Ok(rows.iter().map(|row| row.get(0)).collect())
        })
    }

    fn account_totals<'a>(&'a self, account: &'a str) -> LedgerFuture<'a, AccountTotals> {
        Box::pin(self.totals(account))
    }

    fn revenue_total(&self) -> LedgerFuture<'_, u64> {
        Box::pin(async move {
            let rows = self
                .client()
                .await?
                .query(
                    "SELECT credits_posted::text FROM ledger_accounts WHERE account LIKE 'revenue:%'",
                    &[],
                )
                .await
                .map_err(pg)?;
            let mut total = 0u64;
            for row in rows {
                let text: &str = row.get(0);
                let value: u64 = text.parse().map_err(storage)?;
                total = total.saturating_add(value);
            }
            Ok(total)
        })
    }

    fn outbox_last_seq(&self) -> LedgerFuture<'_, u64> {
        Box::pin(async move {
            let row = self
                .client()
                .await?
                .query_one("SELECT coalesce(max(seq), 0) FROM ledger_outbox", &[])
                .await
                .map_err(pg)?;
            seq(row.get(0))
        })
    }

    fn history<'a>(&'a self, tenant: &'a str, count: usize) -> LedgerFuture<'a, Vec<JournalEntry>> {
        Box::pin(async move {
            check_name("tenant", tenant).map_err(LedgerError::InvalidInput)?;
            self.json_rows(
                "SELECT entry FROM ledger_journal WHERE tenant = $1 ORDER BY seq DESC LIMIT $2",
                &[&tenant, &limit(count)],
            )
            .await
        })
    }

    fn journal_entries(&self, after_seq: u64, count: usize) -> LedgerFuture<'_, Vec<JournalEntry>> {
        Box::pin(async move {
            self.json_rows(
                "SELECT entry FROM ledger_journal WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&to_i64(after_seq)?, &limit(count)],
            )
            .await
        })
    }

    fn outbox_after(&self, after_seq: u64, count: usize) -> LedgerFuture<'_, Vec<(u64, String)>> {
        Box::pin(async move {
            let rows = self
                .client()
                .await?
                .query(
                    "SELECT seq, event FROM ledger_outbox WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&to_i64(after_seq)?, &limit(count)],
                )
                .await
                .map_err(pg)?;
            rows.iter()
                .map(|row| Ok((seq(row.get(0))?, row.get::<_, String>(1))))
                .collect()
        })
    }

    fn hold_record<'a>(&'a self, sandbox_id: &'a str) -> LedgerFuture<'a, Option<HoldRecord>> {
        Box::pin(async move {
            Ok(self
                .json_rows(
                    "SELECT record FROM ledger_holds WHERE sandbox_id = $1",
                    &[&sandbox_id],
                )
                .await?
                .pop())
        })
    }

    fn settle_receipt<'a>(
        &'a self,
        sandbox_id: &'a str,
    ) -> LedgerFuture<'a, Option<SettleReceipt>> {
        Box::pin(async move {
            let key = format!("settle/{sandbox_id}");
            let row = self
                .client()
                .await?
                .query_opt("SELECT stored FROM ledger_keys WHERE key = $1", &[&key])
                .await
                .map_err(pg)?;
            let Some(row) = row else {
                return Ok(None);
            };
            match super::store::stored_receipt(row.get::<_, &str>(0))? {
                Receipt::Settle(receipt) => Ok(Some(receipt)),
                other => Err(super::backend::unexpected(other)),
            }
        })
    }

    fn any_hold_due(&self, now_ms: u64) -> LedgerFuture<'_, bool> {
        Box::pin(self.due(now_ms))
    }

    fn open_holds(&self) -> LedgerFuture<'_, Vec<HoldRecord>> {
        Box::pin(async move {
            self.json_rows(
                "SELECT record FROM ledger_holds WHERE state = 'open' ORDER BY sandbox_id COLLATE \"C\"",
                &[],
            )
            .await
        })
    }

    fn verify(&self) -> LedgerFuture<'_, VerifyReport> {
        Box::pin(async move {
            let snapshot = self.snapshot().await?;
            let mut report = verify::verify(&snapshot)?;
            report.violations.extend(snapshot.copy_violations());
            report.ok = report.violations.is_empty();
            Ok(report)
        })
    }
}
