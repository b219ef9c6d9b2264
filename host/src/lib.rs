//! sandboxer-host: creates and destroys code-execution sandboxes through
//! WebAssembly backend extensions, and bills them against a credits ledger.
//!
//! Modules and their boundaries (see docs/architecture.md):
//! - [`runtime`] loads and calls extensions; knows nothing of money or routing;
//! - [`ledger`] holds, settles and records credits; never calls an extension;
//! - [`profile`] reads sandbox recipes; [`router`] picks the backend for one;
//! - [`paths`] and [`state_db`] say where the host's files live.

pub mod ledger;
pub mod paths;
pub mod profile;
pub mod router;
pub mod runtime;
pub mod state_db;
pub mod toml_file;
