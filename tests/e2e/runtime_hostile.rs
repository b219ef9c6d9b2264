//! Hostile extensions: each fixture misbehaves in one way, the host names
//! the extension and the limit, and in the same process the saas-stub keeps
//! answering. Those that try to make the host use memory run in the real
//! binary, whose peak resident memory is checked against the guest's own.

use crate::support::*;
use sandboxer_host::runtime::{CallError, ExtError, ExtensionSet};
use std::time::{Duration, Instant};

const FIXTURES: &[&str] = &[
    "endless-loop",
    "fuel-burner",
    "memory-growth",
    "trap-in-info",
    "trap-in-estimate-cost",
    "trap-in-create",
    "trap-in-destroy",
    "trap-in-meter-actual",
    "oversized-string",
    "always-unavailable",
    "log-flood",
    "sleeper",
    "other-world",
];

struct Hostile {
    _home: TestHome,
    set: ExtensionSet,
}

impl Hostile {
    async fn load() -> Self {
        let home = TestHome::new().with_saas_stub();
        let fixtures = built_fixtures();
        for name in FIXTURES {
            install(&fixtures, name, &home.extensions(), name);
        }
        // A component importing the host's process capability, ungranted.
        install(&fixtures, "spawner", &home.extensions(), "ungranted-import");
        let dir = home.extensions();
        std::fs::write(dir.join("random-bytes.wasm"), pseudo_random_bytes(4096)).unwrap();
        std::fs::write(dir.join("empty.wasm"), b"").unwrap();
        // The smallest valid core module: magic and version, no sections.
        std::fs::write(dir.join("core-module.wasm"), b"\0asm\x01\0\0\0").unwrap();
        // The runtime may go: loaded extensions keep what they need.
        let set = home.runtime().load_dir(&dir).await.unwrap();
        Self { _home: home, set }
    }

    fn reason(&self, name: &str) -> String {
        let entry = self
            .set
            .entry(name)
            .unwrap_or_else(|| panic!("{name} is listed"));
        entry
            .status
            .as_ref()
            .err()
            .unwrap_or_else(|| panic!("{name} should be rejected"))
            .clone()
    }

    async fn call_error(&self, name: &str, function: &str) -> CallError {
        let extension = self
            .set
            .get(name)
            .unwrap_or_else(|| panic!("{name} should load"));
        let spec = spec("sbx-hostile");
        let handle = sandboxer_host::runtime::SandboxHandle {
            backend_ref: "hostile-sbx".into(),
            endpoint: None,
        };
        let usage = sandboxer_host::runtime::Usage {
            wall_ms: 1,
            cpu_ms: 0,
            memory_mb_ms: 0,
            egress_bytes: 0,
        };
        let error = match function {
            "estimate-cost" => extension.estimate_cost(&spec).await.err(),
            "create" => extension.create(&spec).await.err(),
            "destroy" => extension.destroy(&spec, &handle).await.err(),
            "meter-actual" => extension.meter_actual(&spec, usage).await.err(),
            other => panic!("unknown function {other}"),
        };
        error.unwrap_or_else(|| panic!("{name} {function} should fail"))
    }

    /// The control: the well-behaved extension in the same process still works.
    async fn assert_saas_stub_answers(&self) {
        let stub = self.set.get("saas-stub").expect("saas-stub stays loaded");
        let estimate = stub
            .estimate_cost(&spec("sbx-control"))
            .await
            .expect("saas-stub keeps answering");
        assert_eq!(
            estimate.amount, 66_600,
            "1 vCPU + 1 GiB for an hour at the default card"
        );
    }
}

fn pseudo_random_bytes(length: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

#[tokio::test]
async fn every_bad_file_is_rejected_with_a_one_line_reason_and_the_rest_load() {
    let hostile = Hostile::load().await;
    for (name, needle) in [
        ("random-bytes", "not WebAssembly"),
        ("empty", "empty file"),
        ("core-module", "core WebAssembly module, not a component"),
        (
            "other-world",
            "not a sandbox-extension component: it exports wasi:cli/run",
        ),
        (
            "ungranted-import",
            "imports `sandboxer:extension/process@0.1.0` (starting programs on the host), which the operator has not granted",
        ),
        (
            "trap-in-info",
            "info() failed: extension `trap-in-info` info: trapped",
        ),
    ] {
        let reason = hostile.reason(name);
        assert!(reason.contains(needle), "{name}: {reason}");
        assert!(!reason.contains('\n'), "{name}: one line: {reason}");
    }
    for name in [
        "saas-stub",
        "endless-loop",
        "memory-growth",
        "oversized-string",
        "trap-in-create",
    ] {
        assert!(hostile.set.get(name).is_some(), "{name} loads");
    }
    hostile.assert_saas_stub_answers().await;
}

#[tokio::test]
async fn an_endless_loop_is_stopped_at_its_wall_clock_limit() {
    let hostile = Hostile::load().await;
    let started = Instant::now();
    let error = hostile.call_error("endless-loop", "estimate-cost").await;
    let elapsed = started.elapsed();
    assert!(
        matches!(error, CallError::Timeout { limit_ms: 200, .. }),
        "{error}"
    );
    assert_eq!(
        error.to_string(),
        "extension `endless-loop` estimate-cost: stopped at its wall-clock limit of 200 ms"
    );
    assert!(
        elapsed >= Duration::from_millis(200),
        "not stopped early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "stopped promptly: {elapsed:?}"
    );
    assert!(error.is_retryable());
    hostile.assert_saas_stub_answers().await;
}

#[tokio::test]
async fn a_call_blocked_in_a_host_call_is_stopped_at_its_wall_clock_limit() {
    let hostile = Hostile::load().await;
    let started = Instant::now();
    let error = hostile.call_error("sleeper", "estimate-cost").await;
    let elapsed = started.elapsed();
    assert!(
        matches!(error, CallError::Timeout { limit_ms: 200, .. }),
        "{error}"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "a one-minute WASI sleep is cut at the deadline: {elapsed:?}"
    );
    hostile.assert_saas_stub_answers().await;
}

#[tokio::test]
async fn a_fuel_budget_stops_a_loop_before_the_deadline() {
    let hostile = Hostile::load().await;
    let error = hostile.call_error("fuel-burner", "estimate-cost").await;
    assert!(
        matches!(
            error,
            CallError::OutOfFuel {
                fuel: 5_000_000,
                ..
            }
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains("fuel limit of 5000000"),
        "{error}"
    );
    hostile.assert_saas_stub_answers().await;
}

#[tokio::test]
async fn memory_growth_stops_at_the_cap() {
    let hostile = Hostile::load().await;
    let error = hostile.call_error("memory-growth", "estimate-cost").await;
    assert!(
        matches!(error, CallError::MemoryLimit { limit_mb: 16, .. }),
        "{error}"
    );
    assert_eq!(
        error.to_string(),
        "extension `memory-growth` estimate-cost: stopped at its memory limit of 16 MiB"
    );
    hostile.assert_saas_stub_answers().await;
}

#[tokio::test]
async fn a_trap_in_each_function_is_a_failed_call_naming_the_function() {
    let hostile = Hostile::load().await;
    for function in ["estimate-cost", "create", "destroy", "meter-actual"] {
        let name = format!("trap-in-{function}");
        let error = hostile.call_error(&name, function).await;
        assert!(matches!(error, CallError::Trap { .. }), "{error}");
        assert!(
            error
                .to_string()
                .starts_with(&format!("extension `{name}` {function}: trapped")),
            "{error}"
        );
        // The trap killed only that call's instance: the next call of the
        // same extension gets a fresh one.
        let extension = hostile.set.get(&name).unwrap();
        if function != "estimate-cost" {
            extension
                .estimate_cost(&spec("sbx-after-trap"))
                .await
                .expect("a fresh instance answers");
        }
        hostile.assert_saas_stub_answers().await;
    }
}

#[tokio::test]
async fn a_reused_instance_that_traps_is_never_reused() {
    let home = TestHome::new();
    install(&built_fixtures(), "hostile", &home.extensions(), "reused");
    std::fs::write(
        home.extensions().join("reused.toml"),
        "[limits]\nreuse_instances = true\n[config]\nmisbehave = \"trap\"\nin = \"create\"\n",
    )
    .unwrap();
    let set = home.runtime().load_dir(&home.extensions()).await.unwrap();
    let reused = set.get("reused").unwrap();
    assert!(reused.limits.reuse_instances);
    for round in 0..3 {
        // Estimates run on a kept instance; each trap throws its instance
        // away, and the next call works on another.
        for _ in 0..5 {
            assert_eq!(
                reused
                    .estimate_cost(&spec("sbx-reuse"))
                    .await
                    .unwrap()
                    .amount,
                1_000,
                "round {round}"
            );
        }
        let error = reused.create(&spec("sbx-reuse")).await.unwrap_err();
        assert!(matches!(error, CallError::Trap { .. }), "{error}");
    }
}

#[tokio::test]
async fn an_oversized_string_is_refused() {
    let hostile = Hostile::load().await;
    let error = hostile.call_error("oversized-string", "create").await;
    assert!(
        matches!(
            error,
            CallError::OutputTooLarge {
                field: "backend-ref",
                size: 1_048_576,
                limit: 1024,
                ..
            }
        ),
        "{error}"
    );
    hostile.assert_saas_stub_answers().await;
}

#[tokio::test]
async fn a_log_flood_is_muted_and_the_call_still_answers() {
    let hostile = Hostile::load().await;
    let extension = hostile.set.get("log-flood").unwrap();
    let estimate = extension
        .estimate_cost(&spec("sbx-flood"))
        .await
        .expect("the flooding call completes");
    assert_eq!(estimate.amount, 1_000);
    hostile.assert_saas_stub_answers().await;
}

#[tokio::test]
async fn backend_errors_are_the_extensions_own_answer() {
    let hostile = Hostile::load().await;
    let error = hostile.call_error("always-unavailable", "create").await;
    assert!(
        matches!(error.ext_error(), Some(ExtError::Unavailable(_))),
        "{error}"
    );
    assert_eq!(
        error.to_string(),
        "extension `always-unavailable` create: unavailable: this backend is always down"
    );
    assert!(error.is_retryable());
    let invalid = hostile
        .set
        .get("saas-stub")
        .unwrap()
        .estimate_cost(&sandboxer_host::runtime::SandboxSpec {
            cpu_millis: 0,
            ..spec("sbx-invalid")
        })
        .await;
    let invalid = invalid.unwrap_err();
    assert!(
        matches!(invalid.ext_error(), Some(ExtError::InvalidSpec(_))),
        "{invalid}"
    );
    assert!(
        !invalid.is_retryable(),
        "a bad spec is never retried elsewhere"
    );
}

/// What the host itself may take on top of what a guest holds: the binary,
/// wasmtime, redb and compiling one component take about 30 MiB.
const HOST_HEADROOM_MIB: u64 = 64;

/// Runs the binary with `args` in a fresh home holding the fixtures `names`:
/// what it did, and its peak resident memory in MiB.
fn run_with_fixtures(names: &[&str], args: &[&str]) -> (Run, u64) {
    let home = TestHome::new();
    for name in names {
        install(&built_fixtures(), name, &home.extensions(), name);
    }
    run_measuring_peak_memory(home.command().args(args))
}

#[test]
fn deleting_keys_that_were_never_written_keeps_nothing_in_host_memory() {
    // The host used to keep every deleted key until the call ended, however
    // long: 1000 keys of 1 MiB took it to 1 GB, 500 000 short ones to 330 MiB.
    for name in ["kv-delete-flood", "kv-delete-many"] {
        let (run, peak_mib) = run_with_fixtures(&[name], &["ext", "estimate", name]);
        let run = run.ok();
        assert!(
            run.stdout.starts_with(&format!("{name}: 0.001000 credits")),
            "the call answers: {}",
            run.stdout
        );
        assert!(
            peak_mib < 64 + HOST_HEADROOM_MIB,
            "{name}: the host peaked at {peak_mib} MiB for a guest capped at 64 MiB"
        );
    }
}

#[tokio::test]
async fn a_huge_error_message_is_refused_before_the_host_copies_it() {
    // 100 MiB of "x " used to take the host to 1 GB: copies, and a list of
    // its 50 million words.
    let (run, peak_mib) = run_with_fixtures(&["huge-error"], &["ext", "estimate", "huge-error"]);
    let run = run.fails(1);
    assert_eq!(
        run.stderr.trim_end(),
        "error: extension `huge-error` estimate-cost: passed the host more than 2097152 bytes at once (in one answer or host call); the limit is 2097152"
    );
    assert!(
        peak_mib < 2 * 100 + HOST_HEADROOM_MIB,
        "the host peaked at {peak_mib} MiB beside the guest's 100 MiB message"
    );

    // Under the transfer limit the message is copied once and cut.
    let home = TestHome::new();
    install(
        &built_fixtures(),
        "hostile",
        &home.extensions(),
        "long-error",
    );
    std::fs::write(
        home.extensions().join("long-error.toml"),
        "[config]\nmisbehave = \"huge-error\"\nsize_mb = 1\nunit = \"x \"\n",
    )
    .unwrap();
    let set = home.runtime().load_dir(&home.extensions()).await.unwrap();
    let error = set
        .get("long-error")
        .unwrap()
        .estimate_cost(&spec("sbx-long-error"))
        .await
        .unwrap_err();
    let Some(ExtError::Internal(message)) = error.ext_error() else {
        panic!("{error}");
    };
    assert_eq!(message.chars().count(), 2001, "2000 characters and '…'");
    assert!(message.starts_with("x x x") && message.ends_with('…'));
}

#[test]
fn a_huge_info_field_rejects_the_extension_at_load_without_copying_it() {
    // A 48 MiB id used to cost 510 MB on every command that loaded the
    // directory.
    let (run, peak_mib) = run_with_fixtures(&["huge-info-id"], &["ext", "list", "--json"]);
    let listed = run.ok().json();
    assert_eq!(listed[0]["status"], "rejected");
    assert_eq!(
        listed[0]["reason"],
        "info() failed: extension `huge-info-id` info: passed the host more than 2097152 bytes at once (in one answer or host call); the limit is 2097152"
    );
    assert!(
        peak_mib < 2 * 48 + HOST_HEADROOM_MIB,
        "the host peaked at {peak_mib} MiB beside the guest's 48 MiB id"
    );

    // Under the transfer limit, each field is refused by its length.
    let home = TestHome::new();
    for field in ["id", "version", "description"] {
        let name = format!("long-{field}");
        install(&built_fixtures(), "hostile", &home.extensions(), &name);
        std::fs::write(
            home.extensions().join(format!("{name}.toml")),
            format!("[config]\nmisbehave = \"huge-info\"\nfield = \"{field}\"\nsize_mb = 1\n"),
        )
        .unwrap();
    }
    let listed = home.run(&["ext", "list", "--json"]).ok().json();
    let reasons: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "info() returned a description of 1048576 bytes; the limit is 1000",
            "info() returned an id of 1048576 bytes; the limit is 64",
            "info() returned a version of 1048576 bytes; the limit is 64",
        ]
    );
}

#[test]
fn buffered_key_value_writes_count_against_the_calls_memory_limit() {
    // 1000 writes of 64 KiB in one call, under a 16 MiB memory limit: the
    // host used to hold all 64 MiB until the call returned.
    let (run, peak_mib) =
        run_with_fixtures(&["kv-set-flood"], &["ext", "estimate", "kv-set-flood"]);
    let run = run.fails(1);
    let refused = run
        .stderr
        .strip_prefix(
            "error: extension `kv-set-flood` estimate-cost: capacity: kv-set refused after ",
        )
        .unwrap_or_else(|| panic!("{}", run.stderr));
    let (writes, message) = refused.split_once(" writes: ").unwrap();
    let writes: u64 = writes.parse().unwrap();
    assert!(
        (100..250).contains(&writes),
        "the guest's own memory and its buffered writes share 16 MiB: {writes} writes"
    );
    assert_eq!(
        message.trim_end(),
        "this call's writes would pass its memory limit of 16 MiB (the host holds a call's writes until it returns); return, and write the rest in another call"
    );
    // The guest's memory, the writes held for the call, and their commit
    // (redb keeps a 64 KiB value in a 128 KiB page) each stay near 16 MiB.
    assert!(
        peak_mib < 4 * 16 + HOST_HEADROOM_MIB,
        "the host peaked at {peak_mib} MiB for a call capped at 16 MiB"
    );
}
