//! Shared helpers: where the built guests are, a fresh home per test, and
//! running the binary.

use sandboxer_host::runtime::{Runtime, SandboxSpec};
use sandboxer_host::state_db::StateDb;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn built(dir: &str) -> PathBuf {
    let path = repo_root().join("target").join(dir);
    assert!(
        path.join(if dir == "extensions" {
            "saas-stub.wasm"
        } else {
            "hostile.wasm"
        })
        .is_file(),
        "{} has no built guests: run `cargo xtask build-extensions` (or `cargo xtask test`) first",
        path.display()
    );
    path
}

/// target/extensions: the shipped extensions and their sidecars.
pub fn built_extensions() -> PathBuf {
    built("extensions")
}

/// target/examples: the Python and JavaScript examples.
pub fn built_examples() -> PathBuf {
    let path = repo_root().join("target/examples");
    assert!(
        ["minute-meter", "reserved-meter", "flat-fee"]
            .iter()
            .all(|name| path.join(format!("{name}.wasm")).is_file()),
        "{} has no built examples: run `cargo xtask build-extensions --examples` (or `cargo xtask test`) first",
        path.display()
    );
    path
}

/// target/fixtures: the hostile fixtures and their sidecars.
pub fn built_fixtures() -> PathBuf {
    built("fixtures")
}

/// Copies `name.wasm` (and `name.toml` when present) from `from` into `to`,
/// optionally under another name.
pub fn install(from: &Path, name: &str, to: &Path, as_name: &str) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(
        from.join(format!("{name}.wasm")),
        to.join(format!("{as_name}.wasm")),
    )
    .unwrap();
    let sidecar = from.join(format!("{name}.toml"));
    if sidecar.is_file() {
        std::fs::copy(sidecar, to.join(format!("{as_name}.toml"))).unwrap();
    }
}

/// A fresh home directory with an extensions directory inside.
pub struct TestHome {
    pub dir: tempfile::TempDir,
    /// Set for every command of this home (`SANDBOXER_STORE`, say).
    env: Vec<(String, String)>,
}

impl TestHome {
    pub fn new() -> Self {
        let home = Self {
            dir: tempfile::tempdir().unwrap(),
            env: Vec::new(),
        };
        std::fs::create_dir_all(home.extensions()).unwrap();
        std::fs::create_dir_all(home.profiles()).unwrap();
        home
    }

    /// Every command of this home runs with `name=value` set too.
    pub fn with_env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// `<home>/profiles`, the profiles directory the binary is given.
    pub fn profiles(&self) -> PathBuf {
        self.path().join("profiles")
    }

    /// Copies the shipped profiles (profiles/*.toml) into this home's.
    pub fn with_shipped_profiles(self) -> Self {
        for entry in std::fs::read_dir(repo_root().join("profiles")).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, self.profiles().join(path.file_name().unwrap())).unwrap();
        }
        self
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn extensions(&self) -> PathBuf {
        self.path().join("extensions")
    }

    pub fn ledger_file(&self) -> PathBuf {
        self.path().join("ledger.redb")
    }

    /// Installs the shipped saas-stub.
    pub fn with_saas_stub(self) -> Self {
        install(
            &built_extensions(),
            "saas-stub",
            &self.extensions(),
            "saas-stub",
        );
        self
    }

    /// Shares one precompiled cache across tests: big guests (an 18 MB
    /// Python component) then compile once per test run, not once per test.
    /// Safe: entries are keyed by content and engine and written atomically.
    pub fn with_shared_cache(self) -> Self {
        let shared = repo_root().join("target/e2e-cache");
        std::fs::create_dir_all(&shared).unwrap();
        std::os::unix::fs::symlink(&shared, self.path().join("cache")).unwrap();
        self
    }

    pub fn runtime(&self) -> Runtime {
        Runtime::new(
            self.path().join("cache"),
            Arc::new(StateDb::new(self.path().join("state.redb"))),
        )
        .unwrap()
    }

    /// `sandboxer-host` with this home and its extensions directory.
    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sandboxer-host"));
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("SANDBOXER_HOME", self.path())
            .env("SANDBOXER_EXTENSIONS_DIR", self.extensions())
            .env("SANDBOXER_PROFILES_DIR", self.profiles())
            // Each test's own cache (or the shared one it links there), not
            // the user's.
            .env("SANDBOXER_CACHE_DIR", self.path().join("cache"))
            .env("RUST_BACKTRACE", "1")
            .envs(self.env.iter().map(|(name, value)| (name, value)));
        command
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.command().args(args).output().unwrap())
    }
}

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(output: Output) -> Self {
        let run = Self {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        assert!(
            !run.stderr.contains("panicked") && !run.stderr.contains("stack backtrace"),
            "the binary must never show a panic or a backtrace:\n{}",
            run.stderr
        );
        run
    }
}

impl Run {
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "expected success:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    pub fn fails(self, code: i32) -> Self {
        assert_eq!(
            self.code, code,
            "expected exit {code}:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.stdout))
    }
}

pub fn spec(sandbox_id: &str) -> SandboxSpec {
    SandboxSpec {
        sandbox_id: sandbox_id.into(),
        profile: "test".into(),
        template: "base".into(),
        cpu_millis: 1000,
        memory_mb: 1024,
        ttl_secs: 3600,
        command: Vec::new(),
        env: Vec::new(),
        network: false,
    }
}

/// Starts the command given after its first argument, waits for it, and
/// writes its peak resident memory (KiB) to the file named by that argument.
/// A probe of its own because the kernel counts in a child's peak the memory
/// image it was started from, which for a child of this test process is the
/// whole test process; a child of this small exec'd program starts small.
const PEAK_MEMORY_PROBE: &str = r#"
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"#;

/// Runs `command` (one from [`TestHome::command`], which clears the
/// environment) to its end, and returns what it did and its peak resident
/// memory in MiB, measured by a `python3` probe.
pub fn run_measuring_peak_memory(command: &Command) -> (Run, u64) {
    let report = tempfile::NamedTempFile::new().unwrap();
    let mut probe = Command::new("python3");
    probe.env_clear();
    for (name, value) in command.get_envs() {
        if let Some(value) = value {
            probe.env(name, value);
        }
    }
    let output = probe
        .arg("-c")
        .arg(PEAK_MEMORY_PROBE)
        .arg(report.path())
        .arg(command.get_program())
        .args(command.get_args())
        .output()
        .unwrap();
    let run = Run::from(output);
    let peak_kib: u64 = std::fs::read_to_string(report.path())
        .unwrap()
        .trim()
        .parse()
        .unwrap_or_else(|error| panic!("the probe's report ({error}): {}", run.stderr));
    (run, peak_kib / 1024)
}
