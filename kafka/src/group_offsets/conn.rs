//! One pipelined connection to a Kafka broker for the group-offsets client:
//! TLS and SASL when the settings ask for them, ApiVersions negotiation, a
//! writer task and a reader task that matches responses to waiting callers by
//! correlation id.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::AtomicI32},
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::{
    ResponseError,
    messages::{
        ApiKey, ApiVersionsRequest, ApiVersionsResponse, RequestHeader, ResponseHeader, SaslAuthenticateRequest,
        SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
    },
    protocol::{Decodable, Encodable, HeaderVersion, StrBytes},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter, ReadHalf, WriteHalf},
    net::TcpStream,
    sync::{mpsc, oneshot},
    task::AbortHandle,
};
use tracing::{debug, warn};

use super::{
    APIS, GroupOffsetsError, MAX_FRAME, Result, WRITE_QUEUE, lock,
    security::{KafkaSecurity, SaslMechanism, Scram, plain_message, server_name},
};

/// A connection to a broker, in the clear or through TLS.
trait KafkaStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> KafkaStream for T {}
type BoxedStream = Box<dyn KafkaStream>;

type Waiter = oneshot::Sender<Result<Bytes>>;

/// State shared by a connection's handle, writer and reader. `pending` is None once the
/// connection is dead, so no request can be registered after its waiters were failed.
pub(super) struct Shared {
    addr: String,
    pending: Mutex<Option<HashMap<i32, Waiter>>>,
}

impl Shared {
    pub(super) fn is_dead(&self) -> bool {
        lock(&self.pending).is_none()
    }

    fn fail_all(&self, reason: &str) {
        let Some(pending) = lock(&self.pending).take() else {
            return;
        };
        warn!(addr = %self.addr, in_flight = pending.len(), reason, "kafka connection closed");
        for (_, waiter) in pending {
            let _ = waiter.send(Err(self.disconnected(reason)));
        }
    }

    fn disconnected(&self, reason: &str) -> GroupOffsetsError {
        let (addr, reason) = (self.addr.clone(), reason.to_owned());
        GroupOffsetsError::Disconnected { addr, reason }
    }
}

/// One pipelined connection: callers register a oneshot under their correlation id and queue
/// the frame for the writer task; the reader task hands each response to its waiter.
pub(super) struct Conn {
    pub(super) shared: Arc<Shared>,
    frames: mpsc::Sender<Bytes>,
    /// Negotiated version per entry of `APIS`, None when the broker and we share none.
    versions: [Option<i16>; APIS.len()],
    pub(super) next_correlation_id: AtomicI32,
    tasks: [AbortHandle; 2],
}

impl Conn {
    pub(super) async fn open(
        addr: &str,
        timeout: Duration,
        client_id: &StrBytes,
        security: &KafkaSecurity,
    ) -> Result<Self> {
        let connect = async {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let mut stream: BoxedStream = match &security.tls {
                Some(tls) => {
                    let name = server_name(addr).map_err(invalid_data)?;
                    Box::new(tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp).await?)
                }
                None => Box::new(tcp),
            };
            let versions = negotiate(&mut stream, client_id).await?;
            if let Some(sasl) = &security.sasl {
                authenticate(&mut stream, client_id, sasl.mechanism, &sasl.username, &sasl.password.0).await?;
            }
            Ok::<_, std::io::Error>((stream, versions))
        };
        let (stream, advertised) = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| GroupOffsetsError::Timeout { api: "connect", addr: addr.into(), timeout })?
            .map_err(|source| GroupOffsetsError::Connect { addr: addr.into(), source })?;
        let versions = APIS.map(|(key, _, lo, hi)| {
            let v = advertised.api_keys.iter().find(|v| v.api_key == key as i16)?;
            let best = v.max_version.min(hi);
            (best >= v.min_version.max(lo)).then_some(best)
        });
        debug!(addr, ?versions, "connected to kafka broker");
        let pending = Mutex::new(Some(HashMap::new()));
        let shared = Arc::new(Shared { addr: addr.to_owned(), pending });
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let (read, write) = tokio::io::split(stream);
        let reader = tokio::spawn(read_loop(read, shared.clone()));
        let writer = tokio::spawn(write_loop(write, rx, shared.clone()));
        Ok(Self {
            shared,
            frames: tx,
            versions,
            next_correlation_id: AtomicI32::new(1),
            tasks: [reader.abort_handle(), writer.abort_handle()],
        })
    }

    pub(super) fn version(&self, api: usize) -> Result<i16> {
        let (_, name, min, max) = APIS[api];
        let addr = self.shared.addr.clone();
        self.versions[api].ok_or(GroupOffsetsError::Unsupported { api: name, addr, min, max })
    }

    pub(super) fn protocol(&self, message: String) -> GroupOffsetsError {
        GroupOffsetsError::Protocol { addr: self.shared.addr.clone(), message }
    }

    pub(super) async fn round_trip(
        &self,
        corr: i32,
        frame: Bytes,
        api: &'static str,
        timeout: Duration,
    ) -> Result<Bytes> {
        let (tx, rx) = oneshot::channel();
        match lock(&self.shared.pending).as_mut() {
            Some(pending) => pending.insert(corr, tx),
            None => return Err(self.shared.disconnected("connection already closed")),
        };
        let exchange = async {
            let sent = self.frames.send(frame).await;
            sent.map_err(|_| self.shared.disconnected("writer stopped"))?;
            rx.await.map_err(|_| self.shared.disconnected("reader stopped"))?
        };
        let result = tokio::time::timeout(timeout, exchange).await;
        if let Some(pending) = lock(&self.shared.pending).as_mut() {
            pending.remove(&corr);
        }
        result.unwrap_or_else(|_| {
            // A broker that does not answer in time gets a fresh connection next time.
            self.shared.fail_all("request timed out");
            self.tasks.iter().for_each(AbortHandle::abort);
            let addr = self.shared.addr.clone();
            Err(GroupOffsetsError::Timeout { api, addr, timeout })
        })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.tasks.iter().for_each(AbortHandle::abort);
    }
}

async fn write_loop(write: WriteHalf<BoxedStream>, mut frames: mpsc::Receiver<Bytes>, shared: Arc<Shared>) {
    let mut write = BufWriter::new(write);
    while let Some(frame) = frames.recv().await {
        // Write everything already queued, then flush once.
        let mut result = write.write_all(&frame).await;
        while let (true, Ok(frame)) = (result.is_ok(), frames.try_recv()) {
            result = write.write_all(&frame).await;
        }
        if let Err(err) = async {
            result?;
            write.flush().await
        }
        .await
        {
            return shared.fail_all(&format!("write failed: {err}"));
        }
    }
}

async fn read_loop(mut read: ReadHalf<BoxedStream>, shared: Arc<Shared>) {
    let reason = loop {
        let frame = match read_frame(&mut read).await {
            Ok(frame) => frame,
            Err(err) => break format!("read failed: {err}"),
        };
        // Every response header starts with the correlation id.
        let corr = frame.get(..4).and_then(|b| b.try_into().ok()).map(i32::from_be_bytes);
        let Some(corr) = corr else {
            break "response shorter than its header".to_owned();
        };
        match lock(&shared.pending).as_mut().and_then(|p| p.remove(&corr)) {
            Some(waiter) => {
                let _ = waiter.send(Ok(frame));
            }
            None => debug!(addr = %shared.addr, corr, "dropping response to an abandoned request"),
        }
    };
    shared.fail_all(&reason);
}

async fn read_frame<R: AsyncRead + Unpin>(read: &mut R) -> std::io::Result<Bytes> {
    let len = read.read_i32().await?;
    let Some(len) = usize::try_from(len).ok().filter(|len| *len <= MAX_FRAME) else {
        return Err(invalid_data(format!("bad frame length {len}")));
    };
    let mut buf = BytesMut::zeroed(len);
    read.read_exact(&mut buf).await?;
    Ok(buf.freeze())
}

/// ApiVersions v3 (Kafka 2.4+), sent before anything else on a new connection.
async fn negotiate(stream: &mut BoxedStream, client_id: &StrBytes) -> std::io::Result<ApiVersionsResponse> {
    const VERSION: i16 = 3;
    let req = ApiVersionsRequest::default()
        .with_client_software_name(StrBytes::from_static_str("lockstep"))
        .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
    let frame = encode_frame(ApiKey::ApiVersions, VERSION, 0, client_id, &req).map_err(invalid_data)?;
    stream.write_all(&frame).await?;
    let mut body = read_frame(stream).await?;
    ResponseHeader::decode(&mut body, ApiVersionsResponse::header_version(VERSION))
        .and_then(|_| ApiVersionsResponse::decode(&mut body, VERSION))
        .map_err(|e| invalid_data(format!("ApiVersions response: {e}")))
        .and_then(|resp| match ResponseError::try_from_code(resp.error_code) {
            Some(err) => Err(invalid_data(format!("ApiVersions failed: {err}"))),
            None => Ok(resp),
        })
}

pub(super) fn encode_frame<R: Encodable + HeaderVersion>(
    key: ApiKey,
    version: i16,
    corr: i32,
    client_id: &StrBytes,
    req: &R,
) -> Result<Bytes, String> {
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(corr)
        .with_client_id(Some(client_id.clone()));
    let mut buf = BytesMut::with_capacity(128);
    buf.put_i32(0); // length, patched below
    header.encode(&mut buf, R::header_version(version)).map_err(|e| e.to_string())?;
    req.encode(&mut buf, version).map_err(|e| e.to_string())?;
    let len = i32::try_from(buf.len() - 4).map_err(|e| e.to_string())?;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf.freeze())
}

/// One request and its response on a connection that has no reader task yet.
async fn exchange<Req, Resp>(
    stream: &mut BoxedStream,
    key: ApiKey,
    version: i16,
    corr: i32,
    client_id: &StrBytes,
    request: &Req,
) -> std::io::Result<Resp>
where
    Req: Encodable + HeaderVersion,
    Resp: Decodable + HeaderVersion,
{
    let frame = encode_frame(key, version, corr, client_id, request).map_err(invalid_data)?;
    stream.write_all(&frame).await?;
    stream.flush().await?;
    let mut body = read_frame(stream).await?;
    ResponseHeader::decode(&mut body, Resp::header_version(version))
        .and_then(|_| Resp::decode(&mut body, version))
        .map_err(|error| invalid_data(format!("{key:?} response: {error}")))
}

/// SASL (KIP-43, KIP-152): SaslHandshake v1 names the mechanism, then each message of the
/// mechanism travels in a SaslAuthenticate v1.
async fn authenticate(
    stream: &mut BoxedStream,
    client_id: &StrBytes,
    mechanism: SaslMechanism,
    username: &str,
    password: &str,
) -> std::io::Result<()> {
    let denied = |message: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, message);
    let handshake = SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(mechanism.name()));
    let answer: SaslHandshakeResponse = exchange(stream, ApiKey::SaslHandshake, 1, -2, client_id, &handshake).await?;
    if let Some(error) = ResponseError::try_from_code(answer.error_code) {
        return Err(denied(format!("sasl handshake for {}: {error}", mechanism.name())));
    }
    let mut round = 0;
    let mut send = async |stream: &mut BoxedStream, message: Vec<u8>| -> std::io::Result<Bytes> {
        round += 1;
        let request = SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(message));
        let answer: SaslAuthenticateResponse =
            exchange(stream, ApiKey::SaslAuthenticate, 1, -2 - round, client_id, &request).await?;
        match ResponseError::try_from_code(answer.error_code) {
            Some(error) => {
                let detail = answer.error_message.map(|message| message.to_string()).unwrap_or_default();
                Err(denied(format!("sasl {} authentication failed: {error} {detail}", mechanism.name())))
            }
            None => Ok(answer.auth_bytes),
        }
    };
    match mechanism {
        SaslMechanism::Plain => {
            send(stream, plain_message(username, password)).await?;
        }
        SaslMechanism::ScramSha256 | SaslMechanism::ScramSha512 => {
            let mut scram = Scram::new(mechanism, username, password);
            let server_first = send(stream, scram.client_first()).await?;
            let client_final = scram.client_final(&server_first).map_err(denied)?;
            let server_final = send(stream, client_final).await?;
            scram.verify_server_final(&server_final).map_err(denied)?;
        }
    }
    debug!(mechanism = mechanism.name(), "sasl authenticated");
    Ok(())
}

fn invalid_data(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}
