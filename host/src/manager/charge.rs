//! The charge policy: how much of what an extension's `meter-actual` asks
//! the host lets stand.
//!
//! An extension's word alone never takes a tenant past what the host can
//! justify. The host can justify the hold (the extension's own estimate for
//! the whole ttl, which the tenant agreed to reserve) or, when more, the
//! estimate's hourly rate over the wall time the host itself measured (a
//! sandbox that outlived its ttl because its destroy kept failing). The
//! operator may let an instance go above that by a tolerance set in its
//! sidecar (`[billing] charge_tolerance`, 1 by default). What is asked above
//! the ceiling is recorded as disputed, never charged.
//!
//! Every amount is integer micro-credits; the arithmetic runs in `u128` and
//! saturates at `u64::MAX`, so no input can overflow it.

use serde::{Deserialize, Serialize};

/// Milliseconds in the hour a rate is quoted for.
const MS_PER_HOUR: u128 = 3_600_000;
/// A tolerance of exactly 1, in millionths.
pub const UNIT_TOLERANCE_PPM: u64 = 1_000_000;

/// What the policy decided for one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeDecision {
    /// What `meter-actual` asked for.
    pub asked: u64,
    /// The most the host lets stand.
    pub ceiling: u64,
    /// What is charged: `min(asked, ceiling)`.
    pub charged: u64,
    /// `asked - charged`: recorded, never charged.
    pub disputed: u64,
}

/// `rate_per_hour` over `wall_ms`, rounded up to a whole micro-credit.
pub fn prorated(rate_per_hour: u64, wall_ms: u64) -> u64 {
    let cost = (u128::from(rate_per_hour) * u128::from(wall_ms)).div_ceil(MS_PER_HOUR);
    u64::try_from(cost).unwrap_or(u64::MAX)
}

/// The highest charge the host can justify, times the operator's tolerance.
pub fn ceiling(hold: u64, rate_per_hour: u64, host_wall_ms: u64, tolerance_ppm: u64) -> u64 {
    let justified = hold.max(prorated(rate_per_hour, host_wall_ms));
    let scaled = u128::from(justified) * u128::from(tolerance_ppm.max(UNIT_TOLERANCE_PPM))
        / u128::from(UNIT_TOLERANCE_PPM);
    u64::try_from(scaled).unwrap_or(u64::MAX)
}

/// Applies the policy to what an extension asked.
pub fn decide(
    asked: u64,
    hold: u64,
    rate_per_hour: u64,
    host_wall_ms: u64,
    tolerance_ppm: u64,
) -> ChargeDecision {
    let ceiling = ceiling(hold, rate_per_hour, host_wall_ms, tolerance_ppm);
    let charged = asked.min(ceiling);
    ChargeDecision {
        asked,
        ceiling,
        charged,
        disputed: asked - charged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_honest_charge_stands_whole() {
        let decision = decide(37, 37, 66_600, 2_000, UNIT_TOLERANCE_PPM);
        assert_eq!((decision.charged, decision.disputed), (37, 0));
    }

    #[test]
    fn an_absurd_charge_is_capped_at_the_hold_and_the_rest_disputed() {
        // The case of the issue: a 1-second sandbox estimated at 0.000014
        // asking u64::MAX.
        let decision = decide(u64::MAX, 14, 50_400, 1_000, UNIT_TOLERANCE_PPM);
        assert_eq!(decision.ceiling, 14);
        assert_eq!(decision.charged, 14);
        assert_eq!(decision.disputed, u64::MAX - 14);
    }

    #[test]
    fn host_measured_overtime_raises_the_ceiling() {
        // Held 1 minute at 3.6 credits an hour (0.06), lived 10 minutes.
        let decision = decide(1_000_000, 60_000, 3_600_000, 600_000, UNIT_TOLERANCE_PPM);
        assert_eq!(decision.ceiling, 600_000);
        assert_eq!((decision.charged, decision.disputed), (600_000, 400_000));
    }

    #[test]
    fn the_operator_tolerance_scales_the_ceiling() {
        let decision = decide(130, 100, 0, 0, 1_250_000);
        assert_eq!(decision.ceiling, 125);
        assert_eq!((decision.charged, decision.disputed), (125, 5));
    }

    #[test]
    fn nothing_overflows() {
        assert_eq!(prorated(u64::MAX, u64::MAX), u64::MAX);
        assert_eq!(ceiling(u64::MAX, u64::MAX, u64::MAX, 10_000_000), u64::MAX);
        assert_eq!(prorated(1, 1), 1, "a started micro-credit is charged");
        assert_eq!(prorated(3_600_000, 3_600_000), 3_600_000);
    }
}
