//! The sync loop: push the outbox, subscribe, apply, ack.
//!
//! - The outbox goes up in batches sized by the server's limits; a change
//!   leaves the outbox only when the server reported its offset (or that it
//!   had it already). A crash in between re-pushes it with the same change id,
//!   which the server answers with the first offset.
//! - Incoming batches are decrypted and merged in one local transaction; the
//!   offset is acked to the server only after that transaction committed.
//! - A change is sealed once, before its first push, and every retry sends
//!   the same bytes (see `store::outbox`).
//! - A Resync, a DATA_LOSS (the server's log lost changes) or a cursor past
//!   the log end rebuild from the log start without deleting anything, and push
//!   back what the log lacks ([`receive`], `store::resync`).
//! - Every unary call has a deadline; a Subscribe stream that stays silent for
//!   three heartbeat intervals is dead. Whether to retry is the server's
//!   verdict ([`lockstep_proto::retry::is_retryable`]).

pub mod account;
mod devices;
mod keys;
pub mod push_target;
mod receive;
mod registration;

use std::{str::FromStr, time::Duration};

use lockstep_proto::{
    retry::{is_retryable, retry_after},
    v1::{
        Change, CreateAccountRequest, CreatePairingTicketRequest, GetServerInfoRequest, GetServerInfoResponse,
        PushRequest, RedeemPairingTicketRequest, accounts_client::AccountsClient, keys_client::KeysClient, push_result,
        sync_client::SyncClient,
    },
};
use rand::Rng;
use tonic::{
    Code, Request, Status,
    metadata::{Ascii, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use zeroize::Zeroizing;

pub use self::{
    devices::{list_devices, revoke_device},
    keys::KeySync,
    receive::Until,
    registration::{Registration, describe_mode, server_info},
};
use crate::crypto::AccountKey;
use crate::store::{Account, ResyncReason, Store, StoreError};

/// How long a unary call may take unless told otherwise (`--rpc-timeout`).
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// Pushes the server shed (busy, with a retry-after) retried within one `push` before it gives up.
const MAX_SHED_RETRIES: u32 = 3;
/// The decode limit when the server does not advertise `max_batch_bytes`.
const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot reach the server at {server}: {message}")]
    Connect { server: String, message: String },
    #[error("{call}: {}", describe(.status))]
    Rpc { call: &'static str, status: Status },
    #[error("the server ended the stream")]
    StreamEnded,
    #[error("the server sent nothing for {} s, not even a heartbeat: the connection is dead", .0.as_secs())]
    StreamIdle(Duration),
    #[error(
        "the server asked this device to rebuild from offset {log_start} again, with nothing delivered since the \
         last time: refusing to loop (a problem on the server's side; `lockstep-cli status` shows it)"
    )]
    ResyncLoop { log_start: i64 },
    /// Key material that does not check out (a device key without a valid proof, …).
    #[error("keys: {0}")]
    Keys(String),
    /// The server advertises a registration mode this request cannot meet (nothing was sent).
    #[error("{0}")]
    Registration(String),
    #[error(
        "changes sealed under key epoch {epoch} arrived, but no device of the account has shared that epoch's key \
         with this device yet: sync a device that has it (e.g. the one that paired this device), then sync again"
    )]
    MissingEpochKey { epoch: u32 },
}

fn describe(status: &Status) -> String {
    if let Some(causes) = transport_failure(status) {
        let hint = if PLAINTEXT_DIALED.load(std::sync::atomic::Ordering::Relaxed) {
            " (the connection broke before the server answered: a server that speaks TLS does this to a plaintext \
             client; if it does, its address starts with https://)"
        } else {
            " (the connection broke before the server answered; try again)"
        };
        return format!("{causes} ({:?}){hint}", status.code());
    }
    let hint = match status.code() {
        Code::Unauthenticated => {
            " (this device's token is not valid any more: it may have been revoked; pair it again)"
        }
        Code::Aborted => " (another sync or watch of this device is running)",
        Code::Unavailable => " (the server or its Kafka is unavailable; try again)",
        Code::PermissionDenied => " (a new account on this server needs an invite code or its registration secret)",
        Code::FailedPrecondition => " (the account's keys changed: sync again to fetch them)",
        _ => "",
    };
    format!("{} ({:?}){hint}", status.message(), status.code())
}

/// A failure below gRPC: a status tonic made from a broken connection (no server
/// sent it, so it has a source), as its message and the chain of its causes.
/// Alone, "transport error (Unknown)" told nobody what to do.
fn transport_failure(status: &Status) -> Option<String> {
    let source = std::error::Error::source(status)?;
    Some(with_causes(status.message().to_string(), Some(source)))
}

/// `message: cause: its cause…`, each cause once (the layers often repeat their inner error).
fn with_causes(mut message: String, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(inner) = source {
        let cause = inner.to_string();
        if !message.contains(&cause) {
            message = format!("{message}: {cause}");
        }
        source = inner.source();
    }
    message
}

impl SyncError {
    /// Whether trying again later may succeed: the server's verdict for its
    /// own answers, yes for a lost connection or a gap in what it sent.
    pub fn is_transient(&self) -> bool {
        match self {
            SyncError::Connect { .. } | SyncError::StreamEnded | SyncError::StreamIdle(_) => true,
            SyncError::Rpc { status, .. } => is_retryable(status),
            SyncError::Store(error) => error.is_transient(),
            SyncError::ResyncLoop { .. } | SyncError::Keys(_) | SyncError::Registration(_) => false,
            SyncError::MissingEpochKey { .. } => true,
        }
    }

    /// How long the server asked to wait before trying again, if it shed the call.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SyncError::Rpc { status, .. } => retry_after(status),
            _ => None,
        }
    }

    fn is_data_loss(&self) -> bool {
        matches!(self, SyncError::Rpc { status, .. } if status.code() == Code::DataLoss)
    }
}

fn rpc(call: &'static str) -> impl FnOnce(Status) -> SyncError {
    move |status| SyncError::Rpc { call, status: deadline_as_such(status) }
}

/// tonic reports a call that ran past its own deadline (`Request::set_timeout`)
/// as CANCELLED "Timeout expired", which no retry rule would retry: it is a
/// deadline, and the call may well succeed next time.
fn deadline_as_such(status: Status) -> Status {
    if status.code() == Code::Cancelled && status.message() == tonic::TimeoutExpired(()).to_string() {
        return Status::deadline_exceeded("no answer within the deadline (--rpc-timeout)");
    }
    status
}

/// Which certificate authorities an `https://` server's certificate must chain to.
#[derive(Debug, Clone, Default)]
pub enum Trust {
    /// The operating system's roots.
    #[default]
    SystemRoots,
    /// Only this CA (PEM), e.g. a self-hosted server's own CA (`--ca-file`).
    PinnedCa(Vec<u8>),
}

impl Trust {
    /// Pins the CA certificate(s) in the PEM file at `path`.
    pub fn ca_file(path: &std::path::Path) -> Result<Self, SyncError> {
        let pem = std::fs::read(path).map_err(|error| SyncError::Connect {
            server: String::new(),
            message: format!("cannot read the CA file {}: {error}", path.display()),
        })?;
        Ok(Self::PinnedCa(pem))
    }

    fn tls_config(&self) -> ClientTlsConfig {
        match self {
            Trust::SystemRoots => ClientTlsConfig::new().with_native_roots(),
            Trust::PinnedCa(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
        }
    }
}

/// Whether `http://` to a host other than loopback is allowed (off unless set).
static ALLOW_PLAINTEXT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Lets this process talk `http://` (no TLS) to hosts beyond loopback: the
/// device token and every change's metadata then cross the network in the
/// clear. For test networks only (`--allow-plaintext`, `LOCKSTEP_ALLOW_PLAINTEXT`).
pub fn allow_plaintext() {
    ALLOW_PLAINTEXT.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether this process dialed a server by `http://` (no TLS): a connection that
/// then breaks before any answer is most likely a TLS port, and the error says so.
/// Process-wide like [`allow_plaintext`]: the CLI talks to one server per process.
static PLAINTEXT_DIALED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `localhost`, `*.localhost`, 127.0.0.0/8 and `[::1]`.
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(address) => address.is_loopback(),
        Err(_) => {
            let host = host.trim_end_matches('.').to_ascii_lowercase();
            host == "localhost" || host.ends_with(".localhost")
        }
    }
}

/// A refusal of `http://` to a host beyond loopback, unless [`allow_plaintext`] was called.
fn plaintext_refusal(uri: &tonic::codegen::http::Uri) -> Option<String> {
    let beyond_loopback = uri.scheme_str() != Some("https") && !uri.host().is_some_and(is_loopback_host);
    (beyond_loopback && !ALLOW_PLAINTEXT.load(std::sync::atomic::Ordering::Relaxed)).then(|| {
        format!(
            "refusing to talk to {} without TLS: the device token would cross the network in the clear; use \
             https://{}… (or, on a test network only, --allow-plaintext / LOCKSTEP_ALLOW_PLAINTEXT=1)",
            uri.host().unwrap_or("the server"),
            uri.authority().map(|authority| authority.as_str()).unwrap_or_default()
        )
    })
}

/// A channel to `server`: `https://` with TLS, the server's certificate
/// checked against `trust`; `http://` in the clear only to loopback (tests, a
/// local proxy) unless [`allow_plaintext`] was called.
pub async fn connect(server: &str, trust: &Trust) -> Result<Channel, SyncError> {
    let fail = |message: String| SyncError::Connect { server: server.into(), message };
    let mut endpoint = Endpoint::from_str(server)
        .map_err(|error| fail(format!("not a server address ({error}); expected e.g. https://sync.example.org")))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if let Some(refusal) = plaintext_refusal(endpoint.uri()) {
        return Err(fail(refusal));
    }
    if endpoint.uri().scheme_str() == Some("https") {
        endpoint = endpoint.tls_config(trust.tls_config()).map_err(|error| fail(format!("tls: {error}")))?;
    } else if matches!(trust, Trust::PinnedCa(_)) {
        return Err(fail("a CA file was given but the server address is not https://".into()));
    } else {
        PLAINTEXT_DIALED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let tls = endpoint.uri().scheme_str() == Some("https");
    endpoint.connect().await.map_err(|error| {
        let message = with_causes(error.to_string(), std::error::Error::source(&error));
        // rustls read something that is not a TLS record: the port answers plaintext.
        if tls && message.contains("InvalidContentType") {
            return fail(format!(
                "{message} (the server does not answer in TLS: if it serves plaintext, its address starts with http://)"
            ));
        }
        fail(message)
    })
}

fn bearer(token: &str) -> Result<MetadataValue<Ascii>, SyncError> {
    format!("Bearer {token}").parse().map_err(|_| SyncError::Store(StoreError::Corrupt("device token".into())))
}

/// A W3C trace context every request of this process carries (`--traceparent`).
static TRACEPARENT: std::sync::OnceLock<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
    std::sync::OnceLock::new();

/// Makes every request carry `traceparent` (W3C trace context:
/// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`), so that a server
/// exporting traces continues the caller's trace. Set once per process.
pub fn send_traceparent(traceparent: &str) -> Result<(), String> {
    let parts: Vec<&str> = traceparent.split('-').collect();
    let hex = |part: &str, len: usize| part.len() == len && part.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = parts.len() == 4 && hex(parts[0], 2) && hex(parts[1], 32) && hex(parts[2], 16) && hex(parts[3], 2);
    if !valid {
        return Err(format!("not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>): {traceparent:?}"));
    }
    let value = traceparent.parse().map_err(|_| "not ASCII".to_string())?;
    TRACEPARENT.set(value).map_err(|_| "a traceparent was set already".to_string())
}

/// A request with the device's token; a unary one also with its deadline.
fn authed<T>(token: &str, message: T, deadline: Option<Duration>) -> Result<Request<T>, SyncError> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", bearer(token)?);
    if let Some(traceparent) = TRACEPARENT.get() {
        request.metadata_mut().insert("traceparent", traceparent.clone());
    }
    if let Some(deadline) = deadline {
        request.set_timeout(deadline);
    }
    Ok(request)
}

/// The decode limit for Subscribe messages: the server's largest batch with headroom.
fn max_message_bytes(max_batch_bytes: u32) -> usize {
    match max_batch_bytes as usize {
        0 => DEFAULT_MAX_MESSAGE_BYTES,
        batch => batch.saturating_add((batch / 4).max(1024 * 1024)),
    }
}

/// Creates an account on `server`: a user, this device, a new account key. Fails early,
/// without a CreateAccount, when the server says `registration` is not enough.
pub async fn create_account(
    server: &str,
    device_name: &str,
    registration: &Registration<'_>,
    rpc_timeout: Duration,
    trust: &Trust,
) -> Result<Account, SyncError> {
    // A server that cannot say (an error here) answers CreateAccount itself.
    if let Ok(info) = server_info(server, rpc_timeout, trust).await {
        if let Some(refusal) = registration::refusal(info.registration(), registration) {
            return Err(SyncError::Registration(refusal));
        }
    }
    let mut accounts = AccountsClient::new(connect(server, trust).await?);
    let invite_code = registration.invite_code.map(str::trim).unwrap_or_default().to_string();
    let mut request = Request::new(CreateAccountRequest { device_name: device_name.into(), invite_code });
    request.set_timeout(rpc_timeout);
    if let Some(secret) = registration.secret {
        let value = secret
            .parse()
            .map_err(|_| SyncError::Store(StoreError::Invalid("the registration secret must be ASCII".into())))?;
        request.metadata_mut().insert("x-lockstep-registration-secret", value);
    }
    let created = accounts.create_account(request).await.map_err(rpc("CreateAccount"))?.into_inner();
    Ok(Account {
        server: server.into(),
        user_id: created.user_id,
        device_id: created.device_id,
        device_name: device_name.into(),
        token: Zeroizing::new(created.device_token),
        key: AccountKey::generate(),
        key_epoch: 1,
        epoch_keys: Default::default(),
    })
}

/// Asks the server for a one-time pairing ticket for `account`.
pub async fn pairing_ticket(
    account: &Account,
    rpc_timeout: Duration,
    trust: &Trust,
) -> Result<(String, i64), SyncError> {
    let mut accounts = AccountsClient::new(connect(&account.server, trust).await?);
    let ticket = accounts
        .create_pairing_ticket(authed(&account.token, CreatePairingTicketRequest {}, Some(rpc_timeout))?)
        .await
        .map_err(rpc("CreatePairingTicket"))?
        .into_inner();
    Ok((ticket.ticket, ticket.expires_at_ms))
}

/// Redeems a ticket: this device joins the account of the device that issued it.
pub async fn redeem(
    server: &str,
    ticket: &str,
    key: AccountKey,
    device_name: &str,
    rpc_timeout: Duration,
    trust: &Trust,
) -> Result<Account, SyncError> {
    let mut accounts = AccountsClient::new(connect(server, trust).await?);
    let mut request =
        Request::new(RedeemPairingTicketRequest { ticket: ticket.into(), device_name: device_name.into() });
    request.set_timeout(rpc_timeout);
    let redeemed = accounts.redeem_pairing_ticket(request).await.map_err(rpc("RedeemPairingTicket"))?.into_inner();
    Ok(Account {
        server: server.into(),
        user_id: redeemed.user_id,
        device_id: redeemed.device_id,
        device_name: device_name.into(),
        token: Zeroizing::new(redeemed.device_token),
        key,
        key_epoch: 1,
        epoch_keys: Default::default(),
    })
}

/// Progress of a sync, for people watching it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Pushed {
        done: u64,
        total: u64,
    },
    Received {
        applied: u64,
        cursor: i64,
        log_end: Option<i64>,
    },
    Resync {
        log_start: i64,
        reason: ResyncReason,
    },
    /// Caught up after a rebuild: `repushed` records the log lacked are queued.
    Rebuilt {
        reason: ResyncReason,
        repushed: u64,
    },
    CaughtUp {
        cursor: i64,
    },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub pushed: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub received: u64,
    pub changed_records: u64,
    pub problems: u64,
    /// Incoming changes set aside until they can apply (`status`, `check`).
    pub deferred: u64,
    /// Changes set aside earlier that applied now.
    pub applied_from_deferred: u64,
    pub resyncs: u64,
    /// Why the device rebuilt from the log start, if it did.
    pub resync_reason: Option<ResyncReason>,
    /// The server's log lost changes; this device repaired it.
    pub log_lost: bool,
    /// Records pushed back because the log lacked them.
    pub repushed: u64,
    pub cursor: Option<i64>,
}

impl Report {
    /// What a person must know beyond the counts, if anything.
    pub fn notice(&self) -> Option<String> {
        let repushed = self.repushed;
        match self.resync_reason? {
            ResyncReason::LogLost => {
                Some(format!("the server's log lost changes; this device pushed back {repushed} records it holds"))
            }
            reason => Some(format!(
                "{}: this device rebuilt from the log start, kept every record and pushed back {repushed} records \
                 the log lacked",
                reason.describe()
            )),
        }
    }
}

/// One device's store and its connection to the server.
pub struct Syncer {
    pub store: Store,
    account: Account,
    connection: Option<(SyncClient<Channel>, GetServerInfoResponse)>,
    /// The Keys service on the same connection.
    keys: Option<KeysClient<Channel>>,
    rpc_timeout: Duration,
    trust: Trust,
}

impl Syncer {
    /// A syncer for the store's account; it connects when first needed.
    pub fn new(store: Store) -> Result<Self, SyncError> {
        let account = store.account()?;
        Ok(Self {
            store,
            account,
            connection: None,
            keys: None,
            rpc_timeout: DEFAULT_RPC_TIMEOUT,
            trust: Trust::default(),
        })
    }

    /// The CAs the server's certificate must chain to (for `https://` servers).
    pub fn with_trust(mut self, trust: Trust) -> Self {
        self.trust = trust;
        self
    }

    /// The deadline of every unary call, and of a Subscribe's first answer.
    pub fn with_rpc_timeout(mut self, rpc_timeout: Duration) -> Self {
        self.rpc_timeout = rpc_timeout;
        self
    }

    /// Drops the connection; the next call reconnects.
    pub fn disconnect(&mut self) {
        self.connection = None;
        self.keys = None;
    }

    async fn connection(&mut self) -> Result<(SyncClient<Channel>, GetServerInfoResponse), SyncError> {
        if let Some(connection) = &self.connection {
            return Ok(connection.clone());
        }
        let channel = connect(&self.account.server, &self.trust).await?;
        let limits = SyncClient::new(channel.clone())
            .get_server_info(authed(&self.account.token, GetServerInfoRequest {}, Some(self.rpc_timeout))?)
            .await
            .map_err(rpc("GetServerInfo"))?
            .into_inner();
        self.keys = Some(KeysClient::new(channel.clone()));
        let sync = SyncClient::new(channel).max_decoding_message_size(max_message_bytes(limits.max_batch_bytes));
        self.connection = Some((sync.clone(), limits.clone()));
        Ok((sync, limits))
    }

    pub fn account(&self) -> &Account {
        &self.account
    }

    /// Pushes the whole outbox. Stops at the first change the server could not
    /// take for now (it stays queued, in order).
    pub async fn push(&mut self, report: &mut Report, progress: &mut dyn FnMut(Progress)) -> Result<(), SyncError> {
        let total = self.store.outbox_len()? as u64;
        if total == 0 {
            return Ok(());
        }
        let (mut sync, limits) = self.connection().await?;
        let max_changes = (limits.max_changes_per_push as usize).clamp(1, 500);
        let byte_budget = (limits.max_request_bytes as usize / 2).max(64 * 1024);
        let mut done = 0;
        let mut refreshed_keys = false;
        loop {
            // Sealed and stored before the first attempt: a retry sends the same bytes.
            let entries = self.store.sealed_outbox_batch(max_changes)?;
            if entries.is_empty() {
                return Ok(());
            }
            let mut batch = Vec::with_capacity(entries.len());
            let mut changes = Vec::with_capacity(entries.len());
            let mut bytes = 0;
            for (entry, sealed) in &entries {
                let change = Change {
                    change_id: entry.change_id.clone(),
                    record_id: entry.record_id.clone(),
                    collection: entry.collection.clone(),
                    op: sealed.op,
                    hlc: sealed.hlc,
                    key_epoch: sealed.key_epoch,
                    nonce: sealed.nonce.clone().into(),
                    ciphertext: sealed.ciphertext.clone().into(),
                };
                if change.ciphertext.len() > limits.max_ciphertext_bytes as usize {
                    // The server would refuse the whole batch: keep this one aside, say so.
                    let reason = format!(
                        "record {} is {} bytes encrypted; this server takes at most {}",
                        entry.record_id,
                        change.ciphertext.len(),
                        limits.max_ciphertext_bytes
                    );
                    self.store.outbox_reject(entry.seq, &reason)?;
                    report.rejected += 1;
                    continue;
                }
                bytes += change.ciphertext.len() + 256;
                if !changes.is_empty() && bytes > byte_budget {
                    break;
                }
                batch.push(entry);
                changes.push(change);
            }
            if changes.is_empty() {
                continue;
            }
            let sent = changes.len();
            let mut shed = 0;
            let response = loop {
                let request =
                    authed(&self.account.token, PushRequest { changes: changes.clone() }, Some(self.rpc_timeout))?;
                match sync.push(request).await {
                    Ok(response) => break Some(response.into_inner()),
                    // The server was busy and said when to come back: wait that long, a few times.
                    Err(status) if shed < MAX_SHED_RETRIES && retry_after(&status).is_some() => {
                        shed += 1;
                        tokio::time::sleep(retry_after(&status).unwrap_or_default()).await;
                    }
                    // Sealed under an epoch older than the account's: fetch the new
                    // keys (which unseals those changes), seal again, push again.
                    Err(status) if status.code() == Code::FailedPrecondition && !refreshed_keys => {
                        tracing::info!(message = status.message(), "push refused under a stale key epoch");
                        refreshed_keys = true;
                        self.sync_keys_before_receiving().await?;
                        break None;
                    }
                    Err(status) => return Err(rpc("Push")(status)),
                }
            };
            let Some(response) = response else { continue };
            let mut acknowledged = Vec::with_capacity(sent);
            let mut stalled = None;
            for (entry, result) in batch.into_iter().zip(response.results) {
                match result.result {
                    Some(push_result::Result::Offset(_)) => {
                        acknowledged.push(entry.seq);
                        report.pushed += 1;
                        report.duplicates += u64::from(result.duplicate);
                    }
                    Some(push_result::Result::Error(error)) if error.retryable => {
                        stalled = Some(error.message);
                        break;
                    }
                    Some(push_result::Result::Error(error)) if error.code == Code::AlreadyExists as i32 => {
                        // The same change always carries the same bytes, so this is
                        // another change under the same id: a true collision.
                        let reason = format!(
                            "change id {} of record {} collides with a different change already in the log ({})",
                            entry.change_id, entry.record_id, error.message
                        );
                        self.store.outbox_reject(entry.seq, &reason)?;
                        report.rejected += 1;
                    }
                    Some(push_result::Result::Error(error)) => {
                        // Refused for good: keep it, out of the way, and say so.
                        self.store.outbox_reject(entry.seq, &error.message)?;
                        report.rejected += 1;
                    }
                    None => {
                        stalled = Some("the server sent an empty result".into());
                        break;
                    }
                }
            }
            self.store.outbox_done(&acknowledged)?;
            done += acknowledged.len() as u64;
            progress(Progress::Pushed { done, total: total.max(done) });
            if let Some(message) = stalled {
                return Err(SyncError::Rpc { call: "Push", status: Status::unavailable(message) });
            }
        }
    }
}

/// Delay before reconnect attempt `attempt` (0-based): exponential from
/// 250 ms, capped at 30 s, each drawn between half and all of its step, so
/// that many devices coming back at once do not reconnect in lockstep.
pub fn backoff(attempt: u32) -> Duration {
    let cap_ms = 250u64.saturating_mul(1 << attempt.min(7)).min(30_000);
    Duration::from_millis(rand::rng().random_range(cap_ms / 2..=cap_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_connection_names_its_causes_an_answer_does_not() {
        let broken = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )));
        let causes = transport_failure(&broken).expect("tonic made it from an error");
        assert!(causes.contains("connection reset by peer"), "{causes}");
        assert_eq!(transport_failure(&Status::unknown("transport error")), None, "a server's answer has no source");
        assert_eq!(transport_failure(&Status::permission_denied("invite required")), None);
    }

    #[test]
    fn plaintext_goes_to_loopback_only() {
        let uri = |text: &str| text.parse::<tonic::codegen::http::Uri>().unwrap();
        for loopback in ["http://127.0.0.1:50051", "http://[::1]:1", "http://localhost:8080", "http://127.9.9.9"] {
            assert_eq!(plaintext_refusal(&uri(loopback)), None, "{loopback}");
        }
        assert_eq!(plaintext_refusal(&uri("https://sync.example.org")), None);
        let beyond = [
            "http://sync.example.org",
            "http://10.0.0.1:50051",
            "http://[2001:db8::1]:1",
            "http://localhost.example.org",
        ];
        for address in beyond {
            let refusal = plaintext_refusal(&uri(address)).expect(address);
            assert!(refusal.contains("https://") && refusal.contains("--allow-plaintext"), "{refusal}");
        }
    }

    #[tokio::test]
    async fn connect_refuses_plaintext_beyond_loopback_before_dialing() {
        let refused = connect("http://192.0.2.1:50051", &Trust::default()).await.expect_err("refused");
        assert!(refused.to_string().contains("use https://192.0.2.1:50051"), "{refused}");
    }

    #[test]
    fn the_decode_limit_follows_the_servers_batch_size() {
        assert_eq!(max_message_bytes(0), DEFAULT_MAX_MESSAGE_BYTES, "an older server: the old limit");
        assert_eq!(max_message_bytes(4 * 1024 * 1024), 5 * 1024 * 1024);
        assert_eq!(max_message_bytes(128 * 1024 * 1024), 160 * 1024 * 1024);
    }

    #[test]
    fn a_call_past_its_own_deadline_is_worth_retrying() {
        let timed_out = rpc("Push")(Status::cancelled(tonic::TimeoutExpired(()).to_string()));
        assert!(timed_out.is_transient(), "{timed_out}");
        assert!(!rpc("Push")(Status::cancelled("the device gave up")).is_transient());
    }

    #[test]
    fn retry_decisions_are_the_servers() {
        let mut refused = Status::internal("x");
        lockstep_proto::retry::mark(&mut refused, false);
        assert!(!SyncError::Rpc { call: "Push", status: refused }.is_transient());
        let mut busy = Status::internal("x");
        lockstep_proto::retry::mark(&mut busy, true);
        assert!(SyncError::Rpc { call: "Push", status: busy }.is_transient());
        assert!(!SyncError::Rpc { call: "Subscribe", status: Status::data_loss("lost") }.is_transient());
        assert!(SyncError::Store(StoreError::Gap { expected: 3, found: 5 }).is_transient());
        assert!(SyncError::StreamIdle(Duration::from_secs(3)).is_transient());
    }

    #[test]
    fn backoff_grows_with_jitter_and_a_cap() {
        for attempt in 0..20 {
            let delay = backoff(attempt).as_millis() as u64;
            let cap = (250u64 << attempt.min(7)).min(30_000);
            assert!(delay >= cap / 2 && delay <= cap, "attempt {attempt}: {delay} ms");
        }
        assert!(backoff(20) >= Duration::from_secs(15));
    }
}
