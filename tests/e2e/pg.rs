//! The PostgreSQL cluster the tests share: `cargo xtask test` starts a
//! throwaway one inside target/ and names it in SANDBOXER_TEST_POSTGRES
//! (`cargo xtask postgres -- cargo test …` does the same for a developer).
//! Each test gets a database of its own.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Tests that restart PostgreSQL take this for writing; every other test
/// that uses the cluster holds it for reading, so a restart never cuts a
/// test that did not ask for it.
static RESTARTS: RwLock<()> = RwLock::new(());

pub fn cluster_url() -> String {
    std::env::var("SANDBOXER_TEST_POSTGRES").unwrap_or_else(|_| {
        panic!(
            "SANDBOXER_TEST_POSTGRES is not set: run the tests with `cargo xtask test`, \
             or one with `cargo xtask postgres -- cargo test --test e2e NAME`"
        )
    })
}

/// A new empty database on the cluster, and its URL.
pub fn fresh_database(purpose: &str) -> String {
    let base = cluster_url();
    let name = format!(
        "{}_{:012x}",
        purpose.replace('-', "_"),
        rand::random::<u64>() & 0xffff_ffff_ffff
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|error| panic!("cannot reach the test cluster at {base}: {error}"));
        let driver = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        drop(client);
        let _ = driver.await;
    });
    let mut url = url::Url::parse(&base).unwrap();
    url.set_path(&name);
    url.to_string()
}

/// For a test that uses the cluster: no restart happens while it is held.
pub fn shared() -> RwLockReadGuard<'static, ()> {
    RESTARTS
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// For a test that restarts the cluster: it waits for every other test
/// that uses it to finish.
pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    RESTARTS
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `pg_ctl ACTION` on the test cluster (`restart`, `stop -m immediate`,
/// `start`), through the script xtask wrote.
pub fn pg_ctl(args: &[&str]) {
    let script = std::env::var("SANDBOXER_TEST_PG_CTL")
        .expect("SANDBOXER_TEST_PG_CTL is set by cargo xtask beside SANDBOXER_TEST_POSTGRES");
    let output = std::process::Command::new(&script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{script} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
