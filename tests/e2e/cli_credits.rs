//! `credits` and `ledger verify` through the real binary.

use crate::support::*;
use sandboxer_host::ledger::{Ledger, LedgerOptions};

#[test]
fn add_show_and_idempotent_keys() {
    let home = TestHome::new();
    home.run(&["credits", "add", "25", "--tenant", "acme"]).ok();
    let shown = home
        .run(&["credits", "show", "--tenant", "acme", "--json"])
        .ok()
        .json();
    assert_eq!(
        shown,
        serde_json::json!({"tenant": "acme", "balance": "25.000000", "held": "0.000000", "available": "25.000000"})
    );

    let first = home
        .run(&[
            "credits",
            "add",
            "2.5",
            "--tenant",
            "acme",
            "--key",
            "invoice-7",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(first["added"], "2.500000");
    assert_eq!(first["replayed"], false);
    let again = home
        .run(&[
            "credits",
            "add",
            "2.5",
            "--tenant",
            "acme",
            "--key",
            "invoice-7",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(again["replayed"], true);
    assert_eq!(again["balance"], "27.500000", "the same key adds once");

    let reused = home
        .run(&[
            "credits",
            "add",
            "3",
            "--tenant",
            "acme",
            "--key",
            "invoice-7",
        ])
        .fails(1);
    assert!(
        reused.stderr.contains("`invoice-7` was already used"),
        "{}",
        reused.stderr
    );

    let verify = home.run(&["ledger", "verify"]).ok();
    assert!(
        verify.stdout.contains("every invariant holds"),
        "{}",
        verify.stdout
    );
    let history = home
        .run(&["credits", "history", "--tenant", "acme", "--json"])
        .ok()
        .json();
    let kinds: Vec<_> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["amount"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["2.500000", "25.000000"], "newest first");
}

#[test]
fn rejected_amounts_exit_2_and_change_nothing() {
    let home = TestHome::new();
    home.run(&["credits", "add", "10", "--tenant", "acme"]).ok();
    let before = home
        .run(&["credits", "history", "--tenant", "acme", "--json"])
        .ok()
        .stdout;
    for (amount, needle) in [
        ("-5", "\"-5\" is negative"),
        ("0.0000001", "more than 6 decimal places"),
        ("abc", "\"abc\" is not an amount of credits"),
        ("0", "must be above zero"),
        ("1e3", "not an amount"),
        ("99999999999999999999", "too large"),
        ("", "empty"),
        (" 5", "\" 5\" is not an amount of credits"),
        ("5 ", "not an amount"),
    ] {
        let run = home
            .run(&["credits", "add", amount, "--tenant", "acme"])
            .fails(2);
        assert!(run.stderr.contains(needle), "{amount:?}: {}", run.stderr);
        assert_eq!(run.stderr.lines().count(), 1, "one line: {}", run.stderr);
    }
    let after = home
        .run(&["credits", "history", "--tenant", "acme", "--json"])
        .ok()
        .stdout;
    assert_eq!(before, after, "no journal entry was written");
    let shown = home
        .run(&["credits", "show", "--tenant", "acme", "--json"])
        .ok()
        .json();
    assert_eq!(shown["balance"], "10.000000");
    let bad_tenant = home
        .run(&["credits", "add", "1", "--tenant", "a b"])
        .fails(2);
    assert!(
        bad_tenant.stderr.contains("tenant name \"a b\" is invalid"),
        "{}",
        bad_tenant.stderr
    );
    home.run(&["ledger", "verify"]).ok();
}

#[test]
fn the_default_tenant_starts_with_default_credits_once() {
    let home = TestHome::new();
    let shown = home.run(&["credits", "show", "--json"]).ok().json();
    assert_eq!(shown["balance"], "10.000000");
    let shown = home.run(&["credits", "show", "--json"]).ok().json();
    assert_eq!(shown["balance"], "10.000000", "granted once");

    let other = TestHome::new();
    let run = other
        .command()
        .env("SANDBOXER_DEFAULT_CREDITS", "2.5")
        .args(["credits", "show", "--json"])
        .output()
        .unwrap();
    assert_eq!(Run::from(run).ok().json()["balance"], "2.500000");
    let bad = other
        .command()
        .env("SANDBOXER_DEFAULT_CREDITS", "lots")
        .args(["credits", "show"])
        .output()
        .unwrap();
    let bad = Run::from(bad).fails(1);
    assert!(
        bad.stderr.contains("SANDBOXER_DEFAULT_CREDITS") && bad.stderr.contains("\"lots\""),
        "{}",
        bad.stderr
    );
}

#[test]
fn a_busy_home_is_waited_for_then_given_up_with_its_own_exit_code() {
    let home = TestHome::new();
    home.run(&["credits", "show"]).ok();
    // Another process (this test) holds the ledger's lock.
    let held = Ledger::open(&home.ledger_file(), LedgerOptions::default()).unwrap();
    let run = Run::from(
        home.command()
            .args(["credits", "show"])
            .env("SANDBOXER_LOCK_WAIT_SECS", "1")
            .output()
            .unwrap(),
    )
    .fails(75);
    assert!(
        run.stderr
            .contains("waiting for another sandboxer-host process to finish"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("gave up after waiting 1 s")
            && run
                .stderr
                .contains("is in use by another sandboxer-host process")
            && run.stderr.contains("SANDBOXER_LOCK_WAIT_SECS"),
        "{}",
        run.stderr
    );
    // Released in time: the command waits and succeeds.
    let waiter = std::thread::spawn({
        let mut command = home.command();
        command.args(["credits", "show", "--json"]);
        move || Run::from(command.output().unwrap())
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    drop(held);
    let shown = waiter.join().unwrap().ok().json();
    assert_eq!(shown["tenant"], "default");
}
