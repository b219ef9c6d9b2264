//! Read-only views across the home that the console draws: every tenant's
//! credits, a tenant's spend per time bucket, the profiles, and one
//! extension in depth (limits, grants, breaker, latency, estimate-vs-actual
//! drift). They only read; nothing here writes money or state.

use super::api::*;
use super::{Caller, Service, ServiceError, tenants};
use crate::ledger::{EntryKind, rfc3339_millis};
use crate::manager::now_ms;
use crate::names::check_name;
use crate::profile::{Profile, available_profiles};
use crate::router::health::{BreakerState, RouteHealth};
use sandboxer_credits::{format_credits, format_micros};

/// Most buckets a spend answer holds: a chart wider than this says nothing
/// more, and a tiny bucket over a long history would be a huge answer.
pub const MAX_SPEND_BUCKETS: u64 = 2_000;
/// Most billed sandboxes an extension report lists one by one.
pub const MAX_DRIFT_POINTS: usize = 100;

fn overflow() -> ServiceError {
    ServiceError::Internal("a sum of credits overflowed".into())
}

impl Service {
    /// Every tenant the home knows (registered, or with an account), with
    /// its credits; sorted by name. Operator only.
    pub async fn all_credits(&self, caller: &Caller) -> Result<Vec<CreditsView>, ServiceError> {
        caller.require_operator("listing every tenant's credits")?;
        let mut names = self.manager.ledger().tenant_names().await?;
        for row in tenants::list(&self.state).map_err(super::tenant_error)? {
            names.push(row.name);
        }
        names.sort();
        names.dedup();
        let mut views = Vec::with_capacity(names.len());
        for name in names {
            let summary = self.manager.ledger().summary(&name).await?;
            views.push(CreditsView::from(&summary));
        }
        Ok(views)
    }

    /// A tenant's charges summed per `bucket_secs` (buckets aligned on the
    /// Unix epoch), from its whole journal.
    pub async fn spend(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        bucket_secs: u64,
    ) -> Result<SpendView, ServiceError> {
        let tenant = caller.tenant_for(tenant)?;
        check_name("tenant", &tenant).map_err(ServiceError::InvalidInput)?;
        if !(1..=31 * 86_400).contains(&bucket_secs) {
            return Err(ServiceError::InvalidInput(format!(
                "bucket_secs must be between 1 and {} (31 days), got {bucket_secs}",
                31 * 86_400
            )));
        }
        if !self.knows_tenant(&tenant).await? {
            return Err(ServiceError::NotFound(format!("no tenant `{tenant}`")));
        }
        let bucket_ms = bucket_secs * 1000;
        // (bucket start ms, charged micros, charges), oldest first.
        let mut sums: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
        let mut total: u64 = 0;
        for entry in self.manager.ledger().history(&tenant, usize::MAX).await? {
            if entry.kind != EntryKind::Charge {
                continue;
            }
            let start = entry.time_ms - entry.time_ms % bucket_ms;
            let sum = sums.entry(start).or_default();
            sum.0 = sum.0.checked_add(entry.amount).ok_or_else(overflow)?;
            sum.1 += 1;
            total = total.checked_add(entry.amount).ok_or_else(overflow)?;
        }
        let mut buckets = Vec::new();
        if let (Some((&first, _)), Some((&last, _))) =
            (sums.first_key_value(), sums.last_key_value())
        {
            let count = (last - first) / bucket_ms + 1;
            if count > MAX_SPEND_BUCKETS {
                return Err(ServiceError::InvalidInput(format!(
                    "{count} buckets of {bucket_secs} s span this history; at most {MAX_SPEND_BUCKETS}: ask for wider buckets"
                )));
            }
            for index in 0..count {
                let start = first + index * bucket_ms;
                let (charged, charges) = sums.get(&start).copied().unwrap_or_default();
                buckets.push(SpendBucket {
                    start: rfc3339_millis(start),
                    charged: format_credits(charged),
                    charges,
                });
            }
        }
        Ok(SpendView {
            tenant,
            bucket_secs,
            total: format_credits(total),
            buckets,
        })
    }

    /// Every profile of the profiles directory, with why one does not
    /// parse.
    pub fn list_profiles(&self) -> Vec<ProfileView> {
        let dir = &self.config.paths.profiles_dir;
        available_profiles(dir)
            .into_iter()
            .map(
                |name| match Profile::load(&dir.join(format!("{name}.toml"))) {
                    Ok(profile) => ProfileView {
                        name,
                        description: profile.description,
                        strategy: Some(profile.route.strategy.name().to_string()),
                        candidates: profile.route.candidates,
                        error: None,
                    },
                    Err(error) => ProfileView {
                        name,
                        description: String::new(),
                        strategy: None,
                        candidates: Vec::new(),
                        error: Some(error.to_string()),
                    },
                },
            )
            .collect()
    }

    /// One extension in depth. Its listing's `reload_error` is the
    /// server's to fill.
    pub async fn extension_report(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<ExtensionReportView, ServiceError> {
        caller.require_operator("an extension's report")?;
        let set = self.extensions().await?;
        let entry = set
            .entry(name)
            .ok_or_else(|| ServiceError::NotFound(format!("no extension `{name}`")))?;
        let extension = entry.extension();
        let now = now_ms();
        let health = RouteHealth::new(self.state.clone())
            .read(&[name.to_string()])
            .map_err(|error| ServiceError::Internal(error.to_string()))?;
        let (breaker, latency) = health.first().copied().unwrap_or_default();
        let breaker = BreakerView {
            state: match breaker.state(now) {
                BreakerState::Closed => "closed",
                BreakerState::Open { .. } => "open",
                BreakerState::HalfOpen => "half-open",
            }
            .into(),
            consecutive_failures: breaker.consecutive_failures,
            open_until: match breaker.state(now) {
                BreakerState::Open { until_ms } => Some(rfc3339_millis(until_ms)),
                _ => None,
            },
        };
        let latency = LatencyView {
            average_ms: (latency.samples > 0).then_some(latency.average_ms),
            samples: latency.samples,
        };
        Ok(ExtensionReportView {
            listing: ExtensionListing::from(entry),
            limits: extension.map(|extension| LimitsView {
                timeout_ms: extension.limits.timeout_ms,
                memory_mb: extension.limits.memory_mb,
                fuel: extension.limits.fuel,
                reuse_instances: extension.limits.reuse_instances,
                kv_quota_mb: extension.limits.kv_quota_mb,
            }),
            grants: extension.and_then(|extension| serde_json::to_value(&extension.grants).ok()),
            charge_tolerance: extension
                .map(|extension| format_credits(extension.billing.charge_tolerance_ppm) + "×"),
            breaker,
            latency,
            drift: self.drift(name)?,
        })
    }

    /// Estimate against charge over the billed sandboxes of `name`.
    fn drift(&self, name: &str) -> Result<DriftView, ServiceError> {
        let mut billed: Vec<_> = self
            .manager
            .list(true)?
            .into_iter()
            .filter(|record| record.extension.as_deref() == Some(name))
            .filter(|record| record.meter.actual.is_some())
            .collect();
        billed.sort_by_key(|record| (record.finished_at_ms, record.created_at_ms));
        let (mut estimated, mut charged, mut disputed) = (0u64, 0u64, 0u64);
        for record in &billed {
            let meter = &record.meter;
            estimated = estimated
                .checked_add(meter.estimate.unwrap_or(0))
                .ok_or_else(overflow)?;
            charged = charged
                .checked_add(meter.actual.unwrap_or(0))
                .ok_or_else(overflow)?;
            disputed = disputed
                .checked_add(meter.charge.as_ref().map_or(0, |charge| charge.disputed))
                .ok_or_else(overflow)?;
        }
        let skip = billed.len().saturating_sub(MAX_DRIFT_POINTS);
        let points = billed[skip..]
            .iter()
            .map(|record| {
                let estimate = record.meter.estimate.unwrap_or(0);
                let actual = record.meter.actual.unwrap_or(0);
                DriftPoint {
                    sandbox_id: record.id.clone(),
                    finished_at: record.finished_at_ms.map(rfc3339_millis),
                    estimate: format_credits(estimate),
                    actual: format_credits(actual),
                    drift: format_micros(i128::from(actual) - i128::from(estimate)),
                }
            })
            .collect();
        Ok(DriftView {
            sandboxes: billed.len() as u64,
            estimated: format_credits(estimated),
            charged: format_credits(charged),
            drift: format_micros(i128::from(charged) - i128::from(estimated)),
            disputed: format_credits(disputed),
            points,
        })
    }
}
