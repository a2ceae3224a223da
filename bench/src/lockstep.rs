//! W1 ingest, W2 fan-out, W4 resume and W3 idle devices, through
//! Lockstep's gRPC API.

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use lockstep_kafka::locks::lock;
use lockstep_proto::v1::{
    SubscribeResponse, accounts_client::AccountsClient, subscribe_response::Event, sync_client::SyncClient,
};
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tonic::{Streaming, transport::Channel};

use crate::{
    Config,
    client::{ChangeMaker, Device, STREAMS_PER_CONNECTION, channel, parse_record, sync},
    procs::{self, Lockstep},
    stats::{self, Metrics, Schedule},
};

/// Changes per push in the saturation phases (W1, W2) and in W4's preload.
const SATURATION_BATCH: u64 = 100;
const PRELOAD_BATCH: u64 = 500;

async fn accounts(lockstep: &Lockstep) -> anyhow::Result<AccountsClient<Channel>> {
    Ok(AccountsClient::new(channel(&lockstep.endpoint()).await?))
}

/// Pushes changes `tag0..tagN` with `workers` concurrent pushers in batches of
/// `batch`, as fast as the server answers. Returns the changes written.
async fn push_all(
    device: &Device,
    clients: &[SyncClient<Channel>],
    maker: &ChangeMaker,
    tag: char,
    count: u64,
    batch: u64,
    workers: usize,
) -> anyhow::Result<u64> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let (device, mut client, maker, next) =
            (device.clone(), clients[worker % clients.len()].clone(), maker.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut written = 0;
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= count {
                    return anyhow::Ok(written);
                }
                let to = (from + batch).min(count);
                device.push(&mut client, maker.batch(tag, from..to)).await?;
                written += to - from;
            }
        }));
    }
    let mut written = 0;
    for task in tasks {
        written += task.await??;
    }
    Ok(written)
}

async fn clients(lockstep: &Lockstep, count: usize) -> anyhow::Result<Vec<SyncClient<Channel>>> {
    let mut clients = Vec::new();
    for _ in 0..count {
        clients.push(sync(channel(&lockstep.endpoint()).await?));
    }
    Ok(clients)
}

/// W1: changes/s at saturation (batches of 100, 4 pushers), then push→ack
/// latency on an open-loop schedule at half the saturated push rate. `name`
/// prefixes the figures (`w1`, or `w1off` for a server without events).
pub async fn w1(
    lockstep: &Lockstep,
    name: &str,
    config: &Config,
    round: usize,
    metrics: &mut Metrics,
) -> anyhow::Result<()> {
    let device = Device::create_account(&mut accounts(lockstep).await?, "w1").await?;
    let clients = clients(lockstep, 2).await?;
    let maker = ChangeMaker::new(config.payload_bytes);

    // Saturation, for a fixed time.
    let deadline = Instant::now() + config.saturation_time;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..config.pushers {
        let (device, mut client, maker, next) =
            (device.clone(), clients[worker % clients.len()].clone(), maker.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut written = 0u64;
            while Instant::now() < deadline {
                let from = next.fetch_add(SATURATION_BATCH, Ordering::Relaxed);
                device.push(&mut client, maker.batch('a', from..from + SATURATION_BATCH)).await?;
                written += SATURATION_BATCH;
            }
            anyhow::Ok(written)
        }));
    }
    let mut written = 0;
    for task in tasks {
        written += task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let pushes_per_second = written as f64 / SATURATION_BATCH as f64 / elapsed;
    metrics.add(round, &format!("{name}.sat_changes_rps"), written as f64 / elapsed);
    metrics.add(round, &format!("{name}.sat_pushes_rps"), pushes_per_second);

    // The same saturation spread over as many users as pushers: a push holds
    // its user's lock until Kafka acked it, so one user's pushes do not overlap.
    let mut spread = Vec::new();
    let mut accounts = accounts(lockstep).await?;
    for index in 0..config.pushers {
        spread.push(Device::create_account(&mut accounts, &format!("w1-spread-{index}")).await?);
    }
    let deadline = Instant::now() + config.saturation_time;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (worker, device) in spread.into_iter().enumerate() {
        let (mut client, maker) = (clients[worker % clients.len()].clone(), maker.clone());
        tasks.push(tokio::spawn(async move {
            let mut written = 0u64;
            while Instant::now() < deadline {
                device.push(&mut client, maker.batch('a', written..written + SATURATION_BATCH)).await?;
                written += SATURATION_BATCH;
            }
            anyhow::Ok(written)
        }));
    }
    let mut spread_written = 0;
    for task in tasks {
        spread_written += task.await??;
    }
    metrics.add(
        round,
        &format!("{name}.sat_users_changes_rps"),
        spread_written as f64 / started.elapsed().as_secs_f64(),
    );

    // Latency at half of saturation, same batch size.
    let rate = pushes_per_second / 2.0;
    let count = (rate * config.latency_time.as_secs_f64()).ceil().max(10.0) as u64;
    let schedule = Schedule::new(rate);
    let histogram = Arc::new(Mutex::new(stats::histogram()));
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(count as usize);
    for seq in 0..count {
        tokio::time::sleep_until(schedule.due(seq)).await;
        let (device, mut client, histogram, failures) =
            (device.clone(), clients[seq as usize % clients.len()].clone(), histogram.clone(), failures.clone());
        let changes = maker.batch('b', seq * SATURATION_BATCH..(seq + 1) * SATURATION_BATCH);
        tasks.push(tokio::spawn(async move {
            match device.push(&mut client, changes).await {
                Ok(_) => stats::record(&mut lock(&histogram), schedule.latency(seq, Instant::now())),
                Err(_) => {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let histogram = lock(&histogram);
    metrics.add(round, &format!("{name}.lat_rate_pushes"), rate);
    metrics.add(round, &format!("{name}.p50_ms"), stats::quantile_ms(&histogram, 0.5));
    metrics.add(round, &format!("{name}.p99_ms"), stats::quantile_ms(&histogram, 0.99));
    let failed = failures.load(Ordering::Relaxed);
    metrics.add(round, &format!("{name}.failed_pushes"), failed as f64);
    // Every change the workload wrote: both saturation phases and the latency phase's pushes.
    let latency_changes = count.saturating_sub(failed) * SATURATION_BATCH;
    metrics.add(round, &format!("{name}.changes"), (written + spread_written + latency_changes) as f64);
    Ok(())
}

/// What one subscribed device saw.
struct Seen {
    /// Changes per tag: 'a' saturation, 'b' latency.
    saturation: u64,
    latency: u64,
    last_at: Option<Instant>,
    histogram: Histogram<u64>,
}

struct Subscriber {
    stats: Arc<Mutex<Seen>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Acks the newest offset put into the returned sender, one ack in flight at
/// a time (newer offsets replace older ones while one is in flight).
fn spawn_acker(
    device: Device,
    mut client: SyncClient<Channel>,
    committed: Arc<AtomicI64>,
) -> (watch::Sender<i64>, JoinHandle<()>) {
    let (ack_tx, mut ack_rx) = watch::channel(-1i64);
    let task = tokio::spawn(async move {
        while ack_rx.changed().await.is_ok() {
            let offset = *ack_rx.borrow_and_update();
            if let Ok(position) = device.ack(&mut client, offset).await {
                committed.fetch_max(position, Ordering::Relaxed);
            }
        }
    });
    (ack_tx, task)
}

fn subscribe_reader(
    device: Device,
    client: SyncClient<Channel>,
    mut stream: Streaming<SubscribeResponse>,
    schedule: Arc<Mutex<Option<Schedule>>>,
    ready: Arc<AtomicUsize>,
) -> Subscriber {
    let stats = Arc::new(Mutex::new(Seen { saturation: 0, latency: 0, last_at: None, histogram: stats::histogram() }));
    let (ack_tx, acker) = spawn_acker(device, client, Arc::new(AtomicI64::new(-1)));
    let seen = stats.clone();
    let reader = tokio::spawn(async move {
        let mut first = true;
        while let Ok(Some(message)) = stream.message().await {
            if first {
                ready.fetch_add(1, Ordering::Relaxed);
                first = false;
            }
            let Some(Event::Changes(batch)) = message.event else { continue };
            let now = Instant::now();
            let schedule = *lock(&schedule);
            let mut seen = lock(&seen);
            let mut last_offset = -1;
            for delivered in &batch.changes {
                last_offset = delivered.offset;
                match delivered.change.as_ref().and_then(|change| parse_record(&change.record_id)) {
                    Some(('a', _)) => seen.saturation += 1,
                    Some(('b', seq)) => {
                        seen.latency += 1;
                        if let Some(schedule) = schedule {
                            stats::record(&mut seen.histogram, schedule.latency(seq, now));
                        }
                    }
                    _ => {}
                }
            }
            seen.last_at = Some(now);
            drop(seen);
            let _ = ack_tx.send(last_offset);
        }
    });
    Subscriber { stats, tasks: vec![reader, acker] }
}

/// Pushes changes `b0..b<count>` one per push, each when `plan` says it is due (open loop:
/// a slow answer does not delay the next push), and waits for every answer.
async fn push_on_schedule(
    pusher: &Device,
    client: &SyncClient<Channel>,
    maker: &ChangeMaker,
    plan: Schedule,
    count: u64,
) -> anyhow::Result<()> {
    let mut tasks = Vec::with_capacity(count as usize);
    for seq in 0..count {
        tokio::time::sleep_until(plan.due(seq)).await;
        let (pusher, mut client, change) = (pusher.clone(), client.clone(), maker.change('b', seq));
        tasks.push(tokio::spawn(async move { pusher.push(&mut client, vec![change]).await }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// W2: one user, `devices` subscribed devices. Deliveries/s while a fifth
/// device pushes at saturation, then push→delivery latency at the latency rate.
pub async fn w2(
    lockstep: &Lockstep,
    config: &Config,
    devices: usize,
    round: usize,
    metrics: &mut Metrics,
) -> anyhow::Result<()> {
    let mut accounts = accounts(lockstep).await?;
    let pusher = Device::create_account(&mut accounts, "w2-pusher").await?;
    let mut readers = Vec::with_capacity(devices);
    for index in 0..devices {
        readers.push(pusher.pair(&mut accounts, &format!("w2-device-{index}")).await?);
    }
    let channels = clients(lockstep, devices.div_ceil(STREAMS_PER_CONNECTION)).await?;
    let schedule = Arc::new(Mutex::new(None));
    let ready = Arc::new(AtomicUsize::new(0));
    let mut subscribers = Vec::with_capacity(devices);
    for (index, device) in readers.iter().enumerate() {
        let mut client = channels[index / STREAMS_PER_CONNECTION].clone();
        let stream = device.subscribe(&mut client, None).await?;
        subscribers.push(subscribe_reader(device.clone(), client, stream, schedule.clone(), ready.clone()));
        if index == 0 {
            // The user's first stream finds the end of the topic through a
            // shared Kafka reader; the others then start from the live tail.
            let opening = Instant::now();
            stats::wait_until("the first device's first heartbeat", || ready.load(Ordering::Relaxed) >= 1).await?;
            metrics.add(round, &format!("w2.d{devices}.first_stream_s"), opening.elapsed().as_secs_f64());
        }
    }
    let opening = Instant::now();
    stats::wait_until("the first heartbeat of every device", || ready.load(Ordering::Relaxed) >= devices).await?;
    metrics.add(round, &format!("w2.d{devices}.other_streams_s"), opening.elapsed().as_secs_f64());

    let push_clients = clients(lockstep, 2).await?;
    let maker = ChangeMaker::new(config.payload_bytes);
    let count = config.fanout_records;
    let started = Instant::now();
    push_all(&pusher, &push_clients, &maker, 'a', count, SATURATION_BATCH, config.pushers).await?;
    let pushed = started.elapsed();
    stats::wait_until("every device to receive the saturation changes", || {
        subscribers.iter().all(|subscriber| lock(&subscriber.stats).saturation >= count)
    })
    .await?;
    let last = subscribers.iter().filter_map(|subscriber| lock(&subscriber.stats).last_at).max();
    let elapsed = last.context("no delivery")?.duration_since(started).as_secs_f64();
    let key = format!("w2.d{devices}");
    metrics.add(round, &format!("{key}.deliveries_rps"), (count * devices as u64) as f64 / elapsed);
    metrics.add(round, &format!("{key}.push_rps"), count as f64 / pushed.as_secs_f64());
    let saturation_count = count;

    // Latency: single-change pushes on an open-loop schedule.
    let count = config.latency_count();
    let plan = Schedule::new(config.latency_rate);
    *lock(&schedule) = Some(plan);
    push_on_schedule(&pusher, &push_clients[0], &maker, plan, count).await?;
    stats::wait_until("every device to receive the latency changes", || {
        subscribers.iter().all(|subscriber| lock(&subscriber.stats).latency >= count)
    })
    .await?;
    let mut histogram = stats::histogram();
    for subscriber in &subscribers {
        histogram.add(&lock(&subscriber.stats).histogram)?;
    }
    metrics.add(round, &format!("{key}.p50_ms"), stats::quantile_ms(&histogram, 0.5));
    metrics.add(round, &format!("{key}.p99_ms"), stats::quantile_ms(&histogram, 0.99));
    metrics.add(round, &format!("{key}.delivered"), ((saturation_count + count) * devices as u64) as f64);
    Ok(())
}

/// W4: a device `resume_records` changes behind catches up. Half-way its
/// stream is dropped without waiting for its acks (a crash) and it
/// subscribes again from its committed offset.
pub async fn w4(lockstep: &Lockstep, config: &Config, round: usize, metrics: &mut Metrics) -> anyhow::Result<()> {
    let mut accounts = accounts(lockstep).await?;
    let pusher = Device::create_account(&mut accounts, "w4-pusher").await?;
    let device = pusher.pair(&mut accounts, "w4-device").await?;
    let push_clients = clients(lockstep, 2).await?;
    let maker = ChangeMaker::new(config.payload_bytes);
    let count = config.resume_records;
    let preload = Instant::now();
    push_all(&pusher, &push_clients, &maker, 'c', count, PRELOAD_BATCH, config.pushers).await?;
    eprintln!("    preloaded {count} changes in {:.1} s", preload.elapsed().as_secs_f64());
    // The server's CPU of the catch-up alone (the round's W4 figure counts the preload's pushes too).
    let catch_up_cpu = procs::CpuSnapshot::take(&[("server", lockstep.pid())]);

    let mut seen = vec![0u32; count as usize];
    let mut received = 0u64;
    let mut client = sync(channel(&lockstep.endpoint()).await?);
    let committed = Arc::new(AtomicI64::new(-1));
    let started = Instant::now();
    let mut window = 0;
    for session in 0..2 {
        let mut stream = device.subscribe(&mut client, None).await?;
        let (ack_tx, acker) = spawn_acker(device.clone(), client.clone(), committed.clone());
        let mut last_offset = -1;
        let target = if session == 0 { count / 2 } else { u64::MAX };
        loop {
            let distinct = seen.iter().filter(|&&times| times > 0).count() as u64;
            if received >= target || distinct >= count {
                break;
            }
            let message = tokio::time::timeout(Duration::from_secs(30), stream.message())
                .await
                .with_context(|| format!("catch-up stalled after {received} changes"))??
                .context("stream ended")?;
            let Some(Event::Changes(batch)) = message.event else { continue };
            for delivered in &batch.changes {
                last_offset = delivered.offset;
                received += 1;
                if let Some(('c', seq)) = delivered.change.as_ref().and_then(|change| parse_record(&change.record_id))
                    && seq < count
                {
                    seen[seq as usize] += 1;
                }
            }
            let _ = ack_tx.send(last_offset);
        }
        if session == 0 {
            // Crash: the stream and any ack in flight are dropped.
            acker.abort();
            drop(stream);
            window = (last_offset + 1 - committed.load(Ordering::Relaxed).max(0)).max(0);
        } else {
            drop(ack_tx);
            let _ = acker.await;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    catch_up_cpu.record(metrics, round, "w4.catch_up");
    let distinct = seen.iter().filter(|&&times| times > 0).count() as u64;
    let duplicates = received - distinct;
    metrics.add(round, "w4.rps", count as f64 / elapsed);
    metrics.add(round, "w4.duplicates", duplicates as f64);
    metrics.add(round, "w4.losses", (count - distinct) as f64);
    metrics.add(round, "w4.ack_window", window as f64);
    metrics.add(round, "w4.delivered", received as f64);
    Ok(())
}

const DEVICES_PER_USER: usize = 100;

/// Memory W3 asks to be free per idle device before it tries a count: the server's RSS per
/// device (about 8.5 KiB measured at 10,000) and the bench's client side of the stream, with
/// room to spare.
const W3_MEMORY_PER_DEVICE_KIB: u64 = 64;

/// The counts of `counts` this machine can hold: each idle stream costs the bench and the
/// server one file descriptor per `streams_per_connection` streams (the process's limit is
/// inherited by the server), and memory. A count left out is said in the report, and why.
fn fitting_counts(counts: &[usize], streams_per_connection: usize, round: usize, metrics: &mut Metrics) -> Vec<usize> {
    let descriptors = procs::open_files_limit();
    let available = procs::memory_available_kib();
    let mut fitting = Vec::new();
    for &count in counts {
        // Connections, plus Kafka's, the accounts database's and the runtime's.
        let needed_descriptors = count.div_ceil(streams_per_connection) as u64 + 1_000;
        let needed_kib = count as u64 * W3_MEMORY_PER_DEVICE_KIB;
        let reason = match (descriptors, available) {
            (Some(limit), _) if limit < needed_descriptors => {
                Some(format!("{needed_descriptors} file descriptors needed, the limit is {limit}"))
            }
            (_, Some(free)) if free < needed_kib => {
                Some(format!("{needed_kib} KiB of memory asked for, {free} KiB available"))
            }
            _ => None,
        };
        match reason {
            Some(reason) => {
                metrics.notes.push(format!("round {}: W3 stopped before {count} idle devices: {reason}", round + 1));
            }
            None => fitting.push(count),
        }
    }
    fitting
}

/// How long W3 reads the server's idle CPU with `count` streams: `cpu_time`, and at the target's
/// count (100,000) one whole lease interval (30 s by default), so that the figure holds exactly
/// one lease renewal pass. A pass publishes a `DeviceConnected` event per live stream, 100,000
/// at once, and a 10 s window held one or none: 25–28 % of a core in runs whose window held none,
/// 50 % in one run (issue 20's analysis).
fn cpu_window(config: &Config, count: usize) -> Duration {
    if count >= crate::W3_LARGE {
        config.cpu_time.max(lockstep_broker::settings::EventsSettings::default().lease_interval)
    } else {
        config.cpu_time
    }
}

/// W3: a fresh Kafka (the round's in a smoke run, `shared_kafka`) and server; idle devices,
/// `DEVICES_PER_USER` per user, are created, then the server's RSS is read with no stream,
/// and with each count of subscribed idle devices, with its idle CPU there.
///
/// The devices are created by the same server process that then holds their
/// streams: after a restart, every user's first stream waits for a shared
/// Kafka reader to find the end of the empty topic (see ANALYSIS.md).
pub async fn w3(
    lockstep_bin: &Path,
    shared_kafka: Option<&procs::Kafka>,
    config: &Config,
    counts: &[usize],
    round: usize,
    metrics: &mut Metrics,
) -> anyhow::Result<()> {
    let counts = fitting_counts(counts, config.streams_per_connection, round, metrics);
    if counts.is_empty() {
        return Ok(());
    }
    let own_kafka;
    let kafka = match shared_kafka {
        Some(kafka) => kafka,
        None => {
            own_kafka = procs::start_kafka().await?;
            &own_kafka
        }
    };
    let count = counts.iter().copied().max().unwrap_or(0);
    let lockstep = procs::start_lockstep_for_idle(lockstep_bin, kafka.bootstrap(), count).await?;
    let started = Instant::now();
    let users = count.div_ceil(DEVICES_PER_USER);
    let endpoint = lockstep.endpoint();
    let devices: Vec<Vec<Device>> = futures::stream::iter(0..users)
        .map(|user| {
            let endpoint = endpoint.clone();
            async move {
                let mut accounts = AccountsClient::new(channel(&endpoint).await?);
                let first = Device::create_account(&mut accounts, &format!("idle-{user}-0")).await?;
                let mut devices = vec![first.clone()];
                for index in 1..DEVICES_PER_USER.min(count - user * DEVICES_PER_USER) {
                    devices.push(first.pair(&mut accounts, &format!("idle-{user}-{index}")).await?);
                }
                anyhow::Ok(devices)
            }
        })
        .buffered(4)
        .try_collect()
        .await?;
    let devices: Vec<Device> = devices.into_iter().flatten().collect();
    eprintln!("    created {} idle devices in {:.1} s", devices.len(), started.elapsed().as_secs_f64());

    let pid = lockstep.pid();
    tokio::time::sleep(config.settle_time).await;
    let rss0 = procs::rss_kib(pid)?;
    metrics.add(round, "w3.rss0_kib", rss0 as f64);
    let ticks_per_second = procs::clock_ticks_per_second() as f64;
    let ready = Arc::new(AtomicUsize::new(0));
    let mut streams: Vec<JoinHandle<()>> = Vec::new();
    let mut channels: Vec<SyncClient<Channel>> = Vec::new();
    for &count in &counts {
        let count = count.min(devices.len());
        while channels.len() < count.div_ceil(config.streams_per_connection) {
            channels.push(sync(channel(&lockstep.endpoint()).await?));
        }
        // Each user's first stream goes first: until one stream of a user has
        // found the end of its (empty) topic through a shared Kafka reader,
        // every stream of that user waits its turn for a reader (see ANALYSIS.md).
        let from = streams.len();
        let (firsts, rest): (Vec<usize>, Vec<usize>) = (from..count).partition(|index| index % DEVICES_PER_USER == 0);
        let mut opened_so_far = from;
        for (phase, indexes) in [("first_s", firsts), ("open_s", rest)] {
            let opening = Instant::now();
            opened_so_far += indexes.len();
            let opened: Vec<Streaming<SubscribeResponse>> = futures::stream::iter(indexes)
                .map(|index| {
                    let mut client = channels[index / config.streams_per_connection].clone();
                    let device = devices[index].clone();
                    async move { device.subscribe(&mut client, None).await }
                })
                .buffered(64)
                .try_collect()
                .await?;
            for mut stream in opened {
                let ready = ready.clone();
                streams.push(tokio::spawn(async move {
                    let mut first = true;
                    while let Ok(Some(_)) = stream.message().await {
                        if first {
                            ready.fetch_add(1, Ordering::Relaxed);
                            first = false;
                        }
                    }
                }));
            }
            stats::wait_until("the first heartbeat of every idle device", || {
                ready.load(Ordering::Relaxed) >= opened_so_far
            })
            .await
            .with_context(|| format!("{} of {opened_so_far} idle streams started", ready.load(Ordering::Relaxed)))?;
            metrics.add(round, &format!("w3.n{count}.{phase}"), opening.elapsed().as_secs_f64());
        }
        let key = format!("w3.n{count}");
        tokio::time::sleep(config.settle_time).await;
        let rss = procs::rss_kib(pid)?;
        let window = cpu_window(config, count);
        let before = procs::cpu_ticks(pid)?;
        tokio::time::sleep(window).await;
        let ticks = procs::cpu_ticks(pid)? - before;
        let cpu_percent = ticks as f64 / ticks_per_second / window.as_secs_f64() * 100.0;
        metrics.add(round, &format!("{key}.cpu_window_s"), window.as_secs_f64());
        metrics.add(round, &format!("{key}.rss_kib"), rss as f64);
        metrics.add(round, &format!("{key}.per_device_kib"), (rss as f64 - rss0 as f64) / count as f64);
        metrics.add(round, &format!("{key}.cpu_percent"), cpu_percent);
    }
    for stream in streams {
        stream.abort();
    }
    Ok(())
}

/// W7: push → delivery across nodes (issue 21). Device A pushes single changes on the open-loop
/// latency schedule through `pushing_node`; device B, of the same account, receives through
/// `receiving_node` and acks. The same node: the single-node figure; another node sharing the
/// accounts database and the events topic: the change reaches B's node through the events
/// topic's LogAppended (the doorbell) and its shared readers. Figures `w7.<name>.p50_ms`,
/// `p99_ms`, `delivered`.
pub async fn w7(
    pushing_node: &Lockstep,
    receiving_node: &Lockstep,
    name: &str,
    config: &Config,
    round: usize,
    metrics: &mut Metrics,
) -> anyhow::Result<()> {
    let pusher = Device::create_account(&mut accounts(pushing_node).await?, "w7-pusher").await?;
    // Paired through the receiving node: it knows the account from the shared database.
    let reader = pusher.pair(&mut accounts(receiving_node).await?, "w7-reader").await?;
    let mut client = sync(channel(&receiving_node.endpoint()).await?);
    let stream = reader.subscribe(&mut client, None).await?;
    let (schedule, ready) = (Arc::new(Mutex::new(None)), Arc::new(AtomicUsize::new(0)));
    let subscriber = subscribe_reader(reader, client, stream, schedule.clone(), ready.clone());
    stats::wait_until("the reader's first heartbeat", || ready.load(Ordering::Relaxed) >= 1).await?;

    let push_client = sync(channel(&pushing_node.endpoint()).await?);
    let maker = ChangeMaker::new(config.payload_bytes);
    let count = config.latency_count();
    let plan = Schedule::new(config.latency_rate);
    *lock(&schedule) = Some(plan);
    push_on_schedule(&pusher, &push_client, &maker, plan, count).await?;
    stats::wait_until("the reader to receive every change", || lock(&subscriber.stats).latency >= count).await?;
    let histogram = lock(&subscriber.stats).histogram.clone();
    metrics.add(round, &format!("w7.{name}.p50_ms"), stats::quantile_ms(&histogram, 0.5));
    metrics.add(round, &format!("w7.{name}.p99_ms"), stats::quantile_ms(&histogram, 0.99));
    metrics.add(round, &format!("w7.{name}.delivered"), count as f64);
    Ok(())
}
