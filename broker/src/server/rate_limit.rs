//! Token buckets, one per key (a peer's IP address, an account), for the calls
//! an attacker would repeat: CreateAccount (each one creates a Kafka topic),
//! pairing tickets, redeem guesses, pushes. A bucket holds `burst` tokens and
//! refills at `per_hour`; a call with no token left is shed with
//! RESOURCE_EXHAUSTED and how long until the next token. The number of buckets
//! is bounded: past `MAX_KEYS`, full buckets (which carry no state worth
//! keeping) are dropped first.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::Mutex,
    time::{Duration, Instant},
};

use lockstep_kafka::locks::lock;

use crate::settings::Rate;

const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

pub struct RateLimiter<K> {
    rate: Rate,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(rate: Rate) -> Self {
        Self { rate, buckets: Mutex::new(HashMap::new()) }
    }

    fn per_second(&self) -> f64 {
        f64::from(self.rate.per_hour) / 3600.0
    }

    /// Takes a token for `key`; when there is none, how long until there is.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let burst = f64::from(self.rate.burst);
        let per_second = self.per_second();
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            buckets.retain(|_, bucket| refilled(bucket, now, per_second, burst) < burst);
            if buckets.len() >= MAX_KEYS {
                // Every bucket is in use: forget them all rather than grow without bound.
                buckets.clear();
            }
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket { tokens: burst, updated: now });
        bucket.tokens = refilled(bucket, now, per_second, burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        if per_second <= 0.0 {
            return Err(Duration::from_secs(3600));
        }
        Err(Duration::from_secs_f64(((1.0 - bucket.tokens) / per_second).min(3600.0)))
    }
}

fn refilled(bucket: &Bucket, now: Instant, per_second: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
    (bucket.tokens + elapsed * per_second).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_refill_rate() {
        let limiter = RateLimiter::new(Rate { burst: 3, per_hour: 3600 });
        let start = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check_at(&"a", start).is_ok());
        }
        let wait = limiter.check_at(&"a", start).unwrap_err();
        assert!(wait <= Duration::from_secs(1) && wait > Duration::from_millis(900), "{wait:?}");
        assert!(limiter.check_at(&"b", start).is_ok(), "keys are independent");
        assert!(limiter.check_at(&"a", start + Duration::from_secs(1)).is_ok(), "one token a second");
        assert!(limiter.check_at(&"a", start + Duration::from_secs(1)).is_err());
        for _ in 0..3 {
            assert!(limiter.check_at(&"a", start + Duration::from_secs(100)).is_ok(), "refilled up to the burst");
        }
        assert!(limiter.check_at(&"a", start + Duration::from_secs(100)).is_err());
    }

    #[test]
    fn the_number_of_buckets_is_bounded() {
        let limiter = RateLimiter::new(Rate { burst: 1, per_hour: 1 });
        let now = Instant::now();
        for key in 0..(MAX_KEYS + 10) {
            let _ = limiter.check_at(&key, now);
        }
        assert!(lock(&limiter.buckets).len() <= MAX_KEYS);
    }
}
