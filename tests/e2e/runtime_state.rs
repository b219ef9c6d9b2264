//! What the runtime keeps between calls and between processes: the
//! precompiled cache, each instance's key-value store, and the network grant.

use crate::support::*;
use sandboxer_host::runtime::{CacheOutcome, CallError, ExtError};
use std::io::Write;
use std::net::TcpListener;

#[test]
fn the_cache_is_used_when_valid_and_replaced_when_corrupt() {
    let home = TestHome::new().with_saas_stub();
    let load = || {
        let runtime = home.runtime();
        let set = runtime.load_dir(&home.extensions()).unwrap();
        let stub = set.get("saas-stub").unwrap().clone();
        (runtime.cache_entry_path(&stub.content_sha256), stub)
    };

    let (entry, stub) = load();
    assert_eq!(stub.cache, CacheOutcome::Compiled);
    assert!(
        entry.is_file(),
        "the compiled artifact is written to {}",
        entry.display()
    );
    let (_, stub) = load();
    assert_eq!(stub.cache, CacheOutcome::Hit);

    // A flipped byte in the payload: detected, recompiled, replaced.
    let mut bytes = std::fs::read(&entry).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xFF;
    std::fs::write(&entry, &bytes).unwrap();
    let (_, stub) = load();
    assert_eq!(stub.cache, CacheOutcome::Replaced);
    stub.estimate_cost(&spec("sbx-after-corruption"))
        .expect("the recompiled component works");
    let (_, stub) = load();
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
    assert_eq!(load().1.cache, CacheOutcome::Replaced);
    std::fs::File::create(&entry)
        .unwrap()
        .write_all(b"not an artifact")
        .unwrap();
    assert_eq!(load().1.cache, CacheOutcome::Replaced);
}

#[test]
fn two_instances_of_one_component_share_the_cache_but_not_config() {
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
    let set = home.runtime().load_dir(&home.extensions()).unwrap();
    let cheap = set.get("cheap").unwrap();
    let pricey = set.get("pricey").unwrap();
    assert_eq!(cheap.content_sha256, pricey.content_sha256);
    assert_eq!(
        cheap.estimate_cost(&spec("a")).unwrap().amount,
        10_000,
        "0.01 per vCPU-hour, one vCPU, one hour"
    );
    assert_eq!(pricey.estimate_cost(&spec("a")).unwrap().amount, 1_000_000);
}

#[test]
fn extension_state_survives_fresh_instances_and_host_restarts() {
    let home = TestHome::new().with_saas_stub();
    let handle = {
        let set = home.runtime().load_dir(&home.extensions()).unwrap();
        let stub = set.get("saas-stub").unwrap();
        let handle = stub.create(&spec("sbx-persist")).unwrap();
        assert_eq!(
            stub.create(&spec("sbx-persist")).unwrap(),
            handle,
            "create is idempotent by sandbox id"
        );
        handle
    };
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // A new runtime and a new state-store handle: a restarted host.
    let set = home.runtime().load_dir(&home.extensions()).unwrap();
    let stub = set.get("saas-stub").unwrap();
    let usage = stub.destroy(&spec("sbx-persist"), &handle).unwrap();
    assert!(usage.wall_ms >= 1100, "the start time was kept: {usage:?}");
    let actual = stub.meter_actual(&spec("sbx-persist"), usage).unwrap();
    // Two started seconds of 1 vCPU + 1 GiB at 0.0504 + 0.0162 per hour.
    let per_second =
        |seconds: u64| 50_400u64 * seconds * 1000 / 3_600_000 + 16_200 * seconds * 1000 / 3_600_000;
    assert!(
        actual >= per_second(2) && actual <= per_second(2) + 2,
        "{actual}"
    );

    let again = stub.destroy(&spec("sbx-persist"), &handle).unwrap_err();
    assert!(
        matches!(again.ext_error(), Some(ExtError::NotFound(_))),
        "{again}"
    );
}

#[test]
fn the_network_grant_allows_only_the_granted_address() {
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
    let set = home.runtime().load_dir(&home.extensions()).unwrap();

    let handle = set
        .get("allowed")
        .unwrap()
        .create(&spec("sbx-net"))
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
