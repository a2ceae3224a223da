//! Token buckets, one per key (a peer's network, an account), for the calls
//! an attacker would repeat: CreateAccount (each one creates a Kafka topic),
//! failed invite codes, pairing tickets, redeem guesses, pushes, database-heavy
//! calls. A bucket holds `burst` tokens and refills at `per_hour`; a call with
//! no token left is shed with RESOURCE_EXHAUSTED and how long until the next
//! token. The number of buckets is bounded: past the capacity, full buckets
//! (which carry no state worth keeping) are dropped first, then the least
//! recently used, a tenth at a time, so that a flood of new keys never resets
//! the buckets in use.

use std::{
    collections::HashMap,
    hash::Hash,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lockstep_kafka::locks::lock;
use lockstep_proto::retry;
use tonic::Status;

use crate::{
    error::ApiError,
    settings::{Rate, RateLimitSettings},
};

/// Buckets one limiter keeps at most.
const MAX_KEYS: usize = 100_000;

/// What a per-source bucket is keyed by: an IPv4 address, or the /64 network of
/// an IPv6 address (one host is commonly handed a whole /64, billions of
/// addresses). `None` is a peer whose address is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(Option<IpAddr>);

impl Source {
    pub fn of(peer: Option<IpAddr>) -> Self {
        Self(peer.map(|ip| match ip.to_canonical() {
            IpAddr::V4(v4) => IpAddr::V4(v4),
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !u128::from(u64::MAX))),
        }))
    }
}

/// One limiter per rate-limited call, shared by the guard layer (which sees
/// paths, peers and accounts) and the CreateAccount handler (which alone knows
/// whether an invite code or secret was good).
pub struct Rates {
    pub create_account_per_address: RateLimiter<Source>,
    /// Taken only by CreateAccount calls that were admitted (a good invite code or
    /// secret, or open registration), right before the account's topic is created.
    pub create_account_total: RateLimiter<()>,
    pub failed_registration_per_address: RateLimiter<Source>,
    pub pairing_ticket_per_account: RateLimiter<Arc<str>>,
    pub redeem_per_address: RateLimiter<Source>,
    pub push_per_account: RateLimiter<Arc<str>>,
    pub database_calls_per_account: RateLimiter<Arc<str>>,
    /// Taken by a token this node does not know, before the database is asked (shared
    /// database only, see `accounts`).
    pub unknown_token_lookups_per_address: RateLimiter<Source>,
}

impl Rates {
    pub fn new(settings: &RateLimitSettings) -> Self {
        Self {
            create_account_per_address: RateLimiter::new(settings.create_account_per_address),
            create_account_total: RateLimiter::new(settings.create_account_total),
            failed_registration_per_address: RateLimiter::new(settings.failed_registration_per_address),
            pairing_ticket_per_account: RateLimiter::new(settings.pairing_ticket_per_account),
            redeem_per_address: RateLimiter::new(settings.redeem_per_address),
            push_per_account: RateLimiter::new(settings.push_per_account),
            database_calls_per_account: RateLimiter::new(settings.database_calls_per_account),
            unknown_token_lookups_per_address: RateLimiter::new(settings.unknown_token_lookups_per_address),
        }
    }
}

/// RESOURCE_EXHAUSTED for a call past its rate, with the wait until the next token.
pub fn exhausted(what: &str, wait: Duration) -> Status {
    let mut status = Status::from(ApiError::ResourceExhausted(format!(
        "too many {what} from here; retry in {} s",
        wait.as_secs().max(1)
    )));
    retry::set_retry_after(&mut status, wait);
    status
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

pub struct RateLimiter<K> {
    rate: Rate,
    capacity: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(rate: Rate) -> Self {
        Self::with_capacity(rate, MAX_KEYS)
    }

    fn with_capacity(rate: Rate, capacity: usize) -> Self {
        debug_assert!(capacity >= 10, "evicting a tenth must evict something");
        Self { rate, capacity, buckets: Mutex::new(HashMap::new()) }
    }

    fn per_second(&self) -> f64 {
        f64::from(self.rate.per_hour) / 3600.0
    }

    /// Takes a token for `key`; when there is none, how long until there is.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    /// Whether `key` has a token, without taking it; when it has none, how long until it has.
    pub fn peek(&self, key: &K) -> Result<(), Duration> {
        let now = Instant::now();
        let buckets = lock(&self.buckets);
        let Some(bucket) = buckets.get(key) else { return Ok(()) };
        let tokens = refilled(bucket, now, self.per_second(), f64::from(self.rate.burst));
        if tokens >= 1.0 { Ok(()) } else { Err(self.wait_for(tokens)) }
    }

    fn check_at(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let burst = f64::from(self.rate.burst);
        let per_second = self.per_second();
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= self.capacity && !buckets.contains_key(key) {
            self.make_room(&mut buckets, now);
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket { tokens: burst, updated: now });
        bucket.tokens = refilled(bucket, now, per_second, burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(self.wait_for(bucket.tokens))
    }

    fn wait_for(&self, tokens: f64) -> Duration {
        let per_second = self.per_second();
        if per_second <= 0.0 {
            return Duration::from_secs(3600);
        }
        Duration::from_secs_f64(((1.0 - tokens) / per_second).min(3600.0))
    }

    /// Drops the full buckets; if that leaves the map over 90 % of its capacity, also
    /// the least recently used buckets down to 90 % (one O(n) pass per tenth of the
    /// capacity of new keys).
    fn make_room(&self, buckets: &mut HashMap<K, Bucket>, now: Instant) {
        let (per_second, burst) = (self.per_second(), f64::from(self.rate.burst));
        buckets.retain(|_, bucket| refilled(bucket, now, per_second, burst) < burst);
        let keep = self.capacity - self.capacity / 10;
        if buckets.len() <= keep {
            return;
        }
        let mut last_used: Vec<Instant> = buckets.values().map(|bucket| bucket.updated).collect();
        let evict = buckets.len() - keep;
        let (_, cutoff, _) = last_used.select_nth_unstable(evict - 1);
        let cutoff = *cutoff;
        let mut evicted = 0;
        buckets.retain(|_, bucket| {
            // Ties at the cutoff: evict only as many as needed.
            let old = bucket.updated < cutoff || (bucket.updated == cutoff && evicted < evict);
            if old {
                evicted += 1;
            }
            !old
        });
        debug_assert!(buckets.len() <= keep, "{} buckets left, {keep} wanted", buckets.len());
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

    #[test]
    fn a_flood_of_new_keys_evicts_the_oldest_buckets_not_the_busy_one() {
        let limiter = RateLimiter::with_capacity(Rate { burst: 1, per_hour: 1 }, 100);
        let start = Instant::now();
        let at = |second: u64| start + Duration::from_secs(second);
        assert!(limiter.check_at(&"attacker".to_string(), at(0)).is_ok());
        for (second, key) in (1..).zip(0..1_000) {
            let _ = limiter.check_at(&format!("flood-{key}"), at(second));
            // The attacker keeps trying: its bucket stays in use, and stays empty.
            assert!(limiter.check_at(&"attacker".to_string(), at(second)).is_err(), "reset after {key} new keys");
        }
        let buckets = lock(&limiter.buckets);
        assert!(buckets.len() <= 100);
        assert!(buckets.contains_key("flood-999") && !buckets.contains_key("flood-0"), "the oldest went first");
    }

    #[test]
    fn peek_takes_no_token() {
        let limiter = RateLimiter::new(Rate { burst: 1, per_hour: 1 });
        assert!(limiter.peek(&"a").is_ok());
        assert!(limiter.peek(&"a").is_ok());
        assert!(limiter.check(&"a").is_ok());
        assert!(limiter.peek(&"a").is_err());
    }

    #[test]
    fn ipv6_sources_are_keyed_by_their_64_and_ipv4_by_address() {
        let ip = |text: &str| Some(text.parse::<IpAddr>().unwrap());
        assert_eq!(Source::of(ip("2001:db8:1:2:aaaa::1")), Source::of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")));
        assert_ne!(Source::of(ip("2001:db8:1:2::1")), Source::of(ip("2001:db8:1:3::1")));
        assert_ne!(Source::of(ip("192.0.2.1")), Source::of(ip("192.0.2.2")));
        assert_eq!(Source::of(ip("::ffff:192.0.2.1")), Source::of(ip("192.0.2.1")), "v4-mapped is the v4 address");
        assert_eq!(Source::of(None), Source::of(None));

        let limiter = RateLimiter::new(Rate { burst: 1, per_hour: 1 });
        assert!(limiter.check(&Source::of(ip("2001:db8::1"))).is_ok());
        assert!(limiter.check(&Source::of(ip("2001:db8::2"))).is_err(), "another address of the same /64");
        assert!(limiter.check(&Source::of(ip("2001:db8:0:1::1"))).is_ok(), "another /64");
    }
}
