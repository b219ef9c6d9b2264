//! The throwaway PostgreSQL cluster that `cargo xtask test`, `cargo xtask
//! bench` (ledger, serve, all) and `cargo xtask postgres -- COMMAND` run
//! against: installs Debian's `postgresql` when no server binaries are found,
//! makes a fresh cluster, starts it on a free loopback port, hands its
//! address to a child process through two environment variables, and stops
//! and deletes it when the child ends, whether or not the child succeeded.
//!
//! It owns `target/postgres/` and nothing else: no system cluster, no
//! service, no container. PostgreSQL refuses to run as root, so as root the
//! cluster belongs to a dedicated system user, [`SERVER_USER`], created when
//! missing (a user of our own, rather than Debian's `postgres`, so that this
//! throwaway cluster never shares an owner with a real one).

use anyhow::{Context, Result, bail};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The superuser URL of the running test cluster; tests create their own
/// databases through it.
pub const TEST_POSTGRES_URL_VARIABLE: &str = "SANDBOXER_TEST_POSTGRES";
/// A script that runs `pg_ctl` for the test cluster, as the right user and
/// with its data directory and log, so a test can `restart`, `stop -m
/// immediate` and `start` the server (the crash drill does).
pub const TEST_PG_CTL_VARIABLE: &str = "SANDBOXER_TEST_PG_CTL";
/// The database superuser that `initdb` creates; trusted on loopback.
const DATABASE_SUPERUSER: &str = "sandboxer";
/// The system user that owns and runs the cluster when xtask runs as root.
const SERVER_USER: &str = "sandboxer-pg";

/// A running test cluster. [`TestCluster::stop`] stops it and reports
/// failure; dropping it without that (an early `?`, a panic) stops it too,
/// printing any failure.
pub struct TestCluster {
    /// `target/postgres/`: the generated pg_ctl script, the pointer to the
    /// cluster directory and the last run's server log.
    state_directory: PathBuf,
    /// Holds `data/` and `server.log`; owned by the server user.
    cluster_directory: PathBuf,
    pg_ctl_script: PathBuf,
    port: u16,
    stopped: bool,
}

/// Who runs initdb and pg_ctl: the dedicated system user when xtask runs as
/// root, otherwise the developer themselves.
struct ServerUser {
    name: String,
    user_id: u32,
    group_id: u32,
}

/// The directory with `initdb`, `pg_ctl` and `postgres`, installing Debian's
/// `postgresql` first when there is none.
pub fn ensure_installed() -> Result<PathBuf> {
    if let Some(binaries) = find_binaries() {
        return Ok(binaries);
    }
    eprintln!("PostgreSQL is missing: the ledger's tests need a server; installing");
    crate::apt_install(&["postgresql"])?;
    find_binaries().context(
        "installed `postgresql`, but found no initdb and pg_ctl in \
         /usr/lib/postgresql/<version>/bin or on PATH",
    )
}

/// Debian keeps the server binaries off PATH, in
/// /usr/lib/postgresql/<version>/bin: take the highest version; elsewhere,
/// the directory of the `pg_ctl` on PATH (through any symlink).
fn find_binaries() -> Option<PathBuf> {
    let has_binaries =
        |directory: &Path| directory.join("initdb").is_file() && directory.join("pg_ctl").is_file();
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, directory)| has_binaries(directory))
        .max_by_key(|(version, _)| *version)
        .map(|(_, directory)| directory);
    debian.or_else(|| {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|directory| directory.join("pg_ctl"))
            .find(|pg_ctl| pg_ctl.is_file())
            .and_then(|pg_ctl| std::fs::canonicalize(pg_ctl).ok())
            .and_then(|pg_ctl| pg_ctl.parent().map(Path::to_path_buf))
            .filter(|directory| has_binaries(directory))
    })
}

impl TestCluster {
    /// Stops and deletes whatever an earlier, killed run left, then makes a
    /// fresh cluster and starts it.
    pub fn start(root: &Path) -> Result<TestCluster> {
        let binaries = ensure_installed()?;
        let server_user = server_user()?;
        let state_directory = root.join("target/postgres");
        std::fs::create_dir_all(&state_directory)?;
        remove_leftover_cluster(&state_directory)?;

        let cluster_directory = make_cluster_directory(&state_directory, server_user.as_ref())?;
        let data_directory = cluster_directory.join("data");
        let log = cluster_directory.join("server.log");

        let started = Instant::now();
        let mut initdb = as_server_user(server_user.as_ref(), &binaries.join("initdb"));
        initdb.arg("--pgdata").arg(&data_directory).args([
            "--auth=trust",
            "--username",
            DATABASE_SUPERUSER,
            "--encoding=UTF8",
            // A locale the machine may not have generated would make
            // initdb fail; the tests compare no text by collation.
            "--locale=C",
            // Only skips initdb's own final flush: the server keeps
            // fsync on, since the tests include a crash drill.
            "--no-sync",
        ]);
        let output = initdb
            .output()
            .with_context(|| format!("cannot start {}", crate::describe(&initdb)))?;
        if !output.status.success() {
            bail!(
                "could not create the PostgreSQL test cluster: `{}` failed with {}: {}{}",
                crate::describe(&initdb),
                output.status,
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let initdb_time = started.elapsed();

        let port = free_loopback_port()?;
        // In postgresql.conf rather than pg_ctl's -o, so every start and
        // restart (ours and the tests', through the script) gets them.
        // No Unix socket: the tests connect over TCP, and a socket path
        // inside a deep checkout can pass the 107-byte limit.
        let mut configuration = std::fs::OpenOptions::new()
            .append(true)
            .open(data_directory.join("postgresql.conf"))
            .context("cannot open the test cluster's postgresql.conf")?;
        writeln!(
            configuration,
            "\n# Added by cargo xtask for its throwaway test cluster.\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = ''\n\
             max_connections = 300"
        )?;

        let pg_ctl_script = state_directory.join("pg_ctl");
        write_pg_ctl_script(
            &pg_ctl_script,
            server_user.as_ref(),
            &binaries.join("pg_ctl"),
            &data_directory,
            &log,
        )?;

        let cluster = TestCluster {
            state_directory,
            cluster_directory,
            pg_ctl_script,
            port,
            stopped: false,
        };
        let output = Command::new(&cluster.pg_ctl_script)
            .arg("start")
            .output()
            .context("cannot run the test cluster's pg_ctl script")?;
        if !output.status.success() {
            let server_log = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = server_log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            // Dropping the cluster deletes its directory but keeps the log.
            bail!(
                "PostgreSQL did not start for the tests (`{} start` failed with {}: {}); \
                 the last lines of its log (kept in {}):\n{}",
                cluster.pg_ctl_script.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
                cluster.state_directory.join("server.log").display(),
                tail.join("\n")
            );
        }
        interrupts_reach_only_the_child(true);
        eprintln!(
            "PostgreSQL test cluster on 127.0.0.1:{port} ({}), data in {}, run by {}; \
             started in {} ms (initdb {} ms)",
            cluster.url(),
            data_directory.display(),
            server_user.map_or_else(|| "this user".to_string(), |user| user.name),
            started.elapsed().as_millis(),
            initdb_time.as_millis()
        );
        Ok(cluster)
    }

    pub fn url(&self) -> String {
        format!(
            "postgres://{DATABASE_SUPERUSER}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    /// The variables a child process needs to use the cluster.
    pub fn environment(&self) -> [(&'static str, String); 2] {
        [
            (TEST_POSTGRES_URL_VARIABLE, self.url()),
            (
                TEST_PG_CTL_VARIABLE,
                self.pg_ctl_script.to_string_lossy().into_owned(),
            ),
        ]
    }

    /// Stops the server (fast: open sessions are ended), keeps its log as
    /// `target/postgres/server.log`, and deletes the cluster.
    pub fn stop(mut self) -> Result<()> {
        self.stopped = true;
        self.stop_and_delete()
    }

    fn stop_and_delete(&self) -> Result<()> {
        interrupts_reach_only_the_child(false);
        let data_directory = self.cluster_directory.join("data");
        // A test may have stopped the server itself (stop -m immediate
        // without a start): then there is nothing for pg_ctl to stop.
        if data_directory.join("postmaster.pid").exists() {
            let output = Command::new(&self.pg_ctl_script)
                .args(["stop", "-m", "fast"])
                .output()
                .context("cannot run the test cluster's pg_ctl script")?;
            if !output.status.success() {
                // pg_ctl refuses when the postmaster died without removing
                // its pid file; stop whatever still runs by its pid.
                stop_postmaster_by_pid(&data_directory).with_context(|| {
                    format!(
                        "could not stop the PostgreSQL test cluster in {} ({})",
                        data_directory.display(),
                        String::from_utf8_lossy(&output.stderr).trim()
                    )
                })?;
            }
        }
        let log = self.cluster_directory.join("server.log");
        let kept_log = self.state_directory.join("server.log");
        if log.exists() {
            crate::copy(&log, &kept_log)?;
        }
        remove_leftover_cluster(&self.state_directory)?;
        std::fs::remove_file(&self.pg_ctl_script).ok();
        eprintln!(
            "PostgreSQL test cluster stopped and deleted; its log is kept in {}",
            kept_log.display()
        );
        Ok(())
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if !self.stopped
            && let Err(error) = self.stop_and_delete()
        {
            eprintln!("xtask: {error:#}");
        }
    }
}

/// As root, the dedicated system user (created if missing); otherwise none.
fn server_user() -> Result<Option<ServerUser>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let id = |flag: &str| -> Option<u32> {
        let output = Command::new("id").args([flag, SERVER_USER]).output().ok()?;
        if !output.status.success() {
            return None;
        }
        String::from_utf8_lossy(&output.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        crate::run(Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            SERVER_USER,
        ]))
        .context("PostgreSQL refuses to run as root, and its user could not be created")?;
    }
    let (Some(user_id), Some(group_id)) = (id("-u"), id("-g")) else {
        bail!("cannot read the user and group ids of `{SERVER_USER}`");
    };
    Ok(Some(ServerUser {
        name: SERVER_USER.to_string(),
        user_id,
        group_id,
    }))
}

/// `program` run as the server user. The working directory is `/`, since
/// initdb and postgres fail when they cannot read the one they start in
/// (such as /root).
fn as_server_user(server_user: Option<&ServerUser>, program: &Path) -> Command {
    let mut command = match server_user {
        Some(user) => {
            let mut runuser = Command::new("runuser");
            runuser.args(["-u", &user.name, "--"]).arg(program);
            runuser
        }
        None => Command::new(program),
    };
    command.current_dir("/");
    command
}

/// The file in `target/postgres/` that names the current cluster directory,
/// so the next run finds a cluster that lives outside `target/`.
fn cluster_pointer(state_directory: &Path) -> PathBuf {
    state_directory.join("cluster-directory")
}

/// A fresh, empty directory for the cluster, owned by the server user:
/// `target/postgres/cluster`, or, when that user cannot reach it (a
/// checkout under /root or inside a `mktemp -d` directory, mode 0700), a
/// fresh `mktemp -d` directory under /tmp handed to that user.
fn make_cluster_directory(
    state_directory: &Path,
    server_user: Option<&ServerUser>,
) -> Result<PathBuf> {
    let hand_over = |directory: &Path| -> Result<()> {
        std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o700))?;
        if let Some(user) = server_user {
            std::os::unix::fs::chown(directory, Some(user.user_id), Some(user.group_id))
                .with_context(|| format!("cannot hand {} to {}", directory.display(), user.name))?;
        }
        Ok(())
    };
    let mut directory = state_directory.join("cluster");
    std::fs::create_dir(&directory)
        .with_context(|| format!("cannot create {}", directory.display()))?;
    hand_over(&directory)?;
    if let Some(user) = server_user {
        let reachable = as_server_user(Some(user), Path::new("test"))
            .arg("-w")
            .arg(&directory)
            .status()
            .context("cannot run `runuser`")?
            .success();
        if !reachable {
            std::fs::remove_dir(&directory)?;
            let output = Command::new("mktemp")
                .args(["-d", "/tmp/sandboxer-postgres.XXXXXX"])
                .output()
                .context("cannot run `mktemp`")?;
            if !output.status.success() {
                bail!(
                    "`mktemp -d` failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            directory = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
            hand_over(&directory)?;
        }
    }
    std::fs::write(
        cluster_pointer(state_directory),
        directory.as_os_str().as_encoded_bytes(),
    )?;
    Ok(directory)
}

/// Stops a server that an earlier run left (killed before it could stop
/// it), and deletes that run's cluster directory.
fn remove_leftover_cluster(state_directory: &Path) -> Result<()> {
    let pointer = cluster_pointer(state_directory);
    let directory = match std::fs::read_to_string(&pointer) {
        Ok(text) => PathBuf::from(text.trim()),
        Err(_) => state_directory.join("cluster"),
    };
    if directory.join("data/postmaster.pid").exists() {
        stop_postmaster_by_pid(&directory.join("data"))?;
    }
    if directory.exists() {
        std::fs::remove_dir_all(&directory).with_context(|| {
            format!("cannot delete the old test cluster {}", directory.display())
        })?;
    }
    std::fs::remove_file(&pointer).ok();
    Ok(())
}

/// Sends the postmaster named by `postmaster.pid` SIGQUIT (immediate
/// shutdown; the cluster is thrown away) and waits until it is gone. A pid
/// that is no longer a `postgres` process (the server was killed and the
/// pid reused, or it is already gone) is left alone.
fn stop_postmaster_by_pid(data_directory: &Path) -> Result<()> {
    let pid_file = data_directory.join("postmaster.pid");
    let Some(pid) = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|text| text.lines().next()?.trim().parse::<libc::pid_t>().ok())
    else {
        return Ok(());
    };
    if !is_running_postgres(pid) {
        return Ok(());
    }
    eprintln!(
        "stopping the PostgreSQL server (pid {pid}) left running in {}",
        data_directory.display()
    );
    // SAFETY: kill has no memory preconditions; the pid was just checked
    // to be a running postgres process.
    if unsafe { libc::kill(pid, libc::SIGQUIT) } != 0 {
        bail!(
            "cannot stop the PostgreSQL server (pid {pid}) left running in {}: {}",
            data_directory.display(),
            std::io::Error::last_os_error()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while is_running_postgres(pid) {
        if Instant::now() > deadline {
            bail!("the PostgreSQL server (pid {pid}) did not stop within 30 s of SIGQUIT");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Whether `pid` is a live (not zombie) process named `postgres`.
fn is_running_postgres(pid: libc::pid_t) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) state ...": comm may hold spaces and parentheses.
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let state = stat[close + 1..].trim_start().chars().next();
    &stat[open + 1..close] == "postgres" && state != Some('Z')
}

/// A loopback port that was free a moment ago (bound to port 0 and
/// released): the server takes it right after.
fn free_loopback_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("cannot find a free loopback port for PostgreSQL")?;
    Ok(listener.local_addr()?.port())
}

/// The script behind `SANDBOXER_TEST_PG_CTL`: `pg_ctl` for this cluster as
/// the server user, waiting for each action; every argument passes through.
fn write_pg_ctl_script(
    script: &Path,
    server_user: Option<&ServerUser>,
    pg_ctl: &Path,
    data_directory: &Path,
    log: &Path,
) -> Result<()> {
    let quote = |path: &Path| format!("'{}'", path.to_string_lossy().replace('\'', r"'\''"));
    let run_as =
        server_user.map_or_else(String::new, |user| format!("runuser -u {} -- ", user.name));
    let text = format!(
        "#!/bin/sh\n\
         # Generated by cargo xtask: pg_ctl for the throwaway test cluster, e.g.\n\
         # `$SANDBOXER_TEST_PG_CTL restart`, `stop -m immediate`, `start`, `status`.\n\
         # Its settings (port, loopback only) are in the cluster's postgresql.conf.\n\
         # From / since postgres fails in a working directory it cannot read.\n\
         cd / || exit 1\n\
         exec {run_as}{} --pgdata {} --log {} --wait \"$@\"\n",
        quote(pg_ctl),
        quote(data_directory),
        quote(log)
    );
    std::fs::write(script, text)?;
    std::fs::set_permissions(script, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// While the cluster runs, xtask only waits for a child (the tests, the
/// command): a Ctrl-C should end that child and let xtask stop the server,
/// not kill xtask and leave the server running. A handler, unlike ignoring
/// the signal, is reset to the default in the child at exec.
fn interrupts_reach_only_the_child(enabled: bool) {
    extern "C" fn ignore_interrupt(_signal: libc::c_int) {}
    let handler = if enabled {
        ignore_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t
    } else {
        libc::SIG_DFL
    };
    // SAFETY: the handler does nothing, so it is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
    }
}
