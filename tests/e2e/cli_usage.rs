//! The command line as a whole, as a new user meets it: what read-only
//! commands leave behind, and what `--help` says.

use crate::support::*;
use std::collections::BTreeSet;
use std::path::Path;

/// Every file and directory under `dir`, as paths relative to it.
fn files_under(dir: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).unwrap() {
            let path = entry.unwrap().path();
            found.insert(path.strip_prefix(dir).unwrap().display().to_string());
            if path.is_dir() && !path.is_symlink() {
                pending.push(path);
            }
        }
    }
    found
}

#[test]
fn read_only_commands_create_nothing_in_a_fresh_home_and_answer_as_an_empty_one() {
    let home = TestHome::new().with_saas_stub().with_shipped_profiles();
    // The compiled-extension cache is the user's, not the home's.
    let user_cache = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Run::from(
            home.command()
                .env("SANDBOXER_CACHE_DIR", user_cache.path())
                .args(args)
                .output()
                .unwrap(),
        )
    };
    let before = files_under(home.path());

    let show = run(&["sandbox", "show", "garbage"]).fails(1);
    assert!(
        show.stderr.contains("no sandbox `garbage`"),
        "{}",
        show.stderr
    );
    let list = run(&["sandbox", "list"]).ok();
    assert!(list.stdout.contains("no live sandboxes"), "{}", list.stdout);
    assert_eq!(
        run(&["sandbox", "list", "--all", "--json"]).ok().json(),
        serde_json::json!([])
    );
    let credits = run(&["credits", "show", "--tenant", "acme"]).fails(1);
    assert!(
        credits.stderr.contains("no tenant `acme`"),
        "{}",
        credits.stderr
    );
    let history = run(&["credits", "history", "--tenant", "acme"]).fails(1);
    assert!(
        history.stderr.contains("no tenant `acme`"),
        "{}",
        history.stderr
    );
    // The default tenant starts with its default credits, as in any home.
    let history = run(&["credits", "history"]).ok();
    assert!(
        history.stdout.contains("no entries for tenant default"),
        "{}",
        history.stdout
    );
    let verify = run(&["ledger", "verify"]).ok();
    assert!(
        verify.stdout.contains("ledger ok: 0 journal entries"),
        "{}",
        verify.stdout
    );
    let route = run(&["route", "explain", "--profile", "saas-stub", "--json"])
        .ok()
        .json();
    assert_eq!(route["chosen"], "saas-stub", "{route}");
    let extensions = run(&["ext", "list"]).ok();
    assert!(
        extensions.stdout.contains("saas-stub") && extensions.stdout.contains("loaded"),
        "{}",
        extensions.stdout
    );
    let tenants = run(&["tenant", "list"]).ok();
    assert!(tenants.stdout.contains("no tenants"), "{}", tenants.stdout);

    assert_eq!(
        files_under(home.path()),
        before,
        "read-only commands leave a fresh home as it was"
    );
    assert!(
        !files_under(user_cache.path()).is_empty(),
        "the compiled extension went to the user's cache"
    );

    // The first command that writes makes the home; reads then use it.
    run(&["credits", "add", "5", "--tenant", "acme"]).ok();
    assert!(home.ledger_file().is_file());
    let shown = run(&["credits", "show", "--tenant", "acme", "--json"])
        .ok()
        .json();
    assert_eq!(shown["balance"], "5.000000", "{shown}");
}

#[tokio::test]
async fn two_homes_share_the_users_cache_and_two_processes_may_fill_it_at_once() {
    let user_cache = tempfile::tempdir().unwrap();
    let homes = [
        TestHome::new().with_saas_stub(),
        TestHome::new().with_saas_stub(),
    ];
    // Two processes in two fresh homes compile the same component into the
    // same empty cache at the same time.
    let children: Vec<_> = homes
        .iter()
        .map(|home| {
            home.command()
                .env("SANDBOXER_CACHE_DIR", user_cache.path())
                .args(["ext", "check"])
                .arg(home.extensions().join("saas-stub.wasm"))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let checked = Run::from(child.wait_with_output().unwrap()).ok();
        assert!(checked.stdout.starts_with("ok: "), "{}", checked.stdout);
    }
    let artifacts: Vec<String> = files_under(user_cache.path())
        .into_iter()
        .filter(|name| !name.contains('/'))
        .collect();
    assert_eq!(
        artifacts
            .iter()
            .filter(|name| name.ends_with(".cwasm"))
            .count(),
        1,
        "one whole artifact, no temporary file left: {artifacts:?}"
    );
    assert!(
        files_under(user_cache.path()).iter().all(|name| !name
            .rsplit('/')
            .next()
            .unwrap()
            .starts_with(".tmp")),
        "no temporary file left: {artifacts:?}"
    );
    // What they wrote verifies and loads: a third home compiles nothing.
    let third = TestHome::new().with_saas_stub();
    let runtime = sandboxer_host::runtime::Runtime::new(
        user_cache.path().to_path_buf(),
        std::sync::Arc::new(sandboxer_host::state_db::StateDb::new(
            third.path().join("state.redb"),
        )),
    )
    .unwrap();
    let set = runtime.load_dir(&third.extensions()).await.unwrap();
    let loaded = set.get("saas-stub").unwrap();
    assert_eq!(loaded.cache, sandboxer_host::runtime::CacheOutcome::Hit);
}

#[test]
fn usage_errors_exit_2_with_one_line_and_under_json_a_json_error() {
    let home = TestHome::new().with_saas_stub().with_shipped_profiles();
    let ttl = home
        .run(&["run", "--profile", "saas-stub", "--ttl", "0", "--json"])
        .fails(2);
    let error = &ttl.json()["error"];
    assert_eq!(error["kind"], "invalid-input", "{}", ttl.stdout);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("the ttl must be between 1 and"),
        "{}",
        ttl.stdout
    );
    let scratch = tempfile::tempdir().unwrap();
    let go = home
        .run(&[
            "ext",
            "new",
            "my-backend",
            "--lang",
            "go",
            "--dir",
            &scratch.path().join("my-backend").display().to_string(),
        ])
        .fails(2);
    assert!(go.stderr.contains("go"), "{}", go.stderr);
    assert!(!scratch.path().join("my-backend").exists(), "nothing made");
    // clap's own refusals are JSON under --json too.
    let unknown = home
        .run(&["credits", "show", "--tenantt", "acme", "--json"])
        .fails(2);
    assert_eq!(
        unknown.json()["error"]["kind"],
        "usage",
        "{}",
        unknown.stdout
    );
    assert!(
        unknown.stderr.contains("unexpected argument '--tenantt'"),
        "{}",
        unknown.stderr
    );
}

#[test]
fn credits_of_a_mistyped_tenant_say_it_is_unknown_instead_of_zeros() {
    let home = TestHome::new();
    home.run(&["credits", "add", "5", "--tenant", "acme"]).ok();
    for command in ["show", "history"] {
        let typo = home
            .run(&["credits", command, "--tenant", "acmee"])
            .fails(1);
        assert!(
            typo.stderr.contains("no tenant `acmee`"),
            "credits {command}: {}",
            typo.stderr
        );
    }
}

#[test]
fn completions_print_a_script_for_each_shell_and_refuse_others() {
    let home = TestHome::new();
    for (shell, marker) in [
        ("bash", "complete -F _sandboxer__host"),
        ("zsh", "#compdef sandboxer-host"),
        ("fish", "complete -c sandboxer-host"),
    ] {
        let script = home.run(&["completions", shell]).ok();
        assert!(script.stdout.contains(marker), "{shell}: {}", script.stdout);
        assert!(
            script.stdout.contains("ledger") && script.stdout.contains("hub-url"),
            "{shell} completes subcommands and options"
        );
    }
    let tcsh = home.run(&["completions", "tcsh"]).fails(2);
    assert!(
        tcsh.stderr.contains("invalid value 'tcsh'"),
        "{}",
        tcsh.stderr
    );
}

/// Runs the binary with `args` in `home`, its terminal a pseudo-terminal
/// (`script` from util-linux), with the user cache `cache`; returns what the
/// terminal showed.
fn on_a_terminal(home: &TestHome, cache: &Path, args: &str) -> String {
    let binary = env!("CARGO_BIN_EXE_sandboxer-host");
    let mut command = std::process::Command::new("script");
    command.env_clear();
    for (name, value) in home.command().get_envs() {
        if let Some(value) = value {
            command.env(name, value);
        }
    }
    let output = command
        .env("SANDBOXER_CACHE_DIR", cache)
        .env("TERM", "xterm")
        .args(["-qec", &format!("{binary} {args}"), "/dev/null"])
        .output()
        .expect("`script` (util-linux) runs a command on a pseudo-terminal");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn a_terminal_sees_each_first_compile_and_json_or_a_pipe_sees_none() {
    let home = TestHome::new().with_saas_stub();
    install(&built_extensions(), "local", &home.extensions(), "local");
    let cache = tempfile::tempdir().unwrap();
    let first = on_a_terminal(&home, cache.path(), "ext list");
    for file in ["saas-stub.wasm", "local.wasm"] {
        assert!(
            first.contains(&format!("compiling {file}"))
                && first.contains("later loads use the cache"),
            "{first}"
        );
    }
    assert!(
        first.contains("saas-stub") && first.contains("loaded"),
        "{first}"
    );
    // Cached: nothing to show.
    let again = on_a_terminal(&home, cache.path(), "ext list");
    assert!(!again.contains("compiling"), "{again}");

    // Under --json, or with stderr not a terminal, no progress at all.
    let json_cache = tempfile::tempdir().unwrap();
    let json = on_a_terminal(&home, json_cache.path(), "ext list --json");
    assert!(!json.contains("compiling"), "{json}");
    let piped_cache = tempfile::tempdir().unwrap();
    let piped = Run::from(
        home.command()
            .env("SANDBOXER_CACHE_DIR", piped_cache.path())
            .args(["ext", "list"])
            .output()
            .unwrap(),
    )
    .ok();
    assert!(!piped.stderr.contains("compiling"), "{}", piped.stderr);
}

#[test]
fn commands_that_need_no_extension_load_none() {
    let home = TestHome::new().with_saas_stub().with_shipped_profiles();
    let cache = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Run::from(
            home.command()
                .env("SANDBOXER_CACHE_DIR", cache.path())
                .args(args)
                .output()
                .unwrap(),
        )
        .ok()
    };
    run(&["credits", "add", "5", "--tenant", "acme"]);
    run(&["credits", "show", "--tenant", "acme"]);
    run(&["sandbox", "list", "--all"]);
    run(&["ledger", "verify"]);
    assert!(
        files_under(cache.path()).is_empty(),
        "no extension was compiled: {:?}",
        files_under(cache.path())
    );
    // A command that routes loads them.
    run(&["route", "explain", "--profile", "saas-stub"]);
    assert!(!files_under(cache.path()).is_empty());
}
