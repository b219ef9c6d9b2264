//! The extension runtime: loads `.wasm` backend components and calls them
//! under limits.
//!
//! It owns the wasmtime engine, the linker (an empty WASI plus the `host`
//! interface), the precompiled cache and each instance's key-value store.
//! It knows nothing of money, routing or sandbox lifecycles: callers get
//! typed answers or a [`CallError`] and decide what they mean.

mod cache;
mod call_state;
mod capabilities;
pub mod catalog;
mod egress;
mod engine;
mod error;
mod extension;
mod file_identity;
mod http_client;
mod http_grants;
mod http_response;
pub mod kv;
pub mod kv_usage;
mod loader;
mod network;
pub mod process;
mod process_host;
mod secrets;
pub mod sidecar;
pub mod stats;

pub mod bindings {
    //! Host-side bindings generated from `wit/`.
    wasmtime::component::bindgen!({
        path: "../wit",
        // The larger world: the contract plus the process capability, which
        // only granted extensions may import.
        world: "self-hosted-extension",
        // Exports are called asynchronously so that a call blocked in a host
        // call (a WASI sleep, a socket wait) can still be stopped at its
        // deadline; the `host` imports are quick and stay synchronous.
        imports: { default: trappable },
        exports: { default: async },
        additional_derives: [serde::Serialize, serde::Deserialize, PartialEq, Eq],
    });
}

pub use bindings::sandboxer::extension::types::{
    BackendKind, CostEstimate, ExtError, ExtensionInfo, MicroCredits, SandboxHandle, SandboxSpec,
    Usage,
};
pub use cache::CacheOutcome;
pub use capabilities::ImportedInterface;
pub use catalog::ExtensionCatalog;
pub use engine::EPOCH_TICK;
pub use error::{CallError, describe_ext_error};
pub use extension::{Extension, PendingKv};
pub use file_identity::SETTLE_WINDOW;
pub use loader::{MAX_COMPONENT_BYTES, instance_name, sidecar_path};
pub use secrets::{
    REFERENCE_PREFIX as SECRET_REFERENCE_PREFIX, REFERENCE_SUFFIX as SECRET_REFERENCE_SUFFIX,
};
pub use sidecar::{
    BillingPolicy, Grants, HttpGrant, HttpScheme, Limits, NetworkGrant, RoutingHints, SecretGrant,
    SecretSource, Sidecar,
};

use crate::state_db::StateDb;
use call_state::CallState;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use wasmtime::Engine;
use wasmtime::component::{HasSelf, Linker};

/// `"self-hosted"` or `"saas"`, as the CLI and JSON show a kind.
pub fn kind_name(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::SelfHosted => "self-hosted",
        BackendKind::Saas => "saas",
    }
}

/// One `.wasm` file of an extensions directory and what became of it.
#[derive(Debug, Clone)]
pub struct ExtensionEntry {
    /// The instance name (file stem).
    pub name: String,
    pub file: PathBuf,
    pub status: Result<Arc<Extension>, String>,
}

impl ExtensionEntry {
    pub fn extension(&self) -> Option<&Arc<Extension>> {
        self.status.as_ref().ok()
    }
}

/// Every extension file of a directory, in name order, loaded or rejected.
#[derive(Debug, Default, Clone)]
pub struct ExtensionSet {
    pub entries: Vec<ExtensionEntry>,
}

impl ExtensionSet {
    /// The loaded instance called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Extension>> {
        self.entry(name).and_then(ExtensionEntry::extension)
    }

    pub fn entry(&self, name: &str) -> Option<&ExtensionEntry> {
        self.entries.iter().find(|entry| entry.name == name)
    }

    pub fn loaded(&self) -> impl Iterator<Item = &Arc<Extension>> {
        self.entries.iter().filter_map(ExtensionEntry::extension)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(String),
    #[error(
        "no extensions directory at {path}: create it and put .wasm extensions in it, or pass --extensions-dir"
    )]
    NoExtensionsDir { path: PathBuf },
    #[error("cannot read the extensions directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The engine, the linker, the cache and the settings extensions are loaded
/// with. Cheap to clone (every part is shared), so loading can move work to
/// blocking threads.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<CallState>>,
    cache: Arc<cache::ArtifactCache>,
    state: Arc<StateDb>,
    ticker: Arc<engine::EpochTicker>,
    on_compile: Option<CompileProgress>,
    /// Where sandbox processes live and the supervisor that starts them;
    /// without it, extensions granted `process` are refused.
    processes: Option<process::ProcessSettings>,
}

/// A one-line notice (a wait, say) for the person at the terminal.
pub type CompileNotice = Arc<dyn Fn(&str) + Send + Sync>;

/// Where a compile the cache could not spare is: compiling a big guest
/// takes seconds, and several compile at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompileStage {
    Started,
    /// Compiled, or failed to (the load then reports why).
    Finished,
}

/// Told the file name at each [`CompileStage`] of a compile.
pub type CompileProgress = Arc<dyn Fn(&str, CompileStage) + Send + Sync>;

impl Runtime {
    /// A runtime caching compiled components in `cache_dir` and keeping
    /// extension state in `state`.
    pub fn new(cache_dir: PathBuf, state: Arc<StateDb>) -> Result<Self, RuntimeError> {
        let engine_error = |error: wasmtime::Error| RuntimeError::Engine(format!("{error:#}"));
        let engine = engine::new_engine().map_err(engine_error)?;
        let mut linker = Linker::<CallState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(engine_error)?;
        // Linked for everyone; only a component granted `http` may import
        // it (capabilities.rs), and every request passes the egress policy.
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(engine_error)?;
        bindings::SelfHostedExtension::add_to_linker::<CallState, HasSelf<CallState>>(
            &mut linker,
            |state| state,
        )
        .map_err(engine_error)?;
        let cache = Arc::new(cache::ArtifactCache::new(cache_dir, &engine));
        let ticker = Arc::new(engine::EpochTicker::start(&engine));
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            cache,
            state,
            ticker,
            on_compile: None,
            processes: None,
        })
    }

    /// Lets extensions granted `process` start programs: each sandbox gets a
    /// directory under `sandboxes_dir`, and `supervisor` (the sandboxer-host
    /// binary) watches each process.
    pub fn enable_processes(&mut self, sandboxes_dir: PathBuf, supervisor: PathBuf) {
        self.processes = Some(process::ProcessSettings {
            sandboxes_dir,
            supervisor,
            pipe_stdin: false,
        });
    }

    /// Gives the processes of sandboxes created from here on a stdin fed
    /// through their `stdin` FIFO (`run` attaches its own), instead of
    /// /dev/null. Call after [`Runtime::enable_processes`], before loading.
    pub fn pipe_stdin_of_new_sandboxes(&mut self) {
        if let Some(settings) = &mut self.processes {
            settings.pipe_stdin = true;
        }
    }

    /// Calls `notice` before and after each compile that the cache cannot
    /// spare.
    pub fn on_compile(&mut self, notice: CompileProgress) {
        self.on_compile = Some(notice);
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Where the precompiled artifact of a component with this hash lives.
    pub fn cache_entry_path(&self, content_sha256: &str) -> PathBuf {
        self.cache.entry_path(content_sha256)
    }

    /// Runs every load check on one file. The instance name is its stem.
    /// Compiling runs on a blocking thread; `info()` on the caller's task.
    pub async fn load_file(&self, path: &Path) -> ExtensionEntry {
        let runtime = self.clone();
        let file = path.to_path_buf();
        let prepared = tokio::task::spawn_blocking(move || loader::prepare(&runtime, &file))
            .await
            .unwrap_or_else(|panicked| Err(format!("the loader failed: {panicked}")));
        let status = match prepared {
            Ok(prepared) => loader::finish(self, prepared).await.map(Arc::new),
            Err(reason) => Err(reason),
        };
        if let Err(reason) = &status {
            tracing::debug!(file = %path.display(), "extension rejected: {reason}");
        }
        ExtensionEntry {
            name: instance_name(path),
            file: path.to_path_buf(),
            status,
        }
    }

    /// The `*.wasm` files of `dir`, by instance name.
    pub fn extension_files(dir: &Path) -> Result<BTreeMap<String, PathBuf>, RuntimeError> {
        let read_dir = std::fs::read_dir(dir).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => RuntimeError::NoExtensionsDir {
                path: dir.to_path_buf(),
            },
            _ => RuntimeError::ReadDir {
                path: dir.to_path_buf(),
                source,
            },
        })?;
        let mut files = BTreeMap::new();
        for entry in read_dir {
            let entry = entry.map_err(|source| RuntimeError::ReadDir {
                path: dir.to_path_buf(),
                source,
            })?;
            let path = entry.path();
            if path
                .extension()
                .is_some_and(|extension| extension == "wasm")
                && !path.is_dir()
            {
                files.insert(instance_name(&path), path);
            }
        }
        Ok(files)
    }

    /// Loads every `*.wasm` in `dir`, several at once (as many as the
    /// machine has cores). One bad file is one rejected entry; it never
    /// stops the others from loading.
    pub async fn load_dir(&self, dir: &Path) -> Result<ExtensionSet, RuntimeError> {
        let files = Self::extension_files(dir)?;
        let parallel = std::thread::available_parallelism().map_or(2, |cores| cores.get());
        let permits = Arc::new(tokio::sync::Semaphore::new(parallel));
        let mut loading = tokio::task::JoinSet::new();
        for (index, path) in files.into_values().enumerate() {
            let runtime = self.clone();
            let permits = permits.clone();
            loading.spawn(async move {
                let _permit = permits.acquire_owned().await;
                (index, runtime.load_file(&path).await)
            });
        }
        let mut entries = Vec::new();
        while let Some(joined) = loading.join_next().await {
            if let Ok(entry) = joined {
                entries.push(entry);
            }
        }
        entries.sort_by_key(|(index, _)| *index);
        Ok(ExtensionSet {
            entries: entries.into_iter().map(|(_, entry)| entry).collect(),
        })
    }
}
