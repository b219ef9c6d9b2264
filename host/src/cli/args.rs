//! The command line, as clap parses it. Help texts here are the `--help`
//! users read: keep them in step with README.md and docs/.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "sandboxer-host",
    version,
    about = "Create and destroy code-execution sandboxes through WebAssembly backend extensions, and bill them in credits.",
    long_about = None,
    after_help = "Exit codes: 0 success, 1 the operation failed, 2 usage error, 75 the home stayed\n\
                  in use by another process for the whole wait (SANDBOXER_LOCK_WAIT_SECS, default 120).\n\
                  Logs go to stderr; set SANDBOXER_LOG (for example SANDBOXER_LOG=info) to see more."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Directory for the ledger and the state store (compiled extensions are cached per user, in
    /// SANDBOXER_CACHE_DIR or ~/.cache/sandboxer/extensions) [default: $XDG_DATA_HOME/sandboxer
    /// or ~/.local/share/sandboxer]
    #[arg(long, global = true, env = "SANDBOXER_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,

    /// Directory of extensions (*.wasm, each with an optional <name>.toml sidecar)
    /// [default: <home>/extensions]
    #[arg(
        long,
        global = true,
        env = "SANDBOXER_EXTENSIONS_DIR",
        value_name = "DIR"
    )]
    pub extensions_dir: Option<PathBuf>,

    /// Directory of profiles (*.toml) [default: <home>/profiles]
    #[arg(
        long,
        global = true,
        env = "SANDBOXER_PROFILES_DIR",
        value_name = "DIR"
    )]
    pub profiles_dir: Option<PathBuf>,

    /// Also deliver meter events to this webhook (a CloudEvents batch per POST): an http://
    /// or https:// URL with a host. A hub that is down costs a command at most 2 s, once
    #[arg(
        long,
        global = true,
        env = "SANDBOXER_HUB_URL",
        value_name = "URL",
        value_parser = parse_hub_url
    )]
    pub hub_url: Option<String>,

    /// Keep the credits ledger and the shared state (sandbox records with their owners' leases,
    /// key-value stores, tenants and keys) in this PostgreSQL database instead of the home's
    /// redb files, shared by every host given the same URL; SANDBOXER_LEASE_SECS (default 30)
    /// is how long a dead host keeps its sandboxes before another takes them over
    /// (docs/deployment.md)
    #[arg(
        long,
        global = true,
        env = "SANDBOXER_STORE",
        value_name = "postgres://USER@HOST:PORT/DATABASE",
        value_parser = parse_store_url
    )]
    pub store: Option<String>,

    /// Talk to this server instead of opening the home [default: the server that owns the
    /// home, found from <home>/server.json, if one runs]
    #[arg(long, global = true, env = "SANDBOXER_SERVER", value_name = "URL")]
    pub server: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a sandbox from a profile, wait for its command or its ttl, destroy it, bill it
    #[command(after_help = "\
The command's stdin is this command's stdin; its stdout and stderr stream here as it runs.

Exit status: the command's own (0-255); 128+N when signal N ended it; 124 when the ttl ended it
(\"ttl reached\"); 130 after Ctrl-C or SIGTERM (the sandbox is destroyed and billed first). Without a
command of its own, a sandbox that lives out its ttl exits 0. The host's own failures exit 1 (and 2
for usage errors), before any command ran.

Example: sandboxer-host run --profile local -- python3 -c 'print(6*7)'")]
    Run {
        #[command(flatten)]
        target: CreateArgs,
        /// Print a JSON summary, with the command's stdout and stderr (the first MiB of each)
        /// and its exit status
        #[arg(long)]
        json: bool,
        /// The command to run in the sandbox, instead of the profile's
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },

    /// Create, list, show and destroy sandboxes
    #[command(
        subcommand,
        after_help = "Example: sandboxer-host sandbox create --profile saas-stub --ttl 600"
    )]
    Sandbox(SandboxCommand),

    /// Read the meter events delivered to <home>/events.jsonl
    #[command(
        subcommand,
        after_help = "Example: sandboxer-host events tail --follow"
    )]
    Events(EventsCommand),

    /// Inspect and check backend extensions
    #[command(subcommand, after_help = "Example: sandboxer-host ext list")]
    Ext(ExtCommand),

    /// Show, add and trace credits
    #[command(
        subcommand,
        after_help = "Example: sandboxer-host credits add 25 --tenant acme"
    )]
    Credits(CreditsCommand),

    /// Check the ledger's invariants
    #[command(subcommand, after_help = "Example: sandboxer-host ledger verify")]
    Ledger(LedgerCommand),

    /// See how a profile picks its backend
    #[command(
        subcommand,
        after_help = "Example: sandboxer-host route explain --profile burst-sandbox"
    )]
    Route(RouteCommand),

    /// Run the host as a server: the native API, the E2B-compatible API, /metrics
    #[command(after_help = "\
The server owns the home: commands run meanwhile on the same home go through it.
It reaps expired sandboxes on time, retries failed destroys, delivers meter events
and reloads the extensions directory when it changes. SIGTERM or SIGINT stops it
after the requests in flight.

Example: sandboxer-host serve --listen 127.0.0.1:3000")]
    Serve {
        /// Address to listen on
        #[arg(
            long,
            env = "SANDBOXER_LISTEN",
            default_value = "127.0.0.1:3000",
            value_name = "ADDR"
        )]
        listen: String,
        /// A file holding the operator's key [default: SANDBOXER_OPERATOR_KEY, else
        /// <home>/operator.key, made on first start]
        #[arg(long, value_name = "FILE")]
        operator_key_file: Option<PathBuf>,
    },

    /// Register tenants and their API keys
    #[command(subcommand, after_help = "Example: sandboxer-host tenant create acme")]
    Tenant(TenantCommand),

    /// Print a shell completion script
    #[command(
        after_help = "Example: sandboxer-host completions bash > /etc/bash_completion.d/sandboxer-host"
    )]
    Completions {
        /// bash, zsh or fish
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Register a tenant and print its API key (shown once; only its hash is kept)
    #[command(after_help = "Example: sandboxer-host tenant create acme")]
    Create {
        /// The tenant's name: letters, digits, '-', '_' and '.', up to 64
        name: String,
        /// Print {name, api_key, created_at} as JSON
        #[arg(long)]
        json: bool,
    },
    /// List tenants (never their keys)
    #[command(after_help = "Example: sandboxer-host tenant list --json")]
    List {
        /// Print a JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Revoke a tenant's key: it stops working at once (its credits and sandboxes stay)
    #[command(after_help = "Example: sandboxer-host tenant revoke acme")]
    Revoke {
        /// The tenant's name
        name: String,
        /// Print the revoked tenant as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// A profile name in the profiles directory, or a path to a .toml file
    #[arg(long, value_name = "NAME")]
    pub profile: String,
    /// The tenant whose credits pay
    #[arg(long, default_value = "default", value_name = "NAME")]
    pub tenant: String,
    /// Lifetime in seconds, instead of the profile's ttl
    #[arg(long, value_name = "SECS")]
    pub ttl: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox and leave it running (until its ttl or `sandbox destroy`)
    #[command(
        after_help = "Example: sandboxer-host sandbox create --profile saas-stub --tenant acme --ttl 600"
    )]
    Create {
        #[command(flatten)]
        target: CreateArgs,
        /// Print the sandbox record as JSON
        #[arg(long)]
        json: bool,
    },
    /// List live sandboxes (--all: every record)
    #[command(after_help = "Example: sandboxer-host sandbox list --all")]
    List {
        /// Also list destroyed and failed sandboxes
        #[arg(long)]
        all: bool,
        /// Print a JSON array of sandbox records
        #[arg(long)]
        json: bool,
    },
    /// Show one sandbox with its attempts and meter
    #[command(after_help = "Example: sandboxer-host sandbox show sbx-0123456789abcdef")]
    Show {
        /// The sandbox's id (sbx-...)
        id: String,
        /// Print the sandbox record as JSON
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a running sandbox of a backend that runs here (`local`): same
    /// namespaces, cgroup or limits, user and bill as the sandbox's own process
    #[command(after_help = "\
Exit status: the command's own (128+N for signal N); 125 when the sandbox cannot be entered
(not running, or not a sandbox on this machine); 126/127 when the command cannot run or is not found.

Example: sandboxer-host sandbox exec sbx-0123456789abcdef -- ls /work")]
    Exec {
        /// The sandbox's id (sbx-...)
        id: String,
        /// The command and its arguments
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Print a sandbox's output (stdout, then stderr as it arrives on stderr); kept after destroy
    /// for SANDBOXER_SANDBOX_LOG_RETENTION_SECS (default a day)
    #[command(after_help = "Example: sandboxer-host sandbox logs sbx-0123456789abcdef --follow")]
    Logs {
        /// The sandbox's id (sbx-...)
        id: String,
        /// Keep printing until its process ends (or Ctrl-C)
        #[arg(long)]
        follow: bool,
    },
    /// Destroy a sandbox and settle its bill; idempotent
    #[command(after_help = "Example: sandboxer-host sandbox destroy sbx-0123456789abcdef")]
    Destroy {
        /// The sandbox's id (sbx-...)
        id: String,
        /// When it cannot be destroyed (its extension is gone, destroy fails):
        /// void its hold, charge nothing, and record why
        #[arg(long)]
        force: bool,
        /// Print the destroyed sandbox's record as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print the latest events (JSON lines), oldest first
    #[command(after_help = "Example: sandboxer-host events tail --limit 5")]
    Tail {
        /// How many events to print
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Keep printing new events as they are delivered (Ctrl-C to stop)
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Dry run: rank a profile's candidates and say why each ineligible one is left out.
    /// Creates nothing and holds nothing; exit 1 when no candidate is eligible
    #[command(
        after_help = "Example: sandboxer-host route explain --profile burst-sandbox --ttl 60"
    )]
    Explain {
        /// A profile name in the profiles directory, or a path to a .toml file
        #[arg(long, value_name = "NAME")]
        profile: String,
        /// Price the sandbox for this many seconds instead of the profile's ttl
        #[arg(long, value_name = "SECS")]
        ttl: Option<u32>,
        /// Print the decision (every candidate, its estimate and reason) as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ExtCommand {
    /// List every .wasm in the extensions directory, loaded or rejected with its reason
    #[command(after_help = "Example: sandboxer-host ext list --json")]
    List {
        /// Print a JSON array instead of a table
        #[arg(long)]
        json: bool,
    },

    /// Run the load checks on one file: exit 0 if it would load, 1 with the reason if not
    #[command(after_help = "Example: sandboxer-host ext check ./my-backend/target/my-backend.wasm")]
    Check {
        /// The .wasm file (its sidecar <stem>.toml beside it is checked too)
        file: PathBuf,
        /// Print the file's listing entry (status, reason, info) as JSON
        #[arg(long)]
        json: bool,
    },

    /// Show what an extension declares, its grants, limits and config
    #[command(after_help = "Example: sandboxer-host ext info saas-stub")]
    Info {
        /// Instance name: the file stem of its .wasm
        name: String,
        /// Print the details as JSON
        #[arg(long)]
        json: bool,
    },

    /// Start a new extension project (Rust, Python or JavaScript) that builds and passes `ext check`
    #[command(after_help = "Example: sandboxer-host ext new my-backend --lang python")]
    New {
        /// The extension's name (also its directory and instance name)
        name: String,
        /// rust, python or js
        #[arg(long, default_value = "rust")]
        lang: String,
        /// Where to create it [default: ./NAME]
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },

    /// Ask an extension what a sandbox of a given size would cost
    #[command(
        after_help = "Example: sandboxer-host ext estimate saas-stub --cpu-millis 2000 --memory-mb 2048 --ttl-secs 1800"
    )]
    Estimate {
        /// Instance name: the file stem of its .wasm
        name: String,
        /// CPU in thousandths of a vCPU
        #[arg(long, default_value_t = 1000)]
        cpu_millis: u32,
        /// Memory in MiB
        #[arg(long, default_value_t = 1024)]
        memory_mb: u32,
        /// Lifetime in seconds
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u32,
        /// Template name passed to the backend
        #[arg(long, default_value = "base")]
        template: String,
        /// Print {extension, estimate, rate_per_hour} as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CreditsCommand {
    /// Show a tenant's balance, held and available credits
    #[command(after_help = "Example: sandboxer-host credits show --tenant acme")]
    Show {
        /// The tenant
        #[arg(long, default_value = "default", value_name = "NAME")]
        tenant: String,
        /// Print {tenant, balance, held, available} as JSON, amounts as decimal strings
        #[arg(long)]
        json: bool,
    },

    /// Add credits to a tenant
    #[command(
        after_help = "Example: sandboxer-host credits add 25 --tenant acme --key invoice-2041"
    )]
    Add {
        /// Decimal credits, up to 6 places (for example 25 or 0.5)
        #[arg(allow_negative_numbers = true)]
        amount: String,
        /// The tenant to credit
        #[arg(long, default_value = "default", value_name = "NAME")]
        tenant: String,
        /// Idempotency key: adding again with the same key adds nothing
        #[arg(long)]
        key: Option<String>,
        /// Print the grant and the balance after it as JSON
        #[arg(long)]
        json: bool,
    },

    /// Show a tenant's journal entries, newest first
    #[command(after_help = "Example: sandboxer-host credits history --tenant acme --limit 5")]
    History {
        /// The tenant
        #[arg(long, default_value = "default", value_name = "NAME")]
        tenant: String,
        /// How many entries to show
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print a JSON array of entries
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Check every ledger invariant; exit 1 naming each violation
    #[command(after_help = "Example: sandboxer-host ledger verify")]
    Verify {
        /// Print the report (counts and violations) as JSON
        #[arg(long)]
        json: bool,
    },
}

/// `--store`: a PostgreSQL URL, checked here so a typo is a usage error.
fn parse_store_url(text: &str) -> Result<String, String> {
    let url = url::Url::parse(text).map_err(|error| {
        format!(
            "{error}: expected a PostgreSQL URL such as postgres://sandboxer@db.internal:5432/sandboxer"
        )
    })?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "the scheme must be postgres (or postgresql), not `{}`; leave --store unset to keep the ledger and the state in the home",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    Ok(text.to_string())
}

/// `--hub-url` as the delivery posts to it: checked once here, so a typo is a
/// usage error at start rather than a warning after the command's work.
fn parse_hub_url(text: &str) -> Result<String, String> {
    let url = url::Url::parse(text).map_err(|error| {
        format!("{error}: expected an http:// or https:// URL such as http://127.0.0.1:8080/events")
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "the scheme must be http or https, not `{}`",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every command (the top level included) with its full name.
    fn every_command() -> Vec<(String, clap::Command)> {
        let mut root = Cli::command();
        root.build();
        let mut found = Vec::new();
        let mut pending = vec![(String::from("sandboxer-host"), root)];
        while let Some((name, command)) = pending.pop() {
            for sub in command.get_subcommands() {
                if sub.get_name() != "help" {
                    pending.push((format!("{name} {}", sub.get_name()), sub.clone()));
                }
            }
            found.push((name, command));
        }
        found
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_help_has_an_example_and_describes_every_flag() {
        let commands = every_command();
        assert!(commands.len() > 25, "{} commands", commands.len());
        for (name, mut command) in commands {
            let help = command.render_long_help().to_string();
            if name != "sandboxer-host" {
                let example = format!("Example: {name}");
                assert!(
                    help.contains(&example),
                    "`{name} --help` shows no `{example}`:\n{help}"
                );
            }
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                assert!(
                    arg.get_help()
                        .is_some_and(|text| !text.to_string().trim().is_empty()),
                    "`{name} --help` does not describe `{id}`"
                );
            }
        }
    }

    #[test]
    fn global_options_have_their_own_heading() {
        let mut show = Cli::command();
        show.build();
        let mut credits = show.find_subcommand_mut("credits").unwrap().clone();
        let mut show = credits.find_subcommand_mut("show").unwrap().clone();
        let help = show.render_help().to_string();
        let (own, global) = help
            .split_once("Global options:")
            .unwrap_or_else(|| panic!("no Global options heading:\n{help}"));
        assert!(
            own.contains("--tenant") && !own.contains("--home"),
            "{help}"
        );
        assert!(
            global.contains("--home") && global.contains("--hub-url"),
            "{help}"
        );
    }
}
