//! README.md's "A short tour", walked line by line as a new user would: as
//! the user running the tests (root in CI), in a `mktemp -d` home (mode
//! 0700, made by the tour's own `export` line), each line through `bash -c`
//! with the tour's environment, in a fresh working directory laid out like
//! the repository (`target/` and `profiles/` link to the real ones, so `ext
//! new` writes nowhere it should not).
//!
//! Each line must exit 0 (or the status its comment states), and print what
//! its comment promises where that is checkable. The README is the user's
//! contract: when a line is wrong, fix the README, not this test.
//!
//! Adapted lines, and why:
//! - `cargo xtask ...` lines are not run: `build-extensions` because the
//!   test needs the guests built already (`cargo xtask test` builds them
//!   first), the benchmarks and the soak because they are the developer's
//!   tools, minutes long, not the user's tour.
//! - `alias sandboxer-host=...` does nothing in `bash -c`: the binary under
//!   test is put first on `PATH` instead.
//! - `export` lines are run, and the environment they leave is carried to
//!   the following lines, as in one shell session.
//! - `sbx-…` stands for an id printed earlier: the local sandbox the tour
//!   creates to enter.
//! - `sandbox logs ID --follow` runs without `--follow` (it would wait for
//!   the sandbox's 300 s ttl).
//! - The `run --profile e2b` line gets a made-up key of E2B's shape: the
//!   tests have no network, so it shows the fallback to saas-stub that its
//!   comment promises rather than a sandbox on E2B.
//! - `serve &` runs as a child of this test and `kill %1` sends it SIGTERM;
//!   the E2B line gets the key `tenant create` printed and the pinned SDK
//!   (`cargo xtask install-e2b-sdks`) on `PYTHONPATH`, where a user would
//!   have `pip install e2b`.

use crate::support::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The shell lines of the tour, in order: every line of its ```sh blocks,
/// continuation lines joined.
fn tour_lines() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme
        .find("## A short tour")
        .expect("README.md has \"A short tour\"");
    let tour = &readme[start..];
    let tour = &tour[..tour[3..].find("\n## ").map_or(tour.len(), |end| end + 3)];
    let mut lines = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in tour.lines() {
        if line.starts_with("```") {
            in_block = line == "```sh";
            continue;
        }
        if !in_block || line.trim().is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => pending.push_str(head),
            None => {
                pending.push_str(line);
                lines.push(std::mem::take(&mut pending));
            }
        }
    }
    lines
}

/// One shell session's worth of state carried between lines.
struct Session {
    work: tempfile::TempDir,
    user_home: tempfile::TempDir,
    env: BTreeMap<String, String>,
    /// The local sandbox the tour creates to enter (`sbx-…`).
    sandbox_id: Option<String>,
    tenant_key: Option<String>,
    server: Option<Child>,
}

impl Session {
    fn new() -> Self {
        let work = tempfile::tempdir().unwrap();
        let root = repo_root();
        std::os::unix::fs::symlink(root.join("target"), work.path().join("target")).unwrap();
        std::os::unix::fs::symlink(root.join("profiles"), work.path().join("profiles")).unwrap();
        let user_home = tempfile::tempdir().unwrap();
        let binary = PathBuf::from(env!("CARGO_BIN_EXE_sandboxer-host"));
        let mut env = BTreeMap::new();
        env.insert(
            "PATH".to_string(),
            format!(
                "{}:{}",
                binary.parent().unwrap().display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        );
        env.insert("HOME".into(), user_home.path().display().to_string());
        env.insert(
            "PYTHONPATH".into(),
            root.join("target/tools/e2b-python").display().to_string(),
        );
        Self {
            work,
            user_home,
            env,
            sandbox_id: None,
            tenant_key: None,
            server: None,
        }
    }

    fn bash(&self, line: &str) -> Command {
        let mut command = Command::new("bash");
        command
            .arg("-c")
            .arg(line)
            .current_dir(self.work.path())
            .env_clear()
            .envs(&self.env);
        command
    }

    /// Runs an `export` line and keeps the environment it leaves.
    fn export(&mut self, line: &str) {
        let output = self.bash(&format!("{line} && env -0")).output().unwrap();
        assert!(output.status.success(), "{line}: {output:?}");
        self.env = String::from_utf8(output.stdout)
            .unwrap()
            .split('\0')
            .filter_map(|pair| pair.split_once('='))
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
    }

    fn run(&self, line: &str) -> Run {
        Run::from(self.bash(line).stdin(Stdio::null()).output().unwrap())
    }

    fn sandboxer_home(&self) -> PathBuf {
        PathBuf::from(&self.env["SANDBOXER_HOME"])
    }

    /// `serve &`: started, and waited for until it owns the home.
    fn start_server(&mut self, line: &str) {
        let line = line.split('&').next().unwrap().trim();
        let child = self
            .bash(&format!("exec {line}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.server = Some(child);
        let server_file = self.sandboxer_home().join("server.json");
        while !server_file.is_file() {
            let server = self.server.as_mut().unwrap();
            assert!(
                server.try_wait().unwrap().is_none(),
                "`{line}` exited before serving"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// `kill %1`: SIGTERM to the server, which must exit 0.
    fn stop_server(&mut self) {
        let server = self.server.take().expect("a server to stop");
        // SAFETY: signalling a child process this test started.
        unsafe {
            libc::kill(server.id() as i32, libc::SIGTERM);
        }
        let output = server.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "the server exits 0 on SIGTERM: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        if let Some(home) = self.env.get("SANDBOXER_HOME")
            && Path::new(home).starts_with(std::env::temp_dir())
        {
            let _ = std::fs::remove_dir_all(home);
        }
    }
}

/// The exit status a tour line's comment states, 0 unless it says otherwise.
fn expected_status(line: &str) -> i32 {
    if line.contains("exits 3") { 3 } else { 0 }
}

/// What a line's comment promises, where a test can check it; whether it
/// promised something checkable.
fn check_promise(line: &str, run: &Run) -> bool {
    let says = |text: &str| {
        assert!(
            run.stdout.contains(text),
            "`{line}` should print {text:?}:\n{}\n{}",
            run.stdout,
            run.stderr
        );
    };
    if line.starts_with("sandboxer-host ext list --json") {
        let listed = run.json();
        assert!(
            listed
                .as_array()
                .unwrap()
                .iter()
                .any(|entry| entry["status"] == "loaded"),
            "{listed}"
        );
    } else if line.starts_with("sandboxer-host ext list") {
        says("saas-stub");
        says("loaded");
    } else if line.starts_with("sandboxer-host ext check") {
        says("ok: ");
    } else if line.starts_with("sandboxer-host ext new") {
        says("created my-backend");
    } else if line.starts_with("sandboxer-host route explain --profile saas-stub --json") {
        assert_eq!(run.json()["chosen"], "saas-stub", "{}", run.stdout);
    } else if line.contains("run --profile saas-stub") {
        let summary = run.json();
        assert_eq!(summary["state"], "destroyed", "{summary}");
        assert!(summary["actual"].is_string(), "{summary}");
    } else if line.contains("run --profile e2b") {
        // Nothing leaves this machine in the tests: the e2b attempt fails
        // (its host name does not resolve) and the profile falls back.
        says("saas-stub");
    } else if line.contains("print(6*7)") {
        says("42");
    } else if line.contains("exit 3") {
        says("hi");
    } else if line.starts_with("sandboxer-host sandbox list") {
        says("ready");
    } else if line.starts_with("sandboxer-host sandbox destroy") {
        says("destroyed");
    } else if line.starts_with("sandboxer-host credits show --tenant acme --json") {
        assert_eq!(run.json()["balance"], "50.000000", "{}", run.stdout);
    } else if line.starts_with("sandboxer-host ledger verify") {
        says("ledger ok");
    } else if line.starts_with("curl") {
        says("sandboxer_sandboxes");
    } else if line.contains("completions bash") {
        assert!(run.stdout.is_empty(), "{}", run.stdout);
    } else {
        return false;
    }
    true
}

#[test]
fn the_readme_tour_works_line_by_line_in_a_private_home() {
    built_extensions();
    let lines = tour_lines();
    assert!(lines.len() > 25, "the tour has its lines: {lines:?}");
    let mut session = Session::new();
    let mut promises_checked = 0;
    for line in &lines {
        if line.starts_with("cargo xtask ") || line.starts_with("alias ") {
            continue;
        }
        if line.starts_with("export ") {
            session.export(line);
            continue;
        }
        if line.contains("serve &") {
            session.start_server(line);
            continue;
        }
        if line.starts_with("kill %1") {
            session.stop_server();
            continue;
        }
        let mut line = line.clone();
        if line.contains("sandbox logs") {
            line = line.replace(" --follow", "");
        }
        if line.contains("sbx-…") {
            let id = session
                .sandbox_id
                .clone()
                .expect("a sandbox created before this line");
            line = line.replace("sbx-…", &id);
        }
        if line.contains("from e2b import") {
            assert!(
                repo_root().join("target/tools/e2b-python/e2b").is_dir(),
                "the pinned E2B Python SDK is not in target/tools: run `cargo xtask install-e2b-sdks` (or `cargo xtask test`)"
            );
        }
        if line.starts_with("SANDBOXER_E2B_API_KEY=e2b_…") {
            // A key of E2B's shape; without a network E2B cannot be
            // reached, which is the comment's "saas-stub if it fails".
            line = line.replace("e2b_…", &format!("e2b_{}", "0".repeat(40)));
        } else if line.contains("e2b_…") {
            let key = session.tenant_key.clone().expect("a tenant key");
            line = line.replace("e2b_…", &key);
        }
        let run = session.run(&line);
        assert_eq!(
            run.code,
            expected_status(&line),
            "`{line}`:\nstdout: {}\nstderr: {}",
            run.stdout,
            run.stderr
        );
        if check_promise(&line, &run) {
            promises_checked += 1;
        }
        if line.contains("sandbox create --profile local") {
            session.sandbox_id = run
                .stdout
                .split_whitespace()
                .find(|word| word.starts_with("sbx-"))
                .map(str::to_string);
        }
        if line.starts_with("sandboxer-host tenant create") {
            session.tenant_key = run
                .stdout
                .split_whitespace()
                .find(|word| word.starts_with("e2b_"))
                .map(str::to_string);
        }
    }
    assert_eq!(
        promises_checked, 15,
        "every checkable promise of the tour was checked (a README edit may need one here)"
    );
    // The tour's home is the private one its export line made.
    let home = session.sandboxer_home();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&home).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700, "{}", home.display());
    assert!(
        session
            .user_home
            .path()
            .join(".local/share/bash-completion/completions/sandboxer-host")
            .is_file()
    );
}
