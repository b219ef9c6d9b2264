//! `bench runtime`: the cost of calling an extension through the host, next
//! to bare wasmtime and native Rust doing the same work, and the cost of
//! loading an extension with and without the precompiled cache.
//!
//! - host: `Extension::estimate_cost` on the saas-stub: fresh Store from the
//!   InstancePre, empty WASI, limiter, deadline, fuel, key-value session,
//!   error classification;
//! - bare: the same component on the same engine and executor, InstancePre,
//!   fresh Store and async call, with only what the engine requires (a WASI
//!   context, a deadline and a fuel tank) and host imports that answer from
//!   a map;
//! - native: the same arithmetic as a Rust function.
//!
//! Goals: host at most 1.25x bare; a warm-cache load under 2 ms; a cached
//! load of the Python and JavaScript guests under 5 ms. A cached load is
//! measured as a later run meets it: after the artifact has settled (see
//! `runtime::SETTLE_WINDOW`), so its identity, not its hash, vouches for it.

use crate::stats::{median, percentile, print_rows, sample, show_ns, write_report};
use anyhow::{Context, Result};
use sandboxer_credits::{parse_credits, prorate};
use sandboxer_host::runtime::bindings::sandboxer::extension::host::{Host, LogLevel};
use sandboxer_host::runtime::bindings::sandboxer::extension::process::{
    ProcessStatus, SpawnRequest as ProcessSpawnRequest,
};
use sandboxer_host::runtime::bindings::{SelfHostedExtension, SelfHostedExtensionPre};
use sandboxer_host::runtime::{CacheOutcome, Runtime, SETTLE_WINDOW, SandboxSpec};
use sandboxer_host::state_db::StateDb;
use serde::Serialize;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

const CALLS: usize = 5_000;
const WARMUP: usize = 500;

/// One language's big guest: loading and calling it.
#[derive(Serialize)]
struct LanguageRow {
    language: &'static str,
    instance: &'static str,
    size_bytes: u64,
    first_load_ns: f64,
    cached_load_ns: f64,
    cached_load_goal_ns: f64,
    /// Bare wasmtime mapping the same artifact (`deserialize_file`): the
    /// floor of a cached load.
    bare_deserialize_ns: f64,
    cached_over_bare: f64,
    call_fresh_instance_ns: f64,
    call_reused_instance_ns: f64,
    call_reused_instance_goal_ns: f64,
}

#[derive(Serialize)]
struct RuntimeReport {
    calls: usize,
    host_call_median_ns: f64,
    host_call_p99_ns: f64,
    bare_call_median_ns: f64,
    bare_call_p99_ns: f64,
    native_call_median_ns: f64,
    host_over_bare: f64,
    host_over_bare_goal: f64,
    cold_load_median_ns: f64,
    compile_only_median_ns: f64,
    warm_load_median_ns: f64,
    warm_load_goal_ns: f64,
    cold_over_warm: f64,
    languages: Vec<LanguageRow>,
}

fn built_extensions() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ is in the workspace")
        .join("target/extensions")
}

fn spec() -> SandboxSpec {
    SandboxSpec {
        sandbox_id: "sbx-bench".into(),
        profile: "bench".into(),
        template: "base".into(),
        cpu_millis: 2000,
        memory_mb: 4096,
        ttl_secs: 600,
        command: Vec::new(),
        env: Vec::new(),
        network: false,
    }
}

/// The Store data of the bare baseline: a WASI context and a config map.
struct BareState {
    wasi: WasiCtx,
    table: ResourceTable,
    config: Arc<BTreeMap<String, String>>,
}

impl WasiView for BareState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl sandboxer_host::runtime::bindings::sandboxer::extension::types::Host for BareState {}

impl Host for BareState {
    fn log(&mut self, _level: LogLevel, _message: String) -> wasmtime::Result<()> {
        Ok(())
    }
    fn config_get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.config.get(&key).cloned())
    }
    fn kv_get(&mut self, _key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        Ok(None)
    }
    fn kv_set(&mut self, _key: String, _value: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
        Ok(Ok(()))
    }
    fn kv_delete(&mut self, _key: String) -> wasmtime::Result<bool> {
        Ok(false)
    }
    fn kv_keys(&mut self, _prefix: String, _limit: u32) -> wasmtime::Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// The baseline links the process capability too (the world has it) but
/// the saas-stub never calls it.
impl sandboxer_host::runtime::bindings::sandboxer::extension::process::Host for BareState {
    fn find_program(&mut self, _name: String) -> wasmtime::Result<Option<String>> {
        Ok(None)
    }
    fn workdir(&mut self, _sandbox_id: String) -> wasmtime::Result<Result<String, String>> {
        Ok(Err("not granted".into()))
    }
    fn spawn(&mut self, _request: ProcessSpawnRequest) -> wasmtime::Result<Result<(), String>> {
        Ok(Err("not granted".into()))
    }
    fn status(&mut self, _sandbox_id: String) -> wasmtime::Result<Result<ProcessStatus, String>> {
        Ok(Err("not granted".into()))
    }
    fn kill(&mut self, _sandbox_id: String) -> wasmtime::Result<Result<ProcessStatus, String>> {
        Ok(Err("not granted".into()))
    }
}

fn bare_pre(
    engine: &Engine,
    component: &Component,
) -> wasmtime::Result<SelfHostedExtensionPre<BareState>> {
    let mut linker = Linker::<BareState>::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    SelfHostedExtension::add_to_linker::<BareState, HasSelf<BareState>>(&mut linker, |state| {
        state
    })?;
    SelfHostedExtensionPre::new(linker.instantiate_pre(component)?)
}

fn bare_call(
    engine: &Engine,
    pre: &SelfHostedExtensionPre<BareState>,
    config: &Arc<BTreeMap<String, String>>,
    spec: &SandboxSpec,
) -> u64 {
    let state = BareState {
        wasi: WasiCtx::builder().build(),
        table: ResourceTable::new(),
        config: config.clone(),
    };
    let mut store = Store::new(engine, state);
    store.set_epoch_deadline(u64::MAX / 2);
    store.set_fuel(u64::MAX).unwrap();
    crate::block_on(async {
        let instance = pre.instantiate_async(&mut store).await.unwrap();
        instance
            .sandboxer_extension_backend()
            .call_estimate_cost(&mut store, spec)
            .await
            .unwrap()
            .unwrap()
            .amount
    })
}

/// What saas-stub's estimate-cost computes, natively.
fn native_estimate(config: &BTreeMap<String, String>, spec: &SandboxSpec) -> u64 {
    let per_vcpu = parse_credits(&config["rate_per_vcpu_hour"]).unwrap();
    let per_gib = parse_credits(&config["rate_per_gib_hour"]).unwrap();
    let duration = u64::from(spec.ttl_secs) * 1000;
    let cpu = prorate(per_vcpu, spec.cpu_millis.into(), 1000, duration).unwrap();
    let memory = prorate(per_gib, spec.memory_mb.into(), 1024, duration).unwrap();
    let hour_cpu = prorate(per_vcpu, spec.cpu_millis.into(), 1000, 3_600_000).unwrap();
    let hour_memory = prorate(per_gib, spec.memory_mb.into(), 1024, 3_600_000).unwrap();
    black_box(hour_cpu + hour_memory);
    cpu + memory
}

fn fresh_runtime(home: &Path) -> Result<Runtime> {
    Ok(Runtime::new(
        home.join("cache"),
        Arc::new(StateDb::new(home.join("state.redb"))),
    )?)
}

pub fn run() -> Result<()> {
    let extensions = built_extensions();
    let stub_file = extensions.join("saas-stub.wasm");
    anyhow::ensure!(
        stub_file.is_file(),
        "{} is missing: run `cargo xtask build-extensions`",
        stub_file.display()
    );
    let home = tempfile::tempdir()?;
    let dir = home.path().join("extensions");
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(&stub_file, dir.join("saas-stub.wasm"))?;
    std::fs::copy(
        extensions.join("saas-stub.toml"),
        dir.join("saas-stub.toml"),
    )?;
    let wasm_path = dir.join("saas-stub.wasm");

    let runtime = fresh_runtime(home.path())?;
    let entry = crate::block_on(runtime.load_file(&wasm_path));
    let stub = entry
        .status
        .map_err(anyhow::Error::msg)
        .context("load saas-stub")?;
    let spec = spec();
    let config = Arc::new(stub.config.clone());

    let host_amount = crate::block_on(stub.estimate_cost(&spec))?.amount;
    let pre = bare_pre(runtime.engine(), stub.component())
        .map_err(|error| anyhow::anyhow!("{error:#}"))?;
    let bare_amount = bare_call(runtime.engine(), &pre, &config, &spec);
    let native_amount = native_estimate(&config, &spec);
    anyhow::ensure!(
        host_amount == bare_amount && bare_amount == native_amount,
        "the three paths disagree: host {host_amount}, bare {bare_amount}, native {native_amount}"
    );

    // Interleave the two wasm paths in rounds so drift on a shared machine
    // hits both alike.
    let mut host_samples = Vec::new();
    let mut bare_samples = Vec::new();
    for _ in 0..5 {
        host_samples.extend(sample(WARMUP / 5, CALLS / 5, || {
            black_box(crate::block_on(stub.estimate_cost(black_box(&spec))).unwrap());
        }));
        bare_samples.extend(sample(WARMUP / 5, CALLS / 5, || {
            black_box(bare_call(runtime.engine(), &pre, &config, black_box(&spec)));
        }));
    }
    host_samples.sort_by(f64::total_cmp);
    bare_samples.sort_by(f64::total_cmp);
    let native_samples = sample(WARMUP, CALLS, || {
        black_box(native_estimate(&config, black_box(&spec)));
    });

    // Loading: cold (compile, no cache entry) versus warm (verified cache hit),
    // each through the whole load path including the info() call.
    let cache_entry = runtime.cache_entry_path(&stub.content_sha256);
    let cold_samples = sample(1, 10, || {
        let _ = std::fs::remove_file(&cache_entry);
        let entry = crate::block_on(runtime.load_file(&wasm_path));
        assert_eq!(entry.extension().unwrap().cache, CacheOutcome::Compiled);
    });
    // A cached load is a later run's: by then the artifact written just now
    // has settled, and the cache trusts its identity instead of hashing it.
    std::thread::sleep(SETTLE_WINDOW);
    let wasm = std::fs::read(&wasm_path)?;
    let compile_samples = sample(1, 10, || {
        black_box(Component::new(runtime.engine(), &wasm).unwrap());
    });
    let warm_samples = sample(5, 100, || {
        let entry = crate::block_on(runtime.load_file(&wasm_path));
        assert_eq!(entry.extension().unwrap().cache, CacheOutcome::Hit);
    });

    let languages = measure_languages(&spec)?;
    let report = RuntimeReport {
        calls: CALLS,
        host_call_median_ns: median(&host_samples),
        host_call_p99_ns: percentile(&host_samples, 99.0),
        bare_call_median_ns: median(&bare_samples),
        bare_call_p99_ns: percentile(&bare_samples, 99.0),
        native_call_median_ns: median(&native_samples),
        host_over_bare: median(&host_samples) / median(&bare_samples),
        host_over_bare_goal: 1.25,
        cold_load_median_ns: median(&cold_samples),
        compile_only_median_ns: median(&compile_samples),
        warm_load_median_ns: median(&warm_samples),
        warm_load_goal_ns: 2_000_000.0,
        cold_over_warm: median(&cold_samples) / median(&warm_samples),
        languages,
    };
    let verdict = |ok: bool| if ok { "meets goal" } else { "MISSES goal" };
    print_rows(
        "runtime: estimate-cost on saas-stub (median over interleaved rounds)",
        &[
            (
                "host call path".into(),
                show_ns(report.host_call_median_ns),
                format!("p99 {}", show_ns(report.host_call_p99_ns)),
            ),
            (
                "bare wasmtime".into(),
                show_ns(report.bare_call_median_ns),
                format!("p99 {}", show_ns(report.bare_call_p99_ns)),
            ),
            (
                "native Rust".into(),
                show_ns(report.native_call_median_ns),
                String::new(),
            ),
            (
                "host / bare".into(),
                format!("{:.2}x", report.host_over_bare),
                format!(
                    "goal <= {:.2}x: {}",
                    report.host_over_bare_goal,
                    verdict(report.host_over_bare <= report.host_over_bare_goal)
                ),
            ),
        ],
    );
    print_rows(
        "runtime: loading saas-stub (whole load path, median)",
        &[
            (
                "cold (compile + cache write)".into(),
                show_ns(report.cold_load_median_ns),
                String::new(),
            ),
            (
                "compile only".into(),
                show_ns(report.compile_only_median_ns),
                String::new(),
            ),
            (
                "warm (verified cache hit)".into(),
                show_ns(report.warm_load_median_ns),
                format!(
                    "goal < 2 ms: {}",
                    verdict(report.warm_load_median_ns < report.warm_load_goal_ns)
                ),
            ),
            (
                "cold / warm".into(),
                format!("{:.1}x", report.cold_over_warm),
                String::new(),
            ),
        ],
    );
    if report.languages.is_empty() {
        println!(
            "\n(no language rows: build the examples with `cargo xtask build-extensions --examples`)"
        );
    } else {
        let mut rows = vec![(
            "Rust (saas-stub)".to_string(),
            show_ns(report.warm_load_median_ns),
            format!(
                "first load {}; call {} (fresh instance)",
                show_ns(report.cold_load_median_ns),
                show_ns(report.host_call_median_ns)
            ),
        )];
        let goal =
            |value: f64, goal: f64, text: &str| format!("goal {text}: {}", verdict(value <= goal));
        for row in &report.languages {
            rows.push((
                format!(
                    "{} ({}, {:.1} MB)",
                    row.language,
                    row.instance,
                    row.size_bytes as f64 / 1e6
                ),
                show_ns(row.cached_load_ns),
                format!(
                    "{}; bare deserialize {} ({:.1}x); first load {}; call {} fresh, {} reused ({:.0}x; {})",
                    goal(row.cached_load_ns, row.cached_load_goal_ns, "cached load <= 5 ms"),
                    show_ns(row.bare_deserialize_ns),
                    row.cached_over_bare,
                    show_ns(row.first_load_ns),
                    show_ns(row.call_fresh_instance_ns),
                    show_ns(row.call_reused_instance_ns),
                    row.call_fresh_instance_ns / row.call_reused_instance_ns,
                    goal(
                        row.call_reused_instance_ns,
                        row.call_reused_instance_goal_ns,
                        "reused <= 50 µs"
                    ),
                ),
            ));
        }
        print_rows(
            "runtime: per language, cached load (median) / first load / estimate-cost call",
            &rows,
        );
    }
    let path = write_report("runtime", &report)?;
    println!("\nwritten to {}", path.display());
    Ok(())
}

fn instance_file(dir: &Path, instance: &str) -> PathBuf {
    dir.join(format!("{instance}.wasm"))
}

/// Runs `sandboxer-bench cached-loads HOME FILE`: medians of cached loads
/// and of bare deserializes, in nanoseconds.
fn cached_loads_in_a_new_process(home: &Path, file: &Path) -> Result<(f64, f64)> {
    let output = std::process::Command::new(std::env::current_exe()?)
        .arg("cached-loads")
        .arg(home)
        .arg(file)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "the cached-load process failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout)?;
    let mut numbers = text.split_whitespace().map(str::parse::<f64>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(cached)), Some(Ok(bare))) => Ok((cached, bare)),
        _ => anyhow::bail!("the cached-load process answered {text:?}"),
    }
}

/// The child of [`cached_loads_in_a_new_process`]: a cached load through the
/// host and bare wasmtime's deserialize of the same artifact, in 21 pairs
/// (after two rounds' warm-up), so that on a shared machine both meet the
/// same moments. Prints both medians.
pub fn cached_loads_child(home: &Path, file: &Path) -> Result<()> {
    // Its own state file: the parent may have the home's open.
    let runtime = Runtime::new(
        home.join("cache"),
        Arc::new(StateDb::new(home.join("cached-loads-state.redb"))),
    )?;
    let load = || {
        crate::block_on(runtime.load_file(file))
            .status
            .map_err(anyhow::Error::msg)
    };
    let artifact = runtime.cache_entry_path(&load()?.content_sha256);
    let (mut cached, mut bare) = (Vec::new(), Vec::new());
    for round in 0..23 {
        let started = Instant::now();
        load()?;
        let cached_ns = started.elapsed().as_nanos() as f64;
        let started = Instant::now();
        // SAFETY: the artifact the host just loaded (and verified) from the cache.
        black_box(
            unsafe { Component::deserialize_file(runtime.engine(), &artifact) }
                .map_err(|error| anyhow::anyhow!("{error:#}"))?,
        );
        if round >= 2 {
            cached.push(cached_ns);
            bare.push(started.elapsed().as_nanos() as f64);
        }
    }
    cached.sort_by(f64::total_cmp);
    bare.sort_by(f64::total_cmp);
    println!("{} {}", median(&cached), median(&bare));
    Ok(())
}

/// First load, cached load, and a call with and without instance reuse, for
/// the Python and JavaScript examples (when they are built).
fn measure_languages(spec: &SandboxSpec) -> Result<Vec<LanguageRow>> {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ is in the workspace")
        .join("target/examples");
    let mut rows = Vec::new();
    for (language, instance) in [("Python", "minute-meter"), ("JavaScript", "reserved-meter")] {
        let wasm = examples.join(format!("{instance}.wasm"));
        if !wasm.is_file() {
            continue;
        }
        let home = tempfile::tempdir()?;
        let dir = home.path().join("extensions");
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(&wasm, dir.join(format!("{instance}.wasm")))?;
        let sidecar = std::fs::read_to_string(examples.join(format!("{instance}.toml")))?;
        std::fs::write(dir.join(format!("{instance}.toml")), &sidecar)?;
        // The same component without reuse, under another name.
        std::fs::copy(&wasm, dir.join("fresh.wasm"))?;
        std::fs::write(
            dir.join("fresh.toml"),
            sidecar.replace("reuse_instances = true", "reuse_instances = false"),
        )?;

        let runtime = fresh_runtime(home.path())?;
        let load = |file: &Path| {
            crate::block_on(runtime.load_file(file))
                .status
                .map_err(anyhow::Error::msg)
        };
        let first = sample(0, 1, || {
            load(&dir.join(format!("{instance}.wasm"))).expect("loads");
        });
        // As a later run would find it: the new artifact has settled.
        std::thread::sleep(SETTLE_WINDOW);
        let reused = load(&dir.join(format!("{instance}.wasm")))?;
        let fresh = load(&dir.join("fresh.wasm"))?;
        anyhow::ensure!(
            reused.limits.reuse_instances && !fresh.limits.reuse_instances,
            "one reuses, one does not"
        );
        // A cached load is a later run's, in a process of its own: this one
        // has just compiled the component, and its heap (fragmented by the
        // compile) slowed wasmtime's many small allocations while reading
        // the artifact, by up to 1.6x.
        let (cached, bare) =
            cached_loads_in_a_new_process(home.path(), &instance_file(&dir, instance))?;
        let call_reused = sample(20, 500, || {
            black_box(crate::block_on(reused.estimate_cost(spec)).unwrap());
        });
        let call_fresh = sample(3, 40, || {
            black_box(crate::block_on(fresh.estimate_cost(spec)).unwrap());
        });
        rows.push(LanguageRow {
            language,
            instance,
            size_bytes: std::fs::metadata(&wasm)?.len(),
            first_load_ns: median(&first),
            cached_load_ns: cached,
            cached_load_goal_ns: 5_000_000.0,
            bare_deserialize_ns: bare,
            cached_over_bare: cached / bare,
            call_fresh_instance_ns: median(&call_fresh),
            call_reused_instance_ns: median(&call_reused),
            call_reused_instance_goal_ns: 50_000.0,
        });
    }
    Ok(rows)
}
