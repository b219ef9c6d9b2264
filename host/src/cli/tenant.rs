//! `tenant create | list | revoke`: who may call the server, with which key.

use super::Context;
use super::args::TenantCommand;
use super::output::{print_json, print_table};
use anyhow::Result;

pub async fn run(command: TenantCommand, context: &Context) -> Result<()> {
    let json = match &command {
        TenantCommand::Create { json, .. }
        | TenantCommand::List { json }
        | TenantCommand::Revoke { json, .. } => *json,
    };
    let api = if matches!(command, TenantCommand::List { .. }) {
        context.connect_read_only(json).await?
    } else {
        context.connect(json).await?
    };
    let outcome = async {
        match command {
            TenantCommand::Create { name, json } => {
                let created = api.create_tenant(&name).await?;
                if json {
                    return print_json(&created);
                }
                println!("tenant {} created; its API key (shown once):", created.name);
                println!("{}", created.api_key);
                Ok(())
            }
            TenantCommand::List { json } => {
                let tenants = api.list_tenants().await?;
                if json {
                    return print_json(&tenants);
                }
                if tenants.is_empty() {
                    println!("no tenants (sandboxer-host tenant create NAME)");
                    return Ok(());
                }
                let rows: Vec<Vec<String>> = tenants
                    .iter()
                    .map(|tenant| {
                        vec![
                            tenant.name.clone(),
                            format!("{}…", tenant.key_prefix),
                            tenant.created_at.clone(),
                            tenant
                                .revoked_at
                                .clone()
                                .map_or_else(|| "active".into(), |at| format!("revoked {at}")),
                        ]
                    })
                    .collect();
                print_table(&["NAME", "KEY", "CREATED", "STATUS"], &rows);
                Ok(())
            }
            TenantCommand::Revoke { name, json } => {
                let tenant = api.revoke_tenant(&name).await?;
                if json {
                    return print_json(&tenant);
                }
                println!(
                    "tenant {}: key {}… revoked; its credits and sandboxes stay",
                    tenant.name, tenant.key_prefix
                );
                Ok(())
            }
        }
    }
    .await;
    api.close().await;
    outcome
}
