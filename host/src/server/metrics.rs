//! `/metrics` in the Prometheus text format: requests and latencies by route
//! and status as they happen; sandboxes by state, holds and charges,
//! extension calls by instance, breaker states and reload failures read
//! fresh at each scrape from what the host already keeps.

use crate::router::health::{BreakerState, RouteHealth};
use crate::service::Service;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Mutex;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    /// The route's pattern (`/sandboxes/{sandboxID}`), not the path: ids
    /// would make a series per sandbox.
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub instance: String,
    pub function: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    pub instance: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<RouteLabels, Histogram>,
    sandboxes: Family<StateLabels, Gauge>,
    holds_open: Gauge,
    held: Gauge,
    charged: Gauge,
    calls: Family<CallLabels, Gauge>,
    breaker_open: Family<InstanceLabels, Gauge>,
    pub reload_failures: Counter,
    /// One scrape at a time refills the read-at-scrape families.
    scrape: Mutex<()>,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sandboxer");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route and status",
            requests.clone(),
        );
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer, by method and route",
            latency.clone(),
        );
        let sandboxes = Family::<StateLabels, Gauge>::default();
        registry.register("sandboxes", "Sandbox records by state", sandboxes.clone());
        let holds_open = Gauge::default();
        registry.register("holds_open", "Open credit holds", holds_open.clone());
        let held = Gauge::default();
        registry.register(
            "held_micro_credits",
            "Micro-credits held by open holds",
            held.clone(),
        );
        let charged = Gauge::default();
        registry.register(
            "charged_micro_credits",
            "Micro-credits charged to tenants since the ledger began",
            charged.clone(),
        );
        let calls = Family::<CallLabels, Gauge>::default();
        registry.register(
            "extension_calls",
            "Extension calls since this server started, by instance, function and outcome (ok, backend-error, timeout, trap, out-of-fuel, memory-limit, too-much-data, host-error)",
            calls.clone(),
        );
        let breaker_open = Family::<InstanceLabels, Gauge>::default();
        registry.register(
            "breaker_open",
            "1 while an instance's circuit breaker is open (cooling down), else 0",
            breaker_open.clone(),
        );
        let reload_failures = Counter::default();
        registry.register(
            "extension_reload_failures",
            "Changed extension files that failed to load (the previous version kept serving)",
            reload_failures.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            sandboxes,
            holds_open,
            held,
            charged,
            calls,
            breaker_open,
            reload_failures,
            scrape: Mutex::new(()),
        }
    }
}

impl Metrics {
    /// The text exposition, with the read-at-scrape figures refreshed.
    pub fn render(&self, service: &Service) -> String {
        let _scrape = self
            .scrape
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.refresh(service);
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!("cannot encode metrics: {error}");
        }
        text
    }

    fn refresh(&self, service: &Service) {
        let manager = service.manager();
        self.sandboxes.clear();
        for state in [
            "requested",
            "provisioning",
            "ready",
            "destroying",
            "destroyed",
            "failed",
            "expired",
        ] {
            self.sandboxes
                .get_or_create(&StateLabels {
                    state: state.into(),
                })
                .set(0);
        }
        if let Ok(records) = manager.list(true) {
            for record in records {
                self.sandboxes
                    .get_or_create(&StateLabels {
                        state: record.state.name().into(),
                    })
                    .inc();
            }
        }
        // `render` runs on a blocking thread of the server's runtime.
        let runtime = tokio::runtime::Handle::current();
        let ledger = manager.ledger();
        if let Ok(holds) = runtime.block_on(ledger.open_holds()) {
            self.holds_open.set(holds.len() as i64);
            let held: u64 = holds.iter().map(|hold| hold.amount).sum();
            self.held.set(i64::try_from(held).unwrap_or(i64::MAX));
        }
        // Every charge credits an extension's revenue account.
        if let Ok(charged) = runtime.block_on(ledger.revenue_total()) {
            self.charged.set(i64::try_from(charged).unwrap_or(i64::MAX));
        }
        self.calls.clear();
        let extensions = service.catalog().snapshot();
        let mut instances = Vec::new();
        for extension in extensions
            .loaded()
            .cloned()
            .chain(service.catalog().retired())
        {
            for (function, outcome, count) in extension.call_stats() {
                self.calls
                    .get_or_create(&CallLabels {
                        instance: extension.name.clone(),
                        function: function.into(),
                        outcome: outcome.into(),
                    })
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
            instances.push(extension.name.clone());
        }
        self.breaker_open.clear();
        let health = RouteHealth::new(service.state().clone());
        if let Ok(states) = health.read(&instances) {
            let now = crate::manager::now_ms();
            for (instance, (breaker, _)) in instances.iter().zip(states) {
                let open = matches!(breaker.state(now), BreakerState::Open { .. });
                self.breaker_open
                    .get_or_create(&InstanceLabels {
                        instance: instance.clone(),
                    })
                    .set(i64::from(open));
            }
        }
    }
}
