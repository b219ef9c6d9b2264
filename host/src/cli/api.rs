//! Which way a command reaches the host: the home opened here, or the
//! server that owns it. Both answer with the same types; this only forwards.
//!
//! A command that only reads (`sandbox show`, `credits show`, `ledger
//! verify`, ...) must not give a fresh home a ledger and a state store:
//! [`Api::connect_read_only`] answers such a home as the empty home it is.

use sandboxer_host::manager::Retries;
use sandboxer_host::service::api::*;
use sandboxer_host::service::client::Client;
use sandboxer_host::service::{Caller, Service, ServiceConfig, ServiceError};

pub struct Api {
    way: Way,
    /// The scratch home a read-only command on a fresh home was answered
    /// from; removed when the command ends.
    _scratch_home: Option<tempfile::TempDir>,
}

enum Way {
    Local(Box<Service>),
    Remote(Client),
}

/// What a command prints on stderr besides its answer.
pub fn note(line: &str) {
    eprintln!("{line}");
}

impl Api {
    /// The server owning the home when one runs (or `server`), else the
    /// home opened here and reconciled.
    pub async fn connect(
        config: ServiceConfig,
        server: Option<&str>,
    ) -> Result<Self, ServiceError> {
        if let Some(client) = Client::discover(&config.paths, server).await? {
            return Ok(Self::remote(client));
        }
        Self::open_local(config, None).await
    }

    /// Like [`Api::connect`], for a command that only reads. A home with
    /// neither a ledger, a state store nor sandboxes yet is not given them: the same
    /// service opened on an empty scratch directory (with this home's
    /// extensions and profiles directories) answers, so the answers are
    /// exactly an empty home's ("no sandbox ...", "no tenant ...", an empty
    /// list), and the scratch directory is removed after the command.
    pub async fn connect_read_only(
        mut config: ServiceConfig,
        server: Option<&str>,
    ) -> Result<Self, ServiceError> {
        if let Some(client) = Client::discover(&config.paths, server).await? {
            return Ok(Self::remote(client));
        }
        let paths = &config.paths;
        // Sandbox directories without a ledger (a crash right after a first
        // spawn) are a home with work to reconcile, not an empty one.
        if paths.ledger_file().exists()
            || paths.state_file().exists()
            || paths.sandboxes_dir().exists()
        {
            return Self::open_local(config, None).await;
        }
        let scratch = tempfile::Builder::new()
            .prefix("sandboxer-empty-home-")
            .tempdir()
            .map_err(|error| {
                ServiceError::Internal(format!("cannot make a scratch directory: {error}"))
            })?;
        config.paths.home = scratch.path().to_path_buf();
        Self::open_local(config, Some(scratch)).await
    }

    fn remote(client: Client) -> Self {
        Self {
            way: Way::Remote(client),
            _scratch_home: None,
        }
    }

    async fn open_local(
        config: ServiceConfig,
        scratch_home: Option<tempfile::TempDir>,
    ) -> Result<Self, ServiceError> {
        let service = Service::open(config).await?;
        match service.reconcile(Retries::Skip).await {
            Ok(report) => {
                for action in &report.actions {
                    note(&format!("reconciled {action}"));
                }
            }
            Err(error) => note(&format!("warning: reconcile failed: {error}")),
        }
        Ok(Self {
            way: Way::Local(Box::new(service)),
            _scratch_home: scratch_home,
        })
    }

    /// Delivers waiting events and releases the home (local only).
    pub async fn close(self) {
        if let Way::Local(service) = self.way
            && let Some(warning) = (*service).close().await
        {
            note(&format!("warning: {warning}"));
        }
    }

    pub async fn create_sandbox(
        &self,
        request: CreateSandbox,
    ) -> Result<SandboxView, ServiceError> {
        match &self.way {
            Way::Local(service) => service.create_sandbox(&Caller::Operator, request).await,
            Way::Remote(client) => client.create_sandbox(&request).await,
        }
    }

    pub async fn sandbox(&self, id: &str) -> Result<SandboxView, ServiceError> {
        match &self.way {
            Way::Local(service) => service.show_sandbox(&Caller::Operator, id),
            Way::Remote(client) => client.sandbox(id).await,
        }
    }

    pub async fn list_sandboxes(
        &self,
        query: &SandboxQuery,
    ) -> Result<Vec<SandboxView>, ServiceError> {
        match &self.way {
            Way::Local(service) => Ok(service
                .list_sandboxes(&Caller::Operator, query)?
                .iter()
                .map(SandboxView::from)
                .collect()),
            Way::Remote(client) => client.list_sandboxes(query).await,
        }
    }

    pub async fn destroy_sandbox(
        &self,
        id: &str,
        force: bool,
    ) -> Result<SandboxView, ServiceError> {
        match &self.way {
            Way::Local(service) => service.destroy_sandbox(&Caller::Operator, id, force).await,
            Way::Remote(client) => client.destroy_sandbox(id, force).await,
        }
    }

    pub async fn credits(&self, tenant: &str) -> Result<CreditsView, ServiceError> {
        match &self.way {
            Way::Local(service) => service.credits(&Caller::Operator, Some(tenant)).await,
            Way::Remote(client) => client.credits(tenant).await,
        }
    }

    pub async fn add_credits(
        &self,
        tenant: &str,
        request: &AddCredits,
    ) -> Result<GrantView, ServiceError> {
        match &self.way {
            Way::Local(service) => {
                service
                    .add_credits(&Caller::Operator, Some(tenant), request)
                    .await
            }
            Way::Remote(client) => client.add_credits(tenant, request).await,
        }
    }

    pub async fn history(
        &self,
        tenant: &str,
        limit: usize,
    ) -> Result<Vec<EntryView>, ServiceError> {
        match &self.way {
            Way::Local(service) => {
                service
                    .history(&Caller::Operator, Some(tenant), limit)
                    .await
            }
            Way::Remote(client) => client.history(tenant, limit).await,
        }
    }

    pub async fn verify(&self) -> Result<VerifyView, ServiceError> {
        match &self.way {
            Way::Local(service) => service.verify(&Caller::Operator).await,
            Way::Remote(client) => client.verify().await,
        }
    }

    pub async fn route_explain(
        &self,
        profile: &str,
        ttl_secs: Option<u32>,
    ) -> Result<RouteExplainView, ServiceError> {
        match &self.way {
            Way::Local(service) => service
                .route_explain(profile, ttl_secs)
                .await
                .map(|decision| RouteExplainView::from(&decision)),
            Way::Remote(client) => client.route_explain(profile, ttl_secs).await,
        }
    }

    pub async fn create_tenant(&self, name: &str) -> Result<TenantCreated, ServiceError> {
        match &self.way {
            Way::Local(service) => service.create_tenant(&Caller::Operator, name).await,
            Way::Remote(client) => client.create_tenant(name).await,
        }
    }

    pub async fn list_tenants(&self) -> Result<Vec<TenantView>, ServiceError> {
        match &self.way {
            Way::Local(service) => service.list_tenants(&Caller::Operator),
            Way::Remote(client) => client.list_tenants().await,
        }
    }

    pub async fn revoke_tenant(&self, name: &str) -> Result<TenantView, ServiceError> {
        match &self.way {
            Way::Local(service) => service.revoke_tenant(&Caller::Operator, name).await,
            Way::Remote(client) => client.revoke_tenant(name).await,
        }
    }
}
