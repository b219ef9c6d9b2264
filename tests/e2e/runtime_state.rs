//! What the runtime keeps between calls and between processes: the
//! precompiled cache, each instance's key-value store, and the network grant.

use crate::support::*;
use sandboxer_host::runtime::{CacheOutcome, CallError, ExtError};
use std::io::Write;
use std::net::TcpListener;

#[tokio::test]
async fn the_cache_is_used_when_valid_and_replaced_when_corrupt() {
    let home = TestHome::new().with_saas_stub();
    let load = async || {
        let runtime = home.runtime();
        let set = runtime.load_dir(&home.extensions()).await.unwrap();
        let stub = set.get("saas-stub").unwrap().clone();
        (runtime.cache_entry_path(&stub.content_sha256), stub)
    };

    let (entry, stub) = load().await;
    assert_eq!(stub.cache, CacheOutcome::Compiled);
    assert!(
        entry.is_file(),
        "the compiled artifact is written to {}",
        entry.display()
    );
    let (_, stub) = load().await;
    assert_eq!(stub.cache, CacheOutcome::Hit);

    // A flipped byte in the payload: detected, recompiled, replaced.
    let mut bytes = std::fs::read(&entry).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xFF;
    std::fs::write(&entry, &bytes).unwrap();
    let (_, stub) = load().await;
    assert_eq!(stub.cache, CacheOutcome::Replaced);
    stub.estimate_cost(&spec("sbx-after-corruption"))
        .await
        .expect("the recompiled component works");
    let (_, stub) = load().await;
    assert_eq!(
        stub.cache,
        CacheOutcome::Hit,
        "the replacement entry is valid"
    );

    // Truncated, then replaced by foreign bytes: never trusted either.
    let length = std::fs::metadata(&entry).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&entry)
        .unwrap()
        .set_len(length / 3)
        .unwrap();
    assert_eq!(load().await.1.cache, CacheOutcome::Replaced);
    std::fs::File::create(&entry)
        .unwrap()
        .write_all(b"not an artifact")
        .unwrap();
    assert_eq!(load().await.1.cache, CacheOutcome::Replaced);
}

#[tokio::test]
async fn two_instances_of_one_component_share_the_cache_but_not_config() {
    let home = TestHome::new();
    install(
        &built_extensions(),
        "saas-stub",
        &home.extensions(),
        "cheap",
    );
    install(
        &built_extensions(),
        "saas-stub",
        &home.extensions(),
        "pricey",
    );
    std::fs::write(
        home.extensions().join("cheap.toml"),
        "[config]\nrate_per_vcpu_hour = \"0.01\"\nrate_per_gib_hour = \"0\"\n",
    )
    .unwrap();
    std::fs::write(
        home.extensions().join("pricey.toml"),
        "[config]\nrate_per_vcpu_hour = \"1.0\"\nrate_per_gib_hour = \"0\"\n",
    )
    .unwrap();
    let set = home.runtime().load_dir(&home.extensions()).await.unwrap();
    let cheap = set.get("cheap").unwrap();
    let pricey = set.get("pricey").unwrap();
    assert_eq!(cheap.content_sha256, pricey.content_sha256);
    assert_eq!(
        cheap.estimate_cost(&spec("a")).await.unwrap().amount,
        10_000,
        "0.01 per vCPU-hour, one vCPU, one hour"
    );
    assert_eq!(
        pricey.estimate_cost(&spec("a")).await.unwrap().amount,
        1_000_000
    );
}

#[tokio::test]
async fn extension_state_survives_fresh_instances_and_host_restarts() {
    let home = TestHome::new().with_saas_stub();
    let handle = {
        let set = home.runtime().load_dir(&home.extensions()).await.unwrap();
        let stub = set.get("saas-stub").unwrap();
        let handle = stub.create(&spec("sbx-persist")).await.unwrap();
        assert_eq!(
            stub.create(&spec("sbx-persist")).await.unwrap(),
            handle,
            "create is idempotent by sandbox id"
        );
        handle
    };
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // A new runtime and a new state-store handle: a restarted host.
    let set = home.runtime().load_dir(&home.extensions()).await.unwrap();
    let stub = set.get("saas-stub").unwrap();
    let usage = stub.destroy(&spec("sbx-persist"), &handle).await.unwrap();
    assert!(usage.wall_ms >= 1100, "the start time was kept: {usage:?}");
    let actual = stub
        .meter_actual(&spec("sbx-persist"), usage)
        .await
        .unwrap();
    // Two started seconds of 1 vCPU + 1 GiB at 0.0504 + 0.0162 per hour.
    let per_second =
        |seconds: u64| 50_400u64 * seconds * 1000 / 3_600_000 + 16_200 * seconds * 1000 / 3_600_000;
    assert!(
        actual >= per_second(2) && actual <= per_second(2) + 2,
        "{actual}"
    );

    let again = stub
        .destroy(&spec("sbx-persist"), &handle)
        .await
        .unwrap_err();
    assert!(
        matches!(again.ext_error(), Some(ExtError::NotFound(_))),
        "{again}"
    );
}

#[tokio::test]
async fn the_network_grant_allows_only_the_granted_address() {
    let granted = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let granted_port = granted.local_addr().unwrap().port();
    let other_port = other.local_addr().unwrap().port();

    let home = TestHome::new();
    let fixtures = built_fixtures();
    install(&fixtures, "connector", &home.extensions(), "allowed");
    install(&fixtures, "connector", &home.extensions(), "denied");
    install(&fixtures, "connector", &home.extensions(), "no-grant");
    std::fs::write(
        home.extensions().join("no-grant.toml"),
        format!("[config]\ntarget = \"127.0.0.1:{granted_port}\"\n"),
    )
    .unwrap();
    std::fs::write(
        home.extensions().join("allowed.toml"),
        format!("[grants]\nnetwork = [\"127.0.0.1:{granted_port}\"]\n[config]\ntarget = \"127.0.0.1:{granted_port}\"\n"),
    )
    .unwrap();
    std::fs::write(
        home.extensions().join("denied.toml"),
        format!("[grants]\nnetwork = [\"127.0.0.1:{granted_port}\"]\n[config]\ntarget = \"127.0.0.1:{other_port}\"\n"),
    )
    .unwrap();
    let set = home.runtime().load_dir(&home.extensions()).await.unwrap();

    let handle = set
        .get("allowed")
        .unwrap()
        .create(&spec("sbx-net"))
        .await
        .unwrap();
    assert_eq!(
        handle.backend_ref,
        format!("connected to 127.0.0.1:{granted_port}")
    );
    granted
        .accept()
        .expect("the granted listener saw the connection");

    let error = set
        .get("denied")
        .unwrap()
        .create(&spec("sbx-net"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &error,
            CallError::Backend {
                error: ExtError::Unavailable(_),
                ..
            }
        ),
        "{error}"
    );
    other.set_nonblocking(true).unwrap();
    assert!(
        other.accept().is_err(),
        "nothing reached the address outside the grant"
    );
}

#[test]
fn the_key_value_quota_refuses_the_write_past_it_and_names_it() {
    let home = TestHome::new();
    install(&built_fixtures(), "kv-fill", &home.extensions(), "kv-fill");
    // Each value counts 65 549 bytes (a 13-byte key and 64 KiB): 15 fit in
    // the 1 MiB quota, with the 11-byte key the fixture keeps its place in.
    let quota_refusal = |writes: u64, would_hold: u64| {
        format!(
            "error: extension `kv-fill` estimate-cost: capacity: kv-set refused after {writes} writes: the store would hold {would_hold} bytes of keys and values, over its quota of 1048576 bytes (limits.kv_quota_mb); delete some first"
        )
    };
    let first = home.run(&["ext", "estimate", "kv-fill"]).fails(1);
    assert_eq!(first.stderr.trim_end(), quota_refusal(15, 1_048_784));
    // Another process, the same store: the count was kept with the writes.
    let second = home.run(&["ext", "estimate", "kv-fill"]).fails(1);
    assert_eq!(second.stderr.trim_end(), quota_refusal(0, 1_048_795));

    let state = sandboxer_host::state_db::StateDb::new(home.path().join("state.redb"));
    assert_eq!(
        sandboxer_host::runtime::kv_usage::stored_usage(&state, "kv-fill").unwrap(),
        sandboxer_host::runtime::kv_usage::KvUsage {
            keys: 16,
            bytes: 15 * 65_549 + 11,
        }
    );
}

#[test]
fn start_up_cost_does_not_grow_with_the_key_value_stores() {
    // 8 instances filled to the default 16 MiB quota: 128 MiB of values, a
    // state.redb of about 270 MB. Every command used to read all of it on
    // start-up (redb's debug-build consistency walk), in time and memory.
    let home = TestHome::new();
    for instance in 0..8 {
        let name = format!("kv-bulk-{instance}");
        install(&built_fixtures(), "hostile", &home.extensions(), &name);
        std::fs::write(
            home.extensions().join(format!("{name}.toml")),
            "[config]\nmisbehave = \"kv-fill\"\ncount = 250\nvalue_bytes = 65536\n",
        )
        .unwrap();
    }
    // Compiled once, so no measured command compiles.
    home.run(&["ext", "list"]).ok();
    let (empty, empty_peak_mib) =
        run_measuring_peak_memory(home.command().args(["sandbox", "list"]));
    empty.ok();
    for instance in 0..8 {
        home.run(&["ext", "estimate", &format!("kv-bulk-{instance}")])
            .ok();
    }
    let state_bytes = std::fs::metadata(home.path().join("state.redb"))
        .unwrap()
        .len();
    assert!(state_bytes > 128 << 20, "state.redb is {state_bytes} bytes");

    for command in [&["sandbox", "list"][..], &["credits", "show"]] {
        let (run, peak_mib) = run_measuring_peak_memory(home.command().args(command));
        run.ok();
        assert!(
            peak_mib < empty_peak_mib + 32,
            "{command:?} peaked at {peak_mib} MiB with {state_bytes} bytes of state, {empty_peak_mib} MiB with none"
        );
    }
}
