//! A device as the benchmarks drive Lockstep: credentials plus thin
//! wrappers over the gRPC API that attach the bearer token.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use lockstep_proto::v1::{
    AckRequest, Change, CreateAccountRequest, CreatePairingTicketRequest, Op, PushRequest, RedeemPairingTicketRequest,
    SubscribeRequest, SubscribeResponse, accounts_client::AccountsClient, push_result, sync_client::SyncClient,
};
use rand::RngCore;
use tonic::{
    Request, Streaming,
    transport::{Channel, Endpoint},
};

/// Streams per HTTP/2 connection, below the server's `max_streams_per_connection` (64).
pub const STREAMS_PER_CONNECTION: usize = 50;

#[derive(Clone, Debug)]
pub struct Device {
    pub token: String,
}

pub async fn channel(endpoint: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {endpoint}"))
}

pub fn sync(channel: Channel) -> SyncClient<Channel> {
    SyncClient::new(channel).max_decoding_message_size(64 * 1024 * 1024)
}

pub fn request<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("token is ascii"));
    request
}

impl Device {
    pub async fn create_account(accounts: &mut AccountsClient<Channel>, name: &str) -> anyhow::Result<Self> {
        let created = accounts
            .create_account(CreateAccountRequest { device_name: name.into(), ..Default::default() })
            .await
            .context("CreateAccount")?
            .into_inner();
        Ok(Self { token: created.device_token })
    }

    /// A new device of this device's account.
    pub async fn pair(&self, accounts: &mut AccountsClient<Channel>, name: &str) -> anyhow::Result<Self> {
        let ticket = accounts
            .create_pairing_ticket(request(CreatePairingTicketRequest {}, &self.token))
            .await
            .context("CreatePairingTicket")?
            .into_inner()
            .ticket;
        let paired = accounts
            .redeem_pairing_ticket(RedeemPairingTicketRequest { ticket, device_name: name.into() })
            .await
            .context("RedeemPairingTicket")?
            .into_inner();
        Ok(Self { token: paired.device_token })
    }

    /// Pushes and expects every change to be written; returns the last offset.
    pub async fn push(&self, sync: &mut SyncClient<Channel>, changes: Vec<Change>) -> anyhow::Result<i64> {
        let results = sync.push(request(PushRequest { changes }, &self.token)).await?.into_inner().results;
        let mut last = -1;
        for result in results {
            match result.result {
                Some(push_result::Result::Offset(offset)) => last = last.max(offset),
                other => bail!("change was not written: {other:?}"),
            }
        }
        Ok(last)
    }

    pub async fn subscribe(
        &self,
        sync: &mut SyncClient<Channel>,
        from_offset: Option<i64>,
    ) -> anyhow::Result<Streaming<SubscribeResponse>> {
        Ok(sync.subscribe(request(SubscribeRequest { from_offset, repair: false }, &self.token)).await?.into_inner())
    }

    pub async fn ack(&self, sync: &mut SyncClient<Channel>, offset: i64) -> anyhow::Result<i64> {
        Ok(sync.ack(request(AckRequest { offset }, &self.token)).await?.into_inner().committed_offset)
    }
}

/// Makes changes whose record id carries a sequence number (`<tag><seq>`),
/// with `size` bytes of ciphertext.
#[derive(Clone)]
pub struct ChangeMaker {
    ciphertext: Bytes,
    nonce: Bytes,
}

impl ChangeMaker {
    pub fn new(size: usize) -> Self {
        let mut ciphertext = vec![0u8; size];
        rand::rng().fill_bytes(&mut ciphertext);
        let mut nonce = vec![0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        Self { ciphertext: Bytes::from(ciphertext), nonce: Bytes::from(nonce) }
    }

    pub fn change(&self, tag: char, seq: u64) -> Change {
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        Change {
            change_id: uuid::Uuid::now_v7().to_string(),
            record_id: format!("{tag}{seq}"),
            collection: "bench".into(),
            op: Op::Upsert as i32,
            hlc: (now_ms << 16) | (seq & 0xffff),
            key_epoch: 1,
            nonce: self.nonce.clone(),
            ciphertext: self.ciphertext.clone(),
        }
    }

    pub fn batch(&self, tag: char, seqs: std::ops::Range<u64>) -> Vec<Change> {
        seqs.map(|seq| self.change(tag, seq)).collect()
    }
}

/// The tag and sequence number of a record id made by [`ChangeMaker`].
pub fn parse_record(record_id: &str) -> Option<(char, u64)> {
    let mut chars = record_id.chars();
    let tag = chars.next()?;
    Some((tag, chars.as_str().parse().ok()?))
}
