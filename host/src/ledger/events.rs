//! Meter events: CloudEvents 1.0 JSON records written to the outbox in the
//! same transaction as the money movement they describe.
//!
//! An event's `id` is `<ledger id>-<journal seq>`: stable across redelivery,
//! unique across ledgers, so a sink can deduplicate on it.

use super::types::JournalEntry;
use sandboxer_credits::format_credits;
use serde::{Deserialize, Serialize};
use std::time::{Duration, UNIX_EPOCH};

pub const EVENT_SOURCE: &str = "sandboxer-host/ledger";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeterEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub time: String,
    pub subject: String,
    pub datacontenttype: String,
    pub data: serde_json::Value,
}

/// RFC 3339 UTC time with milliseconds, such as `2026-11-29T03:22:30.123Z`.
pub fn rfc3339_millis(time_ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(time_ms)).to_string()
}

pub fn event_id(ledger_id: &str, seq: u64) -> String {
    format!("{ledger_id}-{seq}")
}

/// The event of one journal entry. Its subject is the sandbox when there is
/// one, else the tenant.
pub fn journal_event(ledger_id: &str, entry: &JournalEntry, extension: Option<&str>) -> MeterEvent {
    let subject = entry
        .sandbox_id
        .as_ref()
        .map(|sandbox_id| format!("sandbox/{sandbox_id}"))
        .unwrap_or_else(|| format!("tenant/{}", entry.tenant));
    let mut data = serde_json::json!({
        "seq": entry.seq,
        "kind": entry.kind.name(),
        "tenant": entry.tenant,
        "amount": format_credits(entry.amount),
        "amount_micros": entry.amount,
        "debit": entry.debit,
        "credit": entry.credit,
        "key": entry.key,
    });
    let object = data.as_object_mut().expect("a JSON object");
    if let Some(sandbox_id) = &entry.sandbox_id {
        object.insert("sandbox_id".into(), sandbox_id.clone().into());
    }
    if let Some(extension) = extension {
        object.insert("extension".into(), extension.into());
    }
    if entry.overrun > 0 {
        object.insert("overrun".into(), format_credits(entry.overrun).into());
        object.insert("overrun_micros".into(), entry.overrun.into());
    }
    if let Some(reason) = &entry.reason {
        object.insert("reason".into(), reason.clone().into());
    }
    MeterEvent {
        specversion: "1.0".into(),
        id: event_id(ledger_id, entry.seq),
        source: EVENT_SOURCE.into(),
        event_type: entry.kind.event_type().into(),
        time: rfc3339_millis(entry.time_ms),
        subject,
        datacontenttype: "application/json".into(),
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::types::EntryKind;

    #[test]
    fn events_are_cloudevents_with_stable_ids() {
        let entry = JournalEntry {
            seq: 7,
            time_ms: 1_796_008_950_123,
            kind: EntryKind::Hold,
            debit: "tenant:acme".into(),
            credit: "system:holds".into(),
            amount: 1_500_000,
            key: "hold/sbx-1".into(),
            tenant: "acme".into(),
            sandbox_id: Some("sbx-1".into()),
            overrun: 0,
            reason: None,
        };
        let event = journal_event("L1", &entry, Some("saas-stub"));
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["id"], "L1-7");
        assert_eq!(json["type"], "sandboxer.credits.held");
        assert_eq!(json["subject"], "sandbox/sbx-1");
        assert_eq!(json["time"], "2026-11-30T03:22:30.123Z");
        assert_eq!(json["data"]["amount"], "1.500000");
        assert_eq!(json["data"]["extension"], "saas-stub");
        assert!(json["data"].get("overrun").is_none());
    }
}
