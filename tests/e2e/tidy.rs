//! Repository rules, checked like any other behaviour.

use crate::support::repo_root;

/// Every command in `--help` is mentioned in the README or docs/.
#[test]
fn docs_mention_every_cli_command() {
    let root = repo_root();
    let mut docs = std::fs::read_to_string(root.join("README.md")).unwrap();
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        // docs/ also holds images (docs/images/) and openapi.json.
        if path.extension().is_some_and(|extension| extension == "md") {
            docs.push_str(&std::fs::read_to_string(path).unwrap());
        }
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
/// money; the ledger never touches wasmtime or extensions; the console
/// (server/ui) calls only the service's operations
/// (docs/architecture.md, "Invariants").
#[test]
fn module_boundaries_hold() {
    let host = repo_root().join("host/src");
    // Every Rust file under a directory, subdirectories included.
    fn rust_files(dir: &std::path::Path, found: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, found);
            } else if path.extension().is_some_and(|extension| extension == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                found.push((path.display().to_string(), text));
            }
        }
    }
    let sources = |dir: &str| -> Vec<(String, String)> {
        let mut found = Vec::new();
        rust_files(&host.join(dir), &mut found);
        found
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
    for (file, text) in sources("server/ui") {
        for forbidden in [".manager()", ".ledger()", ".state()", ".runtime()"] {
            assert!(
                !text.contains(forbidden),
                "{file}: the console only calls the service's operations ({forbidden})"
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
