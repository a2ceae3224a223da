//! A TCP proxy the fault tests control, put between Lockstep and Kafka.
//!
//! Kafka clients connect to the broker address the metadata advertises, not
//! to the bootstrap address, so the broker must advertise the proxy's address
//! (see [`crate::kafka::KafkaOptions::advertised_port`]) for every Kafka
//! connection of the server to pass through here.
//!
//! - [`Proxy::cut`] drops every open connection and blackholes new ones (the
//!   TCP handshake succeeds, nothing is ever forwarded): a network partition,
//!   where a client learns nothing until its own timeouts fire.
//! - [`Proxy::freeze`] forwards nothing more on open connections, without
//!   closing them, and blackholes new ones: a partition where packets are
//!   dropped and no reset ever arrives, so only a client's own request
//!   timeouts notice it (the harder case for "answer within a deadline").
//! - [`Proxy::restore`] forwards again: frozen connections carry on where they
//!   stopped, blackholed ones are closed (so clients reconnect).
//! - [`Proxy::set_delay`] delays every chunk, in each direction, by a fixed
//!   latency without limiting throughput (a slow link, not a narrow one).
//! - [`Proxy::bytes_to_upstream`] counts what it delivered upstream (how much
//!   of a request a server let its client send).
//! - [`Proxy::counts`] says what each fault did to the traffic (connections
//!   it cut or held, chunks it held or delayed): the evidence that a fault hit.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};

/// Chunks queued per direction of a connection before the reader waits.
const QUEUED_CHUNKS: usize = 1024;
const CHUNK_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Link {
    cut: bool,
    frozen: bool,
    delay: Duration,
}

impl Link {
    /// New connections are held, never forwarded.
    fn blackholes(&self) -> bool {
        self.cut || self.frozen
    }
}

pub struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    link_tx: watch::Sender<Link>,
    accept_task: JoinHandle<()>,
    bytes_up: Arc<AtomicU64>,
    effects: Arc<Effects>,
}

/// What the faults did to the traffic so far, counted where they took effect.
#[derive(Debug, Default)]
struct Effects {
    /// Open connections a cut closed.
    connections_cut: AtomicU64,
    /// New connections held unforwarded while the link was cut or frozen.
    connections_blackholed: AtomicU64,
    /// Reads or writes that had to wait for a frozen link.
    chunks_held: AtomicU64,
    /// Chunks forwarded later than they arrived because of a delay.
    chunks_delayed: AtomicU64,
}

/// A snapshot of [`Proxy::counts`]; subtract two to see what one fault did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProxyCounts {
    pub connections_cut: u64,
    pub connections_blackholed: u64,
    pub chunks_held: u64,
    pub chunks_delayed: u64,
}

impl ProxyCounts {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &ProxyCounts) -> ProxyCounts {
        ProxyCounts {
            connections_cut: self.connections_cut.saturating_sub(earlier.connections_cut),
            connections_blackholed: self.connections_blackholed.saturating_sub(earlier.connections_blackholed),
            chunks_held: self.chunks_held.saturating_sub(earlier.chunks_held),
            chunks_delayed: self.chunks_delayed.saturating_sub(earlier.chunks_delayed),
        }
    }
}

impl std::fmt::Display for ProxyCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "proxy cut {} connections, blackholed {}, held {} chunks, delayed {}",
            self.connections_cut, self.connections_blackholed, self.chunks_held, self.chunks_delayed
        )
    }
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (link_tx, link_rx) = watch::channel(Link::default());
        let bytes_up = Arc::new(AtomicU64::new(0));
        let effects = Arc::new(Effects::default());
        let accept_task = tokio::spawn(accept_loop(listener, upstream, link_rx, bytes_up.clone(), effects.clone()));
        Ok(Self { addr, upstream, link_tx, accept_task, bytes_up, effects })
    }

    /// What the faults did to the traffic so far.
    pub fn counts(&self) -> ProxyCounts {
        let effects = &self.effects;
        ProxyCounts {
            connections_cut: effects.connections_cut.load(Ordering::Relaxed),
            connections_blackholed: effects.connections_blackholed.load(Ordering::Relaxed),
            chunks_held: effects.chunks_held.load(Ordering::Relaxed),
            chunks_delayed: effects.chunks_delayed.load(Ordering::Relaxed),
        }
    }

    /// Bytes written to upstream so far, over all connections.
    pub fn bytes_to_upstream(&self) -> u64 {
        self.bytes_up.load(Ordering::Relaxed)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Drops every open connection; new ones are accepted and never forwarded.
    pub fn cut(&self) {
        self.link_tx.send_modify(|link| link.cut = true);
    }

    /// Open connections stall (nothing forwarded, nothing closed); new ones
    /// are accepted and never forwarded.
    pub fn freeze(&self) {
        self.link_tx.send_modify(|link| link.frozen = true);
    }

    /// Forwards again, after [`Proxy::cut`] or [`Proxy::freeze`].
    pub fn restore(&self) {
        self.link_tx.send_modify(|link| {
            link.cut = false;
            link.frozen = false;
        });
    }

    /// Every chunk is forwarded `delay` after it was read (zero: at once).
    pub fn set_delay(&self, delay: Duration) {
        self.link_tx.send_modify(|link| link.delay = delay);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Connections end when the link sender goes away (see `until_cut`).
        self.accept_task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    link_rx: watch::Receiver<Link>,
    bytes_up: Arc<AtomicU64>,
    effects: Arc<Effects>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of file descriptors or similar: try again shortly rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(serve(client, upstream, link_rx.clone(), bytes_up.clone(), effects.clone()));
    }
}

async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    mut link_rx: watch::Receiver<Link>,
    bytes_up: Arc<AtomicU64>,
    effects: Arc<Effects>,
) {
    if link_rx.borrow_and_update().blackholes() {
        // Blackholed: hold the socket, read nothing, until the link is back.
        effects.connections_blackholed.fetch_add(1, Ordering::Relaxed);
        until_restored(&mut link_rx).await;
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        // Upstream down (Kafka killed): close, as a refused connection would.
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let forward = futures::future::join(
        pipe(client_read, server_write, link_rx.clone(), Some(bytes_up), effects.clone()),
        pipe(server_read, client_write, link_rx.clone(), None, effects.clone()),
    );
    tokio::select! {
        _ = forward => {}
        () = until_cut(&mut link_rx) => {
            effects.connections_cut.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Copies `from` to `to`, each chunk due `delay` after it was read; shuts
/// `to` down once `from` ended and everything queued was written.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    link_rx: watch::Receiver<Link>,
    written: Option<Arc<AtomicU64>>,
    effects: Arc<Effects>,
) {
    let (chunk_tx, mut chunk_rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUED_CHUNKS);
    let mut writer_link_rx = link_rx.clone();
    let mut reader_link_rx = link_rx;
    let reader_effects = effects.clone();
    let read = async move {
        let mut buffer = vec![0u8; CHUNK_BYTES];
        loop {
            // Frozen: leave the bytes in the kernel, as a dead link would.
            if until_thawed(&mut reader_link_rx).await {
                reader_effects.chunks_held.fetch_add(1, Ordering::Relaxed);
            }
            let read = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            let due = Instant::now() + reader_link_rx.borrow().delay;
            if chunk_tx.send((due, buffer[..read].to_vec())).await.is_err() {
                break;
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = chunk_rx.recv().await {
            if due > Instant::now() {
                effects.chunks_delayed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep_until(due).await;
            }
            if until_thawed(&mut writer_link_rx).await {
                effects.chunks_held.fetch_add(1, Ordering::Relaxed);
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            if let Some(written) = &written {
                written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// Returns when the link is cut or the proxy is gone.
async fn until_cut(link_rx: &mut watch::Receiver<Link>) {
    while !link_rx.borrow_and_update().cut {
        if link_rx.changed().await.is_err() {
            return;
        }
    }
}

/// Returns when the link is not frozen (at once, usually) or the proxy is
/// gone; true if it had to wait.
async fn until_thawed(link_rx: &mut watch::Receiver<Link>) -> bool {
    let mut waited = false;
    while link_rx.borrow_and_update().frozen {
        waited = true;
        if link_rx.changed().await.is_err() {
            break;
        }
    }
    waited
}

/// Returns when the link is restored or the proxy is gone.
async fn until_restored(link_rx: &mut watch::Receiver<Link>) {
    while link_rx.borrow_and_update().blackholes() {
        if link_rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(message).await?;
        let mut answer = vec![0u8; message.len()];
        stream.read_exact(&mut answer).await?;
        Ok(answer)
    }

    #[tokio::test]
    async fn forwards_cuts_blackholes_restores_and_delays() -> anyhow::Result<()> {
        let proxy = Proxy::start(echo_server().await).await?;
        let mut open = TcpStream::connect(proxy.addr()).await?;
        assert_eq!(round_trip(&mut open, b"hello").await?, b"hello");

        assert_eq!(proxy.counts(), ProxyCounts::default(), "no fault yet, no effect counted");
        proxy.cut();
        // The open connection is closed by the proxy.
        let mut buffer = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(5), open.read(&mut buffer)).await?;
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        // A new one connects but hears nothing.
        let mut blackholed = TcpStream::connect(proxy.addr()).await?;
        blackholed.write_all(b"anyone?").await?;
        let silent = tokio::time::timeout(Duration::from_millis(300), blackholed.read(&mut buffer)).await;
        assert!(silent.is_err(), "a blackholed connection answered: {silent:?}");
        let after_cut = proxy.counts();
        assert_eq!((after_cut.connections_cut, after_cut.connections_blackholed), (1, 1), "{after_cut}");

        proxy.restore();
        let mut again = TcpStream::connect(proxy.addr()).await?;
        assert_eq!(round_trip(&mut again, b"back").await?, b"back");

        // Frozen: the open connection stays open and silent, then carries on.
        proxy.freeze();
        again.write_all(b"held").await?;
        let held = tokio::time::timeout(Duration::from_millis(300), again.read(&mut buffer)).await;
        assert!(held.is_err(), "a frozen link forwarded: {held:?}");
        proxy.restore();
        let mut rest = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), again.read_exact(&mut rest)).await??;
        assert_eq!(&rest, b"held");
        let after_freeze = proxy.counts().since(&after_cut);
        assert!(after_freeze.chunks_held >= 1 && after_freeze.connections_cut == 0, "{after_freeze}");
        assert_eq!(after_freeze.chunks_delayed, 0, "{after_freeze}");

        proxy.set_delay(Duration::from_millis(200));
        let started = Instant::now();
        assert_eq!(round_trip(&mut again, b"slow").await?, b"slow");
        // One delay each way.
        assert!(started.elapsed() >= Duration::from_millis(400), "{:?}", started.elapsed());
        let after_delay = proxy.counts().since(&after_cut);
        assert!(after_delay.chunks_delayed >= 2, "each way: {after_delay}");
        Ok(())
    }
}
