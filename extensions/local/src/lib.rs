//! local: a self-hosted backend that runs each sandbox's command on this
//! machine, inside bubblewrap, through the host's `process` capability.
//!
//! The extension itself stays sandboxed: it can start only the programs its
//! sidecar grants (`process = ["bwrap"]`), and it starts every workload
//! inside bubblewrap, never directly. Without bubblewrap it answers
//! `unavailable`, so routing falls back to another backend.
//!
//! The sandbox gets new user, pid, ipc, uts and cgroup namespaces, and a
//! new network namespace (no network) unless the profile asks for network;
//! read-only binds of `/usr`, `/bin`, `/sbin` and `/lib*` and the few files
//! of `/etc` a program needs to start; its own `/proc`, `/dev` and `/tmp`;
//! and a private writable working directory at `/work`: a tmpfs of at most
//! `work_mb`, made inside the sandbox, so nothing of the host's file system
//! is bound writable (and nothing under a private home has to be reachable
//! by the sandbox's user). The host applies the limits to the process tree:
//! with cgroups memory, processes and CPU bandwidth for the whole tree,
//! without them per-process memory, CPU time and the user's process count;
//! and the ttl (the tree is killed when it ends).
//!
//! bubblewrap reports on descriptor 3 (`--json-status-fd`), so `create`
//! returns only once the sandbox's command runs, and fails with
//! bubblewrap's own words when it could not set the sandbox up.
//!
//! Config (`[config]` of the sidecar): `rate_per_vcpu_hour` and
//! `rate_per_gib_hour` (decimal credits, default 0, so lowest-cost routing
//! can weigh this machine against SaaS backends), `max_processes`
//! (default 64) and `work_mb` (the size of `/work`, default 256).

use sandboxer_sdk::process::{BUBBLEWRAP_STATUS_FD, ProcessLimits, SpawnRequest};
use sandboxer_sdk::*;

const BUBBLEWRAP: &str = "bwrap";
const INSTALL_HINT: &str =
    "bubblewrap is not installed on this machine: install bubblewrap (apt-get install bubblewrap)";
const DEFAULT_MAX_PROCESSES: u32 = 64;
const DEFAULT_WORK_MB: u32 = 256;

struct Local;

fn rate_card() -> Result<pricing::RateCard, ExtError> {
    pricing::RateCard::from_config(0, 0)
}

fn bubblewrap() -> Result<String, ExtError> {
    process::find_program(BUBBLEWRAP).ok_or_else(|| ExtError::Unavailable(INSTALL_HINT.into()))
}

fn validate(spec: &SandboxSpec) -> Result<(), ExtError> {
    if spec.cpu_millis == 0 || spec.memory_mb == 0 || spec.ttl_secs == 0 {
        return Err(ExtError::InvalidSpec(format!(
            "cpu_millis, memory_mb and ttl_secs must be above zero (got {}, {}, {})",
            spec.cpu_millis, spec.memory_mb, spec.ttl_secs
        )));
    }
    Ok(())
}

/// A whole number from the sidecar's `[config]`, or its default.
fn config_number(key: &str, default: u32) -> Result<u32, ExtError> {
    match config::get(key) {
        Some(text) => text.trim().parse().map_err(|_| {
            ExtError::Internal(format!(
                "config key `{key}`: {text:?} is not a whole number"
            ))
        }),
        None => Ok(default),
    }
}

/// The bubblewrap command line that runs the spec's command in a `/work`
/// of `work_mb` MiB.
fn bubblewrap_args(spec: &SandboxSpec, work_mb: u32) -> Vec<String> {
    let mut args: Vec<String> = [
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "sandbox",
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    .map(String::from)
    .to_vec();
    if !spec.network {
        args.push("--unshare-net".into());
    }
    for path in ["/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"] {
        args.extend(["--ro-bind-try".into(), path.into(), path.into()]);
    }
    // What dynamic linking, locales and time zones read; certificates and
    // name resolution only when the sandbox has the network.
    let mut etc = vec![
        "/etc/ld.so.cache",
        "/etc/ld.so.conf",
        "/etc/ld.so.conf.d",
        "/etc/alternatives",
        "/etc/localtime",
    ];
    if spec.network {
        etc.extend([
            "/etc/resolv.conf",
            "/etc/hosts",
            "/etc/nsswitch.conf",
            "/etc/ssl",
            "/etc/ca-certificates",
        ]);
    }
    for path in etc {
        args.extend(["--ro-bind-try".into(), path.into(), path.into()]);
    }
    let work_bytes = u64::from(work_mb) * 1024 * 1024;
    args.extend(
        [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
            "--size",
            &work_bytes.to_string(),
            "--tmpfs",
            "/work",
            "--chdir",
            "/work",
            "--json-status-fd",
            &BUBBLEWRAP_STATUS_FD.to_string(),
            "--",
        ]
        .map(String::from),
    );
    if spec.command.is_empty() {
        // No command: keep the sandbox alive for its ttl.
        args.extend(["sleep".into(), spec.ttl_secs.to_string()]);
    } else {
        args.extend(spec.command.iter().cloned());
    }
    args
}

impl Backend for Local {
    fn info() -> ExtensionInfo {
        ExtensionInfo {
            id: "local".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: BackendKind::SelfHosted,
            description: "Runs sandboxes on this machine inside bubblewrap".into(),
        }
    }

    fn estimate_cost(spec: SandboxSpec) -> Result<CostEstimate, ExtError> {
        validate(&spec)?;
        bubblewrap()?;
        config_number("max_processes", DEFAULT_MAX_PROCESSES)?;
        config_number("work_mb", DEFAULT_WORK_MB)?;
        rate_card()?.estimate(&spec)
    }

    fn create(spec: SandboxSpec) -> Result<SandboxHandle, ExtError> {
        validate(&spec)?;
        let program = bubblewrap()?;
        let max_processes = config_number("max_processes", DEFAULT_MAX_PROCESSES)?;
        let work_mb = config_number("work_mb", DEFAULT_WORK_MB)?;
        let mut env = vec![
            (
                "PATH".to_string(),
                "/usr/local/bin:/usr/bin:/bin".to_string(),
            ),
            ("HOME".to_string(), "/work".to_string()),
            ("LANG".to_string(), "C.UTF-8".to_string()),
        ];
        env.extend(spec.env.iter().cloned());
        let vcpus = spec.cpu_millis.div_ceil(1000).max(1);
        let request = SpawnRequest {
            sandbox_id: spec.sandbox_id.clone(),
            program,
            args: bubblewrap_args(&spec, work_mb),
            env,
            limits: ProcessLimits {
                memory_mb: spec.memory_mb,
                cpu_secs: spec.ttl_secs.saturating_mul(vcpus),
                cpu_millis: spec.cpu_millis,
                max_processes,
                wall_secs: spec.ttl_secs,
            },
            status_fd: Some(BUBBLEWRAP_STATUS_FD),
        };
        process::spawn(&request).map_err(|error| {
            ExtError::Unavailable(format!("cannot start the sandbox in bubblewrap: {error}"))
        })?;
        log::info(&format!(
            "sandbox {} started in bubblewrap",
            spec.sandbox_id
        ));
        Ok(SandboxHandle {
            backend_ref: format!("local-{}", spec.sandbox_id),
            endpoint: None,
        })
    }

    fn destroy(spec: SandboxSpec, _handle: SandboxHandle) -> Result<Usage, ExtError> {
        let status = process::kill(&spec.sandbox_id).map_err(ExtError::NotFound)?;
        let usage = status.usage;
        let peak_mb = usage.peak_memory_kb.div_ceil(1024);
        Ok(Usage {
            wall_ms: usage.wall_ms,
            cpu_ms: usage.cpu_ms,
            memory_mb_ms: peak_mb.saturating_mul(usage.wall_ms),
            egress_bytes: 0,
        })
    }

    fn meter_actual(spec: SandboxSpec, usage: Usage) -> Result<MicroCredits, ExtError> {
        rate_card()?.actual(&spec, usage.wall_ms)
    }
}

export_backend!(Local);
