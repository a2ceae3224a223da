//! The gate in front of every handler, a tower layer that runs before tonic
//! reads a request's body:
//!
//! 1. **Authenticate first.** Every `lockstep.v1` call except the open ones
//!    ([`OPEN_RPCS`]) needs a valid device token in its headers; without one the
//!    call is answered UNAUTHENTICATED at once and its body is never read (HTTP/2
//!    flow control then stops the client after one window). Handlers check the
//!    token again (an in-memory lookup), so a device revoked while its body was
//!    still arriving is refused too.
//! 2. **Bound the work.** At most `limits.max_concurrent_requests` calls are in
//!    handlers at once across all connections, and
//!    `limits.max_concurrent_requests_per_device` of one device; at most
//!    `limits.max_inflight_push_bytes` of Push bodies are held at once, counted
//!    as the bytes arrive. Either limit sheds with RESOURCE_EXHAUSTED (retryable)
//!    and `x-lockstep-retry-after-ms`, which clients wait out before retrying.
//! 3. **Rate-limit** what an attacker would repeat (see `rate_limit`):
//!    CreateAccount and RedeemPairingTicket per peer address (an IPv4 address or
//!    an IPv6 /64), CreatePairingTicket, Push and the calls that cost database
//!    or Kafka work (push targets, Keys, ListDevices) per account; shed the same
//!    way, with the wait until the next token. CreateAccount's server-wide
//!    budget and its failed guesses are counted by the handler, which alone
//!    knows whether an invite code was good.
//! 4. **Time out.** A call (body upload included) that is not answered within
//!    `limits.request_timeout` ends UNAVAILABLE (retryable); a stream counts
//!    until its first message.

use std::{
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use lockstep_proto::retry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{
    Status,
    body::Body,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tower::{Layer, Service};

use super::rate_limit::{self, Rates, Source};
use crate::{
    accounts::{Accounts, AuthedDevice, CachedAuth},
    error::ApiError,
    settings::LimitsSettings,
    slots::KeyedSlots,
};
use lockstep_kafka::locks::lock;

/// Calls anyone may make without a device token.
pub const OPEN_RPCS: &[&str] = &[
    "/lockstep.v1.Accounts/CreateAccount",
    "/lockstep.v1.Accounts/RedeemPairingTicket",
    "/lockstep.v1.Sync/GetServerInfo",
];
const PUSH: &str = "/lockstep.v1.Sync/Push";
const CREATE_ACCOUNT: &str = "/lockstep.v1.Accounts/CreateAccount";
const REDEEM: &str = "/lockstep.v1.Accounts/RedeemPairingTicket";
const PAIRING_TICKET: &str = "/lockstep.v1.Accounts/CreatePairingTicket";
/// Calls that cost database or Kafka work per call (ListDevices: one Kafka lookup per device).
const DATABASE_CALLS: &[&str] =
    &["/lockstep.v1.Accounts/ListDevices", "/lockstep.v1.PushTargets/", "/lockstep.v1.Keys/"];
/// The services this gate guards; health and reflection stay open.
const GUARDED_PREFIX: &str = "/lockstep.v1.";
const MAX_TOKEN_CHARS: usize = 128;

struct Shared {
    accounts: Accounts,
    requests: Arc<Semaphore>,
    /// Calls in handlers per device (`limits.max_concurrent_requests_per_device`).
    device_calls: KeyedSlots,
    push_bytes: Arc<Semaphore>,
    request_timeout: Duration,
    retry_after: Duration,
    rates: Arc<Rates>,
}

#[derive(Clone)]
pub struct GuardLayer {
    shared: Arc<Shared>,
}

impl GuardLayer {
    pub fn new(accounts: Accounts, limits: &LimitsSettings, rates: Arc<Rates>) -> Self {
        Self {
            shared: Arc::new(Shared {
                accounts,
                requests: Arc::new(Semaphore::new(limits.max_concurrent_requests as usize)),
                device_calls: KeyedSlots::new(limits.max_concurrent_requests_per_device),
                push_bytes: Arc::new(Semaphore::new(limits.max_inflight_push_bytes as usize)),
                request_timeout: limits.request_timeout,
                retry_after: limits.retry_after,
                rates,
            }),
        }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guard { inner, shared: self.shared.clone() }
    }
}

#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// The device token from `authorization: Bearer <token>`, checked for shape only.
pub fn bearer_token(headers: &http::HeaderMap) -> Result<&str, ApiError> {
    let header = headers.get("authorization").ok_or_else(|| {
        ApiError::Unauthenticated("missing credentials: send `authorization: Bearer <device token>` metadata".into())
    })?;
    let value =
        header.to_str().map_err(|_| ApiError::Unauthenticated("authorization metadata is not readable text".into()))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| ApiError::Unauthenticated("authorization metadata must be `Bearer <device token>`".into()))?
        .trim();
    if token.is_empty() || token.len() > MAX_TOKEN_CHARS {
        return Err(ApiError::Unauthenticated("device token is malformed".into()));
    }
    Ok(token)
}

impl Shared {
    fn shed(&self, what: &str) -> Status {
        let mut status = Status::from(ApiError::ResourceExhausted(format!("the server is busy ({what}); retry later")));
        retry::set_retry_after(&mut status, self.retry_after);
        status
    }

    /// The rate limit of the call at `path`, if it has one.
    fn rate_limit(&self, path: &str, peer: Option<IpAddr>, user_id: Option<&Arc<str>>) -> Result<(), Status> {
        rate_limit(&self.rates, path, peer, user_id)
    }
}

/// The rate limit of the call at `path`, if it has one.
fn rate_limit(rates: &Rates, path: &str, peer: Option<IpAddr>, user_id: Option<&Arc<str>>) -> Result<(), Status> {
    let source = Source::of(peer);
    let (verdict, what) = match (path, user_id) {
        (CREATE_ACCOUNT, _) => (rates.create_account_per_address.check(&source), "new accounts"),
        (REDEEM, _) => (rates.redeem_per_address.check(&source), "pairing attempts"),
        (PAIRING_TICKET, Some(user)) => (rates.pairing_ticket_per_account.check(user), "pairing tickets"),
        (PUSH, Some(user)) => (rates.push_per_account.check(user), "pushes"),
        (path, Some(user)) if is_database_call(path) => {
            (rates.database_calls_per_account.check(user), "account and key lookups")
        }
        _ => (Ok(()), ""),
    };
    verdict.map_err(|wait| {
        tracing::debug!(path, ?peer, ?wait, "rate limited");
        rate_limit::exhausted(what, wait)
    })
}

fn is_database_call(path: &str) -> bool {
    DATABASE_CALLS.iter().any(|call| if call.ends_with('/') { path.starts_with(call) } else { path == *call })
}

/// The address of the peer that sent `request`, in the clear or through TLS.
fn peer_ip<B>(request: &http::Request<B>) -> Option<IpAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| extensions.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|info| info.get_ref().remote_addr()))
        .map(|addr| addr.ip())
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<http::Request<Body>> for Guard<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone is the one that was not made ready: take the ready one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let path = request.uri().path();
        if !path.starts_with(GUARDED_PREFIX) {
            return Box::pin(inner.call(request));
        }
        if OPEN_RPCS.contains(&path) {
            return admit(inner, shared, request, None);
        }
        let token = match bearer_token(request.headers()) {
            Ok(token) => token,
            Err(error) => return refuse(path, error.into()),
        };
        match shared.accounts.cached(token) {
            CachedAuth::Valid(device) => admit(inner, shared, request, Some(device)),
            CachedAuth::Refused => refuse(path, unknown_token().into()),
            // Paired through another node, or checked too long ago: the database decides.
            // A token this node never saw costs a query each: limited per address, so a
            // flood of made-up tokens cannot keep the shared database busy.
            unsure => {
                if unsure == CachedAuth::Unknown {
                    let source = Source::of(peer_ip(&request));
                    if let Err(wait) = shared.rates.unknown_token_lookups_per_address.check(&source) {
                        tracing::debug!(path, ?source, ?wait, "unknown-token lookups rate limited");
                        return refuse(path, rate_limit::exhausted("lookups of unknown device tokens", wait));
                    }
                }
                let token = token.to_owned();
                Box::pin(async move {
                    match shared.accounts.lookup(&token).await {
                        Ok(Some(device)) => admit(inner, shared, request, Some(device)).await,
                        Ok(None) => refuse(request.uri().path(), unknown_token().into()).await,
                        Err(error) => refuse(request.uri().path(), ApiError::from(error).into()).await,
                    }
                })
            }
        }
    }
}

fn unknown_token() -> ApiError {
    ApiError::Unauthenticated("unknown or revoked device token".into())
}

/// Answers `status` without calling the handler.
fn refuse<E: Send + 'static>(path: &str, status: Status) -> BoxFuture<Result<http::Response<Body>, E>> {
    if path == PUSH {
        // Pushes refused here never reach the handler, which counts the others.
        let code = crate::error::code_name(status.code());
        metrics::counter!("lockstep_pushes_total", "code" => code).increment(1);
    }
    Box::pin(std::future::ready(Ok(status.into_http())))
}

/// Rate limits, concurrency bounds and the timeout for a call whose caller (if it needs one)
/// was authenticated.
fn admit<S>(
    mut inner: S,
    shared: Arc<Shared>,
    mut request: http::Request<Body>,
    caller: Option<AuthedDevice>,
) -> BoxFuture<Result<http::Response<Body>, S::Error>>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    let path = request.uri().path().to_owned();
    let path = path.as_str();
    let refuse = |status: Status| refuse::<S::Error>(path, status);
    let user_id = caller.as_ref().map(|device| &device.user_id);
    if let Err(status) = shared.rate_limit(path, peer_ip(&request), user_id) {
        return refuse(status);
    }
    let device_call = match caller {
        Some(device) => match shared.device_calls.take(&device.device_id) {
            Ok(call) => Some(call),
            Err(_) => {
                tracing::debug!(path, "request shed: limits.max_concurrent_requests_per_device reached");
                return refuse(shared.shed("too many requests of this device in progress"));
            }
        },
        None => None,
    };
    let Ok(call_permit) = shared.requests.clone().try_acquire_owned() else {
        tracing::debug!(path, "request shed: limits.max_concurrent_requests reached");
        return refuse(shared.shed("too many requests in progress"));
    };
    // Push bodies count against the byte budget as they arrive; what they took is
    // given back when the call is answered (the decoded changes live until then).
    let held_bytes = Arc::new(Mutex::new(None::<OwnedSemaphorePermit>));
    if path == PUSH {
        request = request
            .map(|body| Body::new(BudgetedBody { inner: body, shared: shared.clone(), held: held_bytes.clone() }));
    }
    let timeout = shared.request_timeout;
    Box::pin(async move {
        let answered = tokio::time::timeout(timeout, inner.call(request)).await;
        drop(call_permit);
        drop(device_call);
        drop(held_bytes);
        match answered {
            Ok(response) => response,
            Err(_) => Ok(Status::from(ApiError::Unavailable(format!(
                "the request was not answered within {} s (limits.request_timeout)",
                timeout.as_secs()
            )))
            .into_http()),
        }
    })
}

/// A request body whose data frames take permits from the push byte budget.
struct BudgetedBody {
    inner: Body,
    shared: Arc<Shared>,
    held: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
}

impl HttpBody for BudgetedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            let Ok(len) = u32::try_from(data.len()) else {
                return Poll::Ready(Some(Err(self.shared.shed("push bytes in flight"))));
            };
            match self.shared.push_bytes.clone().try_acquire_many_owned(len) {
                Ok(permit) => {
                    let mut held = lock(&self.held);
                    match held.as_mut() {
                        Some(held) => held.merge(permit),
                        None => *held = Some(permit),
                    }
                }
                Err(_) => {
                    tracing::debug!("push shed: limits.max_inflight_push_bytes reached");
                    return Poll::Ready(Some(Err(self.shared.shed("push bytes in flight"))));
                }
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{Rate, RateLimitSettings};

    #[test]
    fn database_heavy_calls_share_one_bucket_per_account() {
        let settings =
            RateLimitSettings { database_calls_per_account: Rate { burst: 3, per_hour: 1 }, ..Default::default() };
        let rates = Rates::new(&settings);
        let (alice, bob): (Arc<str>, Arc<str>) = ("alice".into(), "bob".into());
        for path in [
            "/lockstep.v1.Accounts/ListDevices",
            "/lockstep.v1.Keys/ListDeviceKeys",
            "/lockstep.v1.PushTargets/SetPushTarget",
        ] {
            rate_limit(&rates, path, None, Some(&alice)).expect("within the burst");
        }
        let status = rate_limit(&rates, "/lockstep.v1.Keys/GetEpochKeys", None, Some(&alice)).unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(retry::retry_after(&status).is_some_and(|wait| wait >= Duration::from_secs(60)), "{status:?}");
        rate_limit(&rates, "/lockstep.v1.Keys/GetEpochKeys", None, Some(&bob)).expect("another account");
        for path in ["/lockstep.v1.Sync/Ack", "/lockstep.v1.Accounts/RevokeDevice", "/lockstep.v1.Sync/GetServerInfo"] {
            rate_limit(&rates, path, None, Some(&alice)).expect("not a database-heavy call");
        }
    }

    #[test]
    fn create_account_takes_only_the_per_address_bucket_here() {
        let settings = RateLimitSettings {
            create_account_per_address: Rate { burst: 1, per_hour: 1 },
            create_account_total: Rate { burst: 1, per_hour: 1 },
            ..Default::default()
        };
        let rates = Rates::new(&settings);
        let peer = |text: &str| Some(text.parse::<IpAddr>().unwrap());
        rate_limit(&rates, CREATE_ACCOUNT, peer("2001:db8::1"), None).expect("first call");
        assert!(rate_limit(&rates, CREATE_ACCOUNT, peer("2001:db8::ffff"), None).is_err(), "same /64");
        rate_limit(&rates, CREATE_ACCOUNT, peer("2001:db8:0:1::1"), None).expect("another /64");
        // The server-wide budget is the handler's, for admitted calls only.
        rates.create_account_total.check(&()).expect("untouched by the guard");
    }
}
