//! Extensions in other languages, end to end: the Python, JavaScript and
//! hand-written WAT examples load, pass `ext check`, are chosen by a profile and bill exactly
//! what their pricing says; `ext new` scaffolds build and pass `ext check`
//! in Rust, Python and JavaScript.

use crate::support::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn home_with_examples() -> TestHome {
    let home = TestHome::new().with_saas_stub().with_shared_cache();
    let examples = built_examples();
    for name in ["minute-meter", "reserved-meter", "flat-fee"] {
        install(&examples, name, &home.extensions(), name);
        std::fs::write(
            home.profiles().join(format!("{name}.toml")),
            format!("description = \"{name}\"\n[route]\nstrategy = \"explicit\"\nextension = \"{name}\"\n"),
        )
        .unwrap();
    }
    home
}

#[test]
fn the_python_and_javascript_examples_bill_exactly_their_pricing() {
    let home = home_with_examples();
    let listed = home.run(&["ext", "list", "--json"]).ok().json();
    for name in ["minute-meter", "reserved-meter", "flat-fee"] {
        let entry = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|entry| entry["name"] == name)
            .unwrap();
        assert_eq!(entry["status"], "loaded", "{entry}");
        let file = home.extensions().join(format!("{name}.wasm"));
        home.run(&["ext", "check", file.to_str().unwrap()]).ok();
    }

    // (instance, estimate for 90 s, actual of a 2 s run)
    let cases = [
        // Python: 0.01 per sandbox + per started minute (0.0008 per vCPU, 0.0002 per GiB):
        // 90 s is 2 minutes; a 2 s run is 1.
        ("minute-meter", "0.012000", "0.011000"),
        // JavaScript: per second with a 60 s minimum at 0.02 per vCPU-hour and
        // 0.005 per GiB-hour: 90 s is 500 + 125; a 2 s run pays the 60 s
        // minimum, 334 + 84 (each rounded up).
        ("reserved-meter", "0.000625", "0.000418"),
        // WAT, by hand: 0.005 per sandbox, whatever it does.
        ("flat-fee", "0.005000", "0.005000"),
    ];
    home.run(&["credits", "add", "1", "--tenant", "polyglot"])
        .ok();
    let mut expected_balance = 1_000_000u64;
    for (name, estimate_90s, actual_2s) in cases {
        let estimate = home
            .run(&["ext", "estimate", name, "--ttl-secs", "90", "--json"])
            .ok()
            .json();
        assert_eq!(estimate["estimate"], estimate_90s, "{name}");

        let decision = home
            .run(&["route", "explain", "--profile", name, "--json"])
            .ok()
            .json();
        assert_eq!(decision["chosen"], name);

        let run = home
            .run(&[
                "run",
                "--profile",
                name,
                "--tenant",
                "polyglot",
                "--ttl",
                "2",
                "--json",
            ])
            .ok()
            .json();
        assert_eq!(run["state"], "destroyed", "{name}");
        assert_eq!(run["extension"], name);
        assert_eq!(run["actual"], actual_2s, "{name}");
        expected_balance -= sandboxer_credits::parse_credits(actual_2s).unwrap();
    }
    let shown = home
        .run(&["credits", "show", "--tenant", "polyglot", "--json"])
        .ok()
        .json();
    assert_eq!(
        shown["available"],
        sandboxer_credits::format_credits(expected_balance)
    );
    home.run(&["ledger", "verify"]).ok();
}

#[test]
fn the_cheapest_language_wins_a_lowest_cost_route() {
    let home = home_with_examples();
    std::fs::write(
        home.profiles().join("cheapest.toml"),
        "description = \"any language\"\n[sandbox]\nttl_secs = 3600\n[route]\nstrategy = \"lowest-cost\"\ncandidates = [\"minute-meter\", \"reserved-meter\", \"saas-stub\"]\n",
    )
    .unwrap();
    let decision = home
        .run(&["route", "explain", "--profile", "cheapest", "--json"])
        .ok()
        .json();
    let ranked: Vec<&str> = decision["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|candidate| candidate["name"].as_str().unwrap())
        .collect();
    // An hour of 1 vCPU + 1 GiB: JavaScript 0.025, saas-stub 0.0666, Python 0.07.
    assert_eq!(ranked, ["reserved-meter", "saas-stub", "minute-meter"]);
}

fn scaffold(language: &str, name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join(name);
    let home = TestHome::new();
    let created = home
        .command()
        .args(["ext", "new", name, "--lang", language, "--dir"])
        .arg(&project)
        .output()
        .unwrap();
    let created = Run::from(created).ok();
    assert!(
        created.stdout.contains("sandboxer-host ext check"),
        "{}",
        created.stdout
    );
    (dir, project)
}

fn check(file: &Path) -> Run {
    let home = TestHome::new().with_shared_cache();
    home.run(&["ext", "check", file.to_str().unwrap()])
}

#[test]
fn ext_new_scaffolds_build_and_pass_ext_check_in_every_language() {
    let tools = repo_root().join("target/tools");
    built_examples(); // the tools come with the examples

    let (_keep, project) = scaffold("python", "pydemo");
    let status = Command::new(tools.join("python/bin/componentize-py"))
        .env("PYTHONPATH", tools.join("python"))
        .env("RUST_BACKTRACE", "0")
        .args([
            "-d",
            "wit",
            "-w",
            "sandbox-extension",
            "componentize",
            "app",
            "-o",
            "pydemo.wasm",
        ])
        .current_dir(&project)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        check(&project.join("pydemo.wasm"))
            .ok()
            .stdout
            .contains("would load as `pydemo`")
    );

    let (_keep, project) = scaffold("js", "jsdemo");
    let status = Command::new(tools.join("js/node_modules/.bin/jco"))
        .args([
            "componentize",
            "backend.js",
            "--wit",
            "wit",
            "--world-name",
            "sandbox-extension",
        ])
        .args([
            "--disable",
            "http",
            "--disable",
            "fetch-event",
            "--out",
            "jsdemo.wasm",
        ])
        .current_dir(&project)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        check(&project.join("jsdemo.wasm"))
            .ok()
            .stdout
            .contains("would load as `jsdemo`")
    );

    let (_keep, project) = scaffold("rust", "rsdemo");
    let target = repo_root().join("target/wasm");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--quiet",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(&target)
        .current_dir(&project)
        .status()
        .unwrap();
    assert!(status.success());
    let built = target.join("wasm32-wasip2/release/rsdemo.wasm");
    assert!(check(&built).ok().stdout.contains("would load as `rsdemo`"));
}
