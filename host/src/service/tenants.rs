//! Tenants and their API keys, and the operator's keys, in the state store
//! (on a shared store, in its database: a key works at every host).
//!
//! A key is shown once, when it is made, and stored only as its SHA-256: a
//! copy of the state store does not hand out keys. Tenant keys have the
//! shape older E2B SDKs require (`e2b_` and 40 lowercase hex digits);
//! operator keys start `sbxop_` so the two are never confused. A revoked
//! key stops working at once; the tenant's ledger account and sandboxes
//! stay.

use crate::names::check_name;
use crate::state_db::{StateDb, StateDbError};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// tenant name -> TenantRow (JSON)
const TENANTS: TableDefinition<&str, &str> = TableDefinition::new("tenants");
/// sha256 of a live tenant key -> tenant name
const TENANT_KEYS: TableDefinition<&str, &str> = TableDefinition::new("tenant_keys");
/// sha256 of an operator key -> when it was made (ms)
const OPERATOR_KEYS: TableDefinition<&str, u64> = TableDefinition::new("operator_keys");

pub const TENANT_KEY_PREFIX: &str = "e2b_";
pub const OPERATOR_KEY_PREFIX: &str = "sbxop_";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRow {
    pub name: String,
    pub key_sha256: String,
    /// The key's first characters, to tell keys apart in listings.
    pub key_prefix: String,
    pub created_at_ms: u64,
    pub revoked_at_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("{0}")]
    InvalidName(String),
    #[error("tenant `{0}` already exists; revoke it first to give it a new key")]
    Exists(String),
    #[error("no tenant named `{0}`")]
    Unknown(String),
    #[error(transparent)]
    State(#[from] StateDbError),
    #[error("tenants: {0}")]
    Storage(String),
}

fn storage(error: impl std::fmt::Display) -> TenantError {
    TenantError::Storage(error.to_string())
}

/// The SHA-256 of a key, as stored.
pub fn key_sha256(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random key: `prefix` and 40 lowercase hex digits.
pub fn new_key(prefix: &str) -> String {
    let bytes: [u8; 20] = rand::random();
    format!("{prefix}{}", hex::encode(bytes))
}

/// Who a key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOwner {
    Operator,
    Tenant(String),
}

/// Registers `name` with a new key; returns the row and the key (shown once).
pub async fn create(
    state: &StateDb,
    name: &str,
    now_ms: u64,
) -> Result<(TenantRow, String), TenantError> {
    check_name("tenant", name).map_err(TenantError::InvalidName)?;
    let key = new_key(TENANT_KEY_PREFIX);
    let row = TenantRow {
        name: name.to_string(),
        key_sha256: key_sha256(&key),
        key_prefix: key[..TENANT_KEY_PREFIX.len() + 6].to_string(),
        created_at_ms: now_ms,
        revoked_at_ms: None,
    };
    let json = serde_json::to_string(&row).map_err(storage)?;
    if let Some(shared) = state.shared() {
        return if shared
            .tenant_create(name, json, &row.key_sha256)
            .await
            .map_err(TenantError::Storage)?
        {
            Ok((row, key))
        } else {
            Err(TenantError::Exists(name.to_string()))
        };
    }
    let stored = row.clone();
    let (sender, outcome) = std::sync::mpsc::channel();
    state
        .write_async(move |write| {
            let mut tenants = write.open_table(TENANTS).map_err(|e| e.to_string())?;
            if let Some(existing) = tenants
                .get(stored.name.as_str())
                .map_err(|e| e.to_string())?
            {
                let existing: TenantRow =
                    serde_json::from_str(existing.value()).map_err(|e| e.to_string())?;
                if existing.revoked_at_ms.is_none() {
                    let _ = sender.send(false);
                    return Ok(());
                }
            }
            tenants
                .insert(stored.name.as_str(), json.as_str())
                .map_err(|e| e.to_string())?;
            write
                .open_table(TENANT_KEYS)
                .map_err(|e| e.to_string())?
                .insert(stored.key_sha256.as_str(), stored.name.as_str())
                .map_err(|e| e.to_string())?;
            let _ = sender.send(true);
            Ok(())
        })
        .await?;
    if outcome.recv().unwrap_or(false) {
        Ok((row, key))
    } else {
        Err(TenantError::Exists(name.to_string()))
    }
}

/// Every tenant, by name.
pub fn list(state: &StateDb) -> Result<Vec<TenantRow>, TenantError> {
    if let Some(shared) = state.shared() {
        return shared
            .tenant_rows()
            .map_err(TenantError::Storage)?
            .iter()
            .map(|json| serde_json::from_str(json).map_err(storage))
            .collect();
    }
    let database = state.database()?;
    let read = database.begin_read().map_err(storage)?;
    let table = match read.open_table(TENANTS) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(error) => return Err(storage(error)),
    };
    let mut rows = Vec::new();
    for row in table.iter().map_err(storage)? {
        let (_, json) = row.map_err(storage)?;
        rows.push(serde_json::from_str(json.value()).map_err(storage)?);
    }
    Ok(rows)
}

/// One tenant, if registered.
pub fn get(state: &StateDb, name: &str) -> Result<Option<TenantRow>, TenantError> {
    Ok(list(state)?.into_iter().find(|row| row.name == name))
}

/// Revokes `name`'s key: it stops working now.
pub async fn revoke(state: &StateDb, name: &str, now_ms: u64) -> Result<TenantRow, TenantError> {
    let mut row = get(state, name)?.ok_or_else(|| TenantError::Unknown(name.to_string()))?;
    if row.revoked_at_ms.is_none() {
        row.revoked_at_ms = Some(now_ms);
    }
    let json = serde_json::to_string(&row).map_err(storage)?;
    if let Some(shared) = state.shared() {
        shared
            .tenant_revoke(name, json, &row.key_sha256)
            .await
            .map_err(TenantError::Storage)?;
        return Ok(row);
    }
    let stored = row.clone();
    state
        .write_async(move |write| {
            write
                .open_table(TENANTS)
                .map_err(|e| e.to_string())?
                .insert(stored.name.as_str(), json.as_str())
                .map_err(|e| e.to_string())?;
            write
                .open_table(TENANT_KEYS)
                .map_err(|e| e.to_string())?
                .remove(stored.key_sha256.as_str())
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .await?;
    Ok(row)
}

/// Remembers an operator key (its hash).
pub async fn add_operator_key(state: &StateDb, key: &str, now_ms: u64) -> Result<(), TenantError> {
    let hash = key_sha256(key);
    if let Some(shared) = state.shared() {
        return shared
            .operator_key_add(&hash, now_ms)
            .await
            .map_err(TenantError::Storage);
    }
    state
        .write_async(move |write| {
            write
                .open_table(OPERATOR_KEYS)
                .map_err(|e| e.to_string())?
                .insert(hash.as_str(), now_ms)
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .await?;
    Ok(())
}

/// Whose key this is, if anyone's.
pub fn owner(state: &StateDb, key: &str) -> Result<Option<KeyOwner>, TenantError> {
    let hash = key_sha256(key);
    if let Some(shared) = state.shared() {
        return Ok(shared
            .key_owner(&hash)
            .map_err(TenantError::Storage)?
            .map(|tenant| tenant.map_or(KeyOwner::Operator, KeyOwner::Tenant)));
    }
    let database = state.database()?;
    let read = database.begin_read().map_err(storage)?;
    match read.open_table(OPERATOR_KEYS) {
        Ok(table) => {
            if table.get(hash.as_str()).map_err(storage)?.is_some() {
                return Ok(Some(KeyOwner::Operator));
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(error) => return Err(storage(error)),
    }
    match read.open_table(TENANT_KEYS) {
        Ok(table) => Ok(table
            .get(hash.as_str())
            .map_err(storage)?
            .map(|name| KeyOwner::Tenant(name.value().to_string()))),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(error) => Err(storage(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_shape_e2b_sdks_accept() {
        let key = new_key(TENANT_KEY_PREFIX);
        assert_eq!(key.len(), 44);
        assert!(key.starts_with("e2b_"));
        assert!(
            key[4..]
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        );
        assert_ne!(key, new_key(TENANT_KEY_PREFIX));
    }

    #[tokio::test]
    async fn a_key_names_its_tenant_until_revoked_and_is_stored_only_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDb::new(dir.path().join("state.redb"));
        let (row, key) = create(&state, "acme", 1).await.unwrap();
        assert_eq!(
            owner(&state, &key).unwrap(),
            Some(KeyOwner::Tenant("acme".into()))
        );
        assert!(matches!(
            create(&state, "acme", 2).await,
            Err(TenantError::Exists(_))
        ));
        assert_eq!(owner(&state, "e2b_wrong").unwrap(), None);
        let stored = serde_json::to_string(&list(&state).unwrap()).unwrap();
        assert!(!stored.contains(&key), "the key itself is never stored");
        assert_eq!(row.key_sha256, key_sha256(&key));
        revoke(&state, "acme", 3).await.unwrap();
        assert_eq!(owner(&state, &key).unwrap(), None);
        let (_, again) = create(&state, "acme", 4).await.unwrap();
        assert_ne!(again, key, "a revoked tenant gets a new key");
        add_operator_key(&state, "sbxop_x", 5).await.unwrap();
        assert_eq!(owner(&state, "sbxop_x").unwrap(), Some(KeyOwner::Operator));
    }
}
