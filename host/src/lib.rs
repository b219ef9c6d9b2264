//! sandboxer-host: creates and destroys code-execution sandboxes through
//! WebAssembly backend extensions, and bills them against a credits ledger.
//!
//! Modules and their boundaries (see docs/architecture.md):
//! - [`runtime`] loads and calls extensions; knows nothing of money or routing;
//! - [`ledger`] holds, settles and records credits; never calls an extension;
//! - [`profile`] reads sandbox recipes; [`router`] picks the backend for one;
//! - [`manager`] is the one place that joins router, runtime and ledger for a
//!   sandbox's lifecycle; [`delivery`] sends the outboxes' events to sinks;
//! - [`paths`] and [`state_db`] say where the host's files live;
//! - [`supervisor`], [`cgroups`], [`sandbox_exec`], [`sandbox_io`] and
//!   [`sandbox_reaper`] run, enter, read and clean up the process trees of
//!   sandboxes on this machine (the `process` capability's other half).

pub mod cgroups;
pub mod delivery;
pub mod group_commit;
pub mod ledger;
pub mod manager;
pub mod names;
pub mod paths;
pub mod profile;
pub(crate) mod redo_log;
pub mod router;
pub mod runtime;
pub mod sandbox_exec;
pub mod sandbox_io;
pub mod sandbox_reaper;
pub mod scaffold;
pub mod server;
pub mod service;
pub mod state_db;
pub mod state_pg;
pub mod supervisor;
pub mod toml_file;
