//! One wake-up attempt: the HTTP request to a push service (RFC 8030 Web Push
//! with an RFC 8291 `aes128gcm` body and an RFC 8292 VAPID JWT, or a
//! Matrix-push-gateway webhook), what it means for the next attempt, and a
//! `WakeUp` event per attempt. `dispatch` decides when attempts run.
//!
//! The payload is content-free: `{"v":1,"log_end":N}`. Every request is
//! checked against the target policy first (the target came from the events
//! topic, which the worker does not trust more than a device); host names go
//! through [`FilteringResolver`]; redirects are never followed; at most
//! `http.max_response_bytes` of an answer are read. Endpoints are secrets, so
//! only their origin is ever logged.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use lockstep_schemas::{Event, EventBody, PushTarget, TargetRemovedReason, WakeUpOutcome, target_policy::TargetPolicy};
use rand::Rng;
use reqwest::{StatusCode, Url, header::HeaderMap};
use tokio::time::Instant;

use crate::{
    Error,
    events::Publisher,
    resolve::{FilteringResolver, Lookup},
    settings::Settings,
    vapid::VapidKey,
};

/// A device to wake.
#[derive(Debug, Clone)]
pub struct WakeOrder {
    pub user_id: String,
    pub device_id: String,
    pub target: PushTarget,
    pub log_end: i64,
}

impl WakeOrder {
    /// The fairness key: the target's origin as the HTTP client reads it
    /// (`HTTPS://Push.Example:443` and `https://push.example` are one origin).
    pub fn origin(&self) -> String {
        let (PushTarget::WebPush { endpoint: url, .. } | PushTarget::Webhook { url, .. }) = &self.target;
        Url::parse(url).map_or_else(|_| self.target.origin().to_string(), |url| url.origin().ascii_serialization())
    }
}

/// How a wake-up ended, after its retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WakeResult {
    pub outcome: WakeUpOutcome,
    /// The target is gone (404/410) or rejected: it was removed and an event says so.
    pub target_removed: bool,
    /// When the last attempt ended (Unix ms), as in its `WakeUp` event.
    pub at_ms: i64,
}

/// Where a wake-up stands before an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptState {
    /// 1 for the first attempt.
    pub number: u32,
    /// The push service answered 413: send without a payload.
    pub empty_body: bool,
}

impl AttemptState {
    pub const FIRST: Self = Self { number: 1, empty_body: false };
}

/// What one attempt leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    Done(WakeResult),
    /// Try again after `delay`, in `next`.
    Retry {
        delay: Duration,
        next: AttemptState,
    },
}

/// One attempt, as the dispatcher needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptReport {
    pub end: AttemptEnd,
    /// No answer, or one later than `wake.slow_after`.
    pub slow: bool,
    /// The origin asked for a pause (429): no request to it before then.
    pub origin_pause: Option<Duration>,
    /// The attempt's `WakeUp` event (and a `PushTargetRemoved`), to publish with
    /// [`Waker::publish`] before the attempt counts as ended. The dispatcher does
    /// that after it gave the origin's slot back: a slot is for talking to the push
    /// service, not for waiting on Kafka's acknowledgement.
    pub events: Vec<Event>,
}

/// What one request got back.
enum Answer {
    Status(StatusCode, HeaderMap, bytes::Bytes),
    /// Timeout or connection error (or a refused address): no status.
    Unanswered,
    /// The target is refused by the policy or cannot be encoded: never sent.
    Unsendable,
}

pub struct Waker {
    client: reqwest::Client,
    policy: Arc<TargetPolicy>,
    vapid: VapidKey,
    /// Signed VAPID authorizations by origin, reused for half their lifetime
    /// (RFC 8292 lets a token be reused until it expires; an ES256 signature per
    /// request was most of the CPU a wake-up costs).
    vapid_tokens: std::sync::Mutex<std::collections::HashMap<String, (String, Instant)>>,
    settings: Settings,
    worker_id: String,
    publisher: Publisher,
}

/// At most this many origins' tokens are kept (then the cache starts again).
const MAX_CACHED_TOKENS: usize = 4096;

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Waker {
    pub fn new(settings: Settings, vapid: VapidKey, worker_id: String, publisher: Publisher) -> Result<Self, Error> {
        Self::with_lookup(settings, vapid, worker_id, publisher, Lookup::System)
    }

    /// Like [`Waker::new`], resolving names with `lookup` (tests: a fixed table).
    pub fn with_lookup(
        settings: Settings,
        vapid: VapidKey,
        worker_id: String,
        publisher: Publisher,
        lookup: Lookup,
    ) -> Result<Self, Error> {
        let policy = Arc::new(settings.target_policy().map_err(Error::Http)?);
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve and connect for us, past the filtering resolver.
            .no_proxy()
            .dns_resolver(Arc::new(FilteringResolver::new(policy.clone(), lookup)))
            .timeout(settings.http.request_timeout)
            .connect_timeout(settings.http.request_timeout)
            .user_agent(concat!("lockstep-push/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Http(e.without_url().to_string()))?;
        Ok(Self { client, policy, vapid, vapid_tokens: Default::default(), settings, worker_id, publisher })
    }

    /// One attempt to wake the device; publishes its `WakeUp` event (and a
    /// `PushTargetRemoved` when the target is gone). A `probe` (first contact with
    /// an origin) waits at most `wake.slow_after` for the answer.
    pub async fn attempt(&self, order: &WakeOrder, state: AttemptState, probe: bool) -> AttemptReport {
        let origin = order.target.origin();
        let last = state.number >= self.settings.wake.max_attempts;
        let started = Instant::now();
        let timeout = if probe { self.settings.wake.slow_after } else { self.settings.http.request_timeout };
        let answer = self.send(order, state.empty_body, timeout).await;
        let slow = matches!(answer, Answer::Unanswered) || started.elapsed() > self.settings.wake.slow_after;
        let status = match &answer {
            Answer::Status(status, _, _) => i32::from(status.as_u16()),
            Answer::Unanswered | Answer::Unsendable => 0,
        };
        let failed_or = |outcome| if last { WakeUpOutcome::Failed } else { outcome };
        let mut origin_pause = None;
        let mut next = AttemptState { number: state.number + 1, empty_body: state.empty_body };
        let (outcome, removed, retry_in) = match &answer {
            Answer::Status(status, _, body) if status.is_success() => {
                if self.webhook_rejected(&order.target, body) {
                    (WakeUpOutcome::Gone, Some(TargetRemovedReason::Rejected), None)
                } else {
                    (WakeUpOutcome::Sent, None, None)
                }
            }
            Answer::Status(StatusCode::NOT_FOUND | StatusCode::GONE, ..) => {
                (WakeUpOutcome::Gone, Some(TargetRemovedReason::Gone), None)
            }
            Answer::Status(StatusCode::PAYLOAD_TOO_LARGE, ..) if !state.empty_body && !last => {
                next.empty_body = true;
                (WakeUpOutcome::Retrying, None, Some(Duration::ZERO))
            }
            Answer::Status(StatusCode::TOO_MANY_REQUESTS, headers, _) => {
                let wait = retry_after(headers).unwrap_or_else(|| self.backoff(state.number));
                origin_pause = Some(wait.min(self.settings.wake.retry_max_delay));
                (failed_or(WakeUpOutcome::Throttled), None, Some(Duration::ZERO))
            }
            Answer::Status(status, ..) if status.is_server_error() => {
                (failed_or(WakeUpOutcome::Retrying), None, Some(self.backoff(state.number)))
            }
            Answer::Unanswered => (failed_or(WakeUpOutcome::Retrying), None, Some(self.backoff(state.number))),
            // 3xx (never followed), 400, 401, 403, …, a refused target: trying again will not help.
            Answer::Status(..) | Answer::Unsendable => (WakeUpOutcome::Failed, None, None),
        };
        let at_ms = now_ms();
        metrics::counter!("lockstep_push_wakeup_attempts_total", "outcome" => outcome.as_str()).increment(1);
        tracing::info!(
            user_id = %order.user_id,
            device_id = %order.device_id,
            origin = %origin,
            log_end = order.log_end,
            http_status = status,
            attempt = state.number,
            ?outcome,
            "wake-up attempt"
        );
        let event = |body| Event { user_id: order.user_id.clone(), node_id: self.worker_id.clone(), at_ms, body };
        let mut events = vec![event(EventBody::WakeUp {
            device_id: order.device_id.clone(),
            log_end: order.log_end,
            outcome,
            http_status: status,
        })];
        if let Some(reason) = removed {
            events.push(event(EventBody::PushTargetRemoved { device_id: order.device_id.clone(), reason }));
        }
        let end = match retry_in {
            Some(delay) if outcome != WakeUpOutcome::Failed => AttemptEnd::Retry { delay, next },
            _ => AttemptEnd::Done(WakeResult { outcome, target_removed: removed.is_some(), at_ms }),
        };
        AttemptReport { end, slow, origin_pause, events }
    }

    /// Exponential backoff with ±50 % jitter: base · 2^(attempt−1), capped.
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.settings.wake.retry_base_delay.saturating_mul(1 << attempt.saturating_sub(1).min(16));
        let base = base.min(self.settings.wake.retry_max_delay);
        base.mul_f64(rand::rng().random_range(0.5..1.5))
    }

    async fn send(&self, order: &WakeOrder, empty_body: bool, timeout: Duration) -> Answer {
        let request = match self.build(order, empty_body) {
            Ok(request) => request.timeout(timeout),
            Err(error) => {
                metrics::counter!("lockstep_push_refused_targets_total").increment(1);
                tracing::warn!(device_id = %order.device_id, origin = %order.target.origin(), %error, "wake-up not sent");
                return Answer::Unsendable;
            }
        };
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                // reqwest errors name the URL: drop it, it is a secret.
                tracing::debug!(origin = %order.target.origin(), error = %error.without_url(), "push service did not answer");
                return Answer::Unanswered;
            }
        };
        let status = response.status();
        let headers = response.headers().clone();
        // Read chunk by chunk up to the bound, then stop: the rest is never read
        // (dropping the response closes the connection). The client's timeout bounds the time.
        let max = self.settings.http.max_response_bytes;
        let mut body = bytes::BytesMut::new();
        while body.len() < max {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk[..chunk.len().min(max - body.len())]),
                Ok(None) | Err(_) => break,
            }
        }
        Answer::Status(status, headers, body.freeze())
    }

    fn build(&self, order: &WakeOrder, empty_body: bool) -> Result<reqwest::RequestBuilder, Error> {
        // Again here, whatever was checked before: the target came from the events topic.
        let url = self.policy.check_target(&order.target).map_err(Error::RefusedTarget)?;
        let payload = serde_json::json!({ "v": 1, "log_end": order.log_end }).to_string();
        match &order.target {
            PushTarget::WebPush { p256dh, auth, .. } => {
                let http = &self.settings.http;
                let authorization = self.vapid_authorization(order.target.origin());
                let request = self
                    .client
                    .post(url)
                    .header("TTL", http.ttl.as_secs().to_string())
                    .header("Urgency", &http.urgency)
                    .header("Topic", &http.topic)
                    .header("Authorization", authorization);
                if empty_body {
                    return Ok(request.header("Content-Length", "0"));
                }
                let public = web_push_native::p256::PublicKey::from_sec1_bytes(p256dh)
                    .map_err(|_| Error::Target("p256dh is not a P-256 point"))?;
                if auth.len() != 16 {
                    return Err(Error::Target("auth is not 16 bytes"));
                }
                let auth = web_push_native::Auth::clone_from_slice(auth);
                let body = web_push_native::encrypt(payload.into_bytes(), &public, &auth)
                    .map_err(|_| Error::Target("cannot encrypt for this subscription"))?;
                Ok(request
                    .header("Content-Encoding", "aes128gcm")
                    .header("Content-Type", "application/octet-stream")
                    .body(body))
            }
            PushTarget::Webhook { app_id, pushkey, .. } => {
                let notification = serde_json::json!({
                    "notification": {
                        "devices": [{ "app_id": app_id, "pushkey": pushkey, "data": { "log_end": order.log_end } }],
                        "prio": "high",
                    }
                });
                Ok(self.client.post(url).json(&notification))
            }
        }
    }

    /// The VAPID authorization for `origin`: a cached one younger than half the
    /// token lifetime (so it is valid for at least as long again), else a new one.
    fn vapid_authorization(&self, origin: &str) -> String {
        let lifetime = self.settings.vapid.token_lifetime;
        let now = Instant::now();
        let mut tokens = lockstep_kafka::locks::lock(&self.vapid_tokens);
        if let Some((token, made)) = tokens.get(origin)
            && now.duration_since(*made) < lifetime / 2
        {
            return token.clone();
        }
        let token = self.vapid.authorization(origin, &self.settings.vapid.subject, lifetime);
        if tokens.len() >= MAX_CACHED_TOKENS {
            tokens.clear();
        }
        tokens.insert(origin.to_owned(), (token.clone(), now));
        token
    }

    fn webhook_rejected(&self, target: &PushTarget, body: &[u8]) -> bool {
        let PushTarget::Webhook { pushkey, .. } = target else { return false };
        let Ok(answer) = serde_json::from_slice::<serde_json::Value>(body) else { return false };
        let rejected = answer.get("rejected").and_then(|r| r.as_array());
        rejected.is_some_and(|keys| keys.iter().any(|key| key.as_str() == Some(pushkey)))
    }

    /// Publishes an attempt's events, in order (waits for Kafka's acknowledgement).
    pub async fn publish(&self, events: &[Event]) {
        for event in events {
            if let Err(error) = self.publisher.publish(event).await {
                tracing::warn!(user_id = %event.user_id, kind = event.body.kind(), %error, "cannot publish wake-up event");
            }
        }
    }
}

/// `Retry-After` (RFC 9110): seconds, or an HTTP date (a date already past means now).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    retry_after_at(headers, std::time::SystemTime::now())
}

fn retry_after_at(headers: &HeaderMap, now: std::time::SystemTime) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waker(token_lifetime: Duration) -> (Waker, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let vapid = VapidKey::load_or_create(dir.path()).unwrap();
        let mut settings = Settings::default();
        settings.vapid.token_lifetime = token_lifetime;
        (Waker::new(settings, vapid, "push-test".into(), Publisher::disabled()).unwrap(), dir)
    }

    #[test]
    fn a_vapid_token_is_signed_once_per_origin_and_renewed_at_half_its_lifetime() {
        let (waker, _dir) = waker(Duration::from_secs(2));
        let first = waker.vapid_authorization("https://push.example");
        assert_eq!(waker.vapid_authorization("https://push.example"), first, "reused");
        let other = waker.vapid_authorization("https://other.example");
        assert_ne!(other, first, "each origin is its own audience");
        // Half the lifetime later the token is signed again, with an `exp` at least a
        // second later (ES256 here is deterministic: the same claims would sign the same).
        std::thread::sleep(Duration::from_millis(1_100));
        let renewed = waker.vapid_authorization("https://push.example");
        assert_ne!(renewed, first, "renewed once half its lifetime passed");
        assert_eq!(waker.vapid_authorization("https://push.example"), renewed);
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(reqwest::header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        headers.insert(reqwest::header::RETRY_AFTER, "Wed, 21 Oct 2015 07:29:30 GMT".parse().unwrap());
        assert_eq!(retry_after_at(&headers, now), Some(Duration::from_secs(90)));
        headers.insert(reqwest::header::RETRY_AFTER, "Wed, 21 Oct 2015 07:27:00 GMT".parse().unwrap());
        assert_eq!(retry_after_at(&headers, now), Some(Duration::ZERO), "a date past: now");
        headers.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }
}
