//! Crash consistency of the lifecycle, at every durable write.
//!
//! The failure this guards against: the manager commits to two stores (the
//! ledger, then the sandbox record), so a crash between two commits leaves
//! them disagreeing. Random kills rarely land in those windows; this test
//! lands in each one. A preloaded library (`tests/crashpoint/crashpoint.c`)
//! counts the process's fsync/fdatasync calls and SIGKILLs it at the Nth,
//! before or after the call reaches the disk. For every command below
//! (create, create with fallback, destroy and settle, run, the reconcile of
//! an expired sandbox) and every N it can reach, on a fresh copy of a
//! prepared home, the command is killed at N, then the host is started
//! twice, and the invariants are checked:
//!
//! - every sandbox is terminal (destroyed, failed) or live and held;
//! - at most one charge per sandbox, equal to its record's `actual`;
//! - balance + charges = grants, and nothing is held for a finished sandbox;
//! - `ledger verify` passes;
//! - the second start finds nothing left to do (one pass converges).

use crate::support::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const GRANTED_MICROS: i128 = 10_000_000;

/// Builds the preload library once per test run.
fn crashpoint_library() -> &'static Path {
    static LIBRARY: OnceLock<PathBuf> = OnceLock::new();
    LIBRARY.get_or_init(|| {
        let out_dir = repo_root().join("target/crashpoint");
        std::fs::create_dir_all(&out_dir).unwrap();
        let out = out_dir.join(format!("crashpoint-{}.so", std::process::id()));
        let source = repo_root().join("tests/crashpoint/crashpoint.c");
        let status = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&out)
            .arg(&source)
            .arg("-ldl")
            .status()
            .expect("a C compiler (cc) builds the crash-point library");
        assert!(status.success(), "cc failed to build {}", source.display());
        out
    })
}

/// A command to crash, and the home it starts from.
struct Scenario {
    name: &'static str,
    args: Vec<String>,
    template: TestHome,
}

fn base_home() -> TestHome {
    let home = TestHome::new()
        .with_saas_stub()
        .with_shipped_profiles()
        .with_shared_cache();
    install(
        &built_fixtures(),
        "always-unavailable",
        &home.extensions(),
        "always-unavailable",
    );
    // The cheapest candidate always answers `unavailable`: every create
    // voids one hold and falls back to saas-stub under a second.
    std::fs::write(
        home.profiles().join("fallback.toml"),
        "name = \"fallback\"\n[sandbox]\nttl_secs = 300\n\
         [route]\nstrategy = \"lowest-cost\"\ncandidates = [\"always-unavailable\", \"saas-stub\"]\nfallback = true\n",
    )
    .unwrap();
    home.run(&["credits", "add", "10", "--tenant", "t1"]).ok();
    home
}

fn create(home: &TestHome, profile: &str, ttl: &str) -> String {
    let created = home
        .run(&[
            "sandbox",
            "create",
            "--profile",
            profile,
            "--tenant",
            "t1",
            "--ttl",
            ttl,
            "--json",
        ])
        .ok()
        .json();
    created["id"].as_str().unwrap().to_string()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| arg.to_string()).collect()
}

fn scenarios() -> Vec<Scenario> {
    let mut scenarios = vec![
        Scenario {
            name: "create",
            args: strings(&[
                "sandbox",
                "create",
                "--profile",
                "saas-stub",
                "--tenant",
                "t1",
            ]),
            template: base_home(),
        },
        Scenario {
            name: "fallback",
            args: strings(&[
                "sandbox",
                "create",
                "--profile",
                "fallback",
                "--tenant",
                "t1",
            ]),
            template: base_home(),
        },
        Scenario {
            name: "run",
            args: strings(&[
                "run",
                "--profile",
                "saas-stub",
                "--tenant",
                "t1",
                "--ttl",
                "1",
            ]),
            template: base_home(),
        },
    ];
    let destroy_home = base_home();
    let id = create(&destroy_home, "saas-stub", "300");
    scenarios.push(Scenario {
        name: "destroy",
        args: strings(&["sandbox", "destroy", &id]),
        template: destroy_home,
    });
    let expired_home = base_home();
    create(&expired_home, "saas-stub", "1");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    scenarios.push(Scenario {
        name: "reconcile",
        // Any start reconciles: the expired sandbox is destroyed and settled.
        args: strings(&["sandbox", "list"]),
        template: expired_home,
    });
    scenarios
}

/// Copies a home (redb files are closed: the process that wrote them ended).
fn copy_home(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            let _ = std::fs::remove_file(&target);
            std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else if kind.is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_home(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn fresh_copy(template: &TestHome) -> TestHome {
    let home = TestHome::new();
    copy_home(template.path(), home.path());
    home
}

/// Runs the scenario's command under the preload; returns whether it was
/// killed (false: it finished before reaching the crash point).
fn run_crashing(home: &TestHome, args: &[String], at: u64, when: &str) -> bool {
    let output = home
        .command()
        .args(args)
        .env("LD_PRELOAD", crashpoint_library())
        .env("SANDBOXER_CRASH_AT", at.to_string())
        .env("SANDBOXER_CRASH_WHEN", when)
        .output()
        .unwrap();
    output.status.signal() == Some(libc_sigkill())
}

fn libc_sigkill() -> i32 {
    9
}

/// How many durable writes the command makes when nothing crashes.
fn durable_writes(template: &TestHome, args: &[String]) -> u64 {
    let home = fresh_copy(template);
    let count_file = home.path().join("fsync-count");
    let run = Run::from(
        home.command()
            .args(args)
            .env("LD_PRELOAD", crashpoint_library())
            .env("SANDBOXER_CRASH_COUNT", &count_file)
            .output()
            .unwrap(),
    )
    .ok();
    drop(run);
    std::fs::read_to_string(&count_file)
        .map(|text| text.trim().parse().unwrap())
        .unwrap_or(0)
}

fn micros(value: &Value) -> i128 {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("an amount: {value}"));
    let negative = text.starts_with('-');
    let amount =
        i128::from(sandboxer_credits::parse_credits(text.trim_start_matches('-')).unwrap());
    if negative { -amount } else { amount }
}

/// Removes an extension's files (its component and sidecar) from a home.
fn remove_extension(home: &TestHome, name: &str) {
    for entry in std::fs::read_dir(home.extensions()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(&format!("{name}."))
        {
            std::fs::remove_file(path).unwrap();
        }
    }
}

/// Sandbox `id`'s record as the first start after a crash at `at` leaves it.
fn record_after_a_start(home: &TestHome, id: &str, at: u64) -> Value {
    let records = home.run(&["sandbox", "list", "--all", "--json"]);
    assert_eq!(records.code, 0, "crash at {at}: {}", records.stderr);
    let records = records.json();
    records
        .as_array()
        .unwrap()
        .iter()
        .find(|record| record["id"] == id)
        .unwrap_or_else(|| panic!("crash at {at}: {id} is listed: {records}"))
        .clone()
}

/// The ledger's charge for sandbox `id` (tenant t1), if it made one.
fn charge_of(home: &TestHome, id: &str) -> Option<Value> {
    let history = home
        .run(&[
            "credits", "history", "--tenant", "t1", "--limit", "1000", "--json",
        ])
        .ok()
        .json();
    history
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| {
            entry["kind"] == "charge"
                && entry["sandbox_id"]
                    .as_str()
                    .is_some_and(|hold| hold.starts_with(&format!("{id}.")))
        })
        .cloned()
}

/// Starts the host twice and checks every invariant.
fn check_invariants(home: &TestHome, context: &str) {
    let first = home.run(&["sandbox", "list", "--all", "--json"]);
    assert_eq!(first.code, 0, "{context}: first start: {}", first.stderr);
    let second = home.run(&["sandbox", "list", "--all", "--json"]);
    assert_eq!(second.code, 0, "{context}: second start: {}", second.stderr);
    assert!(
        !second.stderr.contains("reconciled"),
        "{context}: the second start still had work: {}",
        second.stderr
    );
    let records = second.json();
    let records = records.as_array().unwrap();

    let verify = home.run(&["ledger", "verify", "--json"]);
    assert_eq!(verify.code, 0, "{context}: {}", verify.stdout);

    let history = home
        .run(&[
            "credits", "history", "--tenant", "t1", "--limit", "10000", "--json",
        ])
        .ok()
        .json();
    let mut charges: BTreeMap<String, Vec<i128>> = BTreeMap::new();
    let mut granted = 0;
    for entry in history.as_array().unwrap() {
        match entry["kind"].as_str().unwrap() {
            "charge" => {
                let hold = entry["sandbox_id"].as_str().unwrap();
                let sandbox = hold.rsplit_once('.').map_or(hold, |(id, _)| id);
                charges
                    .entry(sandbox.to_string())
                    .or_default()
                    .push(micros(&entry["amount"]));
            }
            "grant" => granted += micros(&entry["amount"]),
            _ => {}
        }
    }
    assert_eq!(granted, GRANTED_MICROS, "{context}: grants");

    let mut held_for_live = 0;
    for record in records {
        let id = record["id"].as_str().unwrap();
        let state = record["state"].as_str().unwrap();
        let charged = charges.get(id).cloned().unwrap_or_default();
        assert!(
            charged.len() <= 1,
            "{context}: {id} was charged {} times: {charged:?}",
            charged.len()
        );
        match state {
            "ready" => {
                assert!(charged.is_empty(), "{context}: live {id} was charged");
                held_for_live += micros(&record["meter"]["hold"]);
            }
            "destroyed" => {
                let actual = micros(&record["meter"]["actual"]);
                let charge = charged.first().copied().unwrap_or(0);
                assert_eq!(charge, actual, "{context}: {id} charged != its actual");
            }
            "failed" => assert!(charged.is_empty(), "{context}: failed {id} was charged"),
            other => panic!("{context}: {id} is stuck in {other}: {record}"),
        }
    }
    let shown = home
        .run(&["credits", "show", "--tenant", "t1", "--json"])
        .ok()
        .json();
    let total_charged: i128 = charges.values().flatten().sum();
    assert_eq!(
        micros(&shown["balance"]) + total_charged,
        GRANTED_MICROS,
        "{context}: balance + charges = grants"
    );
    assert_eq!(
        micros(&shown["held"]),
        held_for_live,
        "{context}: held = the holds of live sandboxes"
    );
}

#[test]
fn every_durable_write_of_the_lifecycle_is_a_safe_place_to_crash() {
    let mut points = 0;
    for scenario in scenarios() {
        let total = durable_writes(&scenario.template, &scenario.args);
        assert!(
            total >= 2,
            "{}: expected durable writes to crash at, counted {total}",
            scenario.name
        );
        for at in 1..=total {
            for when in ["before", "after"] {
                let context = format!(
                    "{} crashed {when} durable write {at} of {total}",
                    scenario.name
                );
                let home = fresh_copy(&scenario.template);
                // A command may make fewer writes on another run (run's
                // sweeps depend on timing): one that finished is checked too.
                if run_crashing(&home, &scenario.args, at, when) {
                    points += 1;
                }
                check_invariants(&home, &context);
            }
        }
    }
    eprintln!("crash points checked: {points}");
    assert!(points >= 20, "only {points} crash points were reached");
}

/// The path of each durable write the command makes when nothing crashes,
/// in order (1-based, as `SANDBOXER_CRASH_AT` counts them).
fn durable_write_paths(template: &TestHome, args: &[String]) -> Vec<(u64, String)> {
    let home = fresh_copy(template);
    let paths_file = home.path().join("fsync-paths");
    let output = home
        .command()
        .args(args)
        .env("LD_PRELOAD", crashpoint_library())
        .env("SANDBOXER_CRASH_PATHS", &paths_file)
        .output()
        .unwrap();
    assert!(output.status.success(), "{args:?}: {output:?}");
    std::fs::read_to_string(&paths_file)
        .unwrap()
        .lines()
        .map(|line| {
            let (at, path) = line.split_once(' ').unwrap();
            (at.parse().unwrap(), path.to_string())
        })
        .collect()
}

/// A power cut, not a kill: the `provisioning` record is written without a
/// sync, so the disk may lose it while keeping the hold synced after it.
/// Modelled by killing `sandbox create` right after each ledger sync made
/// before the state's redo log was first synced (the holds, and a
/// fallback's void), then zeroing that log's records: they were never
/// synced, and redb drops its own unsynced commits when it opens after a
/// crash. The hold keeps a copy of the record, so the next start restores it
/// and recovers the create; the usual invariants hold, and the sandbox is
/// billed once. Also with the host down past the hold's expiry (the hold
/// expired before the start): the expired hold keeps its copy.
#[test]
fn a_provisioning_record_lost_in_a_power_cut_is_restored_from_its_hold() {
    for (profile, expire, restorable) in [
        ("saas-stub", false, 1),
        ("saas-stub", true, 1),
        // The first attempt's hold, then the second's (the record on the
        // disk is then still on the first attempt).
        ("fallback", false, 2),
    ] {
        let template = base_home();
        let args = strings(&["sandbox", "create", "--profile", profile, "--tenant", "t1"]);
        let paths = durable_write_paths(&template, &args);
        let log_synced = paths
            .iter()
            .find(|(_, path)| path.ends_with("/state.wal"))
            .map(|(at, _)| *at)
            .expect("the create syncs the state's redo log");
        let ledger_syncs: Vec<u64> = paths
            .iter()
            .filter(|(at, path)| *at < log_synced && path.ends_with("/ledger.wal"))
            .map(|(at, _)| *at)
            .collect();
        assert!(
            !ledger_syncs.is_empty(),
            "{profile}: the hold is synced before the state's log: {paths:?}"
        );
        let mut restored = 0;
        for at in ledger_syncs {
            let context = format!(
                "{profile} (hold expired: {expire}): power cut after durable write {at} ({paths:?})"
            );
            let home = fresh_copy(&template);
            assert!(run_crashing(&home, &args, at, "after"), "{context}");
            let log = home.path().join("state.wal");
            let length = std::fs::metadata(&log).unwrap().len();
            let file = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
            std::os::unix::fs::FileExt::write_all_at(
                &file,
                &vec![0; (length - 4096) as usize],
                4096,
            )
            .unwrap();
            drop(file);
            if expire {
                let ledger = sandboxer_host::ledger::Ledger::open(
                    &home.path().join("ledger.redb"),
                    sandboxer_host::ledger::LedgerOptions {
                        default_credits: 0,
                        expire_on_open: false,
                    },
                )
                .unwrap();
                let a_day_later = sandboxer_host::manager::now_ms() + 86_400_000;
                assert!(
                    !ledger.expire_due(a_day_later).unwrap().is_empty(),
                    "{context}"
                );
            }
            let start = home.run(&["sandbox", "list", "--all", "--json"]);
            assert_eq!(start.code, 0, "{context}: {}", start.stderr);
            let records = start.json();
            let records = records.as_array().unwrap();
            if start.stderr.contains("restored from hold") {
                restored += 1;
                assert_eq!(records.len(), 1, "{context}: {records:?}");
                // Its create is recovered: created again (idempotent by
                // sandbox id) then destroyed and billed, or, on a backend
                // that answers with an error, failed with its hold voided.
                let state = records[0]["state"].as_str().unwrap();
                assert!(
                    state == "destroyed" || state == "failed",
                    "{context}: the restored record was recovered: {}",
                    start.stderr
                );
            } else {
                // Only after a void: nothing was held or is live.
                assert!(records.is_empty(), "{context}: {records:?}");
            }
            check_invariants(&home, &context);
        }
        assert_eq!(
            restored, restorable,
            "{profile} (hold expired: {expire}): records restored from their hold"
        );
    }
}

/// A destroy killed after its settle reached the disk, before its
/// `destroyed` record did (that write is not synced), on a home whose
/// operator then removed the extension, or replaced it with one whose
/// destroy traps: the next start cannot destroy and price it again, and
/// ends the record with the charge the ledger made instead of leaving it
/// `destroying` with a settled hold.
#[test]
fn a_settled_destroy_whose_record_was_lost_ends_without_its_extension() {
    for replacement in [None, Some("trap-in-destroy")] {
        settled_destroy_ends_with_the_ledgers_charge(replacement);
    }
}

fn settled_destroy_ends_with_the_ledgers_charge(replacement: Option<&str>) {
    let template = base_home();
    let id = create(&template, "saas-stub", "300");
    let args = strings(&["sandbox", "destroy", &id]);
    let total = durable_writes(&template, &args);
    let (mut settled_points, mut taken_from_the_ledger) = (0, 0);
    for at in 1..=total {
        let home = fresh_copy(&template);
        if !run_crashing(&home, &args, at, "after") {
            continue;
        }
        remove_extension(&home, "saas-stub");
        if let Some(replacement) = replacement {
            install(
                &built_fixtures(),
                replacement,
                &home.extensions(),
                "saas-stub",
            );
        }
        let record = record_after_a_start(&home, &id, at);
        let charge = charge_of(&home, &id);
        let Some(charge) = charge else {
            // Not settled yet: destroying it needs the extension.
            assert_ne!(record["state"], "destroyed", "crash at {at}: {record}");
            continue;
        };
        settled_points += 1;
        assert_eq!(record["state"], "destroyed", "crash at {at}: {record}");
        if record["note"]
            .as_str()
            .is_some_and(|note| note.contains("the ledger had settled it"))
        {
            taken_from_the_ledger += 1;
        }
        assert_eq!(
            micros(&record["meter"]["actual"]),
            micros(&charge["amount"]),
            "crash at {at}: the record's actual is the ledger's charge: {record}"
        );
        let shown = home
            .run(&["credits", "show", "--tenant", "t1", "--json"])
            .ok()
            .json();
        assert_eq!(micros(&shown["held"]), 0, "crash at {at}: nothing held");
        assert_eq!(home.run(&["ledger", "verify"]).code, 0, "crash at {at}");
    }
    assert!(
        settled_points >= 1 && taken_from_the_ledger >= 1,
        "{replacement:?}: no crash point of `sandbox destroy` fell between its settle and \
         its record ({total} durable writes, {settled_points} after the settle)"
    );
}

/// `sandbox destroy --force` on a sandbox whose extension is gone bills the
/// host-measured time; killed after each of its syncs, the next start never
/// finds it live with its hold settled: it is `destroyed` with the ledger's
/// charge, or still waits (ready or destroying) with its hold open.
#[test]
fn a_forced_destroy_without_its_extension_is_a_safe_place_to_crash() {
    let template = base_home();
    let id = create(&template, "saas-stub", "300");
    remove_extension(&template, "saas-stub");
    let args = strings(&["sandbox", "destroy", &id, "--force"]);
    let total = durable_writes(&template, &args);
    let mut charged_points = 0;
    for at in 1..=total {
        let home = fresh_copy(&template);
        if !run_crashing(&home, &args, at, "after") {
            continue;
        }
        let record = record_after_a_start(&home, &id, at);
        let charge = charge_of(&home, &id);
        let shown = home
            .run(&["credits", "show", "--tenant", "t1", "--json"])
            .ok()
            .json();
        match charge {
            Some(charge) => {
                charged_points += 1;
                assert_eq!(record["state"], "destroyed", "crash at {at}: {record}");
                assert_eq!(
                    micros(&record["meter"]["actual"]),
                    micros(&charge["amount"]),
                    "crash at {at}: {record}"
                );
                assert_eq!(micros(&shown["held"]), 0, "crash at {at}: nothing held");
            }
            None => {
                let state = record["state"].as_str().unwrap();
                assert!(
                    state == "ready" || state == "destroying",
                    "crash at {at}: not charged, yet {state}: {record}"
                );
                assert_eq!(
                    micros(&shown["held"]),
                    micros(&record["meter"]["hold"]),
                    "crash at {at}: its hold stays open"
                );
            }
        }
        assert_eq!(home.run(&["ledger", "verify"]).code, 0, "crash at {at}");
    }
    assert!(
        charged_points >= 1,
        "no crash point of the forced destroy came after its settle ({total} durable writes)"
    );
}

/// A destroy whose charge the policy cut (`overcharge` asks u64::MAX and is
/// charged its hold), killed after each of its syncs: at every point where
/// the ledger charged it, the next start ends it `destroyed` with that
/// charge and the dispute recorded (the usage is on the disk before such a
/// settle, so recovery prices it again and finds the same cut).
#[test]
fn a_cut_charge_keeps_its_dispute_through_a_crash() {
    let template = base_home();
    install(
        &built_fixtures(),
        "overcharge",
        &template.extensions(),
        "overcharge",
    );
    std::fs::write(
        template.profiles().join("overcharge.toml"),
        "description = \"x\"\n[route]\nstrategy = \"explicit\"\nextension = \"overcharge\"\n",
    )
    .unwrap();
    let id = create(&template, "overcharge", "300");
    let args = strings(&["sandbox", "destroy", &id]);
    let total = durable_writes(&template, &args);
    let mut charged_points = 0;
    for at in 1..=total {
        let home = fresh_copy(&template);
        if !run_crashing(&home, &args, at, "after") {
            continue;
        }
        check_invariants(
            &home,
            &format!("overcharge crashed after durable write {at}"),
        );
        let record = home.run(&["sandbox", "show", &id, "--json"]).ok().json();
        if record["state"] != "destroyed" {
            continue;
        }
        charged_points += 1;
        assert_eq!(
            record["meter"]["actual"], "0.001000",
            "crash at {at}: {record}"
        );
        let disputed = &record["meter"]["charge"]["disputed"];
        assert!(
            disputed.as_str().is_some_and(|amount| amount != "0.000000"),
            "crash at {at}: the cut is recorded: {record}"
        );
    }
    assert!(
        charged_points >= 2,
        "expected crash points after the settle ({total} durable writes)"
    );
}
