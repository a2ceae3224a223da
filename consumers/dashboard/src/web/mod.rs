//! The HTTP side: the page (server-rendered HTML that reloads itself, no
//! JavaScript), the JSON API with the same data, `/metrics` and `/healthz`.
//! Everything but `/healthz` and `/login` needs the admin token when one is set,
//! and every request must name an allowed host (see `auth`).

mod auth;
mod html;

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    middleware,
    response::{Html, IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, Serialize};

use lockstep_kafka::locks::lock;

use crate::{App, fleet::DeviceView, now_ms, status::Status};

pub fn router(app: Arc<App>) -> Router {
    let protected = Router::new()
        .route("/", get(fleet_page))
        .route("/users/{user_id}", get(user_page))
        .route("/api/v1/devices", get(api_devices))
        .route("/api/v1/users/{user_id}", get(api_user))
        .route("/api/v1/summary", get(api_summary))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth::require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/login", get(auth::login_form).post(auth::login))
        .merge(protected)
        .layer(middleware::from_fn_with_state(app.clone(), auth::require_allowed_host))
        .with_state(app)
}

#[derive(Serialize)]
struct DevicesResponse {
    devices: Vec<DeviceView>,
}

#[derive(Debug, Default, Deserialize)]
pub struct DeviceFilter {
    /// A status name (e.g. `STALLED`), or several separated by commas.
    pub status: Option<String>,
    /// A user id.
    pub user: Option<String>,
    /// Most rows on the page (default `table_rows`).
    pub limit: Option<usize>,
}

impl DeviceFilter {
    fn statuses(&self) -> Result<Option<Vec<Status>>, String> {
        let Some(text) = self.status.as_deref().filter(|text| !text.trim().is_empty()) else {
            return Ok(None);
        };
        text.split(',')
            .map(|name| Status::parse(name).ok_or_else(|| format!("unknown status {:?}", name.trim())))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn apply(&self, views: Vec<DeviceView>) -> Result<Vec<DeviceView>, String> {
        let statuses = self.statuses()?;
        let user = self.user.as_deref().map(str::trim).filter(|user| !user.is_empty());
        Ok(views
            .into_iter()
            .filter(|view| statuses.as_ref().is_none_or(|wanted| wanted.contains(&view.status)))
            .filter(|view| user.is_none_or(|user| view.user_id == user))
            .collect())
    }
}

async fn healthz(State(app): State<Arc<App>>) -> impl IntoResponse {
    let applied = lock(&app.fleet).events_applied();
    format!("ok events_applied={applied}\n")
}

async fn fleet_page(State(app): State<Arc<App>>, Query(filter): Query<DeviceFilter>) -> Response {
    let now = now_ms();
    let (summary, views) = {
        let fleet = lock(&app.fleet);
        let views = fleet.devices(now, &app.settings.status);
        (fleet.summary(&views, now), views)
    };
    let shown = match filter.apply(views) {
        Ok(shown) => shown,
        Err(message) => return (StatusCode::BAD_REQUEST, message).into_response(),
    };
    let limit = filter.limit.unwrap_or(app.settings.table_rows);
    Html(html::fleet_page(&summary, &shown, limit, &filter, app.settings.page_refresh)).into_response()
}

async fn user_page(State(app): State<Arc<App>>, Path(user_id): Path<String>) -> Response {
    let view = lock(&app.fleet).user_view(&user_id, now_ms(), &app.settings.status);
    match view {
        Some(view) => Html(html::user_page(&view, now_ms(), app.settings.page_refresh)).into_response(),
        None => (StatusCode::NOT_FOUND, Html(html::not_found(&user_id))).into_response(),
    }
}

async fn api_devices(State(app): State<Arc<App>>, Query(filter): Query<DeviceFilter>) -> Response {
    let views = lock(&app.fleet).devices(now_ms(), &app.settings.status);
    match filter.apply(views) {
        // Serialized straight from the views (no intermediate JSON tree).
        Ok(devices) => Json(DevicesResponse { devices }).into_response(),
        Err(message) => (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": message }))).into_response(),
    }
}

async fn api_user(State(app): State<Arc<App>>, Path(user_id): Path<String>) -> Response {
    match lock(&app.fleet).user_view(&user_id, now_ms(), &app.settings.status) {
        Some(view) => Json(view).into_response(),
        None => (StatusCode::NOT_FOUND, Json(serde_json::json!({ "error": "unknown user" }))).into_response(),
    }
}

async fn api_summary(State(app): State<Arc<App>>) -> Response {
    let now = now_ms();
    let fleet = lock(&app.fleet);
    let views = fleet.devices(now, &app.settings.status);
    Json(fleet.summary(&views, now)).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    crate::record_status_gauges(&app);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}
