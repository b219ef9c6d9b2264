//! Repository rules, checked like any other behaviour.

use crate::support::repo_root;

/// Every command in `--help` is mentioned in the README or docs/.
#[test]
fn docs_mention_every_cli_command() {
    let root = repo_root();
    let mut docs = std::fs::read_to_string(root.join("README.md")).unwrap();
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        docs.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    for command in [
        "ext list",
        "ext check",
        "ext info",
        "ext estimate",
        "credits show",
        "credits add",
        "credits history",
        "ledger verify",
        "route explain",
        "run --profile",
        "sandbox create",
        "sandbox list",
        "sandbox show",
        "sandbox destroy",
        "sandbox exec",
        "sandbox logs",
        "events tail",
        "ext new",
        "serve",
        "tenant create",
        "tenant list",
        "tenant revoke",
        "completions",
    ] {
        assert!(
            docs.contains(command),
            "README.md or docs/ should document `{command}`"
        );
    }
}

/// The runtime never touches money or routing; the router never touches
/// money; the ledger never touches wasmtime or extensions
/// (docs/architecture.md, "Invariants").
#[test]
fn module_boundaries_hold() {
    let host = repo_root().join("host/src");
    let sources = |dir: &str| -> Vec<(String, String)> {
        std::fs::read_dir(host.join(dir))
            .unwrap()
            .map(|entry| {
                let path = entry.unwrap().path();
                (
                    path.display().to_string(),
                    std::fs::read_to_string(&path).unwrap(),
                )
            })
            .collect()
    };
    for (file, text) in sources("runtime") {
        assert!(
            !text.contains("crate::ledger"),
            "{file}: the runtime knows nothing of money"
        );
    }
    for (file, text) in sources("router") {
        assert!(
            !text.contains("crate::ledger"),
            "{file}: the router never holds credits"
        );
        assert!(
            !text.contains("crate::manager"),
            "{file}: the router knows nothing of lifecycles"
        );
    }
    for (file, text) in sources("cli") {
        for forbidden in [
            "ledger::Ledger",
            "SandboxManager",
            "Router::new",
            "state_db::StateDb::new",
        ] {
            assert!(
                !text.contains(forbidden),
                "{file}: the command line only calls the service layer ({forbidden})"
            );
        }
    }
    for (file, text) in sources("server") {
        for forbidden in ["Ledger::open", "SandboxManager::new", "router::Router"] {
            assert!(
                !text.contains(forbidden),
                "{file}: the server only calls the service layer ({forbidden})"
            );
        }
    }
    for (file, text) in sources("ledger") {
        for forbidden in ["wasmtime::", "use wasmtime", "crate::runtime"] {
            assert!(
                !text.contains(forbidden),
                "{file}: the ledger never touches {forbidden}"
            );
        }
    }
}
