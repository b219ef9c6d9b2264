//! The shared part of the state store on PostgreSQL (`--store
//! postgres://…`): sandbox records with the host that owns each and its
//! lease, the lifecycle outbox, the extensions' key-value stores, tenants
//! and keys, the webhook's delivery cursors. What stays in each home's
//! `state.redb` is the host's own: routing health (breakers, latencies),
//! dispute tallies, the cursors of its own `events.jsonl`.
//!
//! Ownership. Every live sandbox is owned by one host (its home's host id)
//! until `lease_until_ms`, on the database's clock. The owner's writes
//! renew the lease, and its reader thread renews all of them every third of
//! a lease, on a timer of its own. A record write from a host that no longer owns the row
//! changes nothing and fails ([`SharedWriteError::Fenced`]): once another
//! host has taken a sandbox over, the old owner cannot touch it again, even
//! if it was only paused. A host takes over the live sandboxes whose lease
//! ran out (`UPDATE … RETURNING`, so two hosts never both get one); a host
//! asked to destroy or extend another host's ready sandbox claims it the
//! same way.
//!
//! Connections. Reads run on reader threads (four), each with its own
//! connection and runtime, so callers may be synchronous (an extension's key-value
//! call) or on any runtime; writes run on a second such thread, which
//! groups concurrent writers into one transaction. That transaction first
//! locks the one `state_meta` row, so lifecycle events get gap-free
//! sequence numbers in commit order, and key-value usage rows stay exact.

use crate::ledger::{connect_postgres, describe_postgres_error};
use crate::manager::lifecycle_events::PendingEvent;
use crate::manager::record::SandboxStatus;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, GenericClient};

/// How long a host owns its sandboxes without renewing, by default
/// (`SANDBOXER_LEASE_SECS`).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// The shortest lease allowed: a host renews once a second at best.
pub const MIN_LEASE: Duration = Duration::from_secs(3);
/// Most writes committed in one transaction.
const MAX_GROUP: usize = 256;
/// Reader threads, each with its own connection: reads of concurrent
/// requests (key checks, records, an extension's kv) run side by side.
const READERS: usize = 4;

/// Milliseconds since the epoch on the database's clock: leases are
/// compared on one clock, whatever the hosts' clocks say.
const DB_NOW: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

#[derive(Debug, Clone, thiserror::Error)]
pub enum SharedWriteError {
    #[error(
        "sandbox {id} is now served by host {owner}, which took it over; this host no longer acts on it"
    )]
    Fenced { id: String, owner: String },
    #[error(
        "sandbox {id} is served by host {owner}, which is working on it (or runs it on its own machine); send the request to that host, or try again shortly"
    )]
    Owned { id: String, owner: String },
    #[error("{0}")]
    Store(String),
}

fn pg(error: tokio_postgres::Error) -> String {
    format!("PostgreSQL: {}", describe_postgres_error(&error))
}

/// One key-value write of a call: a value, or `None` to delete.
pub type KvWrite = (String, Option<Vec<u8>>);

/// What one write commits: a record (owned by this host), its events, and
/// an extension call's key-value writes, all or none.
#[derive(Debug, Default)]
pub struct StateWrite {
    pub record: Option<SandboxStatus>,
    pub events: Vec<PendingEvent>,
    pub kv: Option<(String, Vec<KvWrite>)>,
}

/// Where a job's answer goes: a blocked thread, or an awaiting task.
enum Reply<T> {
    Sync(std::sync::mpsc::SyncSender<T>),
    Async(oneshot::Sender<T>),
}

impl<T> Reply<T> {
    fn send(self, value: T) {
        match self {
            Self::Sync(sender) => {
                let _ = sender.send(value);
            }
            Self::Async(sender) => {
                let _ = sender.send(value);
            }
        }
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type ReadJob = Box<dyn FnOnce(Result<Arc<Client>, String>) -> BoxFuture + Send>;
type WriteJob = (StateWrite, Reply<Result<(), SharedWriteError>>);

/// Runs `body` on a thread of its own, inside a current-thread runtime.
fn spawn_thread<F, Fut>(name: &str, body: F) -> Result<(), String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime");
            runtime.block_on(body());
        })
        .map(drop)
        .map_err(|error| format!("cannot start the {name} thread: {error}"))
}

/// The connection of a worker thread, opened again when lost.
async fn connection(slot: &mut Option<Arc<Client>>, url: &str) -> Result<Arc<Client>, String> {
    if let Some(client) = slot.as_ref()
        && !client.is_closed()
    {
        return Ok(client.clone());
    }
    let client = Arc::new(
        connect_postgres(url)
            .await
            .map_err(|error| error.to_string())?,
    );
    // A statement stuck longer than this (a lost network, a lock held by a
    // frozen host) fails instead of stopping every caller behind it.
    client
        .batch_execute("SET statement_timeout = '20s'")
        .await
        .map_err(pg)?;
    *slot = Some(client.clone());
    Ok(client)
}

/// The shared state of the hosts on one PostgreSQL database.
pub struct PgState {
    host_id: String,
    lease: Duration,
    reads: mpsc::UnboundedSender<ReadJob>,
    writes: mpsc::UnboundedSender<WriteJob>,
}

impl std::fmt::Debug for PgState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgState")
            .field("host_id", &self.host_id)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl PgState {
    /// Starts the reader and writer threads for `url` (whose schema the
    /// ledger's connect has migrated), serving as `host_id`.
    pub fn start(url: &str, host_id: String, lease: Duration) -> Result<Self, String> {
        let (reads, read_jobs) = mpsc::unbounded_channel::<ReadJob>();
        let read_jobs = Arc::new(tokio::sync::Mutex::new(read_jobs));
        for index in 0..READERS {
            let (read_jobs, reader_url) = (read_jobs.clone(), url.to_string());
            let renewer = Owner {
                host_id: host_id.clone(),
                lease_ms: lease.as_millis() as i64,
            };
            spawn_thread(&format!("state-pg-reader-{index}"), move || async move {
                let mut slot = None;
                // The first reader renews the leases, on a timer of its
                // own, so that nothing the host is busy with (a long
                // reconcile pass, slow backends) delays them.
                let mut renewal = tokio::time::interval(lease / 3);
                renewal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        job = async { read_jobs.lock().await.recv().await } => {
                            let Some(job) = job else { break };
                            let client = connection(&mut slot, &reader_url).await;
                            job(client).await;
                        }
                        _ = renewal.tick(), if index == 0 => {
                            let renewed = match connection(&mut slot, &reader_url).await {
                                Ok(client) => renew_leases(&client, &renewer).await,
                                Err(error) => Err(error),
                            };
                            if let Err(error) = renewed {
                                tracing::warn!("leases could not be renewed: {error}");
                            }
                        }
                    }
                }
            })?;
        }
        let (writes, write_jobs) = mpsc::unbounded_channel::<WriteJob>();
        let owner = Owner {
            host_id: host_id.clone(),
            lease_ms: lease.as_millis() as i64,
        };
        let writer_url = url.to_string();
        spawn_thread("state-pg-writer", move || {
            write_loop(writer_url, owner, write_jobs)
        })?;
        Ok(Self {
            host_id,
            lease,
            reads,
            writes,
        })
    }

    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// This host as the writer of records (for a write the ledger commits
    /// with its operation: [`crate::ledger::Joint`]).
    pub fn owner(&self) -> Owner {
        Owner {
            host_id: self.host_id.clone(),
            lease_ms: self.lease_ms(),
        }
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn lease_ms(&self) -> i64 {
        self.lease.as_millis() as i64
    }

    fn read_job<T, F, Fut>(f: F, reply: Reply<Result<T, String>>) -> ReadJob
    where
        T: Send + 'static,
        F: FnOnce(Arc<Client>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, String>> + Send + 'static,
    {
        Box::new(move |client| {
            Box::pin(async move {
                let answer = match client {
                    Ok(client) => f(client).await,
                    Err(error) => Err(error),
                };
                reply.send(answer);
            })
        })
    }

    /// Runs `f` on the reader's connection and waits for it, blocking the
    /// thread (never the reader's).
    fn read<T, F, Fut>(&self, f: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Client>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, String>> + Send + 'static,
    {
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        self.reads
            .send(Self::read_job(f, Reply::Sync(sender)))
            .map_err(|_| "the shared state store's reader has stopped".to_string())?;
        // A server's worker thread hands its other tasks to another worker
        // while it waits (the CLI's current-thread runtime cannot, and just
        // waits).
        let wait = || receiver.recv();
        let answer = match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        };
        answer.map_err(|_| "the shared state store's reader has stopped".to_string())?
    }

    /// [`PgState::read`], awaited.
    async fn read_async<T, F, Fut>(&self, f: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Client>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, String>> + Send + 'static,
    {
        let (sender, receiver) = oneshot::channel();
        self.reads
            .send(Self::read_job(f, Reply::Async(sender)))
            .map_err(|_| "the shared state store's reader has stopped".to_string())?;
        receiver
            .await
            .map_err(|_| "the shared state store's reader has stopped".to_string())?
    }

    /// Commits `write` (grouped with other writers'), blocking the thread.
    pub fn write(&self, write: StateWrite) -> Result<(), SharedWriteError> {
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        self.writes
            .send((write, Reply::Sync(sender)))
            .map_err(|_| stopped_writer())?;
        receiver.recv().map_err(|_| stopped_writer())?
    }

    /// [`PgState::write`], awaited.
    pub async fn write_async(&self, write: StateWrite) -> Result<(), SharedWriteError> {
        let (sender, receiver) = oneshot::channel();
        self.writes
            .send((write, Reply::Async(sender)))
            .map_err(|_| stopped_writer())?;
        receiver.await.map_err(|_| stopped_writer())?
    }

    // ---- records ----

    pub fn record(&self, id: &str) -> Result<Option<SandboxStatus>, String> {
        let id = id.to_string();
        self.read(move |client| async move {
            let row = client
                .query_opt("SELECT record FROM sandboxes WHERE id = $1", &[&id])
                .await
                .map_err(pg)?;
            row.map(|row| parse_record(row.get(0))).transpose()
        })
    }

    /// Every record, oldest first; only the live ones with `live_only`.
    pub fn records(&self, live_only: bool) -> Result<Vec<SandboxStatus>, String> {
        self.read(move |client| async move {
            let sql = if live_only {
                "SELECT record FROM sandboxes WHERE live ORDER BY created_at_ms, id"
            } else {
                "SELECT record FROM sandboxes ORDER BY created_at_ms, id"
            };
            let rows = client.query(sql, &[]).await.map_err(pg)?;
            rows.iter().map(|row| parse_record(row.get(0))).collect()
        })
    }

    /// The live sandboxes this host owns, oldest first: what its reconcile
    /// and ttl sweep act on.
    pub fn owned_live(&self) -> Result<Vec<SandboxStatus>, String> {
        let host = self.host_id.clone();
        self.read(move |client| async move {
            let rows = client
                .query(
                    "SELECT record FROM sandboxes WHERE live AND owner_host = $1 \
                     ORDER BY created_at_ms, id",
                    &[&host],
                )
                .await
                .map_err(pg)?;
            rows.iter().map(|row| parse_record(row.get(0))).collect()
        })
    }

    /// Takes over every live sandbox whose owner's lease ran out; returns
    /// each one's id and the host it was taken from.
    ///
    /// Only sandboxes of `extensions` (those loaded here) are taken: a host
    /// that could not destroy one leaves it to a host that can.
    pub async fn take_over_expired(
        &self,
        extensions: Vec<String>,
    ) -> Result<Vec<(String, String)>, String> {
        if extensions.is_empty() {
            return Ok(Vec::new());
        }
        let (host, lease) = (self.host_id.clone(), self.lease_ms());
        self.read_async(move |client| async move {
            let rows = client
                .query(
                    &format!(
                        "WITH expired AS ( \
                             SELECT id, owner_host FROM sandboxes \
                             WHERE live AND owner_host <> $1 AND lease_until_ms < {DB_NOW} \
                                 AND record::jsonb ->> 'extension' = ANY($3) \
                             ORDER BY id FOR UPDATE SKIP LOCKED) \
                         UPDATE sandboxes SET owner_host = $1, lease_until_ms = {DB_NOW} + $2::bigint \
                         FROM expired WHERE sandboxes.id = expired.id \
                         RETURNING sandboxes.id, expired.owner_host"
                    ),
                    &[&host, &lease, &extensions],
                )
                .await
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|row| (row.get::<_, String>(0), row.get::<_, String>(1)))
                .collect())
        })
        .await
    }

    /// Makes this host the owner of sandbox `id` before it acts on it: a
    /// sandbox it owns already, one whose lease ran out, or a ready SaaS one
    /// (no operation of its owner is under way, and it runs at the provider,
    /// reachable from any host). Another host working on it (creating,
    /// destroying), or running it on its own machine, keeps it: the answer
    /// names that host. A finished or unknown sandbox has nothing to claim.
    pub async fn claim(&self, id: &str) -> Result<(), SharedWriteError> {
        let (id, host, lease) = (id.to_string(), self.host_id.clone(), self.lease_ms());
        let owner = self
            .read_async(move |client| async move {
                let claimed = client
                    .query_opt(
                        &format!(
                            "UPDATE sandboxes SET owner_host = $2, lease_until_ms = {DB_NOW} + $3::bigint \
                             WHERE id = $1 AND live AND (owner_host = $2 \
                                 OR lease_until_ms < {DB_NOW} \
                                 OR (state = 'ready' AND record::jsonb ->> 'kind' = 'saas')) \
                             RETURNING 1"
                        ),
                        &[&id, &host, &lease],
                    )
                    .await
                    .map_err(pg)?;
                if claimed.is_some() {
                    return Ok(None);
                }
                let row = client
                    .query_opt(
                        "SELECT owner_host FROM sandboxes WHERE id = $1 AND live",
                        &[&id],
                    )
                    .await
                    .map_err(pg)?;
                Ok(row.map(|row| (id, row.get::<_, String>(0))))
            })
            .await
            .map_err(SharedWriteError::Store)?;
        match owner {
            None => Ok(()),
            Some((id, owner)) => Err(SharedWriteError::Owned { id, owner }),
        }
    }

    // ---- lifecycle outbox ----

    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, String)>, String> {
        self.read(move |client| async move {
            let rows = client
                .query(
                    "SELECT seq, event FROM lifecycle_events WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&(after.min(i64::MAX as u64) as i64), &(limit as i64)],
                )
                .await
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|row| (row.get::<_, i64>(0) as u64, row.get::<_, String>(1)))
                .collect())
        })
    }

    pub fn last_event_seq(&self) -> Result<u64, String> {
        self.read(move |client| async move {
            let row = client
                .query_one("SELECT coalesce(max(seq), 0) FROM lifecycle_events", &[])
                .await
                .map_err(pg)?;
            Ok(row.get::<_, i64>(0) as u64)
        })
    }

    // ---- extension key-value stores ----

    pub fn kv_get(&self, instance: &str, key: &str) -> Result<Option<Vec<u8>>, String> {
        let (instance, key) = (instance.to_string(), key.to_string());
        self.read(move |client| async move {
            let row = client
                .query_opt(
                    "SELECT value FROM extension_kv WHERE instance = $1 AND key = $2",
                    &[&instance, &key],
                )
                .await
                .map_err(pg)?;
            Ok(row.map(|row| row.get::<_, Vec<u8>>(0)))
        })
    }

    /// What `key` counts against the quota (key and value bytes).
    pub fn kv_entry_bytes(&self, instance: &str, key: &str) -> Result<Option<u64>, String> {
        let (instance, key) = (instance.to_string(), key.to_string());
        self.read(move |client| async move {
            let row = client
                .query_opt(
                    "SELECT octet_length(key) + octet_length(value) FROM extension_kv \
                     WHERE instance = $1 AND key = $2",
                    &[&instance, &key],
                )
                .await
                .map_err(pg)?;
            Ok(row.map(|row| row.get::<_, i32>(0) as u64))
        })
    }

    /// Keys and bytes `instance` holds.
    pub fn kv_usage(&self, instance: &str) -> Result<(u64, u64), String> {
        let instance = instance.to_string();
        self.read(move |client| async move {
            let row = client
                .query_opt(
                    "SELECT keys, bytes FROM extension_kv_usage WHERE instance = $1",
                    &[&instance],
                )
                .await
                .map_err(pg)?;
            Ok(row.map_or((0, 0), |row| {
                (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64)
            }))
        })
    }

    /// Up to `limit` stored keys of `instance` starting with `prefix`, in
    /// byte order.
    pub fn kv_keys(
        &self,
        instance: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<String>, String> {
        let (instance, prefix) = (instance.to_string(), prefix.to_string());
        self.read(move |client| async move {
            let rows = client
                .query(
                    "SELECT key FROM extension_kv WHERE instance = $1 AND key >= $2 \
                     AND starts_with(key, $2) ORDER BY key LIMIT $3",
                    &[&instance, &prefix, &(limit as i64)],
                )
                .await
                .map_err(pg)?;
            Ok(rows.iter().map(|row| row.get::<_, String>(0)).collect())
        })
    }
}

impl PgState {
    // ---- tenants and keys ----

    /// Registers a tenant (its row as JSON, its key's hash) unless a live
    /// one has the name; answers whether it did. One statement, so two
    /// hosts registering one name at once cannot both succeed.
    pub async fn tenant_create(
        &self,
        name: &str,
        row_json: String,
        key_sha256: &str,
    ) -> Result<bool, String> {
        let (name, key) = (name.to_string(), key_sha256.to_string());
        self.read_async(move |client| async move {
            let created = client
                .query_opt(
                    "WITH made AS ( \
                         INSERT INTO tenants (name, revoked, row) VALUES ($1, false, $2) \
                         ON CONFLICT (name) DO UPDATE SET revoked = false, row = EXCLUDED.row \
                         WHERE tenants.revoked \
                         RETURNING name) \
                     INSERT INTO tenant_keys (key_sha256, name) SELECT $3, name FROM made \
                     RETURNING 1",
                    &[&name, &row_json, &key],
                )
                .await
                .map_err(pg)?;
            Ok(created.is_some())
        })
        .await
    }

    /// Every tenant's row (JSON), by name.
    pub fn tenant_rows(&self) -> Result<Vec<String>, String> {
        self.read(move |client| async move {
            let rows = client
                .query("SELECT row FROM tenants ORDER BY name", &[])
                .await
                .map_err(pg)?;
            Ok(rows.iter().map(|row| row.get::<_, String>(0)).collect())
        })
    }

    /// Marks a tenant revoked (its new row) and forgets its key.
    pub async fn tenant_revoke(
        &self,
        name: &str,
        row_json: String,
        key_sha256: &str,
    ) -> Result<(), String> {
        let (name, key) = (name.to_string(), key_sha256.to_string());
        self.read_async(move |client| async move {
            client
                .execute(
                    "WITH gone AS (DELETE FROM tenant_keys WHERE name = $1 OR key_sha256 = $3) \
                     UPDATE tenants SET revoked = true, row = $2 WHERE name = $1",
                    &[&name, &row_json, &key],
                )
                .await
                .map_err(pg)?;
            Ok(())
        })
        .await
    }

    pub async fn operator_key_add(&self, key_sha256: &str, now_ms: u64) -> Result<(), String> {
        let key = key_sha256.to_string();
        let now = now_ms.min(i64::MAX as u64) as i64;
        self.read_async(move |client| async move {
            client
                .execute(
                    "INSERT INTO operator_keys (key_sha256, created_at_ms) VALUES ($1, $2) \
                     ON CONFLICT (key_sha256) DO NOTHING",
                    &[&key, &now],
                )
                .await
                .map_err(pg)?;
            Ok(())
        })
        .await
    }

    /// Whose key has this hash: `Some(None)` an operator's, `Some(Some(name))`
    /// a tenant's, `None` nobody's.
    pub fn key_owner(&self, key_sha256: &str) -> Result<Option<Option<String>>, String> {
        let key = key_sha256.to_string();
        self.read(move |client| async move {
            let row = client
                .query_opt(
                    "SELECT NULL::text FROM operator_keys WHERE key_sha256 = $1 \
                     UNION ALL SELECT name FROM tenant_keys WHERE key_sha256 = $1 LIMIT 1",
                    &[&key],
                )
                .await
                .map_err(pg)?;
            Ok(row.map(|row| row.get::<_, Option<String>>(0)))
        })
    }
}

/// How long a host keeps delivering a shared sink without delivering again
/// (it renews each time it delivers).
const DELIVERY_LEASE_MS: i64 = 30_000;

impl PgState {
    // ---- delivery to shared sinks ----

    /// Takes (or keeps) the delivery of `sink`'s `source` outbox for this
    /// host and answers its cursor; `None` when another host delivers it.
    pub fn delivery_claim(&self, sink: &str, source: &str) -> Result<Option<u64>, String> {
        let (sink, source) = (sink.to_string(), source.to_string());
        let host = self.host_id.clone();
        self.read(move |client| async move {
            client
                .execute(
                    "INSERT INTO delivery_cursors (sink, source, seq, holder, until_ms) \
                     VALUES ($1, $2, 0, '', 0) ON CONFLICT (sink, source) DO NOTHING",
                    &[&sink, &source],
                )
                .await
                .map_err(pg)?;
            let row = client
                .query_opt(
                    &format!(
                        "UPDATE delivery_cursors SET holder = $3, \
                             until_ms = {DB_NOW} + {DELIVERY_LEASE_MS} \
                         WHERE sink = $1 AND source = $2 \
                             AND (holder = $3 OR until_ms < {DB_NOW}) \
                         RETURNING seq"
                    ),
                    &[&sink, &source, &host],
                )
                .await
                .map_err(pg)?;
            Ok(row.map(|row| row.get::<_, i64>(0) as u64))
        })
    }

    /// Moves the cursor after a delivery, if this host still delivers it;
    /// answers whether it does.
    pub fn delivery_advance(&self, sink: &str, source: &str, seq: u64) -> Result<bool, String> {
        let (sink, source) = (sink.to_string(), source.to_string());
        let host = self.host_id.clone();
        let seq = seq.min(i64::MAX as u64) as i64;
        self.read(move |client| async move {
            let moved = client
                .execute(
                    &format!(
                        "UPDATE delivery_cursors SET seq = greatest(seq, $4::bigint), \
                             until_ms = {DB_NOW} + {DELIVERY_LEASE_MS} \
                         WHERE sink = $1 AND source = $2 AND holder = $3"
                    ),
                    &[&sink, &source, &host, &seq],
                )
                .await
                .map_err(pg)?;
            Ok(moved == 1)
        })
    }
}

fn stopped_writer() -> SharedWriteError {
    SharedWriteError::Store("the shared state store's writer has stopped".into())
}

fn parse_record(json: &str) -> Result<SandboxStatus, String> {
    serde_json::from_str(json).map_err(|error| format!("sandbox records: {error}"))
}

/// Renews every lease `owner` holds. Rows a write holds are skipped (that
/// write renews them): never waiting on a row lock, renewal cannot deadlock
/// with a writer's group.
async fn renew_leases(client: &Client, owner: &Owner) -> Result<u64, String> {
    client
        .execute(
            &format!(
                "UPDATE sandboxes SET lease_until_ms = {DB_NOW} + $2::bigint \
                 WHERE id IN (SELECT id FROM sandboxes WHERE live AND owner_host = $1 \
                     ORDER BY id FOR UPDATE SKIP LOCKED)"
            ),
            &[&owner.host_id, &owner.lease_ms],
        )
        .await
        .map_err(pg)
}

/// Who writes: this host, and the lease each write renews.
#[derive(Debug, Clone)]
pub struct Owner {
    pub(crate) host_id: String,
    pub(crate) lease_ms: i64,
}

async fn write_loop(url: String, owner: Owner, mut jobs: mpsc::UnboundedReceiver<WriteJob>) {
    let mut slot = None;
    while let Some(first) = jobs.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let (writes, replies): (Vec<StateWrite>, Vec<_>) = group.into_iter().unzip();
        let results = match connection(&mut slot, &url).await {
            Ok(client) => commit_group(&client, &owner, writes).await,
            Err(error) => writes
                .iter()
                .map(|_| Err(SharedWriteError::Store(error.clone())))
                .collect(),
        };
        for (reply, result) in replies.into_iter().zip(results) {
            reply.send(result);
        }
    }
}

async fn commit_group(
    client: &Client,
    owner: &Owner,
    writes: Vec<StateWrite>,
) -> Vec<Result<(), SharedWriteError>> {
    let count = writes.len();
    let failed = |error: String| vec![Err(SharedWriteError::Store(error)); count];
    if let Err(error) = client.batch_execute("BEGIN").await {
        return failed(pg(error));
    }
    match apply_group(client, owner, writes).await {
        Ok(results) => match client.batch_execute("COMMIT").await {
            Ok(()) => results,
            Err(error) => failed(format!(
                "PostgreSQL: the commit's outcome is unknown ({}): the sandbox's next step \
                 writes its record again",
                describe_postgres_error(&error)
            )),
        },
        Err(error) => {
            let _ = client.batch_execute("ROLLBACK").await;
            failed(error)
        }
    }
}

async fn apply_group(
    client: &Client,
    owner: &Owner,
    writes: Vec<StateWrite>,
) -> Result<Vec<Result<(), SharedWriteError>>, String> {
    let mut outbox = Outbox::lock(client).await?;
    let mut results = Vec::with_capacity(writes.len());
    for write in writes {
        results.push(apply_write(client, owner, &mut outbox, write).await?);
    }
    outbox.save(client).await?;
    Ok(results)
}

/// The lifecycle outbox's counter, locked (the `state_meta` row) for the
/// rest of a transaction.
pub(crate) struct Outbox {
    state_id: String,
    first_seq: i64,
    next_seq: i64,
}

impl Outbox {
    /// Locks `state_meta`: every transaction that writes state takes it
    /// first (after `ledger_meta`, for one that writes the ledger too), so
    /// sequence numbers are gap-free in commit order, and no two hosts'
    /// writes interleave.
    pub(crate) async fn lock(client: &impl GenericClient) -> Result<Self, String> {
        let meta = client
            .query_one(
                "SELECT state_id, next_event_seq FROM state_meta WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await
            .map_err(pg)?;
        let next_seq: i64 = meta.get(1);
        Ok(Self {
            state_id: meta.get(0),
            first_seq: next_seq,
            next_seq,
        })
    }

    /// Stores the counter moved by the events appended.
    pub(crate) async fn save(&self, client: &impl GenericClient) -> Result<(), String> {
        if self.next_seq != self.first_seq {
            client
                .execute(
                    "UPDATE state_meta SET next_event_seq = $1 WHERE id = 1",
                    &[&self.next_seq],
                )
                .await
                .map_err(pg)?;
        }
        Ok(())
    }
}

/// Applies one write inside the caller's transaction (which holds the
/// outbox lock): its record as `owner`'s, then its key-value writes and its
/// events. A record another host owns is answered `Fenced`, and nothing of
/// that write is applied.
pub(crate) async fn apply_write(
    client: &impl GenericClient,
    owner: &Owner,
    outbox: &mut Outbox,
    write: StateWrite,
) -> Result<Result<(), SharedWriteError>, String> {
    if let Some(record) = &write.record
        && let Some(holder) = put_record(client, record, owner).await?
    {
        return Ok(Err(SharedWriteError::Fenced {
            id: record.id.clone(),
            owner: holder,
        }));
    }
    if let Some((instance, kv)) = &write.kv {
        apply_kv(client, instance, kv).await?;
    }
    for event in write.events {
        let json = event
            .to_json(&outbox.state_id, outbox.next_seq as u64)
            .map_err(|error| error.to_string())?;
        client
            .execute(
                "INSERT INTO lifecycle_events (seq, event) VALUES ($1, $2)",
                &[&outbox.next_seq, &json],
            )
            .await
            .map_err(pg)?;
        outbox.next_seq += 1;
    }
    Ok(Ok(()))
}

/// Locks the records `ids` for the rest of the caller's transaction and
/// answers which of them another host than `owner` owns (id, owner).
pub(crate) async fn lock_records(
    client: &impl GenericClient,
    ids: &[String],
    owner: &str,
) -> Result<Vec<(String, String)>, String> {
    let rows = client
        .query(
            "SELECT id, owner_host FROM sandboxes WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            &[&ids],
        )
        .await
        .map_err(pg)?;
    Ok(rows
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, String>(1)))
        .filter(|(_, holder)| holder != owner)
        .collect())
}

/// Writes `record` as `host`'s, renewing its lease; answers the owner's id
/// instead when another host owns it (and writes nothing).
async fn put_record(
    client: &impl GenericClient,
    record: &SandboxStatus,
    owner: &Owner,
) -> Result<Option<String>, String> {
    let json = serde_json::to_string(record).map_err(|error| error.to_string())?;
    let as_i64 = |value: u64| value.min(i64::MAX as u64) as i64;
    let written = client
        .query_opt(
            &format!(
                "INSERT INTO sandboxes (id, tenant, state, live, owner_host, lease_until_ms, \
                     created_at_ms, updated_at_ms, record) \
                 VALUES ($1, $2, $3, $4, $5, {DB_NOW} + $6::bigint, $7, $8, $9) \
                 ON CONFLICT (id) DO UPDATE SET tenant = EXCLUDED.tenant, \
                     state = EXCLUDED.state, live = EXCLUDED.live, \
                     lease_until_ms = EXCLUDED.lease_until_ms, \
                     updated_at_ms = EXCLUDED.updated_at_ms, record = EXCLUDED.record \
                 WHERE sandboxes.owner_host = EXCLUDED.owner_host \
                 RETURNING 1"
            ),
            &[
                &record.id,
                &record.tenant,
                &record.state.name(),
                &record.state.is_live(),
                &owner.host_id,
                &owner.lease_ms,
                &as_i64(record.created_at_ms),
                &as_i64(record.updated_at_ms),
                &json,
            ],
        )
        .await
        .map_err(pg)?;
    if written.is_some() {
        return Ok(None);
    }
    let row = client
        .query_one(
            "SELECT owner_host FROM sandboxes WHERE id = $1",
            &[&record.id],
        )
        .await
        .map_err(pg)?;
    Ok(Some(row.get(0)))
}

/// Applies one call's key-value writes and moves its usage row by what
/// they changed.
async fn apply_kv(
    client: &impl GenericClient,
    instance: &str,
    writes: &[KvWrite],
) -> Result<(), String> {
    let (mut keys, mut bytes) = (0i64, 0i64);
    for (key, value) in writes {
        let previous: Option<i32> = match value {
            Some(value) => client
                .query_one(
                    "WITH old AS (SELECT octet_length(key) + octet_length(value) AS bytes \
                         FROM extension_kv WHERE instance = $1 AND key = $2) \
                     INSERT INTO extension_kv (instance, key, value) VALUES ($1, $2, $3) \
                     ON CONFLICT (instance, key) DO UPDATE SET value = EXCLUDED.value \
                     RETURNING (SELECT bytes FROM old)",
                    &[&instance, key, value],
                )
                .await
                .map_err(pg)?
                .get(0),
            None => client
                .query_opt(
                    "DELETE FROM extension_kv WHERE instance = $1 AND key = $2 \
                     RETURNING octet_length(key) + octet_length(value)",
                    &[&instance, key],
                )
                .await
                .map_err(pg)?
                .map(|row| row.get(0)),
        };
        if let Some(previous) = previous {
            keys -= 1;
            bytes -= i64::from(previous);
        }
        if let Some(value) = value {
            keys += 1;
            bytes += (key.len() + value.len()) as i64;
        }
    }
    if keys != 0 || bytes != 0 {
        client
            .execute(
                "INSERT INTO extension_kv_usage (instance, keys, bytes) \
                 VALUES ($1, greatest($2::bigint, 0), greatest($3::bigint, 0)) \
                 ON CONFLICT (instance) DO UPDATE SET \
                     keys = greatest(extension_kv_usage.keys + $2::bigint, 0), \
                     bytes = greatest(extension_kv_usage.bytes + $3::bigint, 0)",
                &[&instance, &keys, &bytes],
            )
            .await
            .map_err(pg)?;
    }
    Ok(())
}
