//! Project automation, run as `cargo xtask <command>`:
//!
//! - `build-extensions`: installs the wasm32-wasip2 target if missing, builds
//!   every shipped extension and every test fixture in release, and copies
//!   them (with their sidecars) into `target/extensions/` and
//!   `target/fixtures/`;
//! - `test`: build-extensions, then fmt check, clippy with `-D warnings`, and
//!   `cargo test --workspace`: the gate CI runs;
//! - `demo`: builds everything and runs the main job against a fresh home;
//! - `bench [SUITE]`: runs a benchmark suite (runtime, routing, ledger, lifecycle, all) and writes
//!   `target/bench/<suite>.json`.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

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
        Some("build-extensions") => build_extensions(&root),
        Some("test") => test(&root),
        Some("demo") => demo(&root),
        Some("bench") => bench(&root, args.get(1).map(String::as_str).unwrap_or("all")),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 build-extensions   build every extension and test fixture into target/\n  \
                 test               build-extensions, fmt check, clippy -D warnings, cargo test --workspace\n  \
                 demo               build and run the main job against a fresh home\n  \
                 bench [SUITE]      run benchmarks: runtime, routing, ledger, lifecycle or all (default)"
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

fn test(root: &Path) -> Result<()> {
    build_extensions(root)?;
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
    run(cargo().args(["test", "--workspace"]))
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

fn bench(root: &Path, suite: &str) -> Result<()> {
    if !["runtime", "routing", "ledger", "lifecycle", "all"].contains(&suite) {
        bail!("unknown bench suite `{suite}`: use runtime, routing, ledger, lifecycle or all");
    }
    build_extensions(root)?;
    run(cargo()
        .args(["run", "--package", "sandboxer-bench", "--"])
        .arg(suite))
}
