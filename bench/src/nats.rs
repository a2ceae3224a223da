//! W5 peer: the W2 and W4 shapes against NATS JetStream (file storage): one
//! stream per user, one durable pull consumer per device, acks per batch
//! read (fan-out: `AckPolicy::All` on the batch's last message; resume:
//! explicit acks of the batch's messages, see [`resume`]).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    stream::{self, StorageType},
};
use bytes::Bytes;
use futures::StreamExt;
use lockstep_kafka::locks::lock;
use tokio::{task::JoinHandle, time::Instant};

use crate::{
    Config,
    stats::{self, Metrics, Schedule},
};

const SATURATION_BATCH: u64 = 100;
const PRELOAD_BATCH: u64 = 500;
/// Messages a device reads before it acks (Redis's XREADGROUP COUNT; Lockstep's catch-up batches).
const READ_COUNT: usize = 256;
/// How long JetStream waits for a device's ack before it redelivers, in the resume workload:
/// the crash leaves a batch unacked, and the device gets it back only after this.
pub const RESUME_ACK_WAIT: Duration = Duration::from_secs(1);

async fn connect(url: &str) -> anyhow::Result<jetstream::Context> {
    let client = async_nats::connect(url).await.with_context(|| format!("connecting to nats at {url}"))?;
    Ok(jetstream::new(client))
}

/// `tag` and `seq` first, then a NUL, then `size` bytes of ciphertext stand-in.
fn message(tag: char, seq: u64, size: usize) -> Bytes {
    let mut body = format!("{tag}{seq}\0").into_bytes();
    body.resize(body.len() + size, 0x5a);
    Bytes::from(body)
}

fn parse(payload: &[u8]) -> Option<(char, u64)> {
    let end = payload.iter().position(|&byte| byte == 0)?;
    let text = std::str::from_utf8(&payload[..end]).ok()?;
    let mut chars = text.chars();
    let tag = chars.next()?;
    Some((tag, chars.as_str().parse().ok()?))
}

async fn create_stream(jetstream: &jetstream::Context, name: &str) -> anyhow::Result<String> {
    let subject = format!("{name}.changes");
    jetstream
        .create_stream(stream::Config {
            name: name.to_string(),
            subjects: vec![subject.clone()],
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating stream {name}"))?;
    Ok(subject)
}

async fn durable_consumer(
    jetstream: &jetstream::Context,
    stream: &str,
    device: &str,
    deliver_policy: DeliverPolicy,
    ack_policy: AckPolicy,
    ack_wait: Duration,
) -> anyhow::Result<PullConsumer> {
    let stream = jetstream.get_stream(stream).await?;
    stream
        .create_consumer(pull::Config {
            durable_name: Some(device.to_string()),
            deliver_policy,
            ack_policy,
            ack_wait,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating consumer {device}"))
}

/// Publishes `seqs`, then waits for every publish ack (the stream stored them).
async fn publish_batch(
    jetstream: &jetstream::Context,
    subject: &str,
    tag: char,
    seqs: std::ops::Range<u64>,
    size: usize,
) -> anyhow::Result<()> {
    let mut acks = Vec::with_capacity((seqs.end - seqs.start) as usize);
    for seq in seqs {
        acks.push(jetstream.publish(subject.to_string(), message(tag, seq, size)).await?);
    }
    for ack in acks {
        ack.await?;
    }
    Ok(())
}

/// Publishes `count` messages with `workers` concurrent batches of `batch`.
async fn publish_all(
    jetstream: &jetstream::Context,
    subject: &str,
    tag: char,
    count: u64,
    batch: u64,
    workers: usize,
    size: usize,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (jetstream, next, subject) = (jetstream.clone(), next.clone(), subject.to_string());
        tasks.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= count {
                    return anyhow::Ok(());
                }
                publish_batch(&jetstream, &subject, tag, from..(from + batch).min(count), size).await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

struct Seen {
    saturation: u64,
    latency: u64,
    last_at: Option<Instant>,
    histogram: hdrhistogram::Histogram<u64>,
}

type Reader = (Arc<Mutex<Seen>>, JoinHandle<anyhow::Result<()>>);

/// The W2 shape: `devices` durable consumers on one user's stream; each
/// device reads with its own connection and acks every batch it read.
pub async fn fanout(
    url: &str,
    config: &Config,
    devices: usize,
    round: usize,
    metrics: &mut Metrics,
) -> anyhow::Result<()> {
    let name = format!("user_{round}_fanout{devices}");
    let producer = connect(url).await?;
    let subject = create_stream(&producer, &name).await?;
    let schedule: Arc<Mutex<Option<Schedule>>> = Arc::new(Mutex::new(None));
    let ready = Arc::new(AtomicUsize::new(0));
    let mut readers: Vec<Reader> = Vec::new();
    for device in 0..devices {
        let jetstream = connect(url).await?;
        let consumer = durable_consumer(
            &jetstream,
            &name,
            &format!("device{device}"),
            DeliverPolicy::New,
            AckPolicy::All,
            Duration::from_secs(30),
        )
        .await?;
        let seen =
            Arc::new(Mutex::new(Seen { saturation: 0, latency: 0, last_at: None, histogram: stats::histogram() }));
        let (schedule, ready, seen_handle) = (schedule.clone(), ready.clone(), seen.clone());
        let task = tokio::spawn(async move {
            let messages = consumer.stream().max_messages_per_batch(READ_COUNT).messages().await?;
            ready.fetch_add(1, Ordering::Relaxed);
            let mut batches = messages.ready_chunks(READ_COUNT);
            while let Some(batch) = batches.next().await {
                let now = Instant::now();
                let plan = *lock(&schedule);
                let mut last = None;
                {
                    let mut seen = lock(&seen_handle);
                    for message in batch {
                        let message = message?;
                        match parse(&message.payload) {
                            Some(('a', _)) => seen.saturation += 1,
                            Some(('b', seq)) => {
                                seen.latency += 1;
                                if let Some(plan) = plan {
                                    stats::record(&mut seen.histogram, plan.latency(seq, now));
                                }
                            }
                            _ => {}
                        }
                        last = Some(message);
                    }
                    seen.last_at = Some(now);
                }
                if let Some(last) = last {
                    // AckPolicy::All: acking the batch's last message acks the batch.
                    last.ack().await.map_err(|error| anyhow::anyhow!("ack: {error}"))?;
                }
            }
            anyhow::Ok(())
        });
        readers.push((seen, task));
    }
    stats::wait_until("every reader to start", || ready.load(Ordering::Relaxed) >= devices).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let count = config.fanout_records;
    let started = Instant::now();
    publish_all(&producer, &subject, 'a', count, SATURATION_BATCH, config.pushers, config.payload_bytes).await?;
    let pushed = started.elapsed();
    stats::wait_until("every device to receive the saturation messages", || {
        readers.iter().all(|(seen, _)| lock(seen).saturation >= count)
    })
    .await?;
    let last = readers.iter().filter_map(|(seen, _)| lock(seen).last_at).max();
    let elapsed = last.context("no delivery")?.duration_since(started).as_secs_f64();
    let key = format!("w5.nats.d{devices}");
    metrics.add(round, &format!("{key}.deliveries_rps"), (count * devices as u64) as f64 / elapsed);
    metrics.add(round, &format!("{key}.push_rps"), count as f64 / pushed.as_secs_f64());
    let saturation_count = count;

    let count = config.latency_count();
    let plan = Schedule::new(config.latency_rate);
    *lock(&schedule) = Some(plan);
    let mut tasks = Vec::with_capacity(count as usize);
    for seq in 0..count {
        tokio::time::sleep_until(plan.due(seq)).await;
        let (jetstream, subject, size) = (producer.clone(), subject.clone(), config.payload_bytes);
        tasks.push(tokio::spawn(async move { publish_batch(&jetstream, &subject, 'b', seq..seq + 1, size).await }));
    }
    for task in tasks {
        task.await??;
    }
    stats::wait_until("every device to receive the latency messages", || {
        readers.iter().all(|(seen, _)| lock(seen).latency >= count)
    })
    .await?;
    let mut histogram = stats::histogram();
    for (seen, task) in &readers {
        histogram.add(&lock(seen).histogram)?;
        task.abort();
    }
    metrics.add(round, &format!("{key}.p50_ms"), stats::quantile_ms(&histogram, 0.5));
    metrics.add(round, &format!("{key}.p99_ms"), stats::quantile_ms(&histogram, 0.99));
    metrics.add(round, &format!("{key}.delivered"), ((saturation_count + count) * devices as u64) as f64);
    producer.delete_stream(&name).await?;
    Ok(())
}

/// The W4 shape: a durable consumer created at the start of a stream of
/// `resume_records` messages catches up; half-way the device crashes after
/// a read and before its ack, connects again and goes on from the same
/// durable consumer (JetStream redelivers the unacked batch after
/// [`RESUME_ACK_WAIT`]).
pub async fn resume(url: &str, config: &Config, round: usize, metrics: &mut Metrics) -> anyhow::Result<()> {
    let name = format!("user_{round}_resume");
    let producer = connect(url).await?;
    let subject = create_stream(&producer, &name).await?;
    let count = config.resume_records;
    publish_all(&producer, &subject, 'c', count, PRELOAD_BATCH, config.pushers, config.payload_bytes).await?;
    // Explicit acks: under AckPolicy::All the first ack after the crash would also ack the
    // crashed batch before JetStream redelivered it (a loss).
    durable_consumer(&producer, &name, "device", DeliverPolicy::All, AckPolicy::Explicit, RESUME_ACK_WAIT).await?;

    let mut seen = vec![0u32; count as usize];
    let mut received = 0u64;
    let mut distinct = 0u64;
    let mut window = 0u64;
    // The crashed batch: read, never acked, so never processed; done once it came back.
    let mut crashed: Vec<u64> = Vec::new();
    let started = Instant::now();
    for session in 0..2 {
        let jetstream = connect(url).await?;
        let consumer: PullConsumer = jetstream
            .get_stream(&name)
            .await?
            .get_consumer("device")
            .await
            .map_err(|error| anyhow::anyhow!("getting consumer device: {error}"))?;
        let messages = consumer.stream().max_messages_per_batch(READ_COUNT).messages().await?;
        let mut batches = messages.ready_chunks(READ_COUNT);
        loop {
            if distinct >= count && crashed.iter().all(|&seq| seen[seq as usize] >= 2) {
                break;
            }
            let batch = tokio::time::timeout(Duration::from_secs(30), batches.next())
                .await
                .with_context(|| format!("nats catch-up stalled after {received} messages"))?;
            let Some(batch) = batch else { bail!("nats message stream ended after {received} messages") };
            let read = batch.len() as u64;
            let mut messages = Vec::with_capacity(batch.len());
            for message in batch {
                let message = message?;
                received += 1;
                if let Some(('c', seq)) = parse(&message.payload)
                    && seq < count
                {
                    if seen[seq as usize] == 0 {
                        distinct += 1;
                    }
                    seen[seq as usize] += 1;
                }
                messages.push(message);
            }
            if session == 0 && received >= count / 2 {
                // Crash after reading, before acking.
                window = read;
                crashed = messages.iter().filter_map(|message| parse(&message.payload)).map(|(_, seq)| seq).collect();
                break;
            }
            // The batch is processed: ack each of its messages (each ack is one publish, none awaited).
            for message in &messages {
                message.ack().await.map_err(|error| anyhow::anyhow!("ack: {error}"))?;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    metrics.add(round, "w5.nats.resume.rps", count as f64 / elapsed);
    metrics.add(round, "w5.nats.resume.duplicates", (received - distinct) as f64);
    metrics.add(round, "w5.nats.resume.losses", (count - distinct) as f64);
    metrics.add(round, "w5.nats.resume.ack_window", window as f64);
    metrics.add(round, "w5.nats.resume.delivered", received as f64);
    producer.delete_stream(&name).await?;
    Ok(())
}
