//! The service over HTTP: what the command line uses while a server owns
//! the home, so every command still works instead of failing on the lock.
//!
//! The server writes `<home>/server.json` (its URL and process id) and, when
//! no operator key was given to it, an operator key to `<home>/operator.key`
//! (mode 0600). A command finds the server from that file, or from
//! `--server URL` / `SANDBOXER_SERVER`, and authenticates with the operator
//! key (`SANDBOXER_OPERATOR_KEY`, else the file). Answers are the same
//! [`super::api`] types; errors come back as [`ServiceError`]s of the kind the
//! server's status says, so a command exits the same way either path.

use super::ServiceError;
use super::api::*;
use super::run::RunHost;
use crate::paths::HostPaths;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `<home>/server.json`: where the server owning a home listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerFile {
    pub url: String,
    pub pid: u32,
    pub started_at: String,
}

pub fn server_file(paths: &HostPaths) -> PathBuf {
    paths.home.join("server.json")
}

pub fn operator_key_file(paths: &HostPaths) -> PathBuf {
    paths.home.join("operator.key")
}

/// How long a command waits for a server's answer (a create may take as
/// long as a backend's create).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone)]
pub struct Client {
    base: String,
    key: Option<String>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).finish()
    }
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

impl Client {
    pub fn new(base: &str, key: Option<String>) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            key,
            agent: ureq::Agent::config_builder()
                .timeout_global(Some(REQUEST_TIMEOUT))
                .http_status_as_error(false)
                .build()
                .into(),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The server that owns `paths.home`, when one runs: from `server` (an
    /// explicit URL), else from `<home>/server.json` if its process is alive
    /// and it answers `/healthz`.
    pub async fn discover(
        paths: &HostPaths,
        server: Option<&str>,
    ) -> Result<Option<Self>, ServiceError> {
        let key = operator_key(paths);
        if let Some(url) = server {
            let client = Self::new(url, key);
            client.health().await.map_err(|error| {
                ServiceError::Unavailable(format!("the server at {url} does not answer: {error}"))
            })?;
            return Ok(Some(client));
        }
        let Ok(text) = std::fs::read_to_string(server_file(paths)) else {
            return Ok(None);
        };
        let Ok(file) = serde_json::from_str::<ServerFile>(&text) else {
            return Ok(None);
        };
        if !process_alive(file.pid) {
            return Ok(None);
        }
        let client = Self::new(&file.url, key);
        match client.health().await {
            Ok(()) => Ok(Some(client)),
            Err(_) => Ok(None),
        }
    }

    async fn health(&self) -> Result<(), String> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(2)))
            .http_status_as_error(false)
            .build()
            .into();
        let url = format!("{}/healthz", self.base);
        tokio::task::spawn_blocking(move || match agent.get(&url).call() {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!("it answered {}", response.status())),
            Err(error) => Err(error.to_string()),
        })
        .await
        .map_err(|error| error.to_string())?
    }

    async fn call<T: DeserializeOwned + Send + 'static>(
        &self,
        method: &'static str,
        path: String,
        body: Option<serde_json::Value>,
    ) -> Result<T, ServiceError> {
        let url = format!("{}{path}", self.base);
        let agent = self.agent.clone();
        let key = self.key.clone();
        tokio::task::spawn_blocking(move || {
            let unreachable = |error: ureq::Error| {
                ServiceError::Unavailable(format!("the server at {url} cannot be reached: {error}"))
            };
            let response = match (method, body) {
                ("GET", _) => with_key(agent.get(&url), &key).call(),
                ("DELETE", _) => with_key(agent.delete(&url), &key).call(),
                (_, body) => {
                    let body = body.unwrap_or(serde_json::Value::Null).to_string();
                    with_key(agent.post(&url), &key)
                        .header("content-type", "application/json")
                        .send(body.as_bytes())
                }
            }
            .map_err(unreachable)?;
            let status = response.status().as_u16();
            let text = response
                .into_body()
                .read_to_string()
                .map_err(|error| ServiceError::Internal(format!("reading {url}: {error}")))?;
            if (200..300).contains(&status) {
                serde_json::from_str(&text).map_err(|error| {
                    ServiceError::Internal(format!("{url} answered what is not its type: {error}"))
                })
            } else {
                let message = serde_json::from_str::<ErrorBody>(&text)
                    .map(|body| body.message)
                    .unwrap_or(text);
                Err(ServiceError::from_status(status, message))
            }
        })
        .await
        .map_err(|error| ServiceError::Internal(error.to_string()))?
    }

    pub async fn create_sandbox(
        &self,
        request: &CreateSandbox,
    ) -> Result<SandboxView, ServiceError> {
        self.call("POST", "/api/v1/sandboxes".into(), Some(json(request)))
            .await
    }

    pub async fn sandbox(&self, id: &str) -> Result<SandboxView, ServiceError> {
        self.call("GET", format!("/api/v1/sandboxes/{}", escape(id)), None)
            .await
    }

    pub async fn list_sandboxes(
        &self,
        query: &SandboxQuery,
    ) -> Result<Vec<SandboxView>, ServiceError> {
        let mut params = Vec::new();
        if query.all {
            params.push("all=true".to_string());
        }
        for (name, value) in [
            ("tenant", &query.tenant),
            ("state", &query.state),
            ("extension", &query.extension),
        ] {
            if let Some(value) = value {
                params.push(format!("{name}={}", escape(value)));
            }
        }
        let query = if params.is_empty() {
            String::new()
        } else {
            format!("?{}", params.join("&"))
        };
        self.call("GET", format!("/api/v1/sandboxes{query}"), None)
            .await
    }

    pub async fn destroy_sandbox(
        &self,
        id: &str,
        force: bool,
    ) -> Result<SandboxView, ServiceError> {
        let force = if force { "?force=true" } else { "" };
        self.call(
            "DELETE",
            format!("/api/v1/sandboxes/{}{force}", escape(id)),
            None,
        )
        .await
    }

    pub async fn credits(&self, tenant: &str) -> Result<CreditsView, ServiceError> {
        self.call("GET", format!("/api/v1/credits/{}", escape(tenant)), None)
            .await
    }

    pub async fn add_credits(
        &self,
        tenant: &str,
        request: &AddCredits,
    ) -> Result<GrantView, ServiceError> {
        self.call(
            "POST",
            format!("/api/v1/credits/{}", escape(tenant)),
            Some(json(request)),
        )
        .await
    }

    pub async fn history(
        &self,
        tenant: &str,
        limit: usize,
    ) -> Result<Vec<EntryView>, ServiceError> {
        self.call(
            "GET",
            format!("/api/v1/credits/{}/history?limit={limit}", escape(tenant)),
            None,
        )
        .await
    }

    pub async fn verify(&self) -> Result<VerifyView, ServiceError> {
        self.call("GET", "/api/v1/ledger/verify".into(), None).await
    }

    pub async fn list_extensions(&self) -> Result<Vec<ExtensionListing>, ServiceError> {
        self.call("GET", "/api/v1/extensions".into(), None).await
    }

    pub async fn route_explain(
        &self,
        profile: &str,
        ttl_secs: Option<u32>,
    ) -> Result<RouteExplainView, ServiceError> {
        let ttl = ttl_secs
            .map(|ttl| format!("?ttl={ttl}"))
            .unwrap_or_default();
        self.call(
            "GET",
            format!("/api/v1/route/{}{ttl}", escape(profile)),
            None,
        )
        .await
    }

    pub async fn create_tenant(&self, name: &str) -> Result<TenantCreated, ServiceError> {
        let body = CreateTenant { name: name.into() };
        self.call("POST", "/api/v1/tenants".into(), Some(json(&body)))
            .await
    }

    pub async fn list_tenants(&self) -> Result<Vec<TenantView>, ServiceError> {
        self.call("GET", "/api/v1/tenants".into(), None).await
    }

    pub async fn revoke_tenant(&self, name: &str) -> Result<TenantView, ServiceError> {
        self.call("DELETE", format!("/api/v1/tenants/{}", escape(name)), None)
            .await
    }

    pub async fn reload(&self) -> Result<Vec<ExtensionListing>, ServiceError> {
        self.call("POST", "/api/v1/reload".into(), Some(serde_json::json!({})))
            .await
    }
}

impl RunHost for Client {
    async fn create(&mut self, request: CreateSandbox) -> Result<SandboxView, ServiceError> {
        self.create_sandbox(&request).await
    }

    async fn get(&mut self, id: &str) -> Result<SandboxView, ServiceError> {
        self.sandbox(id).await
    }

    async fn destroy(&mut self, id: &str) -> Result<SandboxView, ServiceError> {
        self.destroy_sandbox(id, false).await
    }

    async fn credits(&mut self, tenant: &str) -> Result<CreditsView, ServiceError> {
        Client::credits(self, tenant).await
    }

    async fn tick(&mut self) -> Vec<String> {
        // The server reaps and delivers on its own.
        Vec::new()
    }
}

fn with_key<B>(request: ureq::RequestBuilder<B>, key: &Option<String>) -> ureq::RequestBuilder<B> {
    match key {
        Some(key) => request.header("x-api-key", key),
        None => request,
    }
}

fn json(value: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// Percent-escapes a path segment or query value.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                escaped.push(byte as char)
            }
            other => escaped.push_str(&format!("%{other:02X}")),
        }
    }
    escaped
}

/// The operator key a command on this home uses: SANDBOXER_OPERATOR_KEY, else
/// `<home>/operator.key`.
pub fn operator_key(paths: &HostPaths) -> Option<String> {
    std::env::var("SANDBOXER_OPERATOR_KEY")
        .ok()
        .filter(|key| !key.trim().is_empty())
        .or_else(|| read_key_file(&operator_key_file(paths)))
}

fn read_key_file(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_string())
        .filter(|key| !key.is_empty())
}
