//! Simulated devices for the fault tests, on the raw gRPC API, recording
//! everything they see in a [`History`].
//!
//! Each device pushes batches of changes with unique change ids and retries
//! a change that failed retryably with the same bytes until its retry
//! deadline (a few batches it never retries); now and then it pushes an
//! acknowledged batch again (a device that lost the answer), which must come
//! back as duplicates. Each device also keeps one Subscribe stream open,
//! "applies" (records) what arrives and acks after recording, and
//! resubscribes when the stream breaks (with `repair = true` after the server
//! answered DATA_LOSS). Every call has a client deadline, every loop a
//! deadline of its own.

use std::{sync::Arc, time::Duration};

use lockstep_proto::{
    retry::{RETRYABLE_METADATA, is_retryable},
    v1::{
        AckRequest, Change, PushRequest, SubscribeRequest, push_result, subscribe_response::Event,
        sync_client::SyncClient,
    },
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tonic::{Code, Request, Status, transport::Channel};

use crate::{
    device::{Device, change, with_token},
    history::{History, PushOutcome},
    wait::eventually,
};

/// What each simulated device does.
#[derive(Debug, Clone)]
pub struct Plan {
    pub batches_per_device: usize,
    /// Changes per push: 1..=max_batch.
    pub max_batch: usize,
    pub ciphertext_bytes: usize,
    /// Pause between pushes, in milliseconds (a range).
    pub pause_ms: std::ops::Range<u64>,
    /// Time to "apply" one delivered batch before acking it.
    pub apply_delay: Duration,
    /// Client deadline of each RPC (sent as grpc-timeout, and enforced locally).
    pub call_timeout: Duration,
    /// How long a change is retried before the device gives up on it.
    pub retry_for: Duration,
    /// Chance that a device pushes an acknowledged batch again.
    pub push_again: f64,
    /// Chance that a device pushes a batch once and never retries it (it
    /// dropped the edit): a failed change of it must reach nobody unless logged.
    pub no_retry: f64,
    /// A stream silent this long (no heartbeat) is given up and reopened.
    pub stream_idle: Duration,
    /// Close each stream after this many milliseconds (a range) and open a new
    /// one, as a device going in and out of coverage does. None: keep it.
    pub reconnect_ms: Option<std::ops::Range<u64>>,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            batches_per_device: 30,
            max_batch: 8,
            ciphertext_bytes: 256,
            pause_ms: 0..60,
            apply_delay: Duration::ZERO,
            call_timeout: Duration::from_secs(20),
            retry_for: Duration::from_secs(90),
            push_again: 0.05,
            no_retry: 0.1,
            stream_idle: Duration::from_secs(15),
            reconnect_ms: None,
        }
    }
}

/// A device on channels of its own that reconnect lazily (across server restarts).
#[derive(Clone)]
pub struct SimDevice {
    pub id: String,
    token: String,
    sync: SyncClient<Channel>,
    history: Arc<History>,
    call_timeout: Duration,
}

impl SimDevice {
    pub fn new(device: &Device, endpoint: &str, history: Arc<History>, call_timeout: Duration) -> anyhow::Result<Self> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        Ok(Self {
            id: device.device_id.clone(),
            token: device.token.clone(),
            sync: SyncClient::new(channel).max_decoding_message_size(64 * 1024 * 1024),
            history,
            call_timeout,
        })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = with_token(message, &self.token);
        request.set_timeout(self.call_timeout);
        request
    }

    /// Runs `call` with the client deadline, also enforced here: a server that
    /// ignores grpc-timeout must not hang the test.
    async fn bounded<T>(&self, call: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
        match tokio::time::timeout(self.call_timeout + Duration::from_secs(2), call).await {
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded("client-side deadline: the call hung")),
        }
    }

    /// One Push call, recorded per change. Returns each change's outcome.
    pub async fn push_once(&self, changes: &[Change], again: bool) -> Vec<PushOutcome> {
        let sent_at = std::time::Instant::now();
        let request = self.request(PushRequest { changes: changes.to_vec() });
        let answer = self.bounded(async { Ok(self.sync.clone().push(request).await?.into_inner().results) }).await;
        let outcomes: Vec<PushOutcome> = match answer {
            Ok(results) if results.len() == changes.len() => {
                self.history.call("push", None);
                results
                    .into_iter()
                    .map(|result| match result.result {
                        Some(push_result::Result::Offset(offset)) => {
                            PushOutcome::Written { offset, duplicate: result.duplicate }
                        }
                        Some(push_result::Result::Error(error)) => {
                            PushOutcome::Failed { code: Code::from_i32(error.code), retryable: error.retryable }
                        }
                        None => PushOutcome::Failed { code: Code::Unknown, retryable: false },
                    })
                    .collect()
            }
            Ok(_) => {
                self.history.call("push", Some(Code::Internal));
                vec![PushOutcome::CallFailed { code: Code::Internal, retryable: false }; changes.len()]
            }
            Err(status) => {
                self.history.call("push", Some(status.code()));
                // A bare CANCELLED (no verdict of the server's) is the call's stream broken in
                // transport, e.g. the server killed mid-call: its changes are in doubt, not
                // refused, and the device pushes them again.
                let broken = status.code() == Code::Cancelled && status.metadata().get(RETRYABLE_METADATA).is_none();
                let failed =
                    PushOutcome::CallFailed { code: status.code(), retryable: is_retryable(&status) || broken };
                vec![failed; changes.len()]
            }
        };
        for (change, outcome) in changes.iter().zip(&outcomes) {
            self.history.push_sent_at(&self.id, &change.change_id, outcome.clone(), again, sent_at);
        }
        outcomes
    }

    /// Pushes `changes`, retrying those that failed retryably (same bytes)
    /// until `retry_for` passed. Returns each change's offset, if it got one.
    pub async fn push_with_retries(
        &self,
        changes: &[Change],
        retry_for: Duration,
        rng: &mut StdRng,
    ) -> Vec<Option<i64>> {
        let deadline = Instant::now() + retry_for;
        let mut offsets = vec![None; changes.len()];
        let mut pending: Vec<usize> = (0..changes.len()).collect();
        loop {
            let batch: Vec<Change> = pending.iter().map(|index| changes[*index].clone()).collect();
            let outcomes = self.push_once(&batch, false).await;
            let mut still_pending = Vec::new();
            for (index, outcome) in pending.into_iter().zip(outcomes) {
                offsets[index] = outcome.offset();
                if outcome.retryable() {
                    still_pending.push(index);
                }
            }
            pending = still_pending;
            if pending.is_empty() || Instant::now() >= deadline {
                return offsets;
            }
            // A device's own backoff between retries: part of the simulated workload.
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
        }
    }

    /// One Ack call, recorded.
    pub async fn ack(&self, offset: i64) -> Result<i64, Status> {
        let request = self.request(AckRequest { offset });
        let answer =
            self.bounded(async { Ok(self.sync.clone().ack(request).await?.into_inner().committed_offset) }).await;
        self.history.call("ack", answer.as_ref().err().map(Status::code));
        self.history.acked(&self.id, offset, answer.as_ref().map(|committed| *committed).map_err(Status::code));
        answer
    }

    /// Opens a stream from the committed offset (recorded as a call); `repair`
    /// after the server answered DATA_LOSS, as a real device does.
    pub async fn subscribe(
        &self,
        repair: bool,
    ) -> Result<tonic::Streaming<lockstep_proto::v1::SubscribeResponse>, Status> {
        // The stream itself lives long: only opening it has the deadline.
        let request = with_token(SubscribeRequest { from_offset: None, repair }, &self.token);
        let answer = self.bounded(async { Ok(self.sync.clone().subscribe(request).await?.into_inner()) }).await;
        self.history.call("subscribe", answer.as_ref().err().map(Status::code));
        answer
    }
}

/// Every simulated device's tasks; stop with [`Workload::stop`].
pub struct Workload {
    pushers: Vec<JoinHandle<()>>,
    subscribers: Vec<JoinHandle<()>>,
    stop_tx: watch::Sender<bool>,
    /// Changes the pushers set out to push, all batches together.
    planned: usize,
}

impl Workload {
    /// Starts a pusher and a subscriber per device; `seed` picks sizes and pauses.
    pub fn start(devices: &[SimDevice], plan: &Plan, seed: u64) -> Self {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut pushers = Vec::new();
        let mut subscribers = Vec::new();
        let mut planned = 0;
        for (index, device) in devices.iter().enumerate() {
            // Batch sizes drawn up front, so that the run knows what it planned.
            let mut sizes_rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000).wrapping_add(250 + index as u64));
            let sizes: Vec<usize> =
                (0..plan.batches_per_device).map(|_| sizes_rng.random_range(1..=plan.max_batch)).collect();
            planned += sizes.iter().sum::<usize>();
            let rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000).wrapping_add(index as u64));
            pushers.push(tokio::spawn(push_loop(device.clone(), plan.clone(), sizes, rng, stop_rx.clone())));
            let rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000).wrapping_add(500 + index as u64));
            subscribers.push(tokio::spawn(subscribe_loop(device.clone(), plan.clone(), rng, stop_rx.clone())));
        }
        Self { pushers, subscribers, stop_tx, planned }
    }

    /// Changes the pushers set out to push (0 for [`Workload::subscribe_only`]).
    pub fn planned_changes(&self) -> usize {
        self.planned
    }

    /// Starts only the subscribers (changes were pushed beforehand).
    pub fn subscribe_only(devices: &[SimDevice], plan: &Plan) -> Self {
        let (stop_tx, stop_rx) = watch::channel(false);
        let subscribers = devices
            .iter()
            .enumerate()
            .map(|(index, device)| {
                let rng = StdRng::seed_from_u64(index as u64);
                tokio::spawn(subscribe_loop(device.clone(), plan.clone(), rng, stop_rx.clone()))
            })
            .collect();
        Self { pushers: Vec::new(), subscribers, stop_tx, planned: 0 }
    }

    /// Waits until every pusher finished its batches; false if `timeout` passed first.
    pub async fn pushers_done(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while let Some(pusher) = self.pushers.last_mut() {
            if tokio::time::timeout_at(deadline, pusher).await.is_err() {
                return false;
            }
            // Finished: a JoinHandle must not be polled again.
            self.pushers.pop();
        }
        true
    }

    /// Waits until every device applied everything below `log_end` (or `timeout`).
    pub async fn settle(&self, history: &History, log_end: i64, timeout: Duration) -> bool {
        eventually(timeout, "every device applying the log", || async { history.all_applied(log_end) }).await.is_ok()
    }

    /// Stops every task (pushers mid-retry too) and waits a little for them;
    /// one stuck in a call is aborted when `self` drops.
    pub async fn stop(mut self) {
        self.stop_tx.send_replace(true);
        for task in self.pushers.iter_mut().chain(self.subscribers.iter_mut()) {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        for task in self.pushers.iter().chain(&self.subscribers) {
            task.abort();
        }
    }
}

async fn push_loop(
    device: SimDevice,
    plan: Plan,
    sizes: Vec<usize>,
    mut rng: StdRng,
    mut stop_rx: watch::Receiver<bool>,
) {
    let mut acknowledged: Vec<Vec<Change>> = Vec::new();
    for (batch_number, size) in sizes.into_iter().enumerate() {
        let batch: Vec<Change> = (0..size)
            .map(|index| change(&format!("{}-{batch_number}-{index}", &device.id[..8]), plan.ciphertext_bytes))
            .collect();
        let retry_for = if rng.random_bool(plan.no_retry) { Duration::ZERO } else { plan.retry_for };
        let work = device.push_with_retries(&batch, retry_for, &mut rng);
        let offsets = tokio::select! {
            offsets = work => offsets,
            _ = stop_rx.wait_for(|stop| *stop) => return,
        };
        if offsets.iter().all(Option::is_some) {
            acknowledged.push(batch);
        }
        if !acknowledged.is_empty() && rng.random_bool(plan.push_again) {
            let again = &acknowledged[rng.random_range(0..acknowledged.len())];
            device.push_once(again, true).await;
        }
        // Pacing: the plan's think time between a device's pushes.
        tokio::time::sleep(Duration::from_millis(rng.random_range(plan.pause_ms.clone()))).await;
    }
}

async fn subscribe_loop(device: SimDevice, plan: Plan, mut rng: StdRng, mut stop_rx: watch::Receiver<bool>) {
    let mut session = 0u64;
    // The server said the log lost changes: the next stream repairs.
    let mut repair = false;
    while !*stop_rx.borrow() {
        session += 1;
        let stream = tokio::select! {
            stream = device.subscribe(repair) => stream,
            _ = stop_rx.wait_for(|stop| *stop) => return,
        };
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(status) => {
                repair |= status.code() == Code::DataLoss;
                // A device's own pause before it reconnects: part of the simulated workload.
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        repair = false;
        device.history.subscribed(&device.id, session);
        let reconnect_at =
            plan.reconnect_ms.clone().map(|millis| Instant::now() + Duration::from_millis(rng.random_range(millis)));
        loop {
            let message = tokio::select! {
                message = tokio::time::timeout(plan.stream_idle, stream.message()) => message,
                _ = stop_rx.wait_for(|stop| *stop) => return,
                () = until(reconnect_at) => break,
            };
            let event = match message {
                Ok(Ok(Some(message))) => message.event,
                // Ended, failed, or silent for too long: open a new stream.
                Ok(Ok(None)) => break,
                Ok(Err(status)) => {
                    device.history.call("stream", Some(status.code()));
                    repair |= status.code() == Code::DataLoss;
                    break;
                }
                Err(_) => {
                    device.history.call("stream", Some(Code::DeadlineExceeded));
                    break;
                }
            };
            match event {
                Some(Event::Changes(batch)) => {
                    let Some(last) = batch.changes.last().map(|change| change.offset) else { continue };
                    for delivered in &batch.changes {
                        let change_id = delivered.change.as_ref().map_or("", |change| change.change_id.as_str());
                        device.history.delivered(&device.id, session, delivered.offset, change_id);
                    }
                    // Pacing: the plan's time to apply a batch before acking it.
                    tokio::time::sleep(plan.apply_delay).await;
                    // A failed ack is fine: the next one covers it, or the change comes again.
                    if let Err(status) = device.ack(last).await
                        && status.code() == Code::DataLoss
                    {
                        repair = true;
                        break;
                    }
                }
                Some(Event::Resync(resync)) => {
                    let reason = format!("{:?}", resync.reason());
                    device.history.resync(&device.id, resync.log_start_offset, &reason);
                }
                Some(Event::Heartbeat(_)) | None => {}
            }
        }
        // A device's own pause before it reconnects: part of the simulated workload.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
