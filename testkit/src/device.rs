//! A device as the tests drive it: its credentials and thin wrappers over
//! the gRPC API that attach the bearer token.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use lockstep_proto::v1::{
    AckRequest, Change, CreateAccountRequest, CreatePairingTicketRequest, DeliveredChange, Op, PushRequest, PushResult,
    RedeemPairingTicketRequest, SubscribeRequest, SubscribeResponse, accounts_client::AccountsClient, push_result,
    subscribe_response::Event, sync_client::SyncClient,
};
use rand::RngCore;
use tonic::{Request, Status, Streaming, transport::Channel};

use crate::server::Server;

#[derive(Clone)]
pub struct Device {
    pub user_id: String,
    pub device_id: String,
    pub token: String,
    pub accounts: AccountsClient<Channel>,
    pub sync: SyncClient<Channel>,
}

impl Device {
    /// Creates a new account; the device is its first device.
    pub async fn create_account(server: &Server, name: &str) -> anyhow::Result<Self> {
        let mut accounts = server.accounts().await?;
        let created = accounts
            .create_account(CreateAccountRequest { device_name: name.into(), ..Default::default() })
            .await
            .context("CreateAccount")?
            .into_inner();
        Ok(Self {
            user_id: created.user_id,
            device_id: created.device_id,
            token: created.device_token,
            accounts,
            sync: server.sync().await?,
        })
    }

    /// Pairs a new device to this device's account.
    pub async fn pair(&self, server: &Server, name: &str) -> anyhow::Result<Self> {
        let ticket = self
            .accounts
            .clone()
            .create_pairing_ticket(self.request(CreatePairingTicketRequest {}))
            .await
            .context("CreatePairingTicket")?
            .into_inner()
            .ticket;
        let mut accounts = server.accounts().await?;
        let paired = accounts
            .redeem_pairing_ticket(RedeemPairingTicketRequest { ticket, device_name: name.into() })
            .await
            .context("RedeemPairingTicket")?
            .into_inner();
        Ok(Self {
            user_id: paired.user_id,
            device_id: paired.device_id,
            token: paired.device_token,
            accounts,
            sync: server.sync().await?,
        })
    }

    /// The same device talking to a (restarted) server through new connections.
    pub async fn reconnect(&mut self, server: &Server) -> anyhow::Result<()> {
        self.accounts = server.accounts().await?;
        self.sync = server.sync().await?;
        Ok(())
    }

    pub fn request<T>(&self, message: T) -> Request<T> {
        with_token(message, &self.token)
    }

    pub async fn push(&self, changes: Vec<Change>) -> Result<Vec<PushResult>, Status> {
        Ok(self.sync.clone().push(self.request(PushRequest { changes })).await?.into_inner().results)
    }

    /// Pushes and expects every change to be written; returns their offsets.
    pub async fn push_ok(&self, changes: Vec<Change>) -> anyhow::Result<Vec<i64>> {
        let results = self.push(changes).await?;
        results
            .into_iter()
            .map(|result| match result.result {
                Some(push_result::Result::Offset(offset)) => Ok(offset),
                other => bail!("change was not written: {other:?}"),
            })
            .collect()
    }

    pub async fn subscribe(&self, from_offset: Option<i64>) -> Result<Streaming<SubscribeResponse>, Status> {
        Ok(self
            .sync
            .clone()
            .subscribe(self.request(SubscribeRequest { from_offset, ..Default::default() }))
            .await?
            .into_inner())
    }

    pub async fn ack(&self, offset: i64) -> Result<i64, Status> {
        Ok(self.sync.clone().ack(self.request(AckRequest { offset })).await?.into_inner().committed_offset)
    }
}

pub fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("token is ascii"));
    request
}

/// A valid change with a fresh change id and `size` random ciphertext bytes.
pub fn change(record: &str, size: usize) -> Change {
    let mut ciphertext = vec![0u8; size];
    rand::rng().fill_bytes(&mut ciphertext);
    let mut nonce = vec![0u8; 24];
    rand::rng().fill_bytes(&mut nonce);
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
    Change {
        change_id: uuid::Uuid::now_v7().to_string(),
        record_id: record.into(),
        collection: "notes".into(),
        op: Op::Upsert as i32,
        hlc: (now_ms as u64) << 16,
        key_epoch: 1,
        nonce: Bytes::from(nonce),
        ciphertext: Bytes::from(ciphertext),
    }
}

/// `count` changes for records `r0`, `r1`, ….
pub fn changes(count: usize, size: usize) -> Vec<Change> {
    (0..count).map(|index| change(&format!("r{index}"), size)).collect()
}

/// What a stream delivered, in the order it arrived.
#[derive(Debug, Default)]
pub struct Received {
    pub changes: Vec<DeliveredChange>,
    pub resyncs: Vec<lockstep_proto::v1::Resync>,
    pub heartbeats: Vec<lockstep_proto::v1::Heartbeat>,
}

impl Received {
    pub fn offsets(&self) -> Vec<i64> {
        self.changes.iter().map(|change| change.offset).collect()
    }
}

/// Reads `stream` until `until` holds or `timeout` passes (an error then).
pub async fn receive_until(
    stream: &mut Streaming<SubscribeResponse>,
    received: &mut Received,
    timeout: Duration,
    until: impl Fn(&Received) -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !until(received) {
        let message = tokio::time::timeout_at(deadline, stream.message())
            .await
            .with_context(|| format!("timed out after {timeout:?} with {} changes", received.changes.len()))??
            .context("stream ended")?;
        match message.event.context("empty event")? {
            Event::Changes(batch) => received.changes.extend(batch.changes),
            Event::Heartbeat(heartbeat) => received.heartbeats.push(heartbeat),
            Event::Resync(resync) => received.resyncs.push(resync),
        }
    }
    Ok(())
}

/// Reads until `count` changes arrived.
pub async fn receive_changes(
    stream: &mut Streaming<SubscribeResponse>,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Received> {
    let mut received = Received::default();
    receive_until(stream, &mut received, timeout, |received| received.changes.len() >= count).await?;
    Ok(received)
}
