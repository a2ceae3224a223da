//! Browsers' protocol: gRPC-Web over plain HTTP/1.1 on the gRPC port, behind the same
//! authentication, and CORS open only to the origins listed in `web.allowed_origins`.
//!
//! The client here is hand-made on purpose: an HTTP/1.1 request written on a TCP socket,
//! with gRPC-Web's framing (a flag byte, a 4-byte length, the message; trailers as a frame
//! with flag 0x80), as a browser's `fetch` would send it.

use std::{collections::HashMap, sync::Arc, time::Duration};

use anyhow::{Context, bail, ensure};
use lockstep_e2e::{
    device::{Device, change},
    server::Server,
    stack::{Broker, Stack},
    tls::TestCa,
};
use lockstep_proto::v1::{
    ListDevicesRequest, ListDevicesResponse, PushRequest, PushResponse, SubscribeRequest, SubscribeResponse,
    push_result, subscribe_response,
};
use prost::Message;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::TcpStream,
};

/// A connection, in the clear or through TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

const APP: &str = "https://app.example";
const WAIT: Duration = Duration::from_secs(60);

/// An HTTP/1.1 response whose body is read as it arrives.
struct Response {
    status: u16,
    headers: HashMap<String, String>,
    body: BufReader<Box<dyn Io>>,
    chunked: bool,
    /// Body bytes read but not yet taken as frames.
    buffer: Vec<u8>,
    ended: bool,
}

/// What one gRPC-Web frame carried.
enum Frame {
    Message(Vec<u8>),
    Trailers(HashMap<String, String>),
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    fn cors_headers(&self) -> Vec<&String> {
        self.headers.keys().filter(|name| name.starts_with("access-control-")).collect()
    }

    /// Reads more of the body into the buffer; false at its end.
    async fn fill(&mut self) -> anyhow::Result<bool> {
        if self.ended {
            return Ok(false);
        }
        if !self.chunked {
            let mut chunk = vec![0u8; 16 * 1024];
            let read = self.body.read(&mut chunk).await?;
            self.buffer.extend_from_slice(&chunk[..read]);
            self.ended = read == 0;
            return Ok(read > 0);
        }
        let mut size_line = String::new();
        self.body.read_line(&mut size_line).await?;
        let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16)
            .with_context(|| format!("chunk size line {size_line:?}"))?;
        let mut chunk = vec![0u8; size + 2];
        self.body.read_exact(&mut chunk).await?;
        self.buffer.extend_from_slice(&chunk[..size]);
        self.ended = size == 0;
        Ok(size > 0)
    }

    /// The next gRPC-Web frame, or `None` at the end of the body.
    async fn frame(&mut self) -> anyhow::Result<Option<Frame>> {
        loop {
            if self.buffer.len() >= 5 {
                let len = u32::from_be_bytes(self.buffer[1..5].try_into()?) as usize;
                if self.buffer.len() >= 5 + len {
                    let flag = self.buffer[0];
                    let payload = self.buffer[5..5 + len].to_vec();
                    self.buffer.drain(..5 + len);
                    return Ok(Some(match flag {
                        0x00 => Frame::Message(payload),
                        0x80 => Frame::Trailers(parse_headers(&String::from_utf8(payload)?)),
                        other => bail!("unexpected frame flag {other:#x}"),
                    }));
                }
            }
            if !self.fill().await? {
                ensure!(self.buffer.is_empty(), "the body ended inside a frame");
                return Ok(None);
            }
        }
    }

    /// Every frame to the end: the messages and the trailers.
    async fn unary(mut self) -> anyhow::Result<(Vec<Vec<u8>>, HashMap<String, String>)> {
        let mut messages = Vec::new();
        let mut trailers = HashMap::new();
        while let Some(frame) = tokio::time::timeout(WAIT, self.frame()).await?? {
            match frame {
                Frame::Message(message) => messages.push(message),
                Frame::Trailers(found) => trailers = found,
            }
        }
        // A trailers-only answer carries the status in the headers.
        if !trailers.contains_key("grpc-status") {
            trailers = self.headers.clone();
        }
        Ok((messages, trailers))
    }
}

fn parse_headers(text: &str) -> HashMap<String, String> {
    text.split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect()
}

/// Sends one HTTP/1.1 request on a new connection and reads the response's head.
async fn request(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<Response> {
    let stream: Box<dyn Io> = Box::new(TcpStream::connect(server.addr()).await?);
    request_on(stream, server, method, path, headers, body).await
}

/// Sends one HTTP/1.1 request on `stream` and reads the response's head.
async fn request_on(
    mut stream: Box<dyn Io>,
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<Response> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n", server.addr(), body.len());
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    tokio::time::timeout(WAIT, reader.read_line(&mut status_line)).await??;
    let status = status_line.split(' ').nth(1).context("status line")?.parse()?;
    let mut lines = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        lines.push_str(&line);
    }
    let headers = parse_headers(&lines);
    let chunked = headers.get("transfer-encoding").is_some_and(|value| value.contains("chunked"));
    let ended = !chunked && headers.get("content-length").is_some_and(|len| len == "0");
    Ok(Response { status, headers, body: reader, chunked, buffer: Vec::new(), ended })
}

/// A gRPC-Web call (binary `application/grpc-web+proto`) of `message` to `path`.
async fn grpc_web(
    server: &Server,
    path: &str,
    token: Option<&str>,
    message: &impl Message,
) -> anyhow::Result<Response> {
    let stream: Box<dyn Io> = Box::new(TcpStream::connect(server.addr()).await?);
    grpc_web_on(stream, server, path, token, message).await
}

/// Like [`grpc_web`], on `stream`.
async fn grpc_web_on(
    stream: Box<dyn Io>,
    server: &Server,
    path: &str,
    token: Option<&str>,
    message: &impl Message,
) -> anyhow::Result<Response> {
    let encoded = message.encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&u32::try_from(encoded.len())?.to_be_bytes());
    body.extend_from_slice(&encoded);
    let bearer = token.map(|token| format!("Bearer {token}"));
    let mut headers = vec![
        ("content-type", "application/grpc-web+proto"),
        ("accept", "application/grpc-web+proto"),
        ("x-grpc-web", "1"),
        ("origin", APP),
    ];
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer));
    }
    request_on(stream, server, "POST", path, &headers, &body).await
}

fn preflight_headers(origin: &str) -> [(&str, &str); 3] {
    [
        ("origin", origin),
        ("access-control-request-method", "POST"),
        ("access-control-request-headers", "authorization,content-type,x-grpc-web"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_call_unary_and_streaming_rpcs_over_grpc_web() -> anyhow::Result<()> {
    let origins = format!("[\"{APP}\"]");
    let Stack { kafka: _kafka, server, device } =
        Stack::start_with("web-phone", &[("LOCKSTEP_WEB__ALLOWED_ORIGINS", &origins)]).await?;
    let laptop: Device = device.pair(&server, "web-laptop").await?;

    // Unary, authenticated: ListDevices sees both devices.
    let response =
        grpc_web(&server, "/lockstep.v1.Accounts/ListDevices", Some(&device.token), &ListDevicesRequest {}).await?;
    assert_eq!(response.status, 200);
    assert!(response.header("content-type").is_some_and(|kind| kind.starts_with("application/grpc-web")));
    assert_eq!(response.header("access-control-allow-origin"), Some(APP), "{:?}", response.headers);
    let exposed = response.header("access-control-expose-headers").unwrap_or_default().to_string();
    assert!(exposed.contains("grpc-status") && exposed.contains("grpc-message"), "{exposed}");
    let (messages, trailers) = response.unary().await?;
    assert_eq!(trailers.get("grpc-status").map(String::as_str), Some("0"), "{trailers:?}");
    let [listed] = messages.as_slice() else { bail!("one message expected, got {}", messages.len()) };
    assert_eq!(ListDevicesResponse::decode(listed.as_slice())?.devices.len(), 2);

    // Server streaming: the laptop subscribes over gRPC-Web and gets what the phone pushes
    // over gRPC-Web.
    let mut stream =
        grpc_web(&server, "/lockstep.v1.Sync/Subscribe", Some(&laptop.token), &SubscribeRequest::default()).await?;
    assert_eq!(stream.status, 200);
    let pushed = change("web-note", 48);
    let response = grpc_web(
        &server,
        "/lockstep.v1.Sync/Push",
        Some(&device.token),
        &PushRequest { changes: vec![pushed.clone()] },
    )
    .await?;
    let (messages, trailers) = response.unary().await?;
    assert_eq!(trailers.get("grpc-status").map(String::as_str), Some("0"), "{trailers:?}");
    let results = PushResponse::decode(messages.first().context("a push response")?.as_slice())?.results;
    assert!(matches!(results.as_slice(), [result] if matches!(result.result, Some(push_result::Result::Offset(0)))));
    let delivered = tokio::time::timeout(WAIT, async {
        loop {
            match stream.frame().await? {
                Some(Frame::Message(message)) => {
                    if let Some(subscribe_response::Event::Changes(batch)) = SubscribeResponse::decode(&*message)?.event
                    {
                        return anyhow::Ok(batch.changes);
                    }
                }
                Some(Frame::Trailers(trailers)) => bail!("the stream ended: {trailers:?}"),
                None => bail!("the stream ended without trailers"),
            }
        }
    })
    .await??;
    let [delivered] = delivered.as_slice() else { bail!("one change expected, got {}", delivered.len()) };
    assert_eq!(delivered.change.as_ref(), Some(&pushed));
    assert_eq!(delivered.origin_device_id, device.device_id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_closed_but_to_listed_origins_and_auth_still_applies() -> anyhow::Result<()> {
    let origins = format!("[\"{APP}\"]");
    let Stack { kafka: _kafka, server, device: _device } =
        Stack::start_with("cors-phone", &[("LOCKSTEP_WEB__ALLOWED_ORIGINS", &origins)]).await?;
    let path = "/lockstep.v1.Sync/Push";

    // A listed origin's preflight is answered with what its calls need.
    let listed = request(&server, "OPTIONS", path, &preflight_headers(APP), b"").await?;
    assert_eq!(listed.status, 200, "{:?}", listed.headers);
    assert_eq!(listed.header("access-control-allow-origin"), Some(APP));
    assert!(listed.header("access-control-allow-methods").is_some_and(|methods| methods.contains("POST")));
    let allowed = listed.header("access-control-allow-headers").unwrap_or_default();
    assert!(allowed.contains("authorization") && allowed.contains("x-grpc-web"), "{allowed}");

    // Any other origin's (or an origin-less one) gets no CORS header at all.
    for origin in ["https://evil.example", "https://app.example.evil", "null"] {
        let refused = request(&server, "OPTIONS", path, &preflight_headers(origin), b"").await?;
        assert_eq!(refused.status, 403, "{origin}");
        assert!(refused.cors_headers().is_empty(), "{origin}: {:?}", refused.headers);
    }
    let no_origin = request(&server, "OPTIONS", path, &[("access-control-request-method", "POST")], b"").await?;
    assert!(no_origin.cors_headers().is_empty(), "{:?}", no_origin.headers);

    // A gRPC-Web call without a token is refused by the guard as a gRPC call would be.
    let response = grpc_web(&server, path, None, &PushRequest { changes: vec![change("r1", 8)] }).await?;
    assert_eq!(response.status, 200);
    let (messages, trailers) = response.unary().await?;
    assert!(messages.is_empty());
    assert_eq!(trailers.get("grpc-status").map(String::as_str), Some("16"), "UNAUTHENTICATED: {trailers:?}");
    assert!(trailers.get("grpc-message").is_some_and(|message| message.contains("authorization")), "{trailers:?}");
    let response = grpc_web(&server, path, Some("not-a-token"), &PushRequest { changes: vec![] }).await?;
    let (_, trailers) = response.unary().await?;
    assert_eq!(trailers.get("grpc-status").map(String::as_str), Some("16"), "{trailers:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_no_origin_passes_a_preflight() -> anyhow::Result<()> {
    let Stack { kafka: _kafka, server, device: _device } = Stack::start("closed-phone").await?;
    let refused = request(&server, "OPTIONS", "/lockstep.v1.Sync/Push", &preflight_headers(APP), b"").await?;
    assert_eq!(refused.status, 403);
    assert!(refused.cors_headers().is_empty(), "{:?}", refused.headers);
    // Same-origin pages need no preflight: gRPC-Web itself is served.
    let response =
        grpc_web(&server, "/lockstep.v1.Sync/GetServerInfo", None, &lockstep_proto::v1::GetServerInfoRequest {})
            .await?;
    assert!(response.header("access-control-allow-origin").is_none());
    let (messages, trailers) = response.unary().await?;
    assert_eq!(trailers.get("grpc-status").map(String::as_str), Some("0"), "{trailers:?}");
    assert_eq!(messages.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_client_that_speaks_only_http1_calls_too() -> anyhow::Result<()> {
    let ca = TestCa::new("lockstep web test ca")?;
    let certs = tempfile::tempdir()?;
    let served = ca.issue(&["localhost", "127.0.0.1"], certs.path(), "server")?;
    let (cert_file, key_file) = (served.cert.to_string_lossy().to_string(), served.key.to_string_lossy().to_string());
    let events_topic = format!("lockstep.events.test-{}", uuid::Uuid::new_v4());
    let kafka = Broker::shared().await?;
    let server = Server::start_with(
        &kafka,
        &[
            ("LOCKSTEP_TLS__CERT_FILE", &cert_file),
            ("LOCKSTEP_TLS__KEY_FILE", &key_file),
            ("LOCKSTEP_EVENTS__TOPIC", &events_topic),
        ],
    )
    .await?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca.ca_file())? {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let connect = || async {
        let tcp = TcpStream::connect(server.addr()).await?;
        let tls = connector.connect(ServerName::try_from("localhost")?.to_owned(), tcp).await?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        anyhow::Ok(Box::new(tls) as Box<dyn Io>)
    };
    let info = lockstep_proto::v1::GetServerInfoRequest {};
    let response = grpc_web_on(connect().await?, &server, "/lockstep.v1.Sync/GetServerInfo", None, &info).await?;
    let (messages, trailers) = response.unary().await?;
    assert_eq!(trailers.get("grpc-status").map(String::as_str), Some("0"), "{trailers:?}");
    assert_eq!(messages.len(), 1);
    let push = PushRequest { changes: vec![change("r1", 8)] };
    let response = grpc_web_on(connect().await?, &server, "/lockstep.v1.Sync/Push", None, &push).await?;
    let (_, trailers) = response.unary().await?;
    assert_eq!(trailers.get("grpc-status").map(String::as_str), Some("16"), "{trailers:?}");
    Ok(())
}
