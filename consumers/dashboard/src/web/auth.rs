//! Who may read the dashboard, checked before every handler:
//!
//! - **Host.** A request whose `Host` is not a loopback name or address, the
//!   listen address or one of `allowed_hosts` is refused (421): a web page that
//!   rebinds its own DNS name to 127.0.0.1 would otherwise read a dashboard that
//!   needs no token on loopback.
//! - **Admin token** (when one is set): `Authorization: Bearer <token>` (scripts,
//!   Prometheus), or the session cookie that signing in at `/login` (a POST form)
//!   sets. The cookie holds a value derived from the token (HMAC-SHA256), never the
//!   token itself, and is HttpOnly, SameSite=Strict and, over TLS, Secure. A token
//!   in the URL is not accepted: URLs end up in browser history and proxy logs.

use std::{net::IpAddr, sync::Arc};

use axum::{
    Form,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::Next,
    response::{Html, IntoResponse, Redirect, Response},
};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::html;
use crate::{App, settings::Settings};

/// The cookie that carries the session after signing in.
pub const SESSION_COOKIE: &str = "lockstep_session";

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The session value of `admin_token`: knowing it does not reveal the token, and it
/// changes when the token does.
pub fn session_value(admin_token: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(admin_token.as_bytes()).expect("hmac takes keys of any length");
    mac.update(b"lockstep-dashboard session v1");
    hex::encode(mac.finalize().into_bytes())
}

/// The host part of a `Host` header: without the port, an IPv6 address without brackets.
fn host_name(host: &str) -> &str {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(inside, _)| inside);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|byte| byte.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Whether a request naming `host` (its `Host` header) is for this dashboard.
pub fn host_allowed(settings: &Settings, host: &str) -> bool {
    let name = host_name(host).trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    if let Ok(ip) = name.parse::<IpAddr>() {
        let listen_ip = settings.listen_addr.ip();
        if ip.to_canonical().is_loopback() || (!listen_ip.is_unspecified() && ip == listen_ip) {
            return true;
        }
    }
    settings.allowed_hosts.iter().any(|allowed| {
        let allowed = allowed.trim().trim_matches(['[', ']']).trim_end_matches('.');
        allowed.eq_ignore_ascii_case(&name)
    })
}

pub async fn require_allowed_host(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    // HTTP/1.1 has `Host`; HTTP/2 the URI's authority.
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .or_else(|| request.uri().authority().map(|authority| authority.as_str()));
    match host {
        Some(host) if host_allowed(&app.settings, host) => next.run(request).await,
        _ => {
            tracing::debug!(host, "request refused: host not allowed");
            (
                StatusCode::MISDIRECTED_REQUEST,
                "this dashboard does not answer to that host name (add it to allowed_hosts)\n",
            )
                .into_response()
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).map(str::trim)
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers.get_all(header::COOKIE).iter().filter_map(|value| value.to_str().ok()).find_map(|cookies| {
        cookies
            .split(';')
            .find_map(|pair| pair.trim().strip_prefix(SESSION_COOKIE).and_then(|rest| rest.strip_prefix('=')))
    })
}

/// Whether `headers` carry the admin token or the session derived from it.
pub fn authorized(headers: &HeaderMap, admin_token: &str) -> bool {
    if let Some(token) = bearer(headers) {
        return constant_time_eq(token.as_bytes(), admin_token.as_bytes());
    }
    session_cookie(headers)
        .is_some_and(|session| constant_time_eq(session.as_bytes(), session_value(admin_token).as_bytes()))
}

pub async fn require_token(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let Some(admin_token) = app.settings.admin_token.as_deref() else {
        return next.run(request).await;
    };
    if authorized(request.headers(), admin_token) {
        return next.run(request).await;
    }
    let path = request.uri().path();
    if path == "/" || path.starts_with("/users/") {
        // A person with a browser: the sign-in form.
        return (StatusCode::UNAUTHORIZED, Html(html::login_page(None))).into_response();
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "admin token required: Authorization: Bearer <token>, or sign in at /login\n",
    )
        .into_response()
}

pub async fn login_form() -> Html<String> {
    Html(html::login_page(None))
}

#[derive(Deserialize)]
pub struct Login {
    token: String,
}

/// Whether the request reached us over TLS (a proxy in front says so).
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"))
}

pub async fn login(State(app): State<Arc<App>>, headers: HeaderMap, Form(login): Form<Login>) -> Response {
    let Some(admin_token) = app.settings.admin_token.as_deref() else {
        return Redirect::to("/").into_response();
    };
    if !constant_time_eq(login.token.trim().as_bytes(), admin_token.as_bytes()) {
        return (StatusCode::UNAUTHORIZED, Html(html::login_page(Some("wrong admin token")))).into_response();
    }
    let secure = if app.settings.secure_cookie || over_tls(&headers) { "; Secure" } else { "" };
    let cookie = format!("{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict{secure}", session_value(admin_token));
    let mut response = Redirect::to("/").into_response();
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_loopback_the_listen_address_or_configured() {
        let mut settings = Settings::default();
        for allowed in ["127.0.0.1:8090", "localhost:8090", "LOCALHOST", "[::1]:8090", "127.0.0.2", "app.localhost"] {
            assert!(host_allowed(&settings, allowed), "{allowed}");
        }
        for refused in ["evil.example:8090", "evil.example", "localhost.evil.example", "192.0.2.1:8090", "", "[::2]"] {
            assert!(!host_allowed(&settings, refused), "{refused}");
        }
        settings.allowed_hosts = vec!["Dashboard".into(), "2001:db8::5".into()];
        assert!(host_allowed(&settings, "dashboard:8090"));
        assert!(host_allowed(&settings, "[2001:db8::5]:8090"));
        settings.listen_addr = "192.0.2.1:8090".parse().unwrap();
        assert!(host_allowed(&settings, "192.0.2.1:8090"), "the listen address");
        settings.listen_addr = "0.0.0.0:8090".parse().unwrap();
        assert!(!host_allowed(&settings, "0.0.0.0:8090") && !host_allowed(&settings, "192.0.2.1"));
    }

    #[test]
    fn the_session_is_derived_from_the_token_and_the_token_is_not_in_it() {
        let token = "a-long-enough-admin-token";
        let session = session_value(token);
        assert!(!session.contains(token));
        assert_ne!(session, session_value("another-long-admin-token"));
        let mut headers = HeaderMap::new();
        assert!(!authorized(&headers, token));
        headers.insert(header::COOKIE, format!("other=1; {SESSION_COOKIE}={session}").parse().unwrap());
        assert!(authorized(&headers, token));
        headers.insert(header::COOKIE, format!("{SESSION_COOKIE}={token}").parse().unwrap());
        assert!(!authorized(&headers, token), "the raw token is not a session");
        headers.insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        assert!(authorized(&headers, token));
        headers.insert(header::AUTHORIZATION, "Bearer wrong".parse().unwrap());
        assert!(!authorized(&headers, token));
    }
}
