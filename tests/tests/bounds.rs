//! Authenticate first, bound everything: a forged token costs the server no
//! body; push bodies in flight are bounded and shed with a retry-after that
//! the CLI waits out; an upload that never finishes ends at the request
//! timeout and gives its bytes back.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use lockstep_e2e::{
    cli::Cli,
    device::{change, with_token},
    proxy::Proxy,
    stack::Stack,
    wait::{eventually, failed, not_yet, ready},
};
use lockstep_proto::{
    retry,
    v1::{PushRequest, sync_client::SyncClient},
};
use tonic::{Code, transport::Endpoint};

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_with_a_forged_token_is_refused_before_its_8_mib_body_is_read() -> anyhow::Result<()> {
    let Stack { kafka: _kafka, server, device } = Stack::start("phone").await?;
    // Between the client and the server: counts what the server let the client send.
    let proxy = Proxy::start(server.addr()).await?;
    let channel = Endpoint::from_shared(format!("http://{}", proxy.addr()))?.connect().await?;
    let mut sync = SyncClient::new(channel);
    let big: Vec<_> = (0..31).map(|index| change(&format!("r{index}"), 256 * 1024)).collect();
    let body_bytes: usize = big.iter().map(|change| change.ciphertext.len()).sum();
    assert!(body_bytes as u64 > 7 * MIB + MIB / 2, "a body of nearly 8 MiB");

    let before = proxy.bytes_to_upstream();
    let status = sync.push(with_token(PushRequest { changes: big.clone() }, "forged")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // Bytes still on their way through the proxy count too: nothing to wait for but time,
    // and a longer wait only makes the check below stricter.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused_bytes = proxy.bytes_to_upstream() - before;

    // The same body with a valid token is read whole: the measure tells the two apart.
    let before = proxy.bytes_to_upstream();
    let results = sync.push(device.request(PushRequest { changes: big })).await?.into_inner().results;
    assert_eq!(results.len(), 31);
    let accepted_bytes = proxy.bytes_to_upstream() - before;
    eprintln!("measured: forged token {refused_bytes} bytes reached the server, valid token {accepted_bytes}");
    assert!(accepted_bytes >= body_bytes as u64, "{accepted_bytes}");
    assert!(refused_bytes < 2 * MIB, "the server let a forged push send {refused_bytes} bytes");
    Ok(())
}

/// A raw HTTP/2 Push that sends `sent` bytes of a gRPC message announced as
/// `announced` bytes and then nothing more: the server holds what arrived.
struct HeldPush {
    response: h2::client::ResponseFuture,
    _body: h2::SendStream<Bytes>,
    _connection: tokio::task::JoinHandle<()>,
}

impl HeldPush {
    async fn start(addr: std::net::SocketAddr, token: &str, announced: usize, sent: usize) -> anyhow::Result<Self> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (client, connection) = h2::client::handshake(tcp).await?;
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut client = client.ready().await?;
        let request = http::Request::post(format!("http://{addr}/lockstep.v1.Sync/Push"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", format!("Bearer {token}"))
            .body(())?;
        let (response, mut body) = client.send_request(request, false)?;
        let mut data = BytesMut::with_capacity(5 + sent);
        data.put_u8(0);
        data.put_u32(u32::try_from(announced)?);
        data.put_bytes(0x0a, sent);
        body.send_data(data.freeze(), false)?;
        Ok(Self { response, _body: body, _connection: connection })
    }

    /// The grpc-status the server ended the call with.
    async fn status(self) -> anyhow::Result<String> {
        let response = self.response.await?;
        if let Some(status) = response.headers().get("grpc-status") {
            return Ok(status.to_str()?.to_string());
        }
        let mut body = response.into_body();
        while body.data().await.is_some() {}
        let trailers = body.trailers().await?.unwrap_or_default();
        Ok(trailers
            .get("grpc-status")
            .map(|status| status.to_str().unwrap_or_default().to_string())
            .unwrap_or_default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_bytes_in_flight_are_bounded_shed_with_a_retry_after_and_released() -> anyhow::Result<()> {
    let limits = [
        ("LOCKSTEP_LIMITS__MAX_REQUEST_BYTES", "1048576"),
        ("LOCKSTEP_LIMITS__MAX_INFLIGHT_PUSH_BYTES", "1048576"),
        ("LOCKSTEP_LIMITS__REQUEST_TIMEOUT", "4s"),
        ("LOCKSTEP_KAFKA__PRODUCE_TIMEOUT", "1s"),
        ("LOCKSTEP_KAFKA__OPERATION_DEADLINE", "2s"),
    ];
    let Stack { kafka: _kafka, server, device } = Stack::start_with("phone", &limits).await?;

    // An upload that stops short holds 900 kB of the 1 MiB budget.
    let held = HeldPush::start(server.addr(), &device.token, 1_000_000, 900_000).await?;
    // Give the held upload a moment to arrive whole. Nothing shows that it has (the server
    // has no gauge of the bytes in flight), and probing with pushes would race it: a push
    // that holds the budget when the held bytes arrive gets them shed instead.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = eventually(Duration::from_secs(3), "a push shed while an upload holds the budget", || async {
        match device.push(vec![change("a", 200_000), change("b", 200_000)]).await {
            Err(status) if status.code() == Code::ResourceExhausted => ready(status),
            Err(status) => failed(anyhow::anyhow!("expected RESOURCE_EXHAUSTED, got {status:?}")),
            Ok(_) => not_yet("a push got through: the held bytes had not all arrived"),
        }
    })
    .await?;
    assert!(retry::is_retryable(&status), "{status:?}");
    assert_eq!(retry::retry_after(&status), Some(Duration::from_secs(1)), "{status:?}");

    // Uploads that never finish end UNAVAILABLE at the request timeout and give their bytes back.
    assert_eq!(held.status().await?, (Code::Unavailable as i32).to_string());
    let offsets = device.push_ok(vec![change("a", 200_000), change("b", 200_000)]).await?;
    assert_eq!(offsets.len(), 2);

    // The CLI waits out the retry-after of a shed push and then gets through.
    // (The budget is the server's: another account's uploads hold it.)
    let cli = Cli::init("laptop", &server).await?;
    let value = "x".repeat(100_000);
    for record in ["one", "two"] {
        cli.json(&["put", "--id", record, &format!(r#"{{"blob":"{value}"}}"#)]).await?;
    }
    let shed_before = server.log().matches("push shed").count();
    let held = HeldPush::start(server.addr(), &device.token, 1_000_000, 900_000).await?;
    // The held upload arrives first (as above: no gauge to wait on, and a probe would race it).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sync = cli.command(&["sync"], true).output();
    let release = async {
        let shed = eventually(Duration::from_secs(60), "the CLI's push shed", || async {
            server.log().matches("push shed").count() > shed_before
        })
        .await;
        drop(held);
        shed
    };
    let (output, shed) = tokio::join!(sync, release);
    shed?;
    let output = output?;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(report["pushed"], 2, "{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_cannot_take_every_call_slot() -> anyhow::Result<()> {
    use lockstep_proto::v1::ListDevicesRequest;
    let limits = [("LOCKSTEP_LIMITS__MAX_CONCURRENT_REQUESTS_PER_DEVICE", "2")];
    let Stack { kafka: _kafka, server, device: phone } = Stack::start_with("phone", &limits).await?;
    let laptop = phone.pair(&server, "laptop").await?;
    let list = |device: &lockstep_e2e::device::Device| {
        let (mut accounts, request) = (device.accounts.clone(), device.request(ListDevicesRequest {}));
        async move { accounts.list_devices(request).await }
    };
    // Two uploads that never finish, on two connections, hold the phone's two slots.
    let held = [
        HeldPush::start(server.addr(), &phone.token, 100_000, 10).await?,
        HeldPush::start(server.addr(), &phone.token, 100_000, 10).await?,
    ];
    // The held uploads take their slots first. Nothing shows that they have, and a probing
    // call would race them: a call in a slot when one of them arrives gets it refused instead.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = list(&phone).await.expect_err("a third call of the phone");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("this device"), "{status:?}");
    assert!(retry::is_retryable(&status) && retry::retry_after(&status).is_some(), "{status:?}");
    // Another device of the same account is served meanwhile.
    assert_eq!(list(&laptop).await?.into_inner().devices.len(), 2);
    // The slots come back with the calls.
    drop(held);
    let listed = eventually(Duration::from_secs(60), "the phone's slots back", || async {
        match list(&phone).await {
            Ok(listed) => ready(listed),
            Err(status) if status.code() == Code::ResourceExhausted => not_yet(format!("{status:?}")),
            Err(status) => failed(anyhow::anyhow!("the phone's slots did not come back: {status:?}")),
        }
    })
    .await?;
    assert_eq!(listed.into_inner().devices.len(), 2);
    Ok(())
}

/// `limits.max_connections`: with two connections open, a third is closed at once (its
/// call fails); when one of the two closes, new connections are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_are_closed() -> anyhow::Result<()> {
    use lockstep_e2e::{kafka::Kafka, server::Server};
    use lockstep_proto::v1::GetServerInfoRequest;
    let kafka = Kafka::start().await?;
    let server = Server::start_with(&kafka, &[("LOCKSTEP_LIMITS__MAX_CONNECTIONS", "2")]).await?;
    let mut first = server.sync().await?;
    first.get_server_info(GetServerInfoRequest {}).await?;
    let mut second = server.sync().await?;
    second.get_server_info(GetServerInfoRequest {}).await?;
    // A third connection is accepted by the kernel and closed by the server before any answer.
    let third = match server.sync().await {
        Ok(mut third) => {
            third.get_server_info(GetServerInfoRequest {}).await.map(|_| ()).map_err(|status| status.to_string())
        }
        Err(error) => Err(error.to_string()),
    };
    assert!(third.is_err(), "a third connection was served");
    second.get_server_info(GetServerInfoRequest {}).await.expect("the open connections are still served");
    drop(first);
    // The server frees the slot when it sees the connection end: wait for that.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let served = match server.sync().await {
            Ok(mut client) => client.get_server_info(GetServerInfoRequest {}).await.is_ok(),
            Err(_) => false,
        };
        if served {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "a freed slot never served a new connection");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
