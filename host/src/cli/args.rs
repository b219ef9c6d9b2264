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
    /// Directory for the ledger, the state store and the compiled-extension cache
    /// [default: $XDG_DATA_HOME/sandboxer or ~/.local/share/sandboxer]
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

    /// Also deliver meter events to this webhook (a CloudEvents batch per POST)
    #[arg(long, global = true, env = "SANDBOXER_HUB_URL", value_name = "URL")]
    pub hub_url: Option<String>,

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
    #[command(subcommand)]
    Sandbox(SandboxCommand),

    /// Read the meter events delivered to <home>/events.jsonl
    #[command(subcommand)]
    Events(EventsCommand),

    /// Inspect and check backend extensions
    #[command(subcommand)]
    Ext(ExtCommand),

    /// Show, add and trace credits
    #[command(subcommand)]
    Credits(CreditsCommand),

    /// Check the ledger's invariants
    #[command(subcommand)]
    Ledger(LedgerCommand),

    /// See how a profile picks its backend
    #[command(subcommand)]
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
    #[command(subcommand)]
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
        #[arg(long)]
        json: bool,
    },
    /// List tenants (never their keys)
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a tenant's key: it stops working at once (its credits and sandboxes stay)
    #[command(after_help = "Example: sandboxer-host tenant revoke acme")]
    Revoke {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// A profile name in the profiles directory, or a path to a .toml file
    #[arg(long)]
    pub profile: String,
    /// The tenant whose credits pay
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// Lifetime in seconds, instead of the profile's ttl
    #[arg(long, value_name = "SECS")]
    pub ttl: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox and leave it running (until its ttl or `sandbox destroy`)
    Create {
        #[command(flatten)]
        target: CreateArgs,
        #[arg(long)]
        json: bool,
    },
    /// List live sandboxes (--all: every record)
    List {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show one sandbox with its attempts and meter
    Show {
        id: String,
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
        id: String,
        /// The command and its arguments
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Print a sandbox's output (stdout, then stderr as it arrives on stderr); kept after destroy
    /// for SANDBOXER_SANDBOX_LOG_RETENTION_SECS (default a day)
    #[command(after_help = "Example: sandboxer-host sandbox logs sbx-0123456789abcdef --follow")]
    Logs {
        id: String,
        /// Keep printing until its process ends (or Ctrl-C)
        #[arg(long)]
        follow: bool,
    },
    /// Destroy a sandbox and settle its bill; idempotent
    Destroy {
        id: String,
        /// When it cannot be destroyed (its extension is gone, destroy fails):
        /// void its hold, charge nothing, and record why
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print the latest events (JSON lines), oldest first
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
    Explain {
        /// A profile name in the profiles directory, or a path to a .toml file
        #[arg(long)]
        profile: String,
        /// Price the sandbox for this many seconds instead of the profile's ttl
        #[arg(long, value_name = "SECS")]
        ttl: Option<u32>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ExtCommand {
    /// List every .wasm in the extensions directory, loaded or rejected with its reason
    List {
        /// Print a JSON array instead of a table
        #[arg(long)]
        json: bool,
    },

    /// Run the load checks on one file: exit 0 if it would load, 1 with the reason if not
    Check {
        /// The .wasm file (its sidecar <stem>.toml beside it is checked too)
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },

    /// Show what an extension declares, its grants, limits and config
    Info {
        /// Instance name: the file stem of its .wasm
        name: String,
        #[arg(long)]
        json: bool,
    },

    /// Start a new extension project (Rust, Python or JavaScript) that builds and passes `ext check`
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
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CreditsCommand {
    /// Show a tenant's balance, held and available credits
    Show {
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Print {tenant, balance, held, available} as JSON, amounts as decimal strings
        #[arg(long)]
        json: bool,
    },

    /// Add credits to a tenant
    Add {
        /// Decimal credits, up to 6 places (for example 25 or 0.5)
        #[arg(allow_negative_numbers = true)]
        amount: String,
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Idempotency key: adding again with the same key adds nothing
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        json: bool,
    },

    /// Show a tenant's journal entries, newest first
    History {
        #[arg(long, default_value = "default")]
        tenant: String,
        /// How many entries to show
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Check every ledger invariant; exit 1 naming each violation
    Verify {
        #[arg(long)]
        json: bool,
    },
}
