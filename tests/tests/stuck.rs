//! Streams that cannot stick: 1,000 Subscribe streams whose devices never
//! read are ended (UNAVAILABLE, retryable) after `delivery.send_timeout`, their
//! slots free at once, server memory bounded, another user's devices served
//! meanwhile; SIGTERM with 1,000 stuck streams exits within the drain deadline.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use lockstep_e2e::{
    device::{Device, change, changes, receive_changes},
    stack::Stack,
    wait::{eventually, not_yet, ready},
};
use lockstep_proto::v1::{CreatePairingTicketRequest, RedeemPairingTicketRequest};

const STUCK: usize = 1000;
const STREAMS_PER_CONNECTION: usize = 50;
/// Each stuck stream's receive window: what the server may send it before its sends block.
const WINDOW: u32 = 1024;
/// h2 charges a received DATA frame of n < 256 bytes 256 - n against a per-connection budget until
/// the application reads it, and past the budget the client closes its own connection (GOAWAY
/// ENHANCE_YOUR_CALM, "too_many_data_frames"). By default the budget is half the connection window,
/// 32 KiB: about 140 of the server's 25-byte heartbeats (one a second per stream in the test kit).
/// A device that never reads holds every frame, so with 50 streams a connection the raw client gave
/// up on its own connections 2-3 s after opening them, before most streams met the send timeout
/// (and under PostgreSQL, where Subscribe is slower, sometimes before a connection's last stream
/// had opened). The budget here covers all the windows allow: every byte of every stream's window
/// in a frame of its own.
const DATA_FRAME_BUDGET: usize = STREAMS_PER_CONNECTION * WINDOW as usize * 256;
const WAIT: Duration = Duration::from_secs(60);

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).ok_or_else(|| anyhow::anyhow!("no VmRSS"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

/// Subscribe streams opened over raw HTTP/2 with a 1 KiB receive window, never read.
struct StuckStreams {
    /// Per stream: the grpc-status its response headers carried, if any (a refusal).
    refused: Vec<Option<String>>,
    _held: Vec<(h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>, Vec<h2::RecvStream>)>,
}

impl StuckStreams {
    async fn open(addr: std::net::SocketAddr, tokens: &[String]) -> anyhow::Result<Self> {
        let mut refused = Vec::new();
        let mut held = Vec::new();
        for chunk in tokens.chunks(STREAMS_PER_CONNECTION) {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let (client, connection) = h2::client::Builder::new()
                .initial_window_size(WINDOW)
                .data_frame_budget(DATA_FRAME_BUDGET)
                .handshake::<_, Bytes>(tcp)
                .await?;
            let connection = tokio::spawn(async move {
                if let Err(error) = connection.await {
                    eprintln!("the raw client's HTTP/2 connection ended: {error}");
                }
            });
            let mut bodies = Vec::new();
            for token in chunk {
                let mut client = client.clone().ready().await?;
                let request = http::Request::post(format!("http://{addr}/lockstep.v1.Sync/Subscribe"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .header("authorization", format!("Bearer {token}"))
                    .body(())?;
                let (response, mut body) = client.send_request(request, false)?;
                let mut empty_message = BytesMut::new();
                empty_message.put_u8(0);
                empty_message.put_u32(0);
                body.send_data(empty_message.freeze(), true)?;
                let response = tokio::time::timeout(WAIT, response).await??;
                refused.push(response.headers().get("grpc-status").map(|status| status.to_str().unwrap_or("?").into()));
                // Held, never read.
                bodies.push(response.into_body());
            }
            held.push((client, connection, bodies));
        }
        Ok(Self { refused, _held: held })
    }

    fn refusals(&self) -> usize {
        self.refused.iter().filter(|status| status.is_some()).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_that_never_read_are_ended_and_nobody_else_notices() -> anyhow::Result<()> {
    let settings = [
        ("LOCKSTEP_DELIVERY__SEND_TIMEOUT", "2s"),
        ("LOCKSTEP_LIMITS__MAX_SUBSCRIPTIONS", "1002"),
        ("LOCKSTEP_LIMITS__MAX_SUBSCRIPTIONS_PER_USER", "1000"),
    ];
    let Stack { kafka: _kafka, mut server, device: laptop } = Stack::start_with("laptop", &settings).await?;
    let phone = laptop.pair(&server, "phone").await?;
    // Another user with 1,000 devices that will stop reading.
    let owner = Device::create_account(&server, "stuck-0").await?;
    let mut accounts = server.accounts().await?;
    let mut tokens = Vec::with_capacity(STUCK);
    for index in 0..STUCK {
        let ticket =
            accounts.create_pairing_ticket(owner.request(CreatePairingTicketRequest {})).await?.into_inner().ticket;
        let request = RedeemPairingTicketRequest { ticket, device_name: format!("stuck-{index}") };
        tokens.push(accounts.redeem_pairing_ticket(request).await?.into_inner().device_token);
    }
    let rss_before = rss_kib(server.pid())?;

    let stuck = StuckStreams::open(server.addr(), &tokens).await?;
    assert_eq!(stuck.refusals(), 0, "every stuck stream got a slot");
    // Their user's changes fill their windows and buffers.
    for _ in 0..6 {
        owner.push_ok(vec![change("big", 64 * 1024)]).await?;
    }
    // Meanwhile, the other user's devices are served as usual.
    let mut stream = phone.subscribe(None).await?;
    let offsets = laptop.push_ok(changes(20, 1024)).await?;
    let received = receive_changes(&mut stream, 20, WAIT).await?;
    assert_eq!(received.offsets(), offsets);
    let rss_stuck = rss_kib(server.pid())?;

    // Every stuck stream ends by the send timeout, and its slot is free.
    let (timed_out, closed) = eventually(WAIT, format!("{STUCK} stuck streams ended"), || async {
        let log = server.log();
        let timed_out = log.matches("stream ended: the device takes no data").count();
        let closed = log.matches("device closed its stream").count();
        if timed_out + closed >= STUCK {
            ready((timed_out, closed))
        } else {
            not_yet(format!("{timed_out} ended by the timeout, {closed} closed"))
        }
    })
    .await?;
    eprintln!(
        "measured: of {STUCK} stuck streams, {timed_out} ended by delivery.send_timeout, {closed} closed by the client"
    );
    // None of them closed by the raw client: it holds all its windows allow (DATA_FRAME_BUDGET).
    assert_eq!((timed_out, closed), (STUCK, 0), "stuck streams ended by the send timeout, and closed by the client");
    drop(stuck);
    let again = StuckStreams::open(server.addr(), &tokens).await?;
    assert_eq!(again.refusals(), 0, "the slots of the ended streams were free again");
    let rss_after = rss_kib(server.pid())?;
    eprintln!(
        "measured: server RSS {} MiB before, {} MiB with {STUCK} stuck streams, {} MiB after they were ended and \
         {STUCK} more opened",
        rss_before / 1024,
        rss_stuck / 1024,
        rss_after / 1024
    );
    // 1,000 streams × (4 buffered messages + one 1 KiB window) of 64 KiB changes is at most ~260 MiB.
    assert!(rss_stuck.saturating_sub(rss_before) < 300 * 1024, "{rss_before} KiB -> {rss_stuck} KiB");

    // SIGTERM with 1,000 stuck streams: out within the drain deadline (limits.drain_deadline, 10 s),
    // process exit included: calls get 8 s of it, the flushes the rest.
    for _ in 0..6 {
        owner.push_ok(vec![change("big", 64 * 1024)]).await?;
    }
    // Time for the big changes to reach the new stuck streams, so that the stop meets sends
    // that block: no API shows a send that is queued but not taken.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    assert!(server.terminate()?, "clean exit");
    let took = started.elapsed();
    eprintln!("measured: SIGTERM with {STUCK} stuck streams: exited after {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    drop(again);
    Ok(())
}
