//! `GET /api/v1/events`: the meter events as they are written, as
//! server-sent events. Both outboxes (the ledger's money events and the
//! lifecycle's) are read from where they stood when the stream opened (or
//! from the start with `?from=start`); each event's SSE id says which outbox
//! and sequence it is, its `event` is its CloudEvents type and its data the
//! CloudEvent. A tenant sees only events about itself.

use super::error::ApiError;
use super::{AppState, Authenticated};
use crate::manager::lifecycle_events;
use crate::service::{Caller, Service, ServiceError};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::Deserialize;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use utoipa::IntoParams;

const POLL_EVERY: Duration = Duration::from_millis(250);
const BATCH: usize = 100;

#[derive(Debug, Deserialize, IntoParams)]
pub struct EventParams {
    /// `start` to replay every event kept; by default only new ones.
    from: Option<String>,
}

struct Cursor {
    service: Arc<Service>,
    stopping: tokio::sync::watch::Receiver<bool>,
    caller: Caller,
    ledger_seq: u64,
    lifecycle_seq: u64,
    queue: VecDeque<Event>,
}

impl Cursor {
    fn sees(&self, json: &str) -> bool {
        match &self.caller {
            Caller::Operator => true,
            Caller::Tenant(own) => serde_json::from_str::<serde_json::Value>(json)
                .ok()
                .and_then(|event| event["data"]["tenant"].as_str().map(|tenant| tenant == own))
                .unwrap_or(false),
        }
    }

    fn push(&mut self, source: &str, seq: u64, json: String) {
        if !self.sees(&json) {
            return;
        }
        let kind = serde_json::from_str::<serde_json::Value>(&json)
            .ok()
            .and_then(|event| event["type"].as_str().map(str::to_string))
            .unwrap_or_else(|| "meter".into());
        self.queue.push_back(
            Event::default()
                .id(format!("{source}-{seq}"))
                .event(kind)
                .data(json),
        );
    }

    async fn fill(&mut self) {
        let ledger = self.service.manager().ledger();
        if let Ok(events) = ledger.outbox_after(self.ledger_seq, BATCH).await {
            for (seq, json) in events {
                self.ledger_seq = seq;
                self.push("ledger", seq, json);
            }
        }
        // Only events a crash cannot take back: those of a write not yet
        // synced are made durable first.
        let upto = self.service.state().durable_events_async().await;
        if let Ok(events) = upto.map_err(|error| error.to_string()).and_then(|upto| {
            lifecycle_events::after(self.service.state(), self.lifecycle_seq, upto, BATCH)
                .map_err(|error| error.to_string())
        }) {
            for (seq, json) in events {
                self.lifecycle_seq = seq;
                self.push("lifecycle", seq, json);
            }
        }
    }
}

#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventParams),
    responses((status = 200, description = "text/event-stream of CloudEvents", content_type = "text/event-stream")),
    security(("api_key" = [])))]
pub async fn stream(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    params: Result<Query<EventParams>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let params = params?.0;
    let from_start = match params.from.as_deref() {
        None => false,
        Some("start") => true,
        Some(other) => {
            return Err(ServiceError::InvalidInput(format!(
                "from={other:?}: the only value is `start`"
            ))
            .into());
        }
    };
    let service = state.service.clone();
    let (ledger_seq, lifecycle_seq) = if from_start {
        (0, 0)
    } else {
        (
            service
                .manager()
                .ledger()
                .outbox_last_seq()
                .await
                .map_err(ServiceError::from)?,
            lifecycle_events::last_seq(service.state())
                .map_err(|error| ServiceError::Internal(error.to_string()))?,
        )
    };
    let cursor = Cursor {
        service,
        stopping: state.stopping.clone(),
        caller,
        ledger_seq,
        lifecycle_seq,
        queue: VecDeque::new(),
    };
    let events = futures_util::stream::unfold(cursor, |mut cursor| async move {
        loop {
            if let Some(event) = cursor.queue.pop_front() {
                return Some((Ok(event), cursor));
            }
            if *cursor.stopping.borrow() {
                return None;
            }
            cursor.fill().await;
            if cursor.queue.is_empty() {
                tokio::time::sleep(POLL_EVERY).await;
            }
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
