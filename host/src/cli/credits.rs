//! `credits show | add | history` and `ledger verify`.

use super::args::{CreditsCommand, LedgerCommand};
use super::output::{print_json, print_table};
use super::{AlreadyReported, Context};
use anyhow::Result;
use sandboxer_credits::parse_credits;
use sandboxer_host::service::ServiceError;
use sandboxer_host::service::api::AddCredits;

/// Runs a credits command, then delivers the events it wrote.
pub async fn run_credits(command: CreditsCommand, context: &Context) -> Result<()> {
    let json = match &command {
        CreditsCommand::Show { json, .. }
        | CreditsCommand::Add { json, .. }
        | CreditsCommand::History { json, .. } => *json,
    };
    // Bad input changes nothing: not even a new ledger file.
    if let CreditsCommand::Add { amount, .. } = &command {
        parse_credits(amount).map_err(|error| ServiceError::InvalidInput(error.to_string()))?;
    }
    let api = if matches!(command, CreditsCommand::Add { .. }) {
        context.connect(json).await?
    } else {
        context.connect_read_only(json).await?
    };
    let outcome = credits_command(&api, command).await;
    api.close().await;
    outcome
}

async fn credits_command(api: &super::api::Api, command: CreditsCommand) -> Result<()> {
    match command {
        CreditsCommand::Show { tenant, json } => {
            let credits = api.credits(&tenant).await?;
            if json {
                return print_json(&credits);
            }
            println!(
                "tenant {}: balance {}, held {}, available {} credits",
                credits.tenant, credits.balance, credits.held, credits.available
            );
            if let Some(owed) = credits.available.strip_prefix('-') {
                println!(
                    "  it owes {owed} from an overrun; new sandboxes wait until credits are added"
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
            let grant = api
                .add_credits(
                    &tenant,
                    &AddCredits {
                        amount,
                        key: key.clone(),
                    },
                )
                .await?;
            if json {
                return print_json(&grant);
            }
            if grant.replayed {
                println!(
                    "key {:?} was already used: {} credits were added to {} then (entry {}); nothing added now",
                    key.unwrap_or_default(),
                    grant.amount,
                    grant.tenant,
                    grant.seq
                );
            } else {
                println!("added {} credits to {}", grant.added, grant.tenant);
            }
            println!("balance {}, available {}", grant.balance, grant.available);
            Ok(())
        }
        CreditsCommand::History {
            tenant,
            limit,
            json,
        } => {
            let entries = api.history(&tenant, limit).await?;
            if json {
                return print_json(&entries);
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
                        entry.time.clone(),
                        entry.kind.clone(),
                        entry.amount.clone(),
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

pub async fn run_ledger(command: LedgerCommand, context: &Context) -> Result<()> {
    let LedgerCommand::Verify { json } = command;
    let api = context.connect_read_only(json).await?;
    let report = api.verify().await;
    api.close().await;
    let report = report?;
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
