//! W6 wake-ups: 100 users with 10 offline devices each (1,000 devices with Web
//! Push targets at the local push service), each user pushes a burst of 100
//! changes; measured: Kafka's ack of a user's first change → each of its
//! devices' wake-up arriving at the push service (decrypted and verified
//! there), and wake-ups per device per burst. The worker runs with its
//! default `min_interval` (60 s), so a second wake-up within the run would be
//! a coalescing failure.
//!
//! W6 runs last in a round, on the broker and server that W1–W4 loaded: the
//! events topic already holds their events, and before the worker starts W6
//! adds a prior day's traffic of many users ([`fill_events_topic`]); the
//! worker, a new consumer group, replays all of it (issue 20 asks for W6 with
//! the events topic full; on Nisshi that state took the p99 from 1.09 s to
//! 23.6 s).

use std::{
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use lockstep_proto::v1::{PushTarget, SetPushTargetRequest, WebPushTarget, push_target::Target};
use lockstep_testkit::{
    device::{Device, changes, with_token},
    push::{PushService, PushWorker, Subscription, WORKER_ALLOWS_LOCAL_PUSH},
    server::Server as Lockstep,
};

use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
};

use lockstep_schemas::{Event, EventBody, encode_event};

use crate::{Config, stats::Metrics};

/// Records in the server's events topic (high − low watermark, summed over its
/// partitions). Asked again while the topic is new and its partitions have no
/// leader yet (W6 run alone starts right after the server created the topic).
async fn events_topic_records(bootstrap: &str) -> anyhow::Result<i64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match events_topic_records_once(bootstrap).await {
            Ok(records) => return Ok(records),
            Err(error) if Instant::now() < deadline => {
                eprintln!("    the events topic is not ready yet ({error}); asking again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

async fn events_topic_records_once(bootstrap: &str) -> anyhow::Result<i64> {
    let bootstrap = bootstrap.to_string();
    tokio::task::spawn_blocking(move || {
        let topic = lockstep_broker::settings::Settings::default().events.topic;
        let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create()?;
        let timeout = Duration::from_secs(10);
        let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
        let mut records = 0;
        for partition in metadata.topics().iter().flat_map(|topic| topic.partitions()) {
            let (low, high) = consumer.fetch_watermarks(&topic, partition.id(), timeout)?;
            records += high - low;
        }
        anyhow::Ok(records)
    })
    .await?
}

/// Events of one user in a prior day's backlog: 3 devices added and connected, then
/// appends each followed by the 3 devices' acks, until this many.
const BACKLOG_EVENTS_PER_USER: usize = 100;
const BACKLOG_DEVICES_PER_USER: usize = 3;

/// Writes `events` events of a prior day's traffic to the server's events topic, straight
/// to Kafka with the schema's encoder (key = user id, as the server writes them), for
/// `events / 100` users that have devices and appends but no push target (so the worker
/// replays them without waking anyone). Returns the users written.
pub async fn fill_events_topic(bootstrap: &str, events: usize) -> anyhow::Result<usize> {
    let topic = lockstep_broker::settings::Settings::default().events.topic;
    let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "200000")
        .create()?;
    let day_ago_ms = (now_s() * 1000.0) as i64 - 86_400_000;
    let users = events.div_ceil(BACKLOG_EVENTS_PER_USER);
    // In chunks of users, so that the encoded backlog is never all in memory.
    for chunk in (0..users).collect::<Vec<_>>().chunks(500) {
        let mut records = Vec::with_capacity(chunk.len() * BACKLOG_EVENTS_PER_USER);
        for &index in chunk {
            let user = uuid::Uuid::new_v4().to_string();
            let devices: Vec<String> =
                (0..BACKLOG_DEVICES_PER_USER).map(|_| uuid::Uuid::new_v4().to_string()).collect();
            let mut bodies = Vec::with_capacity(BACKLOG_EVENTS_PER_USER);
            for device in &devices {
                bodies.push(EventBody::DeviceAdded { device_id: device.clone() });
                bodies.push(EventBody::DeviceConnected {
                    device_id: device.clone(),
                    lease_until_ms: day_ago_ms,
                    stream_started_ms: None,
                });
            }
            let mut log_end = 0;
            while bodies.len() < BACKLOG_EVENTS_PER_USER {
                bodies.push(EventBody::LogAppended {
                    log_generation: 0,
                    first_offset: log_end,
                    log_end: log_end + 10,
                    count: 10,
                    origin_device_id: devices[0].clone(),
                    first_received_at_ms: day_ago_ms,
                });
                log_end += 10;
                for device in &devices {
                    bodies.push(EventBody::DeviceAcked {
                        device_id: device.clone(),
                        log_generation: 0,
                        committed_offset: log_end - 1,
                    });
                }
            }
            bodies.truncate(BACKLOG_EVENTS_PER_USER.min(events - index * BACKLOG_EVENTS_PER_USER));
            for (sequence, body) in bodies.into_iter().enumerate() {
                // Spread over the day, in order within the user.
                let at_ms = day_ago_ms + ((index * 997) % 20_000_000 + sequence * 600_000) as i64;
                let event = Event { user_id: user.clone(), node_id: "node-bench-prior-day".into(), at_ms, body };
                records.push((topic.clone(), user.clone(), encode_event(&event)?));
            }
        }
        crate::dashboard::produce_all(&producer, records).await?;
    }
    Ok(users)
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// One user: the device that pushes, and its offline devices' subscriptions.
struct User {
    pusher: Device,
    subscriptions: Vec<Subscription>,
}

async fn make_user(lockstep: &Lockstep, service: &PushService, index: usize, devices: usize) -> anyhow::Result<User> {
    let pusher = Device::create_account(lockstep, &format!("w6-pusher-{index}")).await?;
    pusher.push_ok(changes(1, 64)).await?;
    let mut targets = lockstep.push_targets().await?;
    let mut subscriptions = Vec::new();
    for device_index in 0..devices {
        let device = pusher.pair(lockstep, &format!("w6-{index}-{device_index}")).await?;
        // Caught up before the burst: the worker learns its offset from the event.
        device.ack(0).await?;
        let subscription = service.subscribe().await?;
        let target = Target::WebPush(WebPushTarget {
            endpoint: subscription.endpoint.clone(),
            p256dh: Bytes::from(URL_SAFE_NO_PAD.decode(&subscription.p256dh)?),
            auth: Bytes::from(URL_SAFE_NO_PAD.decode(&subscription.auth)?),
        });
        let request = SetPushTargetRequest { target: Some(PushTarget { target: Some(target), updated_at_ms: 0 }) };
        targets.set_push_target(with_token(request, &device.token)).await?;
        subscriptions.push(subscription);
    }
    Ok(User { pusher, subscriptions })
}

pub async fn run(
    lockstep: &Lockstep,
    push_bin: &Path,
    bootstrap: &str,
    config: &Config,
    round: usize,
    metrics: &mut Metrics,
) -> anyhow::Result<()> {
    let (users_count, devices_per_user) = (config.w6_users, 10);
    let filling = Instant::now();
    let backlog_users = fill_events_topic(bootstrap, config.w6_backlog_events).await?;
    metrics.add(round, "w6.backlog_written", config.w6_backlog_events as f64);
    metrics.add(round, "w6.backlog_users", backlog_users as f64);
    metrics.add(round, "w6.backlog_write_s", filling.elapsed().as_secs_f64());
    let backlog = events_topic_records(bootstrap).await?;
    metrics.add(round, "w6.events_before", backlog as f64);
    let service = PushService::start_go().await?;
    // The push service listens on 127.0.0.1: the worker must be told it may reach it. The
    // worker's own session timeout (10 s), not the kit's shorter one for tests that kill workers.
    let settings = [WORKER_ALLOWS_LOCAL_PUSH, ("LOCKSTEP_PUSH_EVENTS__SESSION_TIMEOUT", "10s")];
    let mut worker = PushWorker::prepare_binary(push_bin.to_path_buf(), bootstrap, &settings)?;
    let starting = Instant::now();
    worker.restart()?;
    worker.wait_until_acting(1).await?;
    metrics.add(round, "w6.worker_acting_s", starting.elapsed().as_secs_f64());
    let setup = Instant::now();
    let mut users = Vec::new();
    for chunk in (0..users_count).collect::<Vec<_>>().chunks(10) {
        let made = futures::future::join_all(
            chunk.iter().map(|&index| make_user(lockstep, &service, index, devices_per_user)),
        )
        .await;
        for user in made {
            users.push(user?);
        }
    }
    // Let the worker read the acks and targets; nobody is behind yet.
    tokio::time::sleep(config.w6_quiet).await;
    let premature = service.requests().await?.len();
    eprintln!(
        "    {} users, {} offline devices set up in {:.1} s ({premature} wake-ups before the burst)",
        users.len(),
        users.len() * devices_per_user,
        setup.elapsed().as_secs_f64()
    );

    // The burst: every user pushes 100 changes in 10 pushes, all users at once.
    let bursts = futures::future::join_all(users.iter().map(|user| async move {
        let first = user.pusher.push_ok(changes(10, 64)).await?;
        let acked_at = now_s();
        for _ in 0..9 {
            user.pusher.push_ok(changes(10, 64)).await?;
        }
        anyhow::Ok((first, acked_at))
    }))
    .await;
    let mut acked_at = Vec::new();
    for burst in bursts {
        acked_at.push(burst?.1);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let total = users.len() * devices_per_user;
    loop {
        let seen = service.requests().await?;
        let woken: std::collections::HashSet<&str> = seen.iter().map(|s| s.subscription()).collect();
        if woken.len() >= total || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Room for duplicates to show (well under min_interval).
    tokio::time::sleep(config.w6_quiet).await;
    let seen = service.requests().await?;
    let mut histogram = crate::stats::histogram();
    let (mut missing, mut wakeups, mut max_wakeups, mut failed) = (0usize, 0usize, 0usize, 0usize);
    for (user, acked_at) in users.iter().zip(&acked_at) {
        for subscription in &user.subscriptions {
            let mine: Vec<_> = seen.iter().filter(|s| s.subscription() == subscription.id).collect();
            failed += mine.iter().filter(|s| s.error().is_some() || s.status() != 201).count();
            wakeups += mine.len();
            max_wakeups = max_wakeups.max(mine.len());
            match mine.first() {
                Some(first) => {
                    let latency = (first.arrived() - acked_at).max(0.0);
                    crate::stats::record(&mut histogram, Duration::from_secs_f64(latency));
                }
                None => missing += 1,
            }
        }
    }
    let p50 = crate::stats::quantile_ms(&histogram, 0.5);
    let p99 = crate::stats::quantile_ms(&histogram, 0.99);
    let max = crate::stats::quantile_ms(&histogram, 1.0);
    let per_device = wakeups as f64 / total as f64;
    eprintln!(
        "    w6: ack→wake-up p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms; {per_device:.3} wake-ups per device \
         (max {max_wakeups}), {missing} devices not woken, {failed} requests not verified"
    );
    metrics.add(round, "w6.p50_ms", p50);
    metrics.add(round, "w6.p99_ms", p99);
    metrics.add(round, "w6.max_ms", max);
    metrics.add(round, "w6.wakeups_per_device", per_device);
    metrics.add(round, "w6.max_wakeups_per_device", max_wakeups as f64);
    metrics.add(round, "w6.not_woken", missing as f64);
    metrics.add(round, "w6.unverified", failed as f64);
    metrics.add(round, "w6.premature", premature as f64);
    worker.terminate()?;
    Ok(())
}
