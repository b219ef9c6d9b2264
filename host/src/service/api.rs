//! The answers and requests of the host's API: one serde type per answer,
//! the same for `--json` on the command line, the server's native HTTP API
//! and the client that talks to it. Amounts are decimal-credit strings
//! (six places); times are RFC 3339.

use crate::ledger::{JournalEntry, TenantSummary, rfc3339_millis};
use crate::manager::{SandboxStatus, charge::ChargeDecision};
use crate::router::RouteDecision;
use crate::runtime::{ExtensionEntry, SandboxHandle, SandboxSpec, Usage, kind_name};
use sandboxer_credits::{format_credits, format_micros};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Ask for a sandbox made from a profile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreateSandbox {
    /// A profile name in the profiles directory (the command line also
    /// takes a path to a `.toml` file).
    pub profile: String,
    /// The tenant whose credits pay: the caller's own when a tenant calls;
    /// `default` when an operator leaves it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Lifetime in seconds, instead of the profile's ttl.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u32>,
    /// The command to run, instead of the profile's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Kept with the sandbox, returned and filterable (E2B's metadata).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// One try of one backend during create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AttemptView {
    pub extension: String,
    pub hold_id: String,
    pub estimate: String,
    pub outcome: Option<String>,
}

/// What the charge policy decided (docs/payments.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ChargeView {
    pub asked: String,
    pub ceiling: String,
    pub charged: String,
    pub disputed: String,
}

/// Money and usage of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MeterView {
    pub estimate: Option<String>,
    pub hold: Option<String>,
    pub hold_id: Option<String>,
    pub host_wall_ms: Option<u64>,
    #[schema(value_type = Option<Object>)]
    pub reported_usage: Option<Usage>,
    pub actual: Option<String>,
    /// actual − estimate.
    pub drift: Option<String>,
    /// `metered` or `host-measured`.
    pub basis: Option<String>,
    pub charge: Option<ChargeView>,
}

/// A sandbox's record, as every front end shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SandboxView {
    pub id: String,
    /// requested, provisioning, ready, destroying, destroyed, failed, expired.
    pub state: String,
    pub tenant: String,
    pub profile: String,
    pub extension: Option<String>,
    pub kind: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub handle: Option<SandboxHandle>,
    pub created_at: String,
    pub ready_at: Option<String>,
    pub expires_at: Option<String>,
    pub finished_at: Option<String>,
    #[schema(value_type = Object)]
    pub spec: SandboxSpec,
    pub attempts: Vec<AttemptView>,
    pub meter: MeterView,
    pub destroy_failures: u32,
    pub retry_at: Option<String>,
    pub note: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// For a sandbox whose process runs on this machine: how it runs or ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub process: Option<serde_json::Value>,
}

fn credits(amount: Option<u64>) -> Option<String> {
    amount.map(format_credits)
}

fn charge_view(charge: &ChargeDecision) -> ChargeView {
    ChargeView {
        asked: format_credits(charge.asked),
        ceiling: format_credits(charge.ceiling),
        charged: format_credits(charge.charged),
        disputed: format_credits(charge.disputed),
    }
}

impl From<&SandboxStatus> for SandboxView {
    fn from(record: &SandboxStatus) -> Self {
        Self {
            id: record.id.clone(),
            state: record.state.name().into(),
            tenant: record.tenant.clone(),
            profile: record.profile.clone(),
            extension: record.extension.clone(),
            kind: record.kind.clone(),
            handle: record.handle.clone(),
            created_at: rfc3339_millis(record.created_at_ms),
            ready_at: record.ready_at_ms.map(rfc3339_millis),
            expires_at: record.expires_at_ms.map(rfc3339_millis),
            finished_at: record.finished_at_ms.map(rfc3339_millis),
            spec: record.spec.clone(),
            attempts: record
                .attempts
                .iter()
                .map(|attempt| AttemptView {
                    extension: attempt.extension.clone(),
                    hold_id: attempt.hold_id.clone(),
                    estimate: format_credits(attempt.estimate),
                    outcome: attempt.outcome.clone(),
                })
                .collect(),
            meter: MeterView {
                estimate: credits(record.meter.estimate),
                hold: credits(record.meter.hold),
                hold_id: record.meter.hold_id.clone(),
                host_wall_ms: record.meter.host_wall_ms,
                reported_usage: record.meter.reported_usage,
                actual: credits(record.meter.actual),
                drift: record.meter.drift.map(format_micros),
                basis: record.meter.basis.clone(),
                charge: record.meter.charge.as_ref().map(charge_view),
            },
            destroy_failures: record.destroy_failures,
            retry_at: record.retry_at_ms.map(rfc3339_millis),
            note: record.note.clone(),
            metadata: record.metadata.clone(),
            process: None,
        }
    }
}

/// Which sandboxes to list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SandboxQuery {
    /// Every record, not only live ones.
    #[serde(default)]
    pub all: bool,
    /// Only this tenant's (an operator's filter; a tenant sees only its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Only sandboxes in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Only sandboxes on this extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension: Option<String>,
}

/// A tenant's credits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreditsView {
    pub tenant: String,
    pub balance: String,
    pub held: String,
    pub available: String,
}

impl From<&TenantSummary> for CreditsView {
    fn from(summary: &TenantSummary) -> Self {
        Self {
            tenant: summary.tenant.clone(),
            balance: format_micros(summary.balance),
            held: format_credits(summary.held),
            available: format_micros(summary.available),
        }
    }
}

/// Add credits to a tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AddCredits {
    /// Decimal credits, up to six places, above zero (for example "25" or "0.5").
    pub amount: String,
    /// Idempotency key: adding again with the same key adds nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// What adding credits did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GrantView {
    pub tenant: String,
    /// What this call added: zero when its key had already been used.
    pub added: String,
    /// The amount the key stands for.
    pub amount: String,
    pub replayed: bool,
    pub seq: u64,
    pub balance: String,
    pub held: String,
    pub available: String,
}

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EntryView {
    pub seq: u64,
    pub time: String,
    /// grant, hold, release, charge, void, expire.
    pub kind: String,
    pub amount: String,
    pub debit: String,
    pub credit: String,
    pub key: String,
    pub sandbox_id: Option<String>,
    pub overrun: String,
}

impl From<&JournalEntry> for EntryView {
    fn from(entry: &JournalEntry) -> Self {
        Self {
            seq: entry.seq,
            time: rfc3339_millis(entry.time_ms),
            kind: entry.kind.name().into(),
            amount: format_credits(entry.amount),
            debit: entry.debit.clone(),
            credit: entry.credit.clone(),
            key: entry.key.clone(),
            sandbox_id: entry.sandbox_id.clone(),
            overrun: format_credits(entry.overrun),
        }
    }
}

/// One `.wasm` of the extensions directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExtensionListing {
    pub name: String,
    pub id: Option<String>,
    pub version: Option<String>,
    pub kind: Option<String>,
    /// `loaded` or `rejected`.
    pub status: String,
    pub reason: Option<String>,
    pub file: String,
    /// On a server: its file changed but the new version does not load
    /// (this, why); the version listed keeps serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload_error: Option<String>,
}

impl From<&ExtensionEntry> for ExtensionListing {
    fn from(entry: &ExtensionEntry) -> Self {
        let info = entry.extension().map(|extension| &extension.info);
        Self {
            name: entry.name.clone(),
            id: info.map(|info| info.id.clone()),
            version: info.map(|info| info.version.clone()),
            kind: info.map(|info| kind_name(info.kind).to_string()),
            status: if entry.status.is_ok() {
                "loaded"
            } else {
                "rejected"
            }
            .into(),
            reason: entry.status.as_ref().err().cloned(),
            file: entry.file.display().to_string(),
            reload_error: None,
        }
    }
}

/// One routing candidate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CandidateView {
    pub name: String,
    pub kind: Option<String>,
    pub eligible: bool,
    pub reason: Option<String>,
    pub estimate: Option<String>,
    pub latency_ms: Option<u64>,
    pub latency_samples: u64,
    pub breaker: Option<String>,
    pub rank: Option<usize>,
}

/// `route explain`: a profile's candidates ranked, and why any is left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RouteExplainView {
    pub profile: String,
    pub strategy: String,
    pub fallback: bool,
    pub max_cost: Option<String>,
    pub chosen: Option<String>,
    pub candidates: Vec<CandidateView>,
}

impl RouteExplainView {
    /// `name: reason` for every ineligible candidate, as the router's own
    /// errors say it (a view may come over HTTP, without the router).
    pub fn reasons(&self) -> String {
        self.candidates
            .iter()
            .filter(|candidate| !candidate.eligible)
            .map(|candidate| {
                format!(
                    "{}: {}",
                    candidate.name,
                    candidate.reason.as_deref().unwrap_or("ineligible")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl From<&RouteDecision> for RouteExplainView {
    fn from(decision: &RouteDecision) -> Self {
        Self {
            profile: decision.profile.clone(),
            strategy: decision.strategy.name().into(),
            fallback: decision.fallback,
            max_cost: decision.max_cost.map(format_credits),
            chosen: decision.chosen.clone(),
            candidates: decision
                .candidates
                .iter()
                .map(|candidate| CandidateView {
                    name: candidate.name.clone(),
                    kind: candidate.kind.map(str::to_string),
                    eligible: candidate.eligible,
                    reason: candidate.reason.clone(),
                    estimate: candidate.estimate.map(format_credits),
                    latency_ms: candidate.latency_ms,
                    latency_samples: candidate.latency_samples,
                    breaker: candidate.breaker.map(str::to_string),
                    rank: candidate.rank,
                })
                .collect(),
        }
    }
}

/// Register a tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreateTenant {
    pub name: String,
}

/// A tenant as listed: never its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TenantView {
    pub name: String,
    pub created_at: String,
    /// The key's first characters, to tell keys apart.
    pub key_prefix: String,
    pub revoked_at: Option<String>,
}

/// A tenant just created, with its API key: shown this once, stored only
/// as a hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TenantCreated {
    pub name: String,
    pub api_key: String,
    pub created_at: String,
}

/// Extend or shorten a sandbox's life (E2B's `set_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SetTimeout {
    /// The sandbox now ends this many seconds from now.
    pub timeout: u32,
}

/// What a service error looks like on the wire (the same body E2B's SDKs
/// read): the HTTP status as a number, and one line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub code: u16,
    pub message: String,
}

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ViolationView {
    pub check: String,
    pub message: String,
}

/// `ledger verify`: every invariant, from the stored tables alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VerifyView {
    pub ok: bool,
    pub journal_entries: u64,
    pub accounts: usize,
    pub open_holds: usize,
    pub violations: Vec<ViolationView>,
}

impl From<&crate::ledger::VerifyReport> for VerifyView {
    fn from(report: &crate::ledger::VerifyReport) -> Self {
        Self {
            ok: report.ok,
            journal_entries: report.journal_entries,
            accounts: report.accounts,
            open_holds: report.open_holds,
            violations: report
                .violations
                .iter()
                .map(|violation| ViolationView {
                    check: violation.check.into(),
                    message: violation.message.clone(),
                })
                .collect(),
        }
    }
}

/// A tenant's charges summed per time bucket (the console's spend chart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SpendView {
    pub tenant: String,
    /// Width of each bucket in seconds; buckets start at multiples of it
    /// since the Unix epoch.
    pub bucket_secs: u64,
    /// Every charge of the tenant, summed.
    pub total: String,
    /// Oldest first, from the bucket of the first charge to that of the
    /// last, empty buckets included; none when nothing was charged.
    pub buckets: Vec<SpendBucket>,
}

/// The charges of one time bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SpendBucket {
    /// Where the bucket starts (RFC 3339).
    pub start: String,
    /// The sum of the charges in it.
    pub charged: String,
    /// How many charges.
    pub charges: u64,
}

/// A profile of the profiles directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProfileView {
    pub name: String,
    pub description: String,
    /// `explicit`, `prefer-self-hosted`, `lowest-cost` or `lowest-latency`;
    /// none when the file does not parse.
    pub strategy: Option<String>,
    pub candidates: Vec<String>,
    /// Why the file does not parse, when it does not.
    pub error: Option<String>,
}

/// The limits each call of an extension runs under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LimitsView {
    pub timeout_ms: u64,
    pub memory_mb: u64,
    pub fuel: Option<u64>,
    pub reuse_instances: bool,
    pub kv_quota_mb: u64,
}

/// An extension's circuit breaker (docs/routing.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BreakerView {
    /// `closed`, `open` (cooling down) or `half-open`.
    pub state: String,
    pub consecutive_failures: u32,
    /// While open: when it may be tried again.
    pub open_until: Option<String>,
}

/// An extension's measured time to ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LatencyView {
    /// Moving average of create-to-ready; none before the first sample.
    pub average_ms: Option<u64>,
    pub samples: u64,
}

/// One billed sandbox of an extension: what it estimated, what it charged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DriftPoint {
    pub sandbox_id: String,
    pub finished_at: Option<String>,
    pub estimate: String,
    pub actual: String,
    /// actual − estimate.
    pub drift: String,
}

/// Estimate against actual over an extension's billed sandboxes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DriftView {
    /// Billed sandboxes counted.
    pub sandboxes: u64,
    pub estimated: String,
    pub charged: String,
    /// charged − estimated.
    pub drift: String,
    /// What meter-actual asked above the charge policy's ceiling.
    pub disputed: String,
    /// The newest billed sandboxes (at most 100), oldest first.
    pub points: Vec<DriftPoint>,
}

/// One extension in depth: its listing, limits and grants, how routing sees
/// it, and how its bills compared with its estimates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExtensionReportView {
    pub listing: ExtensionListing,
    /// None for a rejected extension.
    pub limits: Option<LimitsView>,
    /// The sidecar's grants (`network`, `process`, ...); none for a rejected
    /// extension.
    #[schema(value_type = Option<Object>)]
    pub grants: Option<serde_json::Value>,
    /// The most it may charge, as a multiple of what the host can justify.
    pub charge_tolerance: Option<String>,
    pub breaker: BreakerView,
    pub latency: LatencyView,
    pub drift: DriftView,
}
