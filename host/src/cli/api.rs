//! Which way a command reaches the host: the home opened here, or the
//! server that owns it. Both answer with the same types; this only forwards.

use sandboxer_host::manager::Retries;
use sandboxer_host::service::api::*;
use sandboxer_host::service::client::Client;
use sandboxer_host::service::{Caller, Service, ServiceConfig, ServiceError};

pub enum Api {
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
            return Ok(Self::Remote(client));
        }
        let service = Service::open(config).await?;
        match service.reconcile(Retries::Skip).await {
            Ok(report) => {
                for action in &report.actions {
                    note(&format!("reconciled {action}"));
                }
            }
            Err(error) => note(&format!("warning: reconcile failed: {error}")),
        }
        Ok(Self::Local(Box::new(service)))
    }

    /// Delivers waiting events and releases the home (local only).
    pub async fn close(self) {
        if let Self::Local(service) = self
            && let Some(warning) = (*service).close().await
        {
            note(&format!("warning: {warning}"));
        }
    }

    pub async fn create_sandbox(
        &self,
        request: CreateSandbox,
    ) -> Result<SandboxView, ServiceError> {
        match self {
            Self::Local(service) => service.create_sandbox(&Caller::Operator, request).await,
            Self::Remote(client) => client.create_sandbox(&request).await,
        }
    }

    pub async fn sandbox(&self, id: &str) -> Result<SandboxView, ServiceError> {
        match self {
            Self::Local(service) => service.show_sandbox(&Caller::Operator, id),
            Self::Remote(client) => client.sandbox(id).await,
        }
    }

    pub async fn list_sandboxes(
        &self,
        query: &SandboxQuery,
    ) -> Result<Vec<SandboxView>, ServiceError> {
        match self {
            Self::Local(service) => Ok(service
                .list_sandboxes(&Caller::Operator, query)?
                .iter()
                .map(SandboxView::from)
                .collect()),
            Self::Remote(client) => client.list_sandboxes(query).await,
        }
    }

    pub async fn destroy_sandbox(
        &self,
        id: &str,
        force: bool,
    ) -> Result<SandboxView, ServiceError> {
        match self {
            Self::Local(service) => service.destroy_sandbox(&Caller::Operator, id, force).await,
            Self::Remote(client) => client.destroy_sandbox(id, force).await,
        }
    }

    pub async fn credits(&self, tenant: &str) -> Result<CreditsView, ServiceError> {
        match self {
            Self::Local(service) => service.credits(&Caller::Operator, Some(tenant)).await,
            Self::Remote(client) => client.credits(tenant).await,
        }
    }

    pub async fn add_credits(
        &self,
        tenant: &str,
        request: &AddCredits,
    ) -> Result<GrantView, ServiceError> {
        match self {
            Self::Local(service) => {
                service
                    .add_credits(&Caller::Operator, Some(tenant), request)
                    .await
            }
            Self::Remote(client) => client.add_credits(tenant, request).await,
        }
    }

    pub async fn history(
        &self,
        tenant: &str,
        limit: usize,
    ) -> Result<Vec<EntryView>, ServiceError> {
        match self {
            Self::Local(service) => service.history(&Caller::Operator, Some(tenant), limit),
            Self::Remote(client) => client.history(tenant, limit).await,
        }
    }

    pub async fn verify(&self) -> Result<VerifyView, ServiceError> {
        match self {
            Self::Local(service) => service.verify(&Caller::Operator),
            Self::Remote(client) => client.verify().await,
        }
    }

    pub async fn route_explain(
        &self,
        profile: &str,
        ttl_secs: Option<u32>,
    ) -> Result<RouteExplainView, ServiceError> {
        match self {
            Self::Local(service) => service
                .route_explain(profile, ttl_secs)
                .await
                .map(|decision| RouteExplainView::from(&decision)),
            Self::Remote(client) => client.route_explain(profile, ttl_secs).await,
        }
    }

    pub async fn create_tenant(&self, name: &str) -> Result<TenantCreated, ServiceError> {
        match self {
            Self::Local(service) => service.create_tenant(&Caller::Operator, name).await,
            Self::Remote(client) => client.create_tenant(name).await,
        }
    }

    pub async fn list_tenants(&self) -> Result<Vec<TenantView>, ServiceError> {
        match self {
            Self::Local(service) => service.list_tenants(&Caller::Operator),
            Self::Remote(client) => client.list_tenants().await,
        }
    }

    pub async fn revoke_tenant(&self, name: &str) -> Result<TenantView, ServiceError> {
        match self {
            Self::Local(service) => service.revoke_tenant(&Caller::Operator, name).await,
            Self::Remote(client) => client.revoke_tenant(name).await,
        }
    }
}
