//! The PostgreSQL cluster `cargo xtask bench` starts for the ledger and
//! serve suites (named in SANDBOXER_TEST_POSTGRES, a superuser URL): a fresh
//! database per measurement, and the cluster's durability settings, which
//! the reports record so that a fast figure cannot hide `fsync = off`.
//!
//! The databases are not dropped: the cluster is thrown away with them when
//! the bench ends.

use anyhow::{Context, Result};
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};

const CLUSTER_VARIABLE: &str = "SANDBOXER_TEST_POSTGRES";

/// The durability settings of the cluster, as PostgreSQL reports them.
#[derive(Serialize, Clone)]
pub struct ClusterSettings {
    pub server_version: String,
    pub fsync: String,
    pub synchronous_commit: String,
    pub wal_sync_method: String,
}

fn cluster_url() -> Result<String> {
    std::env::var(CLUSTER_VARIABLE).with_context(|| {
        format!(
            "{CLUSTER_VARIABLE} is not set: run `cargo xtask bench ledger` (or serve, or all), \
             which starts a throwaway PostgreSQL cluster"
        )
    })
}

async fn superuser() -> Result<tokio_postgres::Client> {
    let url = cluster_url()?;
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot reach the bench's PostgreSQL cluster at {url}"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// A new empty database named after `purpose` (unique in this process and
/// across runs on one cluster), and its URL.
pub async fn fresh_database(purpose: &str) -> Result<String> {
    static MADE: AtomicUsize = AtomicUsize::new(0);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let name = format!(
        "bench_{purpose}_{}_{stamp}_{}",
        std::process::id(),
        MADE.fetch_add(1, Ordering::Relaxed)
    );
    superuser()
        .await?
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .with_context(|| format!("cannot create the database {name}"))?;
    let mut url = url::Url::parse(&cluster_url()?)?;
    url.set_path(&name);
    Ok(url.to_string())
}

pub async fn settings() -> Result<ClusterSettings> {
    let client = superuser().await?;
    let mut values = Vec::new();
    for name in [
        "server_version",
        "fsync",
        "synchronous_commit",
        "wal_sync_method",
    ] {
        let row = client.query_one(&format!("SHOW {name}"), &[]).await?;
        values.push(row.get::<_, String>(0));
    }
    let [server_version, fsync, synchronous_commit, wal_sync_method] =
        <[String; 4]>::try_from(values).expect("four settings asked");
    Ok(ClusterSettings {
        server_version,
        fsync,
        synchronous_commit,
        wal_sync_method,
    })
}

/// The next transaction id the cluster will assign. Reading it assigns
/// none, so the difference between two readings counts the write
/// transactions committed (or rolled back) in between, on any database.
pub async fn next_transaction_id(url: &str) -> Result<u64> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
        .await?;
    Ok(row.get::<_, &str>(0).parse()?)
}
