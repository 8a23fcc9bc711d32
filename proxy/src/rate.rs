//! The token bucket behind an operator's rate limit: `burst` tokens,
//! refilled at `per_second`; a request (or an L4 connection) takes one or
//! is refused.

use std::sync::Mutex;

use signpost_core::policy::RateLimit;
use tokio::time::Instant;

#[derive(Default)]
pub(crate) struct Limiter {
    bucket: Mutex<Option<Bucket>>,
}

struct Bucket {
    limit: RateLimit,
    tokens: f64,
    refilled: Instant,
}

impl Limiter {
    /// Takes a token under `limit` (none: always allowed). A changed limit
    /// starts with a full bucket.
    pub(crate) fn allow(&self, limit: Option<RateLimit>, now: Instant) -> bool {
        let mut bucket = crate::lock(&self.bucket);
        let Some(limit) = limit else {
            *bucket = None;
            return true;
        };
        let b = match &mut *bucket {
            Some(b) if b.limit == limit => b,
            slot => slot.insert(Bucket {
                limit,
                tokens: f64::from(limit.burst),
                refilled: now,
            }),
        };
        let elapsed = now.saturating_duration_since(b.refilled).as_secs_f64();
        b.tokens = (b.tokens + elapsed * limit.per_second).min(f64::from(limit.burst));
        b.refilled = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let limiter = Limiter::default();
        let limit = Some(RateLimit {
            per_second: 10.0,
            burst: 5,
        });
        let t0 = Instant::now();
        let burst = (0..20).filter(|_| limiter.allow(limit, t0)).count();
        assert_eq!(burst, 5);
        // One second later: ten more, not more.
        let t1 = t0 + Duration::from_secs(1);
        let next = (0..20).filter(|_| limiter.allow(limit, t1)).count();
        assert_eq!(next, 5, "capped at the burst");
        let t2 = t1 + Duration::from_millis(300);
        assert_eq!((0..20).filter(|_| limiter.allow(limit, t2)).count(), 3);
        assert!(limiter.allow(None, t2), "no limit, no refusal");
    }
}
