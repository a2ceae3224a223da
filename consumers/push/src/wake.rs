//! One wake-up: the HTTP request to a push service (RFC 8030 Web Push with an
//! RFC 8291 `aes128gcm` body and an RFC 8292 VAPID JWT, or a Matrix-push-gateway
//! webhook), its retries, and a `WakeUp` event per attempt.
//!
//! The payload is content-free: `{"v":1,"log_end":N}`. Redirects are never
//! followed; endpoints are secrets, so only their origin is ever logged.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use lockstep_schemas::{Event, EventBody, PushTarget, TargetRemovedReason, WakeUpOutcome};
use rand::Rng;
use reqwest::{StatusCode, header::HeaderMap};
use tokio::time::Instant;

use crate::{Error, events::Publisher, settings::Settings, vapid::VapidKey};

/// A device to wake.
#[derive(Debug, Clone)]
pub struct WakeOrder {
    pub user_id: String,
    pub device_id: String,
    pub target: PushTarget,
    pub log_end: i64,
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

/// What one attempt got back.
enum Answer {
    Status(StatusCode, HeaderMap, bytes::Bytes),
    /// Timeout or connection error: no status.
    NoAnswer,
}

pub struct Waker {
    client: reqwest::Client,
    vapid: VapidKey,
    settings: Settings,
    worker_id: String,
    publisher: Publisher,
    /// origin → no request before this instant (a 429's `Retry-After`).
    origin_backoff: Mutex<HashMap<String, Instant>>,
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Waker {
    pub fn new(settings: Settings, vapid: VapidKey, worker_id: String, publisher: Publisher) -> Result<Self, Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.http.request_timeout)
            .connect_timeout(settings.http.request_timeout)
            .user_agent(concat!("lockstep-push/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Http(e.without_url().to_string()))?;
        Ok(Self { client, vapid, settings, worker_id, publisher, origin_backoff: Mutex::default() })
    }

    /// Wakes the device: attempts until an answer that ends it or `wake.max_attempts`.
    pub async fn wake(self: Arc<Self>, order: WakeOrder) -> WakeResult {
        let origin = order.target.origin().to_string();
        let max_attempts = self.settings.wake.max_attempts;
        let mut empty_body = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.wait_for_origin(&origin).await;
            let answer = self.send(&order, empty_body).await;
            let last = attempt >= max_attempts;
            let status = match &answer {
                Answer::Status(status, _, _) => i32::from(status.as_u16()),
                Answer::NoAnswer => 0,
            };
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
                Answer::Status(StatusCode::PAYLOAD_TOO_LARGE, ..) if !empty_body && !last => {
                    empty_body = true;
                    (WakeUpOutcome::Retrying, None, Some(Duration::ZERO))
                }
                Answer::Status(StatusCode::TOO_MANY_REQUESTS, headers, _) => {
                    let wait = retry_after(headers).unwrap_or_else(|| self.backoff(attempt));
                    let wait = wait.min(self.settings.wake.retry_max_delay);
                    self.origin_backoff.lock().unwrap().insert(origin.clone(), Instant::now() + wait);
                    (if last { WakeUpOutcome::Failed } else { WakeUpOutcome::Throttled }, None, Some(Duration::ZERO))
                }
                Answer::Status(status, ..) if status.is_server_error() => (
                    if last { WakeUpOutcome::Failed } else { WakeUpOutcome::Retrying },
                    None,
                    Some(self.backoff(attempt)),
                ),
                Answer::NoAnswer => (
                    if last { WakeUpOutcome::Failed } else { WakeUpOutcome::Retrying },
                    None,
                    Some(self.backoff(attempt)),
                ),
                // 3xx (never followed), 400, 401, 403, …: trying again will not help.
                Answer::Status(..) => (WakeUpOutcome::Failed, None, None),
            };
            let at_ms = now_ms();
            metrics::counter!("lockstep_push_wakeup_attempts_total", "outcome" => outcome.as_str()).increment(1);
            tracing::info!(
                user_id = %order.user_id,
                device_id = %order.device_id,
                origin = %origin,
                log_end = order.log_end,
                http_status = status,
                attempt,
                ?outcome,
                "wake-up attempt"
            );
            self.publish(
                &order,
                at_ms,
                EventBody::WakeUp {
                    device_id: order.device_id.clone(),
                    log_end: order.log_end,
                    outcome,
                    http_status: status,
                },
            )
            .await;
            if let Some(reason) = removed {
                self.publish(
                    &order,
                    at_ms,
                    EventBody::PushTargetRemoved { device_id: order.device_id.clone(), reason },
                )
                .await;
            }
            match retry_in {
                Some(delay) if outcome != WakeUpOutcome::Failed => tokio::time::sleep(delay).await,
                _ => return WakeResult { outcome, target_removed: removed.is_some(), at_ms },
            }
        }
    }

    async fn wait_for_origin(&self, origin: &str) {
        let until = self.origin_backoff.lock().unwrap().get(origin).copied();
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
    }

    /// Exponential backoff with ±50 % jitter: base · 2^(attempt−1), capped.
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.settings.wake.retry_base_delay.saturating_mul(1 << attempt.saturating_sub(1).min(16));
        let base = base.min(self.settings.wake.retry_max_delay);
        base.mul_f64(rand::rng().random_range(0.5..1.5))
    }

    async fn send(&self, order: &WakeOrder, empty_body: bool) -> Answer {
        let request = match self.build(order, empty_body) {
            Ok(request) => request,
            Err(error) => {
                tracing::warn!(device_id = %order.device_id, origin = %order.target.origin(), %error, "cannot build wake-up");
                return Answer::Status(StatusCode::BAD_REQUEST, HeaderMap::new(), bytes::Bytes::new());
            }
        };
        match request.send().await {
            Ok(response) => {
                let status = response.status();
                let headers = response.headers().clone();
                // Bounded read: only a webhook's {"rejected": [...]} matters.
                let body = tokio::time::timeout(self.settings.http.request_timeout, response.bytes()).await;
                let body = body.ok().and_then(Result::ok).unwrap_or_default();
                Answer::Status(status, headers, body.slice(..body.len().min(64 * 1024)))
            }
            Err(error) => {
                // reqwest errors name the URL: drop it, it is a secret.
                tracing::debug!(origin = %order.target.origin(), error = %error.without_url(), "push service did not answer");
                Answer::NoAnswer
            }
        }
    }

    fn build(&self, order: &WakeOrder, empty_body: bool) -> Result<reqwest::RequestBuilder, Error> {
        let payload = serde_json::json!({ "v": 1, "log_end": order.log_end }).to_string();
        match &order.target {
            PushTarget::WebPush { endpoint, p256dh, auth } => {
                let http = &self.settings.http;
                let authorization = self.vapid.authorization(
                    order.target.origin(),
                    &self.settings.vapid.subject,
                    self.settings.vapid.token_lifetime,
                );
                let request = self
                    .client
                    .post(endpoint)
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
            PushTarget::Webhook { url, app_id, pushkey } => {
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

    fn webhook_rejected(&self, target: &PushTarget, body: &[u8]) -> bool {
        let PushTarget::Webhook { pushkey, .. } = target else { return false };
        let Ok(answer) = serde_json::from_slice::<serde_json::Value>(body) else { return false };
        let rejected = answer.get("rejected").and_then(|r| r.as_array());
        rejected.is_some_and(|keys| keys.iter().any(|key| key.as_str() == Some(pushkey)))
    }

    async fn publish(&self, order: &WakeOrder, at_ms: i64, body: EventBody) {
        let event = Event { user_id: order.user_id.clone(), node_id: self.worker_id.clone(), at_ms, body };
        if let Err(error) = self.publisher.publish(&event).await {
            tracing::warn!(user_id = %order.user_id, device_id = %order.device_id, %error, "cannot publish wake-up event");
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
