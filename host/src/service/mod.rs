//! The service layer: the host as one API that the command line and the
//! server both call, so neither holds logic of its own.
//!
//! A [`Service`] is an opened home: the runtime and its extensions (loaded on
//! first need), the ledger, the state store and the manager. Its operations
//! are `async`, take the [`Caller`] (the operator, or one tenant, which sees
//! and touches only its own sandboxes and credits) and answer with the types
//! of [`api`], which `--json` prints and HTTP sends unchanged. Failures are
//! [`ServiceError`]s, which the front ends turn into exit codes and HTTP
//! statuses.
//!
//! The command line opens a service per command and closes it after (redb's
//! files are locked while open); `serve` keeps one open for its whole life and
//! runs the background work of [`background`]. [`client`] is the same API
//! over HTTP, for commands run while a server owns the home.

pub mod api;
pub mod background;
pub mod client;
pub mod config;
mod error;
mod insight;
pub mod run;
pub mod tenants;

pub use config::{ConfigError, ServiceConfig};
pub use error::ServiceError;

use crate::delivery::{self, HubAttempt, Sinks};
use crate::ledger::{Ledger, LedgerOptions, LedgerStore, PgLedger};
use crate::manager::{
    CreateRequest, ReconcileReport, Retries, SandboxManager, SandboxState, SandboxStatus, now_ms,
};
use crate::names::check_name;
use crate::profile::{MAX_TTL_SECS, Profile};
use crate::router::Router;
use crate::router::health::RouteHealth;
use crate::runtime::{ExtensionCatalog, ExtensionSet, Runtime};
use crate::state_db::StateDb;
use api::*;
use sandboxer_credits::parse_credits;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The operator: every tenant, every action.
    Operator,
    /// One tenant: its own sandboxes and credits only.
    Tenant(String),
}

impl Caller {
    /// The tenant an action is about: a tenant's own, or the operator's
    /// choice (`default` when it made none).
    fn tenant_for(&self, asked: Option<&str>) -> Result<String, ServiceError> {
        match (self, asked) {
            (Self::Operator, asked) => Ok(asked.unwrap_or("default").to_string()),
            (Self::Tenant(own), None) => Ok(own.clone()),
            (Self::Tenant(own), Some(asked)) if asked == own => Ok(own.clone()),
            (Self::Tenant(_), Some(asked)) => Err(ServiceError::NotFound(format!(
                "no tenant `{asked}` for this key"
            ))),
        }
    }

    fn require_operator(&self, action: &str) -> Result<(), ServiceError> {
        match self {
            Self::Operator => Ok(()),
            Self::Tenant(_) => Err(ServiceError::Forbidden(format!(
                "{action} needs the operator's key"
            ))),
        }
    }

    fn sees(&self, record: &SandboxStatus) -> bool {
        match self {
            Self::Operator => true,
            Self::Tenant(own) => &record.tenant == own,
        }
    }
}

/// How long a host owns its sandboxes on a shared store without renewing
/// (`SANDBOXER_LEASE_SECS`, whole seconds, at least 3).
fn lease_from_env() -> Result<std::time::Duration, ServiceError> {
    let Ok(text) = std::env::var("SANDBOXER_LEASE_SECS") else {
        return Ok(crate::state_pg::DEFAULT_LEASE);
    };
    let minimum = crate::state_pg::MIN_LEASE.as_secs();
    match text.trim().parse::<u64>() {
        Ok(secs) if (minimum..=86_400).contains(&secs) => Ok(std::time::Duration::from_secs(secs)),
        _ => Err(ServiceError::InvalidInput(format!(
            "SANDBOXER_LEASE_SECS is `{text}`; it must be whole seconds from {minimum} to 86400 \
             (how long a host owns its sandboxes without renewing; default {})",
            crate::state_pg::DEFAULT_LEASE.as_secs()
        ))),
    }
}

/// An opened home.
pub struct Service {
    config: ServiceConfig,
    runtime: Runtime,
    state: Arc<StateDb>,
    catalog: Arc<ExtensionCatalog>,
    /// Set once the extensions directory has been loaded into the catalog.
    extensions_loaded: tokio::sync::OnceCell<()>,
    manager: SandboxManager,
    sinks: Sinks,
}

impl Service {
    /// Opens the home: the runtime, the ledger and the state store (waiting,
    /// bounded, while another process has them). Extensions load on first
    /// need. Call [`Service::reconcile`] next.
    pub async fn open(config: ServiceConfig) -> Result<Self, ServiceError> {
        let paths = &config.paths;
        let state = Arc::new(StateDb::new(paths.state_file()));
        let mut runtime = Runtime::new(paths.cache_dir(), state.clone())?;
        if let Some(supervisor) = &config.supervisor {
            runtime.enable_processes(paths.sandboxes_dir(), supervisor.clone());
            if config.pipe_stdin {
                runtime.pipe_stdin_of_new_sandboxes();
            }
        }
        if let Some(notice) = &config.on_compile {
            runtime.on_compile(notice.clone());
        }
        let options = LedgerOptions {
            default_credits: config.default_credits,
            ..LedgerOptions::default()
        };
        let ledger: Arc<dyn LedgerStore> = match &config.store {
            Some(url) => {
                let lease = lease_from_env()?;
                let ledger = PgLedger::connect(url, options).await?;
                wait_for_home(&config, || Ok(state.database()?)).await?;
                let host_id = crate::manager::lifecycle_events::host_id(&state)
                    .map_err(|error| ServiceError::Internal(error.to_string()))?;
                let shared = crate::state_pg::PgState::start(url, host_id, lease)
                    .map_err(ServiceError::Internal)?;
                state.share(Arc::new(shared));
                Arc::new(ledger)
            }
            None => Arc::new(
                wait_for_home(&config, || {
                    let ledger = Ledger::open(&paths.ledger_file(), options.clone())?;
                    state.database()?;
                    Ok(ledger)
                })
                .await?,
            ),
        };
        let catalog = Arc::new(ExtensionCatalog::new(ExtensionSet::default()));
        let manager = SandboxManager::new(ledger, state.clone(), catalog.clone())
            .with_sandboxes_dir(paths.sandboxes_dir());
        let sinks = Sinks {
            events_file: paths.home.join("events.jsonl"),
            hub_url: config.hub_url.clone(),
        };
        Ok(Self {
            config,
            runtime,
            state,
            catalog,
            extensions_loaded: tokio::sync::OnceCell::new(),
            manager,
            sinks,
        })
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    pub fn manager(&self) -> &SandboxManager {
        &self.manager
    }

    pub fn state(&self) -> &Arc<StateDb> {
        &self.state
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub fn catalog(&self) -> &Arc<ExtensionCatalog> {
        &self.catalog
    }

    /// The extension set, loading the extensions directory the first time.
    pub async fn extensions(&self) -> Result<Arc<ExtensionSet>, ServiceError> {
        self.extensions_loaded
            .get_or_try_init(|| async {
                let set = self
                    .runtime
                    .load_dir(&self.config.paths.extensions_dir)
                    .await?;
                self.catalog.replace(set);
                Ok::<(), ServiceError>(())
            })
            .await?;
        Ok(self.catalog.snapshot())
    }

    /// Recovery after a crash and the ttl sweep (see the manager). Loads the
    /// extensions only when some sandbox needs one.
    pub async fn reconcile(&self, retries: Retries) -> Result<ReconcileReport, ServiceError> {
        let mut taken_over = self.manager.tend_leases().await;
        taken_over.extend(self.manager.restore_lost_records().await);
        let now = now_ms();
        if self.manager.has_work(now, retries)? {
            // A missing extensions directory leaves them unloaded: each
            // sandbox then reports that its extension is missing.
            let _ = self.extensions().await;
        }
        let mut report = self.manager.reconcile(now, retries).await?;
        for action in &taken_over {
            tracing::info!("reconciled: {action}");
        }
        report.actions.splice(0..0, taken_over);
        Ok(report)
    }

    /// Delivers waiting meter events to the sinks. A sink that fails is a
    /// warning (returned), never a failure: its events wait in the outbox.
    pub async fn deliver(self: &Arc<Self>) -> Option<String> {
        self.deliver_to_hub(HubAttempt::Always).await
    }

    async fn deliver_to_hub(self: &Arc<Self>, hub: HubAttempt) -> Option<String> {
        let service = self.clone();
        tokio::task::spawn_blocking(move || service.deliver_blocking(hub))
            .await
            .unwrap_or_else(|panicked| Some(format!("event delivery failed: {panicked}")))
    }

    fn deliver_blocking(&self, hub: HubAttempt) -> Option<String> {
        match delivery::flush(
            &self.sinks,
            self.manager.ledger().as_ref(),
            &self.state,
            hub,
        ) {
            Ok(report) => report.hub_error.map(|error| {
                format!("events could not reach the hub ({error}); they wait in the outbox")
            }),
            Err(error) => Some(format!("events were not delivered: {error}")),
        }
    }

    /// Delivers waiting events and releases the home's files. The hub is
    /// contacted only when this opening wrote events (a command that changed
    /// nothing never waits on it).
    pub async fn close(self) -> Option<String> {
        let service = Arc::new(self);
        let warning = service.deliver_to_hub(HubAttempt::IfNewEvents).await;
        if let Ok(service) = Arc::try_unwrap(service) {
            let state = service.state.clone();
            drop(service);
            state.close();
        }
        warning
    }

    // ---- sandboxes ----

    fn check_ttl(ttl_secs: Option<u32>) -> Result<(), ServiceError> {
        match ttl_secs {
            Some(ttl) if !(1..=MAX_TTL_SECS).contains(&ttl) => Err(ServiceError::InvalidInput(
                format!("the ttl must be between 1 and {MAX_TTL_SECS} seconds, got {ttl}"),
            )),
            _ => Ok(()),
        }
    }

    /// Routes, holds and creates a sandbox from a profile.
    pub async fn create_sandbox(
        &self,
        caller: &Caller,
        request: CreateSandbox,
    ) -> Result<SandboxView, ServiceError> {
        Self::check_ttl(request.ttl_secs)?;
        let tenant = caller.tenant_for(request.tenant.as_deref())?;
        check_name("tenant", &tenant).map_err(ServiceError::InvalidInput)?;
        let profile = Profile::find(&request.profile, &self.config.paths.profiles_dir)?;
        self.extensions().await?;
        let record = self
            .manager
            .create(&CreateRequest {
                profile,
                tenant,
                ttl_secs: request.ttl_secs,
                command: request.command.filter(|command| !command.is_empty()),
                metadata: request.metadata,
            })
            .await?;
        Ok(SandboxView::from(&record))
    }

    /// One sandbox the caller may see.
    pub fn sandbox(&self, caller: &Caller, id: &str) -> Result<SandboxStatus, ServiceError> {
        match self.manager.get(id) {
            Ok(record) if caller.sees(&record) => Ok(record),
            Ok(_) | Err(crate::manager::ManagerError::NotFound(_)) => {
                Err(ServiceError::NotFound(format!("no sandbox `{id}`")))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// One sandbox, with its local process report when it has one.
    pub fn show_sandbox(&self, caller: &Caller, id: &str) -> Result<SandboxView, ServiceError> {
        let record = self.sandbox(caller, id)?;
        let mut view = SandboxView::from(&record);
        view.process = crate::sandbox_io::process_report(&self.config.paths.sandboxes_dir(), id)
            .and_then(|report| serde_json::to_value(report).ok());
        Ok(view)
    }

    /// The caller's sandboxes, oldest first.
    pub fn list_sandboxes(
        &self,
        caller: &Caller,
        query: &SandboxQuery,
    ) -> Result<Vec<SandboxStatus>, ServiceError> {
        let records = self.manager.list(query.all || query.state.is_some())?;
        Ok(records
            .into_iter()
            .filter(|record| caller.sees(record))
            .filter(|record| query.tenant.as_ref().is_none_or(|t| &record.tenant == t))
            .filter(|record| {
                query
                    .state
                    .as_ref()
                    .is_none_or(|s| record.state.name() == s)
            })
            .filter(|record| {
                query
                    .extension
                    .as_ref()
                    .is_none_or(|e| record.extension.as_ref() == Some(e))
            })
            .collect())
    }

    /// Destroys and bills a sandbox (idempotent).
    pub async fn destroy_sandbox(
        &self,
        caller: &Caller,
        id: &str,
        force: bool,
    ) -> Result<SandboxView, ServiceError> {
        self.sandbox(caller, id)?;
        if force {
            caller.require_operator("destroy --force")?;
        }
        let _ = self.extensions().await;
        let record = self.manager.destroy(id, force).await?;
        Ok(SandboxView::from(&record))
    }

    /// Makes a ready sandbox end at `ends_at_ms` (extending its hold when it
    /// ends later; with `only_later`, never sooner).
    pub async fn set_sandbox_end(
        &self,
        caller: &Caller,
        id: &str,
        ends_at_ms: u64,
        only_later: bool,
    ) -> Result<SandboxView, ServiceError> {
        let record = self.sandbox(caller, id)?;
        if record.state != SandboxState::Ready {
            return Err(ServiceError::NotFound(format!(
                "sandbox `{id}` is {}, not running",
                record.state.name()
            )));
        }
        let record = self.manager.set_end(id, ends_at_ms, only_later).await?;
        Ok(SandboxView::from(&record))
    }

    // ---- credits ----

    /// Whether `tenant` exists: registered, or with journal entries.
    async fn knows_tenant(&self, tenant: &str) -> Result<bool, ServiceError> {
        Ok(self.manager.ledger().knows_tenant(tenant).await?
            || tenants::get(&self.state, tenant)
                .map_err(|error| ServiceError::Internal(error.to_string()))?
                .is_some())
    }

    pub async fn credits(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
    ) -> Result<CreditsView, ServiceError> {
        let tenant = caller.tenant_for(tenant)?;
        check_name("tenant", &tenant).map_err(ServiceError::InvalidInput)?;
        if !self.knows_tenant(&tenant).await? {
            return Err(ServiceError::NotFound(format!(
                "no tenant `{tenant}`: it has no credits history (add credits with `credits add AMOUNT --tenant {tenant}`)"
            )));
        }
        let summary = self.manager.ledger().summary(&tenant).await?;
        Ok(CreditsView::from(&summary))
    }

    pub async fn add_credits(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        request: &AddCredits,
    ) -> Result<GrantView, ServiceError> {
        caller.require_operator("adding credits")?;
        let tenant = caller.tenant_for(tenant)?;
        let amount = parse_credits(&request.amount)
            .map_err(|error| ServiceError::InvalidInput(error.to_string()))?;
        if let Some(key) = &request.key
            && (key.is_empty() || key.len() > 256)
        {
            return Err(ServiceError::InvalidInput(
                "a key must be 1 to 256 characters".into(),
            ));
        }
        let ledger = self.manager.ledger();
        let receipt = ledger
            .grant(&tenant, amount, request.key.as_deref())
            .await?;
        let summary = ledger.summary(&tenant).await?;
        Ok(GrantView {
            tenant: receipt.tenant,
            added: sandboxer_credits::format_credits(if receipt.replayed {
                0
            } else {
                receipt.amount
            }),
            amount: sandboxer_credits::format_credits(receipt.amount),
            replayed: receipt.replayed,
            seq: receipt.seq,
            balance: sandboxer_credits::format_micros(summary.balance),
            held: sandboxer_credits::format_credits(summary.held),
            available: sandboxer_credits::format_micros(summary.available),
        })
    }

    pub async fn history(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EntryView>, ServiceError> {
        let tenant = caller.tenant_for(tenant)?;
        check_name("tenant", &tenant).map_err(ServiceError::InvalidInput)?;
        if !self.knows_tenant(&tenant).await? {
            return Err(ServiceError::NotFound(format!("no tenant `{tenant}`")));
        }
        Ok(self
            .manager
            .ledger()
            .history(&tenant, limit)
            .await?
            .iter()
            .map(EntryView::from)
            .collect())
    }

    pub async fn verify(&self, caller: &Caller) -> Result<VerifyView, ServiceError> {
        caller.require_operator("ledger verify")?;
        Ok(VerifyView::from(&self.manager.ledger().verify().await?))
    }

    // ---- extensions and routing ----

    pub async fn list_extensions(&self) -> Result<Vec<ExtensionListing>, ServiceError> {
        let set = self.extensions().await?;
        Ok(set.entries.iter().map(ExtensionListing::from).collect())
    }

    /// Dry run: how `profile` would pick its backend now.
    pub async fn route_explain(
        &self,
        profile: &str,
        ttl_secs: Option<u32>,
    ) -> Result<crate::router::RouteDecision, ServiceError> {
        Self::check_ttl(ttl_secs)?;
        let profile = Profile::find(profile, &self.config.paths.profiles_dir)?;
        let set = self.extensions().await?;
        let health = RouteHealth::new(self.state.clone());
        let spec = profile.spec("route-explain", ttl_secs);
        Router::new(&set, &health)
            .decide(&profile, &spec, now_ms())
            .await
            .map_err(|error| ServiceError::Internal(error.to_string()))
    }

    // ---- tenants ----

    pub async fn create_tenant(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<TenantCreated, ServiceError> {
        caller.require_operator("creating a tenant")?;
        let (row, key) = tenants::create(&self.state, name, now_ms())
            .await
            .map_err(tenant_error)?;
        Ok(TenantCreated {
            name: row.name,
            api_key: key,
            created_at: crate::ledger::rfc3339_millis(row.created_at_ms),
        })
    }

    pub fn list_tenants(&self, caller: &Caller) -> Result<Vec<TenantView>, ServiceError> {
        caller.require_operator("listing tenants")?;
        Ok(tenants::list(&self.state)
            .map_err(tenant_error)?
            .iter()
            .map(tenant_view)
            .collect())
    }

    pub async fn revoke_tenant(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<TenantView, ServiceError> {
        caller.require_operator("revoking a tenant")?;
        let row = tenants::revoke(&self.state, name, now_ms())
            .await
            .map_err(tenant_error)?;
        Ok(tenant_view(&row))
    }

    /// Who holds `key`, if it is a live key.
    pub fn authenticate(&self, key: &str) -> Result<Option<Caller>, ServiceError> {
        Ok(tenants::owner(&self.state, key)
            .map_err(tenant_error)?
            .map(|owner| match owner {
                tenants::KeyOwner::Operator => Caller::Operator,
                tenants::KeyOwner::Tenant(name) => Caller::Tenant(name),
            }))
    }
}

fn tenant_view(row: &tenants::TenantRow) -> TenantView {
    TenantView {
        name: row.name.clone(),
        created_at: crate::ledger::rfc3339_millis(row.created_at_ms),
        key_prefix: row.key_prefix.clone(),
        revoked_at: row.revoked_at_ms.map(crate::ledger::rfc3339_millis),
    }
}

fn tenant_error(error: tenants::TenantError) -> ServiceError {
    match error {
        tenants::TenantError::InvalidName(message) => ServiceError::InvalidInput(message),
        tenants::TenantError::Exists(_) => ServiceError::Conflict(error.to_string()),
        tenants::TenantError::Unknown(_) => ServiceError::NotFound(error.to_string()),
        tenants::TenantError::State(error) => error.into(),
        tenants::TenantError::Storage(message) => ServiceError::Internal(message),
    }
}

/// Runs `open` until the home's files are free, waiting (bounded by
/// SANDBOXER_LOCK_WAIT_SECS) while another process has them.
async fn wait_for_home<T>(
    config: &ServiceConfig,
    mut open: impl FnMut() -> Result<T, ServiceError>,
) -> Result<T, ServiceError> {
    let started = Instant::now();
    let mut announced = false;
    loop {
        match open() {
            Err(ServiceError::Busy(message)) => {
                if started.elapsed() >= config.lock_wait {
                    return Err(ServiceError::Busy(format!(
                        "gave up after waiting {} s: {message} (set SANDBOXER_LOCK_WAIT_SECS to wait longer)",
                        started.elapsed().as_secs()
                    )));
                }
                if !announced {
                    announced = true;
                    if let Some(notice) = &config.on_wait {
                        notice(&format!(
                            "waiting for another sandboxer-host process to finish ({message})"
                        ));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}
