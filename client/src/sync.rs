//! The sync loop: push the outbox, subscribe, apply, ack.
//!
//! - The outbox goes up in batches sized by the server's limits; a change
//!   leaves the outbox only when the server reported its offset (or that it
//!   had it already). A crash in between re-pushes it with the same change id,
//!   which the server answers with the first offset.
//! - Incoming batches are decrypted and merged in one local transaction; the
//!   offset is acked to the server only after that transaction committed.
//! - A Resync from the server rebuilds local state from the log start; the
//!   outbox (unsynced local edits) survives it.

use std::{str::FromStr, time::Duration};

use lockstep_proto::v1::{
    AckRequest, Change, CreateAccountRequest, CreatePairingTicketRequest, DeliveredChange, GetServerInfoRequest,
    GetServerInfoResponse, PushRequest, RedeemPairingTicketRequest, SubscribeRequest, accounts_client::AccountsClient,
    push_result, subscribe_response::Event, sync_client::SyncClient,
};
use rand::Rng;
use tokio_stream::StreamExt;
use tonic::{
    Code, Request, Status,
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint},
};
use zeroize::Zeroizing;

use crate::{
    crypto::{AccountKey, Binding, CryptoError},
    record::ChangePayload,
    store::{Account, Incoming, OutboxEntry, ProblemKind, Store, StoreError},
};

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
}

fn describe(status: &Status) -> String {
    let hint = match status.code() {
        Code::Unauthenticated => {
            " (this device's token is not valid any more: it may have been revoked; pair it again)"
        }
        Code::Aborted => " (another sync or watch of this device is running)",
        Code::Unavailable => " (the server or its Kafka is unavailable; try again)",
        Code::PermissionDenied => " (the server needs a registration secret: --registration-secret)",
        _ => "",
    };
    format!("{} ({:?}){hint}", status.message(), status.code())
}

impl SyncError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            SyncError::Connect { .. } | SyncError::StreamEnded => true,
            SyncError::Rpc { status, .. } => matches!(
                status.code(),
                Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded | Code::Unknown | Code::Internal
            ),
            SyncError::Store(_) => false,
        }
    }
}

fn rpc(call: &'static str) -> impl FnOnce(Status) -> SyncError {
    move |status| SyncError::Rpc { call, status }
}

pub async fn connect(server: &str) -> Result<Channel, SyncError> {
    let fail = |message: String| SyncError::Connect { server: server.into(), message };
    let endpoint = Endpoint::from_str(server)
        .map_err(|error| fail(format!("not a server address ({error}); expected e.g. http://127.0.0.1:50051")))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    endpoint.connect().await.map_err(|error| {
        let mut message = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(inner) = source {
            message = format!("{message}: {inner}");
            source = inner.source();
        }
        fail(message)
    })
}

fn bearer(token: &str) -> Result<MetadataValue<Ascii>, SyncError> {
    format!("Bearer {token}").parse().map_err(|_| SyncError::Store(StoreError::Corrupt("device token".into())))
}

fn authed<T>(token: &str, message: T) -> Result<Request<T>, SyncError> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", bearer(token)?);
    Ok(request)
}

/// Creates an account on `server`: a user, this device, a new account key.
pub async fn create_account(
    server: &str,
    device_name: &str,
    registration_secret: Option<&str>,
) -> Result<Account, SyncError> {
    let mut accounts = AccountsClient::new(connect(server).await?);
    let mut request = Request::new(CreateAccountRequest { device_name: device_name.into() });
    if let Some(secret) = registration_secret {
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
    })
}

/// Asks the server for a one-time pairing ticket for `account`.
pub async fn pairing_ticket(account: &Account) -> Result<(String, i64), SyncError> {
    let mut accounts = AccountsClient::new(connect(&account.server).await?);
    let ticket = accounts
        .create_pairing_ticket(authed(&account.token, CreatePairingTicketRequest {})?)
        .await
        .map_err(rpc("CreatePairingTicket"))?
        .into_inner();
    Ok((ticket.ticket, ticket.expires_at_ms))
}

/// Redeems a ticket: this device joins the account of the device that issued it.
pub async fn redeem(server: &str, ticket: &str, key: AccountKey, device_name: &str) -> Result<Account, SyncError> {
    let mut accounts = AccountsClient::new(connect(server).await?);
    let redeemed = accounts
        .redeem_pairing_ticket(RedeemPairingTicketRequest { ticket: ticket.into(), device_name: device_name.into() })
        .await
        .map_err(rpc("RedeemPairingTicket"))?
        .into_inner();
    Ok(Account {
        server: server.into(),
        user_id: redeemed.user_id,
        device_id: redeemed.device_id,
        device_name: device_name.into(),
        token: Zeroizing::new(redeemed.device_token),
        key,
        key_epoch: 1,
    })
}

/// Progress of a sync, for people watching it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Pushed { done: u64, total: u64 },
    Received { applied: u64, cursor: i64, log_end: Option<i64> },
    Resync { log_start: i64 },
    CaughtUp { cursor: i64 },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub pushed: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub received: u64,
    pub changed_records: u64,
    pub problems: u64,
    pub resyncs: u64,
    pub cursor: Option<i64>,
}

/// One device's store and its connection to the server.
pub struct Syncer {
    pub store: Store,
    account: Account,
    connection: Option<(SyncClient<Channel>, GetServerInfoResponse)>,
}

/// Stop receiving when caught up with the log end, or keep going (watch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    CaughtUp,
    Stopped,
}

impl Syncer {
    /// A syncer for the store's account; it connects when first needed.
    pub fn new(store: Store) -> Result<Self, SyncError> {
        let account = store.account()?;
        Ok(Self { store, account, connection: None })
    }

    /// Drops the connection; the next call reconnects.
    pub fn disconnect(&mut self) {
        self.connection = None;
    }

    async fn connection(&mut self) -> Result<(SyncClient<Channel>, GetServerInfoResponse), SyncError> {
        if let Some(connection) = &self.connection {
            return Ok(connection.clone());
        }
        let channel = connect(&self.account.server).await?;
        let max_message = 64 * 1024 * 1024;
        let mut sync = SyncClient::new(channel).max_decoding_message_size(max_message);
        let limits = sync
            .get_server_info(authed(&self.account.token, GetServerInfoRequest {})?)
            .await
            .map_err(rpc("GetServerInfo"))?
            .into_inner();
        self.connection = Some((sync.clone(), limits.clone()));
        Ok((sync, limits))
    }

    pub fn account(&self) -> &Account {
        &self.account
    }

    fn encrypt(&self, entry: &OutboxEntry) -> Change {
        let binding = Binding {
            user_id: &self.account.user_id,
            record_id: &entry.record_id,
            collection: &entry.collection,
            op: entry.op,
            key_epoch: self.account.key_epoch,
        };
        let (nonce, ciphertext) = self.account.key.seal(&binding, &entry.payload.encode());
        Change {
            change_id: entry.change_id.clone(),
            record_id: entry.record_id.clone(),
            collection: entry.collection.clone(),
            op: entry.op,
            hlc: entry.hlc,
            key_epoch: self.account.key_epoch,
            nonce: nonce.into(),
            ciphertext: ciphertext.into(),
        }
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
        loop {
            let entries = self.store.outbox_batch(max_changes)?;
            if entries.is_empty() {
                return Ok(());
            }
            let mut batch: Vec<&OutboxEntry> = Vec::with_capacity(entries.len());
            let mut changes = Vec::with_capacity(entries.len());
            let mut bytes = 0;
            for entry in &entries {
                let change = self.encrypt(entry);
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
            let response = sync
                .push(authed(&self.account.token, PushRequest { changes })?)
                .await
                .map_err(rpc("Push"))?
                .into_inner();
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

    fn decrypt(&self, delivered: DeliveredChange) -> Incoming {
        let change = delivered.change.unwrap_or_default();
        let binding = Binding {
            user_id: &self.account.user_id,
            record_id: &change.record_id,
            collection: &change.collection,
            op: change.op,
            key_epoch: change.key_epoch,
        };
        let content = match self.account.key.open(&binding, &change.nonce, &change.ciphertext) {
            Ok(plaintext) => ChangePayload::decode(&plaintext).map_err(|error| (ProblemKind::Malformed, error)),
            Err(error @ (CryptoError::Decrypt | CryptoError::Nonce(_) | CryptoError::KeyFormat)) => {
                Err((ProblemKind::Undecryptable, error.to_string()))
            }
        };
        Incoming {
            offset: delivered.offset,
            record_id: change.record_id,
            collection: change.collection,
            origin_device_id: delivered.origin_device_id,
            content,
        }
    }

    /// Receives changes from the device's cursor and applies them, until caught
    /// up or, with `Until::Stopped`, until `stop` resolves or the stream fails.
    /// While receiving, local edits are pushed every `push_every`.
    pub async fn receive(
        &mut self,
        until: Until,
        report: &mut Report,
        progress: &mut dyn FnMut(Progress),
        stop: &mut (dyn std::future::Future<Output = ()> + Unpin + Send),
    ) -> Result<(), SyncError> {
        let cursor = self.store.cursor()?;
        let (mut sync, _) = self.connection().await?;
        let mut stream = self.subscribe(&mut sync, cursor).await?;
        let mut log_end = None;
        let mut push_tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            let message = tokio::select! {
                message = stream.next() => message,
                () = &mut *stop => return Ok(()),
                _ = push_tick.tick(), if until == Until::Stopped => {
                    if self.store.outbox_len()? > 0 {
                        self.push(report, progress).await?;
                    }
                    continue;
                }
            };
            let Some(message) = message else { return Err(SyncError::StreamEnded) };
            let event = message.map_err(rpc("Subscribe"))?.event;
            match event {
                Some(Event::Changes(batch)) => {
                    let Some(last) = batch.changes.last().map(|change| change.offset) else { continue };
                    let incoming: Vec<Incoming> =
                        batch.changes.into_iter().map(|change| self.decrypt(change)).collect();
                    let applied = self.store.apply(&incoming)?;
                    // Committed locally: now the server may forget it for this device.
                    sync.ack(authed(&self.account.token, AckRequest { offset: last })?).await.map_err(rpc("Ack"))?;
                    report.received += applied.changes as u64;
                    report.changed_records += applied.changed_records as u64;
                    report.problems += applied.problems as u64;
                    report.cursor = Some(last + 1);
                    progress(Progress::Received { applied: report.received, cursor: last + 1, log_end });
                }
                Some(Event::Heartbeat(heartbeat)) => {
                    log_end = Some(heartbeat.log_end_offset);
                    let cursor = self.store.cursor()?.unwrap_or(0);
                    self.store.note_sync(heartbeat.log_end_offset)?;
                    if cursor >= heartbeat.log_end_offset {
                        progress(Progress::CaughtUp { cursor });
                        if until == Until::CaughtUp {
                            return Ok(());
                        }
                    }
                }
                Some(Event::Resync(resync)) => {
                    self.store.resync(resync.log_start_offset)?;
                    report.resyncs += 1;
                    progress(Progress::Resync { log_start: resync.log_start_offset });
                }
                None => {}
            }
        }
    }

    async fn subscribe(
        &mut self,
        sync: &mut SyncClient<Channel>,
        cursor: Option<i64>,
    ) -> Result<tonic::Streaming<lockstep_proto::v1::SubscribeResponse>, SyncError> {
        let token = self.account.token.clone();
        let request = |from_offset| authed(&token, SubscribeRequest { from_offset });
        match sync.subscribe(request(cursor)?).await {
            Ok(response) => Ok(response.into_inner()),
            // Our cursor is past the log end: the topic is not the one this
            // store synced with. Start over from the server's side.
            Err(status) if status.code() == Code::OutOfRange && cursor.is_some() => {
                self.store.resync(0)?;
                let response = sync.subscribe(request(Some(0))?).await.map_err(rpc("Subscribe"))?;
                Ok(response.into_inner())
            }
            Err(status) => Err(rpc("Subscribe")(status)),
        }
    }

    /// Push, then receive until caught up, then push what arrived meanwhile.
    pub async fn sync_once(&mut self, progress: &mut dyn FnMut(Progress)) -> Result<Report, SyncError> {
        let mut report = Report::default();
        self.push(&mut report, progress).await?;
        self.receive(Until::CaughtUp, &mut report, progress, &mut std::future::pending()).await?;
        self.push(&mut report, progress).await?;
        report.cursor = self.store.cursor()?;
        Ok(report)
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
    fn backoff_grows_with_jitter_and_a_cap() {
        for attempt in 0..20 {
            let delay = backoff(attempt).as_millis() as u64;
            let cap = (250u64 << attempt.min(7)).min(30_000);
            assert!(delay >= cap / 2 && delay <= cap, "attempt {attempt}: {delay} ms");
        }
        assert!(backoff(20) >= Duration::from_secs(15));
    }
}
