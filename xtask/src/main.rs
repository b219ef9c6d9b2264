//! Project automation, run as `cargo xtask <command>`:
//!
//! - `build-extensions [--examples]`: installs the wasm32-wasip2 target if
//!   missing, builds every shipped extension and every test fixture in
//!   release, and copies them (with their sidecars) into `target/extensions/`
//!   and `target/fixtures/`; with `--examples`, also the Python, JavaScript
//!   and WAT examples into `target/examples/` (their toolchains install on
//!   demand into `target/tools/`);
//! - `install-e2b-sdks`: installs the official E2B Python and JavaScript SDKs,
//!   pinned by `tests/e2b/`, into `target/tools/e2b-python` and `target/tools/e2b-js`;
//! - `test`: installs bubblewrap, Chromium and PostgreSQL if missing
//!   (apt-get, through sudo unless root), build-extensions --examples,
//!   install-e2b-sdks, then fmt check, clippy with `-D warnings`, and `cargo
//!   test --workspace` against a throwaway PostgreSQL cluster: the gate CI runs;
//! - `demo`: builds everything and runs the main job against a fresh home;
//! - `soak [KILLS]`: the soak test with many kills (1000 by default);
//! - `bench [SUITE]`: runs a benchmark suite (runtime, routing, ledger, lifecycle, serve, all) and writes
//!   `target/bench/<suite>.json` (ledger, serve and all against a throwaway PostgreSQL cluster);
//! - `postgres -- COMMAND...`: runs COMMAND against a throwaway PostgreSQL
//!   cluster (the one `test` uses; see `postgres.rs`), then stops it.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

mod postgres;

const WASM_TARGET: &str = "wasm32-wasip2";
/// Guest workspaces: shipped extensions, and the tests' hostile fixtures.
const EXTENSIONS_WORKSPACE: &str = "extensions";
const FIXTURES_WORKSPACE: &str = "tests/fixtures";

fn main() {
    if let Err(error) = run_command() {
        eprintln!("xtask: {error:#}");
        std::process::exit(1);
    }
}

fn run_command() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match args.first().map(String::as_str) {
        Some("build-extensions") => {
            build_extensions(&root)?;
            if args.iter().any(|arg| arg == "--examples") {
                build_examples(&root)?;
            }
            Ok(())
        }
        Some("install-e2b-sdks") => install_e2b_sdks(&root),
        Some("test") => test(&root),
        Some("demo") => demo(&root),
        Some("bench") => bench(&root, args.get(1).map(String::as_str).unwrap_or("all")),
        Some("soak") => soak(&root, args.get(1).map(String::as_str)),
        Some("postgres") => run_with_test_postgres(&root, &args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>

commands:
  build-extensions [--examples]
                     build every extension and test fixture into target/
                     (--examples: also the Python, JavaScript and WAT examples)
  install-e2b-sdks   the pinned E2B Python and JavaScript SDKs into target/tools/
  test               all of that (and bubblewrap, Chromium, PostgreSQL, if missing),
                     then fmt check, clippy -D warnings, cargo test --workspace
                     against a throwaway PostgreSQL cluster in target/postgres/
  demo               build and run the main job against a fresh home
  bench [SUITE]      benchmarks: runtime, routing, ledger, lifecycle, serve or all (default)
  soak [KILLS]       concurrent commands on one home under random SIGKILLs (default 1000
                     kills), then prints kills, lost, doubled, stuck and verify
  postgres -- COMMAND [ARGS...]
                     start the tests' throwaway PostgreSQL cluster, run COMMAND with
                     SANDBOXER_TEST_POSTGRES (superuser URL) and SANDBOXER_TEST_PG_CTL
                     (pg_ctl for it) set, then stop and delete the cluster"
            );
            std::process::exit(2);
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(command: &mut Command) -> Result<()> {
    eprintln!("$ {}", describe(command));
    let status = command
        .status()
        .with_context(|| format!("cannot start {}", describe(command)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", describe(command));
    }
    Ok(())
}

fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn ensure_wasm_target() -> Result<()> {
    let output = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup is needed to install the wasm32-wasip2 target")?;
    if String::from_utf8_lossy(&output.stdout)
        .lines()
        .any(|line| line.trim() == WASM_TARGET)
    {
        return Ok(());
    }
    run(Command::new("rustup").args(["target", "add", WASM_TARGET]))
}

/// The member crates of a guest workspace: each directory with a Cargo.toml.
fn guest_crates(workspace: &Path) -> Result<Vec<String>> {
    let mut crates = Vec::new();
    for entry in std::fs::read_dir(workspace)? {
        let path = entry?.path();
        if path.join("Cargo.toml").is_file() {
            crates.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    crates.sort();
    Ok(crates)
}

fn build_guest_workspace(root: &Path, workspace: &str) -> Result<PathBuf> {
    let target_dir = root.join("target/wasm");
    run(cargo()
        .args([
            "build",
            "--release",
            "--target",
            WASM_TARGET,
            "--manifest-path",
        ])
        .arg(root.join(workspace).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir))?;
    Ok(target_dir.join(WASM_TARGET).join("release"))
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn build_extensions(root: &Path) -> Result<()> {
    ensure_wasm_target()?;

    let built = build_guest_workspace(root, EXTENSIONS_WORKSPACE)?;
    let out = root.join("target/extensions");
    std::fs::create_dir_all(&out)?;
    for name in guest_crates(&root.join(EXTENSIONS_WORKSPACE))? {
        copy(
            &built.join(format!("{}.wasm", name.replace('-', "_"))),
            &out.join(format!("{name}.wasm")),
        )?;
        let sidecar = root
            .join(EXTENSIONS_WORKSPACE)
            .join(&name)
            .join(format!("{name}.toml"));
        if sidecar.is_file() {
            copy(&sidecar, &out.join(format!("{name}.toml")))?;
        }
    }

    let built = build_guest_workspace(root, FIXTURES_WORKSPACE)?;
    let fixtures = root.join("target/fixtures");
    std::fs::create_dir_all(&fixtures)?;
    copy(
        &built.join("other-world.wasm"),
        &fixtures.join("other-world.wasm"),
    )?;
    copy(
        &built.join("connector.wasm"),
        &fixtures.join("connector.wasm"),
    )?;
    copy(&built.join("hostile.wasm"), &fixtures.join("hostile.wasm"))?;
    copy(&built.join("spawner.wasm"), &fixtures.join("spawner.wasm"))?;
    copy(
        &built.join("http_prober.wasm"),
        &fixtures.join("http-prober.wasm"),
    )?;
    // Each hostile sidecar names one misbehaviour; the component is shared.
    for entry in std::fs::read_dir(root.join(FIXTURES_WORKSPACE).join("extensions"))? {
        let sidecar = entry?.path();
        if sidecar
            .extension()
            .is_some_and(|extension| extension == "toml")
        {
            let stem = sidecar.file_stem().unwrap().to_string_lossy().into_owned();
            copy(&sidecar, &fixtures.join(format!("{stem}.toml")))?;
            copy(
                &built.join("hostile.wasm"),
                &fixtures.join(format!("{stem}.wasm")),
            )?;
        }
    }
    eprintln!(
        "extensions in {}, fixtures in {}",
        out.display(),
        fixtures.display()
    );
    Ok(())
}

/// The `local` backend's tests run real sandboxes: install bubblewrap when
/// it is missing, as the wasm target is, with apt-get (through sudo unless
/// this is root).
fn ensure_bubblewrap() -> Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("bwrap").is_file()));
    if found {
        return Ok(());
    }
    eprintln!("bubblewrap (bwrap) is missing: the local backend's tests need it; installing");
    apt_install(&["bubblewrap"])
}

/// Debian's Chromium and its WebDriver: the console's browser test
/// (tests/e2e/console.rs) drives them.
fn ensure_chromium() -> Result<()> {
    if Path::new("/usr/bin/chromium").is_file() && Path::new("/usr/bin/chromedriver").is_file() {
        return Ok(());
    }
    eprintln!(
        "chromium or chromedriver is missing: the console's browser test needs them; installing"
    );
    apt_install(&["chromium", "chromium-driver"])
}

/// `apt-get install` (through sudo unless root), updating the package
/// lists first only when the install fails without.
fn apt_install(packages: &[&str]) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let apt_get = |args: &[&str]| {
        let mut command = if root {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    let install: Vec<&str> = ["install", "-y"].iter().chain(packages).copied().collect();
    if run(&mut apt_get(&install)).is_err() {
        run(&mut apt_get(&["update"]))?;
        run(&mut apt_get(&install)).with_context(|| {
            format!(
                "install them by hand (apt-get install {}), then run again",
                packages.join(" ")
            )
        })?;
    }
    Ok(())
}

fn test(root: &Path) -> Result<()> {
    build_extensions(root)?;
    ensure_bubblewrap()?;
    ensure_chromium()?;
    // Installed up front, so a machine without it fails before the long build.
    postgres::ensure_installed()?;
    build_examples(root)?;
    install_e2b_sdks(root)?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    for workspace in [EXTENSIONS_WORKSPACE, FIXTURES_WORKSPACE] {
        run(cargo()
            .args(["fmt", "--all", "--check", "--manifest-path"])
            .arg(root.join(workspace).join("Cargo.toml")))?;
        run(cargo()
            .args([
                "clippy",
                "--release",
                "--target",
                WASM_TARGET,
                "--manifest-path",
            ])
            .arg(root.join(workspace).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(root.join("target/wasm"))
            .args(["--", "-D", "warnings"]))?;
    }
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // Tests behind features and in guest crates, which the workspace's
    // test run does not build: the SDK's HTTP helper, the e2b extension's
    // own parsing (run natively).
    run(cargo().args(["test", "-p", "sandboxer-sdk", "--features", "http"]))?;
    run(cargo()
        .args(["test", "-p", "e2b", "--manifest-path"])
        .arg(root.join(EXTENSIONS_WORKSPACE).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(root.join("target/guest-native")))?;
    // The ledger's and state store's PostgreSQL tests use this cluster; it
    // is stopped whether or not the tests pass.
    let cluster = postgres::TestCluster::start(root)?;
    let tested = run(cargo()
        .args(["test", "--workspace"])
        .envs(cluster.environment()));
    let stopped = cluster.stop();
    tested.and(stopped)
}

/// `cargo xtask postgres -- COMMAND [ARGS...]`: COMMAND against the tests'
/// throwaway cluster, for a developer's psql session or a single test.
fn run_with_test_postgres(root: &Path, command: &[String]) -> Result<()> {
    let command = match command.split_first() {
        Some((separator, rest)) if separator == "--" => rest,
        _ => command,
    };
    let Some((program, arguments)) = command.split_first() else {
        bail!("usage: cargo xtask postgres -- COMMAND [ARGS...]");
    };
    let cluster = postgres::TestCluster::start(root)?;
    let outcome = run(Command::new(program)
        .args(arguments)
        .envs(cluster.environment()));
    let stopped = cluster.stop();
    outcome.and(stopped)
}

/// Whether `output` exists and is newer than every input.
fn is_fresh(output: &Path, inputs: &[PathBuf]) -> bool {
    let modified = |path: &Path| {
        std::fs::metadata(path)
            .and_then(|metadata| metadata.modified())
            .ok()
    };
    let Some(built) = modified(output) else {
        return false;
    };
    inputs
        .iter()
        .all(|input| modified(input).is_some_and(|time| time <= built))
}

/// The Python, JavaScript and WAT examples, built with their own toolchains,
/// which are installed on demand inside target/tools/ (nothing global).
fn build_examples(root: &Path) -> Result<()> {
    let examples = root.join("extensions/examples");
    let tools = root.join("target/tools");
    let out = root.join("target/examples");
    std::fs::create_dir_all(&out)?;
    let wit = root.join("wit/sandbox-extension.wit");

    // Python: componentize-py from PyPI.
    let python_tools = tools.join("python");
    let componentize_py = python_tools.join("bin/componentize-py");
    let requirements = examples.join("python/requirements.txt");
    if !is_fresh(&componentize_py, std::slice::from_ref(&requirements)) {
        run(Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--upgrade",
                "--target",
            ])
            .arg(&python_tools)
            .arg("-r")
            .arg(&requirements))?;
    }
    let python_out = out.join("minute-meter.wasm");
    let python_sources = vec![
        examples.join("python/app.py"),
        wit.clone(),
        componentize_py.clone(),
    ];
    if !is_fresh(&python_out, &python_sources) {
        run(Command::new(&componentize_py)
            .env("PYTHONPATH", &python_tools)
            .env("RUST_BACKTRACE", "0")
            .arg("-d")
            .arg(root.join("wit"))
            .args(["-w", "sandbox-extension", "componentize", "app", "-p"])
            .arg(examples.join("python"))
            .arg("-o")
            .arg(&python_out))?;
    }
    copy(
        &examples.join("python/minute-meter.toml"),
        &out.join("minute-meter.toml"),
    )?;

    // JavaScript: jco and componentize-js from npm, pinned by the example's lock file.
    let js_tools = tools.join("js");
    std::fs::create_dir_all(&js_tools)?;
    let jco = js_tools.join("node_modules/.bin/jco");
    let lock = examples.join("js/package-lock.json");
    if !is_fresh(&jco, std::slice::from_ref(&lock)) {
        copy(
            &examples.join("js/package.json"),
            &js_tools.join("package.json"),
        )?;
        copy(&lock, &js_tools.join("package-lock.json"))?;
        run(Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&js_tools))?;
    }
    // jco wants the WIT package inside the project it builds.
    let js_wit = js_tools.join("wit");
    std::fs::create_dir_all(&js_wit)?;
    copy(&wit, &js_wit.join("sandbox-extension.wit"))?;
    let js_out = out.join("reserved-meter.wasm");
    let js_sources = vec![examples.join("js/backend.js"), wit.clone(), jco.clone()];
    if !is_fresh(&js_out, &js_sources) {
        run(Command::new(&jco)
            .arg("componentize")
            .arg(examples.join("js/backend.js"))
            .arg("--wit")
            .arg(&js_wit)
            .args([
                "--world-name",
                "sandbox-extension",
                "--disable",
                "http",
                "--disable",
                "fetch-event",
                "--out",
            ])
            .arg(&js_out))?;
    }
    copy(
        &examples.join("js/reserved-meter.toml"),
        &out.join("reserved-meter.toml"),
    )?;

    // WebAssembly text, written by hand: no toolchain but a WAT parser.
    let wat_source = examples.join("wat/flat-fee.wat");
    let wat_out = out.join("flat-fee.wasm");
    if !is_fresh(&wat_out, std::slice::from_ref(&wat_source)) {
        let binary = wat::parse_file(&wat_source).map_err(|error| anyhow::anyhow!("{error}"))?;
        std::fs::write(&wat_out, binary)?;
    }
    eprintln!("examples in {}", out.display());
    Ok(())
}

/// The official E2B SDKs that the server's end-to-end tests drive (tests/e2b/),
/// pinned by a requirements file and an npm lock file and installed inside
/// target/tools/ (nothing global); each is skipped while its install is newer
/// than its pins.
fn install_e2b_sdks(root: &Path) -> Result<()> {
    let pins = root.join("tests/e2b");
    let tools = root.join("target/tools");

    // Python: pip --target, from scratch so a changed pin leaves no stale package.
    let python_sdk = tools.join("e2b-python");
    let requirements = pins.join("python/requirements.txt");
    let python_stamp = python_sdk.join("requirements.txt");
    if !is_fresh(&python_stamp, std::slice::from_ref(&requirements)) {
        if python_sdk.exists() {
            std::fs::remove_dir_all(&python_sdk)?;
        }
        run(Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                // The conflict check looks at the system's packages, which the
                // tests never import beside these.
                "--no-warn-conflicts",
                "--target",
            ])
            .arg(&python_sdk)
            .arg("-r")
            .arg(&requirements))?;
        copy(&requirements, &python_stamp)?;
    }

    // JavaScript: npm ci from the committed lock file.
    let js_sdk = tools.join("e2b-js");
    let lock = pins.join("js/package-lock.json");
    // npm writes this file on every install; the packages' own files keep
    // their tarballs' old timestamps.
    let js_stamp = js_sdk.join("node_modules/.package-lock.json");
    if !is_fresh(&js_stamp, std::slice::from_ref(&lock)) {
        std::fs::create_dir_all(&js_sdk)?;
        copy(&pins.join("js/package.json"), &js_sdk.join("package.json"))?;
        copy(&lock, &js_sdk.join("package-lock.json"))?;
        run(Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&js_sdk))?;
    }
    eprintln!(
        "E2B SDKs in {} and {}",
        python_sdk.display(),
        js_sdk.display()
    );
    Ok(())
}

fn host_binary(root: &Path) -> Result<PathBuf> {
    run(cargo().args(["build", "--package", "sandboxer-host"]))?;
    Ok(root.join("target/debug/sandboxer-host"))
}

fn demo(root: &Path) -> Result<()> {
    build_extensions(root)?;
    let binary = host_binary(root)?;
    let home = root.join("target/demo-home");
    if home.exists() {
        std::fs::remove_dir_all(&home)?;
    }
    let host = |args: &[&str]| -> Result<()> {
        println!("\n$ sandboxer-host {}", args.join(" "));
        let status = Command::new(&binary)
            .args(args)
            .env("SANDBOXER_HOME", &home)
            .env("SANDBOXER_EXTENSIONS_DIR", root.join("target/extensions"))
            .env("SANDBOXER_PROFILES_DIR", root.join("profiles"))
            .status()?;
        if !status.success() {
            bail!("sandboxer-host {} failed with {status}", args.join(" "));
        }
        Ok(())
    };
    println!("demo home: {} (fresh)", home.display());
    host(&["ext", "list"])?;
    host(&["credits", "add", "5", "--tenant", "acme"])?;
    // The main job: route burst-sandbox, hold its estimate, create the
    // sandbox, wait out its (shortened) ttl, destroy it, bill the actual.
    host(&["route", "explain", "--profile", "burst-sandbox"])?;
    host(&[
        "run",
        "--profile",
        "burst-sandbox",
        "--tenant",
        "acme",
        "--ttl",
        "3",
    ])?;
    host(&["sandbox", "list", "--all"])?;
    host(&["credits", "show", "--tenant", "acme"])?;
    host(&["credits", "history", "--tenant", "acme"])?;
    host(&["events", "tail", "--limit", "3"])?;
    host(&["ledger", "verify"])?;
    Ok(())
}

/// The long soak: the e2e soak tests with many more kills (CI runs 40):
/// one home on redb, and two homes sharing a ledger on the throwaway
/// PostgreSQL cluster (which the soak kills once).
fn soak(root: &Path, kills: Option<&str>) -> Result<()> {
    let kills = kills.unwrap_or("1000");
    if kills.parse::<u64>().is_err() {
        bail!("soak takes a number of kills, got `{kills}`");
    }
    build_extensions(root)?;
    let cluster = postgres::TestCluster::start(root)?;
    let soaked = run(cargo()
        .args([
            "test",
            "--package",
            "sandboxer-host",
            "--test",
            "e2e",
            "soak",
            "--",
            "--nocapture",
        ])
        .env("SANDBOXER_SOAK_KILLS", kills)
        .envs(cluster.environment()));
    let stopped = cluster.stop();
    soaked.and(stopped)
}

fn bench(root: &Path, suite: &str) -> Result<()> {
    if !["runtime", "routing", "ledger", "lifecycle", "serve", "all"].contains(&suite) {
        bail!(
            "unknown bench suite `{suite}`: use runtime, routing, ledger, lifecycle, serve or all"
        );
    }
    build_extensions(root)?;
    // `bench serve` starts the real server binary.
    let host = host_binary(root)?;
    let mut bench = cargo();
    bench
        .args(["run", "--package", "sandboxer-bench", "--"])
        .arg(suite)
        .env("SANDBOXER_HOST_BIN", host);
    // The ledger and serve suites measure the PostgreSQL ledger too.
    if !["ledger", "serve", "all"].contains(&suite) {
        return run(&mut bench);
    }
    let cluster = postgres::TestCluster::start(root)?;
    let benched = run(bench.envs(cluster.environment()));
    let stopped = cluster.stop();
    benched.and(stopped)
}
