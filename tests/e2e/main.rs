//! End-to-end tests: the real `sandboxer-host` binary, real wasmtime
//! instances of real components, real redb files in fresh temp dirs.
//!
//! Guests come from `cargo xtask build-extensions` (target/extensions and
//! target/fixtures); `cargo xtask test` builds them before running this.

mod cli_credits;
mod cli_ext;
mod cli_usage;
mod console;
mod crash_points;
mod e2b_backend;
mod federation;
mod http_egress;
mod languages;
mod ledger_concurrency;
mod ledger_crash;
mod ledger_model;
mod ledger_postgres;
mod lifecycle;
mod lifecycle_hostile;
mod local_backend;
mod manager_faults;
mod multi_host;
mod pg;
mod profiles;
mod readme_tour;
mod routing;
mod runtime_cache;
mod runtime_hostile;
mod runtime_state;
mod server;
mod soak;
mod support;
mod tidy;
mod webdriver;
