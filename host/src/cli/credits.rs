//! `credits show | add | history` and `ledger verify`.

use super::AlreadyReported;
use super::args::{CreditsCommand, LedgerCommand};
use super::output::{print_json, print_table};
use anyhow::{Context, Result};
use sandboxer_credits::{format_credits, format_micros, parse_credits};
use sandboxer_host::ledger::{
    DEFAULT_STARTING_CREDITS, JournalEntry, Ledger, LedgerOptions, TenantSummary, rfc3339_millis,
};
use sandboxer_host::paths::HostPaths;
use sandboxer_host::state_db::StateDb;
use serde_json::json;

/// Ledger options, with the default tenant's starting credits from
/// SANDBOXER_DEFAULT_CREDITS.
pub fn ledger_options() -> Result<LedgerOptions> {
    let default_credits = match std::env::var("SANDBOXER_DEFAULT_CREDITS") {
        Ok(text) => parse_credits(&text).context("SANDBOXER_DEFAULT_CREDITS")?,
        Err(_) => DEFAULT_STARTING_CREDITS,
    };
    Ok(LedgerOptions {
        default_credits,
        ..LedgerOptions::default()
    })
}

/// Opens the ledger, waiting (bounded) while another process has it.
pub fn open_ledger(paths: &HostPaths) -> Result<Ledger> {
    let options = ledger_options()?;
    super::wait_for_home(|| Ok(Ledger::open(&paths.ledger_file(), options.clone())?))
}

/// Runs a credits command, then delivers the events it wrote.
pub fn run_credits(
    command: CreditsCommand,
    paths: &HostPaths,
    hub_url: Option<String>,
) -> Result<()> {
    // Bad input changes nothing: not even a new ledger file.
    if let CreditsCommand::Add { amount, .. } = &command {
        parse_credits(amount)?;
    }
    let ledger = open_ledger(paths)?;
    let outcome = credits_command(command, &ledger);
    let state = StateDb::new(paths.state_file());
    super::sandbox::deliver(&super::sandbox::sinks(paths, hub_url), &ledger, &state);
    outcome
}

fn credits_command(command: CreditsCommand, ledger: &Ledger) -> Result<()> {
    match command {
        CreditsCommand::Show { tenant, json } => {
            let summary = ledger.summary(&tenant)?;
            if json {
                return print_json(&summary_json(&summary));
            }
            println!(
                "tenant {}: balance {}, held {}, available {} credits",
                summary.tenant,
                format_micros(summary.balance),
                format_credits(summary.held),
                format_micros(summary.available)
            );
            if summary.available < 0 {
                println!(
                    "  it owes {} from an overrun; new sandboxes wait until credits are added",
                    format_micros(-summary.available)
                );
            }
            Ok(())
        }
        CreditsCommand::Add {
            amount,
            tenant,
            key,
            json,
        } => {
            let micros = parse_credits(&amount)?;
            let receipt = ledger.grant(&tenant, micros, key.as_deref())?;
            let summary = ledger.summary(&tenant)?;
            if json {
                let mut value = summary_json(&summary);
                value["added"] = json!(if receipt.replayed {
                    format_credits(0)
                } else {
                    format_credits(micros)
                });
                value["replayed"] = json!(receipt.replayed);
                return print_json(&value);
            }
            if receipt.replayed {
                println!(
                    "key {:?} was already used: {} credits were added to {} then (entry {}); nothing added now",
                    key.unwrap_or_default(),
                    format_credits(receipt.amount),
                    receipt.tenant,
                    receipt.seq
                );
            } else {
                println!("added {} credits to {}", format_credits(micros), tenant);
            }
            println!(
                "balance {}, available {}",
                format_micros(summary.balance),
                format_micros(summary.available)
            );
            Ok(())
        }
        CreditsCommand::History {
            tenant,
            limit,
            json,
        } => {
            let entries = ledger.history(&tenant, limit)?;
            if json {
                let rows: Vec<_> = entries.iter().map(entry_json).collect();
                return print_json(&rows);
            }
            if entries.is_empty() {
                println!("no entries for tenant {tenant}");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|entry| {
                    vec![
                        entry.seq.to_string(),
                        rfc3339_millis(entry.time_ms),
                        entry.kind.name().to_string(),
                        format_credits(entry.amount),
                        entry.debit.clone(),
                        entry.credit.clone(),
                        entry.sandbox_id.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print_table(
                &[
                    "SEQ", "TIME", "KIND", "AMOUNT", "DEBIT", "CREDIT", "SANDBOX",
                ],
                &rows,
            );
            Ok(())
        }
    }
}

pub fn run_ledger(command: LedgerCommand, paths: &HostPaths) -> Result<()> {
    match command {
        LedgerCommand::Verify { json } => {
            let ledger = open_ledger(paths)?;
            let report = ledger.verify()?;
            if json {
                print_json(&report)?;
            } else if report.ok {
                println!(
                    "ledger ok: {} journal entries, {} accounts, {} open holds; every invariant holds",
                    report.journal_entries, report.accounts, report.open_holds
                );
            } else {
                for violation in &report.violations {
                    eprintln!("violation [{}]: {}", violation.check, violation.message);
                }
                eprintln!(
                    "error: the ledger breaks {} invariant(s)",
                    report.violations.len()
                );
            }
            if report.ok {
                Ok(())
            } else {
                Err(AlreadyReported.into())
            }
        }
    }
}

fn summary_json(summary: &TenantSummary) -> serde_json::Value {
    json!({
        "tenant": summary.tenant,
        "balance": format_micros(summary.balance),
        "held": format_credits(summary.held),
        "available": format_micros(summary.available),
    })
}

fn entry_json(entry: &JournalEntry) -> serde_json::Value {
    json!({
        "seq": entry.seq,
        "time": rfc3339_millis(entry.time_ms),
        "kind": entry.kind.name(),
        "amount": format_credits(entry.amount),
        "debit": entry.debit,
        "credit": entry.credit,
        "key": entry.key,
        "sandbox_id": entry.sandbox_id,
        "overrun": format_credits(entry.overrun),
    })
}
