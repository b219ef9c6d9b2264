//! A sandbox's record (`SandboxStatus`) and where it is kept: the host's
//! state store, written before every step of the lifecycle is acted on.

use super::lifecycle_events::PendingEvent;
use crate::runtime::{PendingKv, SandboxHandle, SandboxSpec, Usage};
use crate::state_db::{LoggedWrite, StateDb};
use crate::state_pg::{SharedWriteError, StateWrite};
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// sandbox id -> SandboxStatus (JSON)
const SANDBOXES: TableDefinition<&str, &str> = TableDefinition::new("sandboxes");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SandboxState {
    /// Recorded; no backend chosen yet.
    Requested,
    /// A backend was chosen, credits held, create under way.
    Provisioning,
    /// Created; running until destroyed or its ttl passes.
    Ready,
    /// Destroy under way (or failed and waiting to be retried).
    Destroying,
    /// Destroyed and settled: the end.
    Destroyed,
    /// Never became ready; nothing is held.
    Failed,
    /// Its ttl passed; destroy follows.
    Expired,
}

impl SandboxState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Provisioning => "provisioning",
            Self::Ready => "ready",
            Self::Destroying => "destroying",
            Self::Destroyed => "destroyed",
            Self::Failed => "failed",
            Self::Expired => "expired",
        }
    }

    /// Whether the sandbox may still hold credits or exist on a backend.
    pub fn is_live(self) -> bool {
        !matches!(self, Self::Destroyed | Self::Failed)
    }
}

/// One try of one backend during create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub extension: String,
    /// The ledger's id for this attempt's hold: `<sandbox id>.<n>`.
    pub hold_id: String,
    pub estimate: u64,
    /// The estimate's price per hour of the requested size.
    #[serde(default)]
    pub rate_per_hour: Option<u64>,
    pub started_at_ms: u64,
    /// `ready`, or why it failed.
    pub outcome: Option<String>,
}

/// Money and usage of one sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meter {
    /// What the chosen backend estimated for the whole ttl.
    pub estimate: Option<u64>,
    /// The estimate's price per hour: what the host bills its own wall-time
    /// measurement at when the backend cannot report.
    #[serde(default)]
    pub rate_per_hour: Option<u64>,
    /// What was held from the tenant (the estimate).
    pub hold: Option<u64>,
    /// The ledger id of the hold that is (or was) open.
    pub hold_id: Option<String>,
    /// Wall time between ready and destroy, as the host measured it.
    pub host_wall_ms: Option<u64>,
    /// What the backend reported on destroy.
    pub reported_usage: Option<Usage>,
    /// What was charged (after the charge policy).
    pub actual: Option<u64>,
    /// actual − estimate, in micro-credits.
    pub drift: Option<i128>,
    /// `metered` (the backend's report, priced by meter-actual) or
    /// `host-measured` (the backend could not report; the estimate's rate
    /// over the wall time the host measured).
    #[serde(default)]
    pub basis: Option<String>,
    /// What meter-actual asked, the ceiling the policy set, and what of it
    /// was disputed instead of charged.
    #[serde(default)]
    pub charge: Option<super::charge::ChargeDecision>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxStatus {
    pub id: String,
    pub tenant: String,
    pub profile: String,
    pub state: SandboxState,
    /// The instance serving it (the latest attempt's, during create).
    pub extension: Option<String>,
    pub kind: Option<String>,
    pub handle: Option<SandboxHandle>,
    pub spec: SandboxSpec,
    pub created_at_ms: u64,
    pub ready_at_ms: Option<u64>,
    /// When its ttl ends (ready + ttl).
    pub expires_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub updated_at_ms: u64,
    pub attempts: Vec<Attempt>,
    pub meter: Meter,
    /// Why it failed, was forced, or last could not be destroyed.
    pub note: Option<String>,
    /// Destroy attempts that failed in a row; reset by none (the sandbox is
    /// destroyed once one succeeds).
    #[serde(default)]
    pub destroy_failures: u32,
    /// When a failed destroy is due to be tried again (backoff).
    #[serde(default)]
    pub retry_at_ms: Option<u64>,
    /// The creator's labels (E2B's metadata), kept and returned as given.
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    State(#[from] crate::state_db::StateDbError),
    #[error("sandbox records: {0}")]
    Storage(String),
    /// On a shared store: another host owns the sandbox now.
    #[error("{0}")]
    Fenced(String),
}

pub(crate) fn storage(error: impl std::fmt::Display) -> RecordError {
    RecordError::Storage(error.to_string())
}

impl From<SharedWriteError> for RecordError {
    fn from(error: SharedWriteError) -> Self {
        match error {
            SharedWriteError::Fenced { .. } | SharedWriteError::Owned { .. } => {
                Self::Fenced(error.to_string())
            }
            SharedWriteError::Store(message) => Self::Storage(message),
        }
    }
}

/// A host-local write that goes with a record's (routing health, a
/// dispute's tally).
pub type LocalWrite = Box<dyn FnOnce(&WriteTransaction) -> Result<(), String> + Send>;

/// What a record write carries besides the record. On redb all of it
/// commits in one transaction, and all but `local` (what routing learns,
/// which a crash may lose) is in the state's redo log with the record. On a
/// shared store the record, its events and the key-value writes commit in
/// one transaction there, and the host-local part after it, in
/// `state.redb` (what routing learns and the dispute tally, which a crash
/// may lose).
#[derive(Default)]
pub struct RecordExtras {
    pub events: Vec<PendingEvent>,
    pub kv: Option<PendingKv>,
    pub local: Option<LocalWrite>,
    /// The instance and micro-credits a charge policy cut, for its tally
    /// (`ext info`).
    pub disputed: Option<(String, u64)>,
}

/// Writes a record's JSON into a transaction (the state store applies its
/// logged writes with it).
pub(crate) fn put_json(write: &WriteTransaction, id: &str, json: &str) -> Result<(), String> {
    write
        .open_table(SANDBOXES)
        .map_err(|error| error.to_string())?
        .insert(id, json)
        .map_err(|error| error.to_string())?;
    Ok(())
}

/// Reads and writes sandbox records.
#[derive(Debug, Clone)]
pub struct RecordStore {
    state: Arc<StateDb>,
}

impl RecordStore {
    pub fn new(state: Arc<StateDb>) -> Self {
        Self { state }
    }

    pub fn state(&self) -> &Arc<StateDb> {
        &self.state
    }

    /// Writes `record` with its extras, durably unless `durable` is false
    /// (a state whose loss in a crash leaves nothing to reconcile).
    pub async fn put_async(
        &self,
        record: &SandboxStatus,
        extras: RecordExtras,
        durable: bool,
    ) -> Result<(), RecordError> {
        let RecordExtras {
            events,
            kv,
            mut local,
            disputed,
        } = extras;
        if let Some(shared) = self.state.shared() {
            if let Some((instance, amount)) = disputed {
                let earlier = local.take();
                local = Some(Box::new(move |write| {
                    if let Some(earlier) = earlier {
                        earlier(write)?;
                    }
                    super::disputes::add(write, &instance, amount)
                        .map_err(|error| error.to_string())
                }));
            }
            shared
                .write_async(StateWrite {
                    record: Some(record.clone()),
                    events,
                    kv: kv.and_then(PendingKv::into_writes),
                })
                .await?;
            if let Some(local) = local {
                self.state.write_eventually_async(local).await?;
            }
            return Ok(());
        }
        let logged = LoggedWrite {
            record: Some((
                record.id.clone(),
                serde_json::to_string(record).map_err(storage)?,
            )),
            events,
            kv: kv.and_then(PendingKv::into_writes),
            disputed,
        };
        self.state
            .write_logged_async(logged, local, durable)
            .await?;
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<Option<SandboxStatus>, RecordError> {
        if let Some(shared) = self.state.shared() {
            return shared.record(id).map_err(RecordError::Storage);
        }
        let database = self.state.database()?;
        let read = database.begin_read().map_err(storage)?;
        let table = match read.open_table(SANDBOXES) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(error) => return Err(storage(error)),
        };
        table
            .get(id)
            .map_err(storage)?
            .map(|json| serde_json::from_str(json.value()).map_err(storage))
            .transpose()
    }

    /// Every record, oldest first.
    pub fn all(&self) -> Result<Vec<SandboxStatus>, RecordError> {
        if let Some(shared) = self.state.shared() {
            return shared.records(false).map_err(RecordError::Storage);
        }
        let database = self.state.database()?;
        let read = database.begin_read().map_err(storage)?;
        let table = match read.open_table(SANDBOXES) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(error) => return Err(storage(error)),
        };
        let mut records = Vec::new();
        for row in table.iter().map_err(storage)? {
            let (_, json) = row.map_err(storage)?;
            records.push(serde_json::from_str::<SandboxStatus>(json.value()).map_err(storage)?);
        }
        records.sort_by_key(|record| (record.created_at_ms, record.id.clone()));
        Ok(records)
    }

    /// Live records, oldest first.
    pub fn live(&self) -> Result<Vec<SandboxStatus>, RecordError> {
        if let Some(shared) = self.state.shared() {
            return shared.records(true).map_err(RecordError::Storage);
        }
        let mut records = self.all()?;
        records.retain(|record| record.state.is_live());
        Ok(records)
    }

    /// The live records this host acts on in reconcile and the ttl sweep:
    /// every live one on redb; on a shared store, those it owns.
    pub fn owned_live(&self) -> Result<Vec<SandboxStatus>, RecordError> {
        match self.state.shared() {
            Some(shared) => shared.owned_live().map_err(RecordError::Storage),
            None => self.live(),
        }
    }

    /// Makes this host the owner of `id` before it acts on it (a no-op on
    /// redb); see [`crate::state_pg::PgState::claim`].
    pub async fn claim(&self, id: &str) -> Result<(), RecordError> {
        match self.state.shared() {
            Some(shared) => Ok(shared.claim(id).await?),
            None => Ok(()),
        }
    }
}
