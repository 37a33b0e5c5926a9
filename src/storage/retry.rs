//! walsync's own retry policy for storage requests, in place of the S3
//! SDK's.
//!
//! The SDK's standard mode draws every retry from one token bucket per
//! process: about fifty network errors empty it, after which no request of
//! any database is retried, and one bad minute of one prefix stalls the
//! fleet. Here every request carries its own few attempts, backed off
//! exponentially with full jitter, so no database can use up another's; and
//! all attempts of the process together are paced to a request rate, so a
//! dead store is not stormed by thousands of databases retrying at once.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Attempts per request while replicating (the first and four retries): at
/// 30% failed requests, one in 400 still fails, and the database's next
/// sync tries again.
pub const ATTEMPTS: u32 = 5;
/// Attempts per request of a command that nothing retries after it
/// (`restore`, `restore-all`, `verify`, `list`): a disaster recovery
/// through a bad network should take longer, not fail.
pub const PATIENT_ATTEMPTS: u32 = 12;

static PROCESS_ATTEMPTS: AtomicU32 = AtomicU32::new(ATTEMPTS);

/// Makes every request of this process [`PATIENT_ATTEMPTS`]-patient (a
/// process runs one command).
pub fn be_patient() {
    PROCESS_ATTEMPTS.store(PATIENT_ATTEMPTS, Ordering::Relaxed);
}

/// Attempts per request in this process.
pub fn attempts() -> u32 {
    PROCESS_ATTEMPTS.load(Ordering::Relaxed)
}
/// The first retry waits up to this long, each next one up to twice as long...
const BASE: Duration = Duration::from_millis(100);
/// ...but never longer than this.
const CAP: Duration = Duration::from_secs(3);

/// Requests per second a process sends to one store, attempts and retries
/// together; also the burst it may send at once.
pub const MAX_REQUESTS_PER_SECOND: f64 = 1000.0;

/// How long to wait before retry number `retry` (1 for the first): a random
/// time up to `BASE * 2^(retry-1)`, capped ("full jitter": clients that
/// failed together do not come back together).
pub fn backoff(retry: u32) -> Duration {
    let ceiling = BASE
        .saturating_mul(1 << (retry.saturating_sub(1)).min(16))
        .min(CAP);
    ceiling.mul_f64(unit_random())
}

/// A number in [0, 1), different on every call.
fn unit_random() -> f64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    // RandomState is seeded randomly per process; hashing a counter with it
    // gives independent-looking numbers without a random-number crate.
    let bits = RandomState::new().hash_one(n);
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// A token bucket shared by every request to one store.
#[derive(Debug)]
pub struct Pace {
    per_second: f64,
    state: Mutex<(f64, Instant)>,
}

impl Pace {
    pub fn new(per_second: f64) -> Self {
        Self {
            per_second,
            state: Mutex::new((per_second, Instant::now())),
        }
    }

    /// Waits until a request may be sent.
    pub async fn wait(&self) {
        loop {
            let wait = {
                let mut state = self
                    .state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let (tokens, at) = &mut *state;
                let now = Instant::now();
                *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second)
                    .min(self.per_second);
                *at = now;
                if *tokens >= 1.0 {
                    *tokens -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - *tokens) / self.per_second)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

impl Default for Pace {
    fn default() -> Self {
        Self::new(MAX_REQUESTS_PER_SECOND)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_is_jittered() {
        for retry in 1..=20 {
            let ceiling = BASE.saturating_mul(1 << (retry - 1).min(16)).min(CAP);
            let waits: Vec<Duration> = (0..50).map(|_| backoff(retry)).collect();
            assert!(waits.iter().all(|w| *w <= ceiling), "{retry}: {waits:?}");
            let distinct: std::collections::HashSet<_> = waits.iter().collect();
            assert!(distinct.len() > 40, "{retry}: not jittered: {waits:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_pace_holds_a_burst_to_the_rate() {
        let pace = Pace::new(10.0);
        let start = Instant::now();
        for _ in 0..30 {
            pace.wait().await;
        }
        // 10 at once, then 20 more at 10 per second.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_millis(2200),
            "{took:?}"
        );
    }
}
