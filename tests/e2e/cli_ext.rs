//! `ext list | check | info | estimate` through the real binary, as a new
//! user would run them.

use crate::support::*;

#[test]
fn ext_list_shows_the_saas_stub_loaded() {
    let home = TestHome::new();
    let run = home
        .command()
        .args(["--extensions-dir"])
        .arg(built_extensions())
        .args(["ext", "list", "--json"])
        .output()
        .unwrap();
    let run = Run::from(run).ok();
    let listed = run.json();
    let stub = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["name"] == "saas-stub")
        .expect("saas-stub is listed");
    assert_eq!(stub["status"], "loaded");
    assert_eq!(stub["kind"], "saas");
    assert_eq!(stub["id"], "saas-stub");
    assert!(stub["reason"].is_null());
    assert!(stub["file"].as_str().unwrap().ends_with("saas-stub.wasm"));
}

#[test]
fn bad_files_are_listed_as_rejected_and_ext_check_fails_on_each() {
    let home = TestHome::new().with_saas_stub();
    let dir = home.extensions();
    std::fs::write(
        dir.join("random.wasm"),
        (0..2048u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    std::fs::write(dir.join("empty.wasm"), b"").unwrap();
    std::fs::write(dir.join("core.wasm"), b"\0asm\x01\0\0\0").unwrap();
    install(&built_fixtures(), "other-world", &dir, "other-world");

    let run = home.run(&["ext", "list", "--json"]).ok();
    let listed = run.json();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 5);
    for entry in listed {
        let name = entry["name"].as_str().unwrap();
        if name == "saas-stub" {
            assert_eq!(entry["status"], "loaded");
            continue;
        }
        assert_eq!(entry["status"], "rejected", "{name}");
        let reason = entry["reason"].as_str().unwrap();
        assert!(
            !reason.is_empty() && !reason.contains('\n'),
            "{name}: {reason}"
        );
        assert!(entry["kind"].is_null() && entry["id"].is_null());

        let check = home
            .run(&["ext", "check", &format!("{}/{name}.wasm", dir.display())])
            .fails(1);
        assert!(
            check.stderr.contains(reason),
            "ext check prints the same reason:\n{}",
            check.stderr
        );
        assert_eq!(
            check.stderr.lines().count(),
            1,
            "one line: {}",
            check.stderr
        );
    }

    let table = home.run(&["ext", "list"]).ok();
    assert!(table.stdout.starts_with("NAME"), "{}", table.stdout);
    let stub_row = table
        .stdout
        .lines()
        .find(|line| line.starts_with("saas-stub "))
        .unwrap();
    assert_eq!(
        stub_row.split_whitespace().collect::<Vec<_>>(),
        ["saas-stub", "loaded", "saas", "0.1.0", "saas-stub"]
    );

    let check = home
        .run(&["ext", "check", &format!("{}/saas-stub.wasm", dir.display())])
        .ok();
    assert!(
        check.stdout.contains("would load as `saas-stub`"),
        "{}",
        check.stdout
    );
}

#[test]
fn a_sidecar_with_an_unknown_key_rejects_the_extension_naming_key_and_file() {
    let home = TestHome::new().with_saas_stub();
    std::fs::write(
        home.extensions().join("saas-stub.toml"),
        "[limits]\ntimeout_ms = 500\nmemroy_mb = 8\n",
    )
    .unwrap();
    let listed = home.run(&["ext", "list", "--json"]).ok().json();
    let reason = listed[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("saas-stub.toml")
            && reason.contains("line 3")
            && reason.contains("memroy_mb"),
        "{reason}"
    );
}

#[test]
fn ext_info_shows_declaration_grants_limits_and_config() {
    let home = TestHome::new().with_saas_stub();
    let info = home
        .run(&["ext", "info", "saas-stub", "--json"])
        .ok()
        .json();
    assert_eq!(info["kind"], "saas");
    assert_eq!(info["limits"]["timeout_ms"], 10_000);
    assert_eq!(info["limits"]["memory_mb"], 64);
    assert!(info["limits"]["fuel"].is_null());
    assert_eq!(info["limits"]["kv_quota_mb"], 16);
    assert_eq!(info["grants"]["network"], serde_json::json!([]));
    assert_eq!(info["config"]["rate_per_vcpu_hour"], "0.0504");
    assert_eq!(info["sha256"].as_str().unwrap().len(), 64);

    let text = home.run(&["ext", "info", "saas-stub"]).ok();
    assert!(
        text.stdout.contains(
            "limits:  10000 ms per call, 64 MiB memory, fuel unlimited, 16 MiB key-value quota, a fresh instance per call"
        ),
        "{}",
        text.stdout
    );

    let missing = home.run(&["ext", "info", "nope"]).fails(1);
    assert!(
        missing.stderr.contains("no extension named `nope`")
            && missing.stderr.contains("saas-stub"),
        "{}",
        missing.stderr
    );
}

#[test]
fn ext_estimate_prices_a_size_at_the_rate_card() {
    let home = TestHome::new().with_saas_stub();
    let estimate = home
        .run(&[
            "ext",
            "estimate",
            "saas-stub",
            "--cpu-millis",
            "2000",
            "--memory-mb",
            "2048",
            "--ttl-secs",
            "1800",
            "--json",
        ])
        .ok()
        .json();
    // (2 × 0.0504 + 2 × 0.0162) / 2 = 0.0666 credits.
    assert_eq!(estimate["estimate"], "0.066600");
    assert_eq!(estimate["rate_per_hour"], "0.133200");
    let invalid = home
        .run(&["ext", "estimate", "saas-stub", "--cpu-millis", "0"])
        .fails(1);
    assert!(
        invalid.stderr.contains("invalid-spec"),
        "{}",
        invalid.stderr
    );
}

#[test]
fn usage_errors_exit_2_and_a_missing_directory_says_what_to_do() {
    let home = TestHome::new();
    home.run(&["ext", "lst"]).fails(2);
    home.run(&["ext", "check"]).fails(2);
    let missing = home
        .command()
        .args(["--extensions-dir", "/nonexistent/dir", "ext", "list"])
        .output()
        .unwrap();
    let missing = Run::from(missing).fails(1);
    assert!(
        missing
            .stderr
            .contains("no extensions directory at /nonexistent/dir"),
        "{}",
        missing.stderr
    );
    let help = home.run(&["--help"]).ok();
    for command in ["ext", "credits", "ledger"] {
        assert!(help.stdout.contains(command), "--help lists {command}");
    }
}

#[test]
fn a_file_stem_outside_the_name_rule_is_rejected_at_load_naming_the_rule() {
    let home = TestHome::new().with_saas_stub();
    install(
        &built_extensions(),
        "saas-stub",
        &home.extensions(),
        "bad name",
    );
    let listed = home.run(&["ext", "list", "--json"]).ok().json();
    let bad = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["name"] == "bad name")
        .expect("the file is listed");
    assert_eq!(bad["status"], "rejected", "{bad}");
    let reason = bad["reason"].as_str().unwrap();
    assert!(
        reason.contains("extension name \"bad name\" is invalid")
            && reason.contains("use 1 to 64 letters, digits, '.', '_' or '-'")
            && reason.contains("rename the file"),
        "{reason}"
    );

    let check = home
        .run(&[
            "ext",
            "check",
            &format!("{}/bad name.wasm", home.extensions().display()),
        ])
        .fails(1);
    assert!(
        check
            .stderr
            .contains("rejected: extension name \"bad name\" is invalid"),
        "{}",
        check.stderr
    );
    // The same component under a good name still loads beside it.
    home.run(&[
        "ext",
        "check",
        &format!("{}/saas-stub.wasm", home.extensions().display()),
    ])
    .ok();
}
