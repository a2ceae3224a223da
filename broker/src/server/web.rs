//! Browsers: gRPC-Web on the gRPC port, and CORS closed to every origin but the listed ones
//! (`web.allowed_origins`).
//!
//! The layers, outermost first: [`PreflightGate`] refuses a preflight (`OPTIONS`) from an
//! origin not listed, with 403 and no CORS headers; tower-http's CORS layer answers the
//! listed origins' preflights and adds `access-control-allow-origin` (and the exposed
//! `grpc-status`, `grpc-message`, … headers) to their calls; tonic-web turns a gRPC-Web call
//! into a gRPC one and its answer back (trailers into the body). Inside them the guard and
//! the services see an ordinary gRPC call: the same authentication, limits and error mapping.
//! A call from an unlisted origin is not refused here (a browser sends `origin` on its
//! same-origin posts too): without the allow header, a page of another origin cannot read it.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderName, HeaderValue, Method, StatusCode, header};
use tonic::body::Body;
use tower::{Layer, Service};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::settings::WebSettings;

/// Headers a browser page may send on its calls.
const REQUEST_HEADERS: &[&str] = &[
    "authorization",
    "content-type",
    "grpc-timeout",
    "traceparent",
    "x-grpc-web",
    "x-user-agent",
    "x-lockstep-registration-secret",
];

/// Headers a browser page may read from the answers (gRPC-Web's trailers-only answers carry
/// the status in headers).
const EXPOSED_HEADERS: &[&str] = &[
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    lockstep_proto::retry::RETRYABLE_METADATA,
    lockstep_proto::retry::RETRY_AFTER_METADATA,
];

/// The CORS layer of `settings`: only the listed origins, POST, the headers above.
pub fn cors_layer(settings: &WebSettings) -> CorsLayer {
    let names =
        |names: &'static [&'static str]| names.iter().map(|name| HeaderName::from_static(name)).collect::<Vec<_>>();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(allowed_origins(settings).iter().cloned()))
        .allow_methods([Method::POST])
        .allow_headers(names(REQUEST_HEADERS))
        .expose_headers(names(EXPOSED_HEADERS))
        .max_age(settings.preflight_max_age)
}

/// The origins of `settings` as header values (validated with the settings; one that is
/// not a header value is left out).
fn allowed_origins(settings: &WebSettings) -> Arc<[HeaderValue]> {
    settings.allowed_origins.iter().filter_map(|origin| HeaderValue::from_str(origin).ok()).collect()
}

/// Refuses preflights from origins not in `web.allowed_origins`.
#[derive(Clone)]
pub struct PreflightGateLayer {
    allowed: Arc<[HeaderValue]>,
}

impl PreflightGateLayer {
    pub fn new(settings: &WebSettings) -> Self {
        Self { allowed: allowed_origins(settings) }
    }
}

impl<S> Layer<S> for PreflightGateLayer {
    type Service = PreflightGate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PreflightGate { inner, allowed: self.allowed.clone() }
    }
}

#[derive(Clone)]
pub struct PreflightGate<S> {
    inner: S,
    allowed: Arc<[HeaderValue]>,
}

impl<S> PreflightGate<S> {
    fn admits<B>(&self, request: &http::Request<B>) -> bool {
        if request.method() != Method::OPTIONS {
            return true;
        }
        request.headers().get(header::ORIGIN).is_some_and(|origin| self.allowed.contains(origin))
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for PreflightGate<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if self.admits(&request) {
            return Box::pin(self.inner.call(request));
        }
        tracing::debug!(origin = ?request.headers().get(header::ORIGIN), "preflight refused: origin not in web.allowed_origins");
        let mut refused = http::Response::new(Body::empty());
        *refused.status_mut() = StatusCode::FORBIDDEN;
        Box::pin(std::future::ready(Ok(refused)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preflight(origin: Option<&str>) -> http::Request<()> {
        let mut request = http::Request::builder().method(Method::OPTIONS).uri("/lockstep.v1.Sync/Push");
        if let Some(origin) = origin {
            request = request.header(header::ORIGIN, origin);
        }
        request.body(()).unwrap()
    }

    #[test]
    fn only_listed_origins_pass_the_preflight_gate() {
        let settings = WebSettings { allowed_origins: vec!["https://app.example".into()], ..Default::default() };
        let gate = PreflightGateLayer::new(&settings).layer(());
        assert!(gate.admits(&preflight(Some("https://app.example"))));
        assert!(!gate.admits(&preflight(Some("https://evil.example"))));
        assert!(!gate.admits(&preflight(Some("https://app.example.evil"))));
        assert!(!gate.admits(&preflight(None)));
        let post = http::Request::builder().method(Method::POST).header(header::ORIGIN, "https://evil.example");
        assert!(gate.admits(&post.body(()).unwrap()), "calls pass; CORS leaves them unreadable");
        let closed = PreflightGateLayer::new(&WebSettings::default()).layer(());
        assert!(!closed.admits(&preflight(Some("https://app.example"))), "closed by default");
    }
}
