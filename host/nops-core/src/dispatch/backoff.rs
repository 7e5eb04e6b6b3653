//! Retry backoff: exponential with full jitter.
//!
//! The pause before retry `n` (0 for the first retry) is drawn uniformly from
//! `[0, min(cap, base · 2^n)]` ("full jitter", as in the AWS architecture blog's "Exponential
//! Backoff and Jitter"). Written by hand rather than with `backon`: backon's jitter adds a
//! random amount *on top of* the exponential delay (`delay + rand · delay`), so its pauses
//! never go below the exponential floor, while full jitter spreads retries of many tasks that
//! failed together over the whole window, which is what keeps a recovering agent fleet from
//! being hit by synchronized waves.

use std::time::Duration;

use rand::Rng;

/// The ceiling of the pause before retry `retry` (0-based): `min(cap_ms, base_ms · 2^retry)`.
pub fn ceiling_ms(base_ms: u64, cap_ms: u64, retry: u32) -> u64 {
    let factor = 1u64.checked_shl(retry.min(63)).unwrap_or(u64::MAX);
    base_ms.saturating_mul(factor).min(cap_ms)
}

/// A pause drawn uniformly from `[0, ceiling_ms(base_ms, cap_ms, retry)]`.
pub fn full_jitter(base_ms: u64, cap_ms: u64, retry: u32) -> Duration {
    let ceiling = ceiling_ms(base_ms, cap_ms, retry);
    Duration::from_millis(rand::rng().random_range(0..=ceiling))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_up_to_the_cap() {
        assert_eq!(ceiling_ms(100, 10_000, 0), 100);
        assert_eq!(ceiling_ms(100, 10_000, 1), 200);
        assert_eq!(ceiling_ms(100, 10_000, 6), 6_400);
        assert_eq!(ceiling_ms(100, 10_000, 7), 10_000);
        assert_eq!(ceiling_ms(100, 10_000, 200), 10_000, "no overflow on huge retry counts");
    }

    #[test]
    fn pauses_stay_within_the_window_and_spread_over_it() {
        let pauses: Vec<u64> = (0..2_000).map(|_| full_jitter(100, 10_000, 3).as_millis() as u64).collect();
        assert!(pauses.iter().all(|p| *p <= 800));
        // Full jitter reaches the bottom of the window, unlike "delay + jitter".
        assert!(pauses.iter().any(|p| *p < 100), "some pauses fall in the lowest eighth");
        assert!(pauses.iter().any(|p| *p > 700), "some pauses fall in the highest eighth");
    }
}
