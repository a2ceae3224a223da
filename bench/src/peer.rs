//! W5 peer: the W2 and W4 shapes against Redis Streams (AOF on, `appendfsync`
//! `always` or `everysec`): one stream per user, one consumer group per
//! device, XADD / XREADGROUP / XACK. `prefix` names the figures of one Redis.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use lockstep_kafka::locks::lock;
use redis::{AsyncConnectionConfig, aio::MultiplexedConnection, streams::StreamReadReply};
use tokio::{task::JoinHandle, time::Instant};

use crate::{
    Config,
    stats::{self, Metrics, Schedule},
};

const SATURATION_BATCH: u64 = 100;
const PRELOAD_BATCH: u64 = 500;
const READ_COUNT: usize = 256;

async fn connect(url: &str) -> anyhow::Result<MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    let config = AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
    Ok(client.get_multiplexed_async_connection_with_config(&config).await?)
}

fn payload(size: usize) -> Vec<u8> {
    vec![0x5a; size]
}

async fn xadd_batch(
    connection: &mut MultiplexedConnection,
    key: &str,
    tag: char,
    seqs: std::ops::Range<u64>,
    body: &[u8],
) -> anyhow::Result<()> {
    let mut pipe = redis::pipe();
    for seq in seqs {
        pipe.cmd("XADD").arg(key).arg("*").arg("s").arg(format!("{tag}{seq}")).arg("p").arg(body);
    }
    pipe.exec_async(connection).await?;
    Ok(())
}

/// Pushes `count` entries with `workers` concurrent pipelines of `batch` XADDs.
async fn push_all(
    connection: &MultiplexedConnection,
    key: &str,
    tag: char,
    count: u64,
    batch: u64,
    workers: usize,
    size: usize,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let body = Arc::new(payload(size));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (mut connection, next, key, body) = (connection.clone(), next.clone(), key.to_string(), body.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= count {
                    return anyhow::Ok(());
                }
                xadd_batch(&mut connection, &key, tag, from..(from + batch).min(count), &body).await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// XREADGROUP (`>` for new entries, `0` for this consumer's pending ones).
async fn read_group(
    connection: &mut MultiplexedConnection,
    key: &str,
    group: &str,
    from: &str,
    block_ms: u64,
) -> anyhow::Result<Vec<(String, String)>> {
    let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg("device")
        .arg("COUNT")
        .arg(READ_COUNT)
        .arg("BLOCK")
        .arg(block_ms)
        .arg("STREAMS")
        .arg(key)
        .arg(from)
        .query_async(connection)
        .await?;
    let mut entries = Vec::new();
    for stream in reply.map(|reply| reply.keys).unwrap_or_default() {
        for id in stream.ids {
            let record: String = id.get("s").context("entry without s")?;
            entries.push((id.id, record));
        }
    }
    Ok(entries)
}

async fn ack(connection: &mut MultiplexedConnection, key: &str, group: &str, ids: &[String]) -> anyhow::Result<()> {
    if !ids.is_empty() {
        redis::cmd("XACK").arg(key).arg(group).arg(ids).exec_async(connection).await?;
    }
    Ok(())
}

fn parse(record: &str) -> Option<(char, u64)> {
    let mut chars = record.chars();
    let tag = chars.next()?;
    Some((tag, chars.as_str().parse().ok()?))
}

struct Seen {
    saturation: u64,
    latency: u64,
    last_at: Option<Instant>,
    histogram: hdrhistogram::Histogram<u64>,
}

type Reader = (Arc<Mutex<Seen>>, JoinHandle<anyhow::Result<()>>);

/// The W2 shape: `devices` consumer groups on one stream; each device reads
/// with its own connection and acks every batch it read.
pub async fn fanout(
    url: &str,
    prefix: &str,
    config: &Config,
    devices: usize,
    round: usize,
    metrics: &mut Metrics,
) -> anyhow::Result<()> {
    let key = format!("user:{round}:fanout{devices}");
    let mut producer = connect(url).await?;
    for device in 0..devices {
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg(format!("device{device}"))
            .arg("$")
            .arg("MKSTREAM")
            .exec_async(&mut producer)
            .await?;
    }
    let schedule: Arc<Mutex<Option<Schedule>>> = Arc::new(Mutex::new(None));
    let ready = Arc::new(AtomicUsize::new(0));
    let mut readers: Vec<Reader> = Vec::new();
    for device in 0..devices {
        let mut connection = connect(url).await?;
        let seen =
            Arc::new(Mutex::new(Seen { saturation: 0, latency: 0, last_at: None, histogram: stats::histogram() }));
        let (key, group, schedule, ready, stats_handle) =
            (key.clone(), format!("device{device}"), schedule.clone(), ready.clone(), seen.clone());
        let task = tokio::spawn(async move {
            ready.fetch_add(1, Ordering::Relaxed);
            loop {
                let entries = read_group(&mut connection, &key, &group, ">", 1000).await?;
                if entries.is_empty() {
                    continue;
                }
                let now = Instant::now();
                let plan = *lock(&schedule);
                {
                    let mut seen = lock(&stats_handle);
                    for (_, record) in &entries {
                        match parse(record) {
                            Some(('a', _)) => seen.saturation += 1,
                            Some(('b', seq)) => {
                                seen.latency += 1;
                                if let Some(plan) = plan {
                                    stats::record(&mut seen.histogram, plan.latency(seq, now));
                                }
                            }
                            _ => {}
                        }
                    }
                    seen.last_at = Some(now);
                }
                let ids: Vec<String> = entries.into_iter().map(|(id, _)| id).collect();
                ack(&mut connection, &key, &group, &ids).await?;
            }
        });
        readers.push((seen, task));
    }
    stats::wait_until("every reader to start", || ready.load(Ordering::Relaxed) >= devices).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let count = config.fanout_records;
    let started = Instant::now();
    push_all(&producer, &key, 'a', count, SATURATION_BATCH, config.pushers, config.payload_bytes).await?;
    let pushed = started.elapsed();
    stats::wait_until("every device to receive the saturation entries", || {
        readers.iter().all(|(seen, _)| lock(seen).saturation >= count)
    })
    .await?;
    let last = readers.iter().filter_map(|(seen, _)| lock(seen).last_at).max();
    let elapsed = last.context("no delivery")?.duration_since(started).as_secs_f64();
    let name = format!("{prefix}.d{devices}");
    metrics.add(round, &format!("{name}.deliveries_rps"), (count * devices as u64) as f64 / elapsed);
    metrics.add(round, &format!("{name}.push_rps"), count as f64 / pushed.as_secs_f64());
    let saturation_count = count;

    let count = config.latency_count();
    let plan = Schedule::new(config.latency_rate);
    *lock(&schedule) = Some(plan);
    let body = Arc::new(payload(config.payload_bytes));
    let mut tasks = Vec::with_capacity(count as usize);
    for seq in 0..count {
        tokio::time::sleep_until(plan.due(seq)).await;
        let (mut connection, key, body) = (producer.clone(), key.clone(), body.clone());
        tasks.push(tokio::spawn(async move { xadd_batch(&mut connection, &key, 'b', seq..seq + 1, &body).await }));
    }
    for task in tasks {
        task.await??;
    }
    stats::wait_until("every device to receive the latency entries", || {
        readers.iter().all(|(seen, _)| lock(seen).latency >= count)
    })
    .await?;
    let mut histogram = stats::histogram();
    for (seen, task) in &readers {
        histogram.add(&lock(seen).histogram)?;
        task.abort();
    }
    metrics.add(round, &format!("{name}.p50_ms"), stats::quantile_ms(&histogram, 0.5));
    metrics.add(round, &format!("{name}.p99_ms"), stats::quantile_ms(&histogram, 0.99));
    metrics.add(round, &format!("{name}.delivered"), ((saturation_count + count) * devices as u64) as f64);
    redis::cmd("DEL").arg(&key).exec_async(&mut producer).await?;
    Ok(())
}

/// The W4 shape: a group created at the start of a stream of
/// `resume_records` entries catches up; half-way the device crashes after a
/// read and before its ack, reconnects, reads its pending entries (`0`),
/// then new ones (`>`).
pub async fn resume(
    url: &str,
    prefix: &str,
    config: &Config,
    round: usize,
    metrics: &mut Metrics,
) -> anyhow::Result<()> {
    let key = format!("user:{round}:resume");
    let group = "device";
    let mut producer = connect(url).await?;
    let count = config.resume_records;
    push_all(&producer, &key, 'c', count, PRELOAD_BATCH, config.pushers, config.payload_bytes).await?;
    redis::cmd("XGROUP").arg("CREATE").arg(&key).arg(group).arg("0").exec_async(&mut producer).await?;

    let mut seen = vec![0u32; count as usize];
    let mut received = 0u64;
    let mut distinct = 0u64;
    let mut window = 0u64;
    let started = Instant::now();
    for session in 0..2 {
        let mut connection = connect(url).await?;
        let mut from = if session == 0 { ">" } else { "0" };
        loop {
            if distinct >= count {
                break;
            }
            let entries = read_group(&mut connection, &key, group, from, 1000).await?;
            if entries.is_empty() {
                if from == "0" {
                    from = ">";
                    continue;
                }
                bail!("redis catch-up stalled after {received} entries");
            }
            for (_, record) in &entries {
                received += 1;
                if let Some(('c', seq)) = parse(record)
                    && seq < count
                {
                    if seen[seq as usize] == 0 {
                        distinct += 1;
                    }
                    seen[seq as usize] += 1;
                }
            }
            if session == 0 && received >= count / 2 {
                // Crash after reading, before acking.
                window = entries.len() as u64;
                break;
            }
            let ids: Vec<String> = entries.into_iter().map(|(id, _)| id).collect();
            ack(&mut connection, &key, group, &ids).await?;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    metrics.add(round, &format!("{prefix}.resume.rps"), count as f64 / elapsed);
    metrics.add(round, &format!("{prefix}.resume.duplicates"), (received - distinct) as f64);
    metrics.add(round, &format!("{prefix}.resume.losses"), (count - distinct) as f64);
    metrics.add(round, &format!("{prefix}.resume.ack_window"), window as f64);
    metrics.add(round, &format!("{prefix}.resume.delivered"), received as f64);
    redis::cmd("DEL").arg(&key).exec_async(&mut producer).await?;
    Ok(())
}
