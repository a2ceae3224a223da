//! Local HTTP listeners that stand in for push services: they count the
//! connections and requests they get, hold requests in flight, or stream a
//! huge body, so tests see what the worker's HTTP client did.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use lockstep_push::{
    Settings,
    events::Publisher,
    resolve::Lookup,
    vapid::VapidKey,
    wake::{WakeOrder, Waker},
};
use lockstep_schemas::PushTarget;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Answer `status` with `headers` after `delay` (a client that gives up first is let go).
    Answer { status: u16, delay: Duration, headers: Vec<(String, String)> },
    /// Answer 200 with a body of `bytes` zero bytes, written lazily as the client reads.
    Stream { bytes: u64 },
}

impl Behaviour {
    pub fn ok() -> Self {
        Self::Answer { status: 200, delay: Duration::ZERO, headers: Vec::new() }
    }

    pub fn slow(delay: Duration) -> Self {
        Self::Answer { status: 200, delay, headers: Vec::new() }
    }
}

/// Requests being answered right now, and the most at once, over a group of listeners.
#[derive(Debug, Default)]
pub struct InFlight {
    pub now: AtomicUsize,
    pub max: AtomicUsize,
}

impl InFlight {
    fn enter(&self) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
    }

    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
pub struct Listener {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    /// (request path, when it arrived)
    pub requests: Arc<Mutex<Vec<(String, Instant)>>>,
    pub body_bytes_sent: Arc<AtomicU64>,
    /// A `Stream` answer stopped (the client went away or it was all sent).
    pub stream_ended: Arc<AtomicBool>,
    pub in_flight: Arc<InFlight>,
    pub group_in_flight: Arc<InFlight>,
}

impl Listener {
    pub async fn start(bind: &str, behaviour: Behaviour) -> Self {
        Self::start_in_group(bind, behaviour, Arc::default()).await
    }

    /// Like [`Listener::start`], adding its requests in flight to `group`.
    pub async fn start_in_group(bind: &str, behaviour: Behaviour, group: Arc<InFlight>) -> Self {
        let socket = TcpListener::bind(bind).await.expect("bind a local listener");
        let listener = Self {
            addr: socket.local_addr().unwrap(),
            connections: Arc::default(),
            requests: Arc::default(),
            body_bytes_sent: Arc::default(),
            stream_ended: Arc::default(),
            in_flight: Arc::default(),
            group_in_flight: group,
        };
        let shared = listener.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = socket.accept().await {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(shared.clone().serve(stream, behaviour.clone()));
            }
        });
        listener
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<(String, Instant)> {
        self.requests.lock().unwrap().clone()
    }

    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn serve(self, mut stream: TcpStream, behaviour: Behaviour) {
        let mut buffer = Vec::new();
        loop {
            // One request: its head, then Content-Length bytes of body.
            let head_end = loop {
                if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                    break end + 4;
                }
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(read) => buffer.extend_from_slice(&chunk[..read]),
                }
            };
            let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
            let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buffer.len() < head_end + length {
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(read) => buffer.extend_from_slice(&chunk[..read]),
                }
            }
            buffer.drain(..head_end + length);
            self.requests.lock().unwrap().push((path, Instant::now()));
            self.in_flight.enter();
            self.group_in_flight.enter();
            let answered = self.answer(&mut stream, &behaviour).await;
            self.in_flight.leave();
            self.group_in_flight.leave();
            if !answered {
                return;
            }
        }
    }

    /// `false`: the connection is done.
    async fn answer(&self, stream: &mut TcpStream, behaviour: &Behaviour) -> bool {
        match behaviour {
            Behaviour::Answer { status, delay, headers } => {
                // Wait, unless the client gives up (it sends nothing more before an answer).
                let mut probe = [0u8; 1];
                tokio::select! {
                    () = tokio::time::sleep(*delay) => {}
                    _ = stream.read(&mut probe) => return false,
                }
                let mut answer = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n");
                for (name, value) in headers {
                    answer.push_str(&format!("{name}: {value}\r\n"));
                }
                answer.push_str("\r\n");
                stream.write_all(answer.as_bytes()).await.is_ok()
            }
            Behaviour::Stream { bytes } => {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {bytes}\r\n\r\n");
                if stream.write_all(head.as_bytes()).await.is_err() {
                    self.stream_ended.store(true, Ordering::SeqCst);
                    return false;
                }
                let chunk = vec![0u8; 64 * 1024];
                let mut sent = 0u64;
                while sent < *bytes {
                    let size = chunk.len().min((*bytes - sent) as usize);
                    match stream.write(&chunk[..size]).await {
                        Ok(0) | Err(_) => break,
                        Ok(written) => {
                            sent += written as u64;
                            self.body_bytes_sent.fetch_add(written as u64, Ordering::SeqCst);
                        }
                    }
                }
                self.stream_ended.store(true, Ordering::SeqCst);
                false
            }
        }
    }
}

/// A worker's settings for tests: `allowed` networks, short timeouts.
pub fn settings(allowed: &[&str]) -> Settings {
    let mut settings = Settings::default();
    settings.http.allow_private_targets = allowed.iter().map(|net| net.to_string()).collect();
    settings.http.request_timeout = Duration::from_secs(5);
    settings.wake.retry_base_delay = Duration::from_millis(200);
    settings
}

pub fn waker(settings: Settings, lookup: Lookup) -> Arc<Waker> {
    let dir = tempfile::tempdir().unwrap();
    let vapid = VapidKey::load_or_create(dir.path()).unwrap();
    Arc::new(Waker::with_lookup(settings, vapid, "push-test".into(), Publisher::disabled(), lookup).unwrap())
}

/// A wake-up of a Matrix-gateway webhook at `base` (`scheme://host:port`).
pub fn webhook(base: &str, device: &str) -> WakeOrder {
    WakeOrder {
        user_id: format!("user-of-{device}"),
        device_id: device.to_string(),
        target: PushTarget::Webhook {
            url: format!("{base}/_matrix/push/v1/notify"),
            app_id: "org.example".into(),
            pushkey: device.to_string(),
        },
        log_end: 7,
    }
}
