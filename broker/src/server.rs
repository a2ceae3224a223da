//! Assembles the server: opens the accounts database, connects to Kafka,
//! and serves the `lockstep.v1` gRPC services (plus health and reflection)
//! until `shutdown` resolves; then ends device streams, drains requests and
//! flushes the producer, in that order.

mod api;
pub mod connections;
pub mod erasure;
pub mod guard;
mod keys_api;
pub mod rate_limit;
pub mod tls;
pub mod web;

use std::{future::Future, net::SocketAddr, time::Duration};

use lockstep_proto::{
    FILE_DESCRIPTOR_SET,
    v1::{
        accounts_server::AccountsServer, keys_server::KeysServer, push_targets_server::PushTargetsServer,
        sync_server::SyncServer,
    },
};
use tokio::net::TcpListener;
use tower::layer::util::{Identity, Stack};

pub use api::{AccountsApi, PushTargetsApi, SyncApi};
pub use keys_api::KeysApi;

use erasure::Erasure;

use crate::{
    accounts::{Accounts, AccountsError},
    db::DbError,
    delivery::{Delivery, log_guard::LogGuard},
    events::{Events, Publisher},
    gateway::{DedupIndex, Gateway},
    kafka::group_offsets::security::KafkaSecurity,
    kafka::{GroupOffsets, GroupOffsetsSettings, KafkaClients, KafkaError, Producer, ReaderPool, Topics},
    keys::{KeyDirectory, KeysError},
    push_targets::PushTargets,
    settings::Settings,
    shutdown::{ShutdownController, ShutdownSource, ShutdownTrigger},
    store::Store,
};

/// How long start-up waits for Kafka to answer.
const KAFKA_STARTUP_DEADLINE: Duration = Duration::from_secs(60);
/// The part of `limits.drain_deadline` kept for flushing the producer and the
/// events once the calls are done: a quarter, at most 2 s.
fn flush_share(drain_deadline: Duration) -> Duration {
    (drain_deadline / 4).min(Duration::from_secs(2))
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Accounts(#[from] AccountsError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Keys(#[from] KeysError),
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("grpc reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("cannot resume account deletions: {0}")]
    Erasure(String),
    #[error("cannot listen on the admin address {addr}: {source}")]
    AdminListen { addr: String, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(
        "refusing to listen on {addr} without TLS: device tokens would cross the network in the clear; set \
         tls.cert_file and tls.key_file, or tls.allow_plaintext = true (LOCKSTEP_TLS__ALLOW_PLAINTEXT=true) when a \
         proxy in front terminates TLS"
    )]
    PlaintextBeyondLoopback { addr: SocketAddr },
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct App {
    pub settings: Settings,
    pub accounts: Accounts,
    pub topics: Topics,
    pub gateway: Gateway,
    pub delivery: Delivery,
    pub events: Events,
    pub push_targets: PushTargets,
    pub keys: KeyDirectory,
    pub erasure: Erasure,
    /// The rate limits, shared by the guard layer and the CreateAccount handler.
    pub rates: std::sync::Arc<rate_limit::Rates>,
}

/// What `run` stops after the requests drained.
pub struct Background {
    pub producer: Producer,
    pub publisher: Option<Publisher>,
}

impl App {
    pub async fn start(settings: Settings, shutdown: ShutdownSource) -> Result<(Self, Background), ServerError> {
        let store = Store::open(&settings.data_dir, &settings.database).await?;
        let mirrored = store.mirror_users_locally().await?;
        tracing::info!(engine = store.engine(), accounts = mirrored, "accounts database open");
        let db = store.clone();
        let accounts = Accounts::open(store.clone(), settings.accounts.pairing_ticket_ttl)
            .await?
            .with_max_devices(settings.accounts.max_devices_per_account)
            .with_token_recheck(settings.accounts.token_recheck_interval)
            .with_invite_claim_lease(settings.limits.request_timeout);
        let keys = KeyDirectory::open(db.clone()).await?;
        let kafka = &settings.kafka;
        let topics = Topics::new(kafka)?;
        tracing::info!(bootstrap_servers = %kafka.bootstrap_servers, "waiting for kafka");
        topics.wait_until_reachable(KAFKA_STARTUP_DEADLINE).await?;
        let producer = Producer::new(kafka)?;
        let (events, publisher) = Publisher::start(&settings)?;
        let readers = ReaderPool::new(kafka, settings.delivery.catchup_readers)?;
        let offsets = GroupOffsets::connect(GroupOffsetsSettings {
            bootstrap_servers: kafka.bootstrap_servers.clone(),
            client_id: "lockstep-offsets".into(),
            request_timeout: kafka.request_timeout,
            max_attempts: 5,
            security: KafkaSecurity::from_client_config(&kafka.client_config).map_err(KafkaError::from)?,
        })
        .await
        .map_err(KafkaError::from)?;
        let guard = LogGuard::new(db.clone());
        let clients =
            KafkaClients { producer: producer.clone(), topics: topics.clone(), readers, offsets: offsets.clone() };
        let delivery = Delivery::new(&clients, &store, guard.clone(), events.clone(), shutdown.clone(), &settings);
        // The dedup index is in the store: with PostgreSQL every node sees it, and a change is
        // reserved there before it is produced (`gateway::reservation`).
        let dedup = DedupIndex::new(store.clone());
        let dedup = if store.is_shared() {
            let node = Some(events.node_id()).filter(|id| !id.is_empty()).unwrap_or("node");
            let holder = format!("{node}/{:016x}", rand::random::<u64>());
            tracing::info!(holder, lease = ?settings.database.push_reservation_lease, "push reservations in the shared store");
            dedup.with_reservations(&holder, settings.database.push_reservation_lease)
        } else {
            dedup
        };
        let log_guard = guard.clone();
        let shutdown_for_sweep = shutdown.clone();
        let gateway =
            Gateway::new(&clients, dedup, delivery.clone(), guard, events.clone(), shutdown.clone(), &settings);
        // Validated with the settings: an error here cannot happen.
        let target_policy =
            crate::push_targets::TargetPolicy::allowing(&settings.push.allow_private_targets).unwrap_or_default();
        let push_targets = PushTargets::new(db.clone(), events.clone(), target_policy);
        let erasure = Erasure::new(
            db,
            accounts.clone(),
            delivery.clone(),
            events.clone(),
            topics.clone(),
            offsets,
            settings.kafka.clone(),
            shutdown.clone(),
        );
        erasure.resume().await.map_err(|error| ServerError::Erasure(error.to_string()))?;
        if events.is_enabled() {
            tokio::spawn(announce(
                delivery.clone(),
                push_targets.clone(),
                settings.events.lease_interval,
                shutdown.clone(),
            ));
            let events_kafka = crate::events::events_kafka(&settings);
            let followed = crate::push_targets::follower::Followed {
                push_targets: push_targets.clone(),
                accounts: accounts.clone(),
                delivery: delivery.clone(),
                node_id: events.node_id().to_owned(),
            };
            tokio::spawn(crate::push_targets::follower::run(settings.clone(), events_kafka, followed, shutdown));
        }
        tokio::spawn(forget_idle_state(
            gateway.clone(),
            delivery.clone(),
            log_guard,
            settings.limits.idle_state_after,
            shutdown_for_sweep,
        ));
        let rates = std::sync::Arc::new(rate_limit::Rates::new(&settings.rate_limits));
        let app = Self { settings, accounts, topics, gateway, delivery, events, push_targets, erasure, keys, rates };
        Ok((app, Background { producer, publisher }))
    }
}

/// How often every stored push target is announced again on the events topic.
const TARGETS_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(6 * 3600);

/// Renews the connected leases of this node's streams every `lease_interval`,
/// and announces the stored push targets at start and every few hours, until
/// shutdown begins.
async fn announce(delivery: Delivery, push_targets: PushTargets, lease_interval: Duration, shutdown: ShutdownSource) {
    let Some(mut running) = shutdown.handle() else { return };
    let mut leases = tokio::time::interval(lease_interval);
    let mut targets = tokio::time::interval(TARGETS_ANNOUNCE_INTERVAL);
    leases.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = leases.tick() => delivery.renew_leases(),
            _ = targets.tick() => match push_targets.announce_all().await {
                Ok(count) => tracing::debug!(count, "push targets announced"),
                Err(error) => tracing::warn!(%error, "cannot announce push targets"),
            },
            () = running.begun() => return,
        }
    }
}

/// Every so often, forgets per-device and per-user state unused for
/// `idle_after` (see `crate::idle`), and reports how much is held.
async fn forget_idle_state(
    gateway: Gateway,
    delivery: Delivery,
    guard: LogGuard,
    idle_after: Duration,
    shutdown: ShutdownSource,
) {
    let Some(mut running) = shutdown.handle() else { return };
    let mut sweeps = tokio::time::interval((idle_after / 4).clamp(Duration::from_millis(250), Duration::from_secs(60)));
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sweeps.tick() => {}
            () = running.begun() => return,
        }
        let devices = delivery.evict_idle(idle_after);
        let users = gateway.evict_idle(idle_after);
        let (marks, generations) = guard.evict_idle(idle_after);
        let forgotten = [
            ("device_offsets", devices),
            ("user_pushes", users),
            ("log_marks", marks),
            ("device_generations", generations),
        ];
        if forgotten.iter().any(|(_, count)| *count > 0) {
            tracing::debug!(?forgotten, "idle state forgotten");
        }
        for (kind, count) in forgotten {
            metrics::counter!("lockstep_idle_state_forgotten_total", "kind" => kind).increment(count as u64);
        }
        let (marks, generations) = guard.state_entries();
        let held = delivery.state_entries().into_iter().chain([
            ("user_pushes", gateway.state_entries()),
            ("log_marks", marks),
            ("device_generations", generations),
        ]);
        for (kind, count) in held {
            metrics::gauge!("lockstep_state_entries", "kind" => kind).set(count as f64);
        }
    }
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    refuse_plaintext_beyond_loopback(&settings, listener.local_addr().ok())?;
    let tls_store = check_before_kafka(&settings)?;
    let controller = ShutdownController::default();
    let (app, background) = App::start(settings, controller.source()).await?;
    let admin_stop_tx = start_admin(&app).await?;
    let (router, health_reporter) = grpc_router(&app).await?;
    let (stop_rx, began_rx) = watch_for_shutdown(shutdown, health_reporter, controller.trigger(), app.delivery.clone());
    let drain_deadline = app.settings.limits.drain_deadline;
    serve(router, listener, tls_store, &app, stop_rx, began_rx.clone(), drain_deadline).await?;
    drop(app);
    shut_down(controller, background, &began_rx, drain_deadline).await;
    let _ = admin_stop_tx.send(());
    tracing::info!("stopped");
    Ok(())
}

/// A server that listens beyond loopback serves TLS, or says it means not to
/// (`tls.allow_plaintext`, e.g. behind a proxy that terminates TLS): device tokens and
/// registration secrets travel in its requests' headers.
fn refuse_plaintext_beyond_loopback(settings: &Settings, local_addr: Option<SocketAddr>) -> Result<(), ServerError> {
    let addr = local_addr.unwrap_or(settings.listen_addr);
    if settings.tls.enabled() || addr.ip().is_loopback() {
        return Ok(());
    }
    if settings.tls.allow_plaintext {
        tracing::warn!(%addr, "listening beyond loopback without tls (tls.allow_plaintext)");
        return Ok(());
    }
    Err(ServerError::PlaintextBeyondLoopback { addr })
}

/// What can be refused before the server touches Kafka: a bad certificate stops it; a
/// registration policy that surprises is logged.
fn check_before_kafka(settings: &Settings) -> Result<Option<std::sync::Arc<tls::CertStore>>, ServerError> {
    let tls_store = match settings.tls.enabled() {
        true => Some(tls::CertStore::load(&settings.tls)?),
        false => None,
    };
    let accounts = &settings.accounts;
    if accounts.allow_registration && accounts.registration_secret.is_none() {
        match (accounts.allow_open_registration, settings.listen_addr.ip().is_loopback()) {
            (true, false) => tracing::warn!("registration is open: anyone who reaches this server can create accounts"),
            (false, false) => tracing::warn!(
                "no accounts.registration_secret: this server, listening beyond loopback, takes no new accounts"
            ),
            _ => {}
        }
    }
    Ok(tls_store)
}

/// Starts the admin endpoints (when `admin_listen_addr` is set); they stop when the
/// returned sender is used (or dropped), last of all.
async fn start_admin(app: &App) -> Result<tokio::sync::oneshot::Sender<()>, ServerError> {
    crate::admin::install();
    let admin_addr = app.settings.admin_listen_addr;
    let admin_listener = crate::admin::bind(admin_addr).await.map_err(|source| ServerError::AdminListen {
        addr: admin_addr.map(|addr| addr.to_string()).unwrap_or_default(),
        source,
    })?;
    let (admin_stop_tx, admin_stop_rx) = tokio::sync::oneshot::channel::<()>();
    if let Some(admin_listener) = admin_listener {
        if let Ok(addr) = admin_listener.local_addr() {
            tracing::info!(%addr, "admin endpoints (/metrics, /healthz, /readyz) listening");
            println!("LOCKSTEP_ADMIN_LISTENING {addr}");
        }
        let stop = async {
            let _ = admin_stop_rx.await;
        };
        tokio::spawn(crate::admin::serve(
            admin_listener,
            app.topics.clone(),
            app.delivery.clone(),
            app.events.clone(),
            stop,
        ));
    }
    Ok(admin_stop_tx)
}

/// The gRPC services with their message size caps, behind the guard layer; and the health
/// reporter that announces them.
async fn grpc_router(
    app: &App,
) -> Result<(tonic::transport::server::Router<GuardStack>, tonic_health::server::HealthReporter), ServerError> {
    let limits = &app.settings.limits;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<AccountsServer<AccountsApi>>().await;
    health_reporter.set_serving::<SyncServer<SyncApi>>().await;
    health_reporter.set_serving::<PushTargetsServer<PushTargetsApi>>().await;
    health_reporter.set_serving::<KeysServer<KeysApi>>().await;
    // Both forms of reflection: grpcurl speaks v1, while Python's grpcio-reflection, older grpcurl
    // and several GUI clients speak only v1alpha (and get UNIMPLEMENTED without it).
    let reflection =
        || tonic_reflection::server::Builder::configure().register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET);
    let (reflection_v1, reflection_v1alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);
    let max_message = limits.max_request_bytes as usize;
    let accounts_service = AccountsServer::new(AccountsApi::new(app.clone()))
        .max_decoding_message_size(64 * 1024)
        .max_encoding_message_size(max_message);
    let push_targets_service = PushTargetsServer::new(PushTargetsApi::new(app.clone()))
        .max_decoding_message_size(64 * 1024)
        .max_encoding_message_size(64 * 1024);
    // Up to MAX_SEALED_KEYS_PER_REQUEST sealed keys of about 200 bytes each.
    let keys_service = KeysServer::new(KeysApi::new(app.clone()))
        .max_decoding_message_size(256 * 1024)
        .max_encoding_message_size(1024 * 1024);
    let sync_service = SyncServer::new(SyncApi::new(app.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(limits.max_response_bytes());
    // HTTP/1.1 for gRPC-Web (browsers); the layers, outermost first: CORS (see `web`),
    // gRPC-Web to gRPC, then the guard every call passes.
    let web = &app.settings.web;
    let router = tonic::transport::Server::builder()
        .accept_http1(true)
        .max_concurrent_streams(limits.max_streams_per_connection)
        .concurrency_limit_per_connection(limits.max_concurrent_requests_per_connection as usize)
        .layer(web::PreflightGateLayer::new(web))
        .layer(web::cors_layer(web))
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(guard::GuardLayer::new(app.accounts.clone(), limits, app.rates.clone()))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(accounts_service)
        .add_service(sync_service)
        .add_service(push_targets_service)
        .add_service(keys_service);
    Ok((router, health_reporter))
}

/// The middleware every call passes, innermost first.
type GuardStack = Stack<
    guard::GuardLayer,
    Stack<tonic_web::GrpcWebLayer, Stack<tower_http::cors::CorsLayer, Stack<web::PreflightGateLayer, Identity>>>,
>;

/// When shutdown began (`None` before): the drain deadline counts from there.
type BeganRx = tokio::sync::watch::Receiver<Option<tokio::time::Instant>>;

/// On `shutdown`: Sync stops serving in health, every task learns shutdown began, device
/// streams end, and the server stops accepting (the returned receiver fires).
fn watch_for_shutdown(
    shutdown: impl Future<Output = ()> + Send + 'static,
    health_reporter: tonic_health::server::HealthReporter,
    trigger: ShutdownTrigger,
    delivery: Delivery,
) -> (tokio::sync::oneshot::Receiver<()>, BeganRx) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (began_tx, began_rx) = tokio::sync::watch::channel(None::<tokio::time::Instant>);
    tokio::spawn(async move {
        shutdown.await;
        let began = tokio::time::Instant::now();
        tracing::info!("shutting down: ending device streams");
        health_reporter.set_not_serving::<SyncServer<SyncApi>>().await;
        trigger.begin();
        delivery.shutdown();
        let _ = stop_tx.send(());
        let _ = began_tx.send(Some(began));
    });
    (stop_rx, began_rx)
}

/// Open calls get the drain deadline but the flushes' share; then their connections are dropped.
fn calls_deadline(drain_deadline: Duration) -> Duration {
    drain_deadline - flush_share(drain_deadline)
}

/// Serves on `listener` (TLS when a certificate is set) until shutdown began and the open
/// calls finished, or their share of the drain deadline ran out.
async fn serve(
    router: tonic::transport::server::Router<GuardStack>,
    listener: TcpListener,
    tls_store: Option<std::sync::Arc<tls::CertStore>>,
    app: &App,
    stop_rx: tokio::sync::oneshot::Receiver<()>,
    mut began_rx: BeganRx,
    drain_deadline: Duration,
) -> Result<(), ServerError> {
    let local_addr: Option<SocketAddr> = listener.local_addr().ok();
    let stop = async {
        let _ = stop_rx.await;
    };
    let limit = connections::ConnectionLimit::new(app.settings.limits.max_connections);
    let server: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> = match tls_store {
        Some(store) => {
            store.clone().watch(app.settings.tls.watch_interval);
            let incoming = tls::incoming(listener, tls::server_config(store), limit);
            Box::pin(router.serve_with_incoming_shutdown(incoming, stop))
        }
        None => {
            // TCP_NODELAY: a response goes out in several small writes (headers, data,
            // trailers); with Nagle on, the later ones wait for the client's delayed
            // ACK, about 40 ms per call.
            let incoming = tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60)));
            Box::pin(router.serve_with_incoming_shutdown(connections::limited(incoming, limit), stop))
        }
    };
    if let Some(addr) = local_addr {
        tracing::info!(%addr, tls = app.settings.tls.enabled(), "lockstep listening");
        // A machine-readable line on stdout, for scripts and tests that start the
        // server on port 0.
        println!("LOCKSTEP_LISTENING {addr}");
    }
    let calls_deadline = calls_deadline(drain_deadline);
    let deadline = async {
        // The sender lives until shutdown began: `Err` cannot happen before.
        let began = began_rx.wait_for(Option::is_some).await.map(|began| *began).ok().flatten();
        tokio::time::sleep_until(began.unwrap_or_else(tokio::time::Instant::now) + calls_deadline).await;
    };
    tokio::select! {
        served = server => served?,
        () = deadline => tracing::warn!(deadline = ?calls_deadline, "connections still open at the drain deadline: closed"),
    }
    Ok(())
}

/// After the last call: waits for the drained requests and streams (what is left of the
/// calls' share), then flushes the producer, then the events publisher, within the rest of
/// the drain deadline.
async fn shut_down(
    controller: ShutdownController,
    background: Background,
    began_rx: &BeganRx,
    drain_deadline: Duration,
) {
    let Background { producer, publisher } = background;
    let calls_deadline = calls_deadline(drain_deadline);
    let began = (*began_rx.borrow()).unwrap_or_else(tokio::time::Instant::now);
    let ends_at = began + drain_deadline;
    let left = || ends_at.saturating_duration_since(tokio::time::Instant::now());
    if !controller.drained((began + calls_deadline).saturating_duration_since(tokio::time::Instant::now())).await {
        tracing::warn!(deadline = ?calls_deadline, "pushes or streams still running at the drain deadline");
    }
    tracing::info!("requests drained: flushing the producer");
    if let Err(error) = producer.flush(left()).await {
        tracing::warn!(%error, "producer flush did not finish");
    }
    // Last: the facts of the drained requests and ended streams.
    if let Some(publisher) = publisher {
        publisher.drain(left()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_beyond_loopback_needs_allow_plaintext() {
        let mut settings = Settings::default();
        let addr = |text: &str| Some(text.parse::<SocketAddr>().unwrap());
        for loopback in ["127.0.0.1:50051", "[::1]:50051", "127.0.0.2:1"] {
            refuse_plaintext_beyond_loopback(&settings, addr(loopback)).expect(loopback);
        }
        for beyond in ["0.0.0.0:50051", "[::]:50051", "192.0.2.7:50051"] {
            let error = refuse_plaintext_beyond_loopback(&settings, addr(beyond)).unwrap_err().to_string();
            assert!(error.contains("tls.allow_plaintext") && error.contains("tls.cert_file"), "{error}");
        }
        settings.tls.allow_plaintext = true;
        refuse_plaintext_beyond_loopback(&settings, addr("0.0.0.0:50051")).expect("allowed");
        settings.tls.allow_plaintext = false;
        settings.tls.cert_file = Some("cert.pem".into());
        settings.tls.key_file = Some("key.pem".into());
        refuse_plaintext_beyond_loopback(&settings, addr("0.0.0.0:50051")).expect("tls");
    }
}
