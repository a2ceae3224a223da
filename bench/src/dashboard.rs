//! WD: the dashboard with a large fleet. The fleet is written straight to
//! Kafka the way the servers would leave it — user topics holding change
//! envelopes, one committed offset per device group, and the events
//! (devices added, appends, acks, leases) on a fresh events topic — then a
//! `lockstep-dashboard` starts on it. Measured: how long until it shows every
//! device, how long the page (worst-first table, 500 rows; and every row)
//! and the JSON API take to render, one Kafka refresh, and its RSS.

use std::{path::Path, time::Duration};

use futures::{StreamExt, stream};
use lockstep_broker::kafka::{GroupOffsets, GroupOffsetsSettings};
use lockstep_schemas::{CHANGE_ENVELOPE_VERSION, ChangeEnvelope, Event, EventBody, Op, encode_change, encode_event};
use lockstep_testkit::{dashboard::Dashboard, kafka::Kafka};
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    producer::{FutureProducer, FutureRecord},
};
use tokio::time::Instant;

use crate::{procs, stats::Metrics};

/// Changes in each user's log.
const LOG_CHANGES: i64 = 20;
pub const DEVICES_PER_USER: usize = 10;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

async fn create_topics(bootstrap: &str, topics: &[String], partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for chunk in topics.chunks(100) {
        let new: Vec<NewTopic> =
            chunk.iter().map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(1))).collect();
        for result in admin.create_topics(&new, &options).await? {
            result.map_err(|(topic, code)| anyhow::anyhow!("creating {topic}: {code}"))?;
        }
    }
    Ok(())
}

pub async fn produce_all(producer: &FutureProducer, records: Vec<(String, String, Vec<u8>)>) -> anyhow::Result<()> {
    let results: Vec<_> = stream::iter(records)
        .map(|(topic, key, value)| async move {
            producer
                .send(FutureRecord::to(&topic).key(&key).payload(&value), Duration::from_secs(30))
                .await
                .map_err(|(error, _)| error)
        })
        .buffer_unordered(1000)
        .collect()
        .await;
    for result in results {
        result?;
    }
    Ok(())
}

/// One WD run with `devices` devices.
pub async fn wd(
    kafka: &Kafka,
    dashboard_bin: &Path,
    devices: usize,
    round: usize,
    metrics: &mut Metrics,
) -> anyhow::Result<()> {
    let bootstrap = kafka.bootstrap();
    let users: Vec<String> =
        (0..devices.div_ceil(DEVICES_PER_USER)).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let topic = |user: &str| format!("lockstep.user.{user}");
    let events_topic = format!("lockstep.events.bench-{}", uuid::Uuid::new_v4());
    let setup = Instant::now();
    create_topics(bootstrap, &users.iter().map(|u| topic(u)).collect::<Vec<_>>(), 1).await?;
    create_topics(bootstrap, std::slice::from_ref(&events_topic), 16).await?;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "200000")
        .create()?;
    let now = now_ms();
    let mut changes = Vec::new();
    for user in &users {
        for offset in 0..LOG_CHANGES {
            let envelope = ChangeEnvelope {
                schema_version: CHANGE_ENVELOPE_VERSION,
                user_id: user.clone(),
                origin_device_id: "bench".into(),
                change_id: uuid::Uuid::new_v4().to_string(),
                record_id: format!("r{offset}"),
                collection: "notes".into(),
                op: Op::Upsert,
                hlc: now << 16,
                key_epoch: 1,
                nonce: vec![0; 24],
                ciphertext: vec![0; 64],
                received_at_ms: now - (LOG_CHANGES - offset) * 60_000,
            };
            changes.push((topic(user), format!("r{offset}"), encode_change(&envelope)?));
        }
    }
    produce_all(&producer, changes).await?;

    // Devices: a spread of states (committed 0..=20, a third connected on one of three nodes).
    let offsets = GroupOffsets::connect(GroupOffsetsSettings {
        bootstrap_servers: bootstrap.to_string(),
        client_id: "bench-wd".into(),
        request_timeout: Duration::from_secs(10),
        max_attempts: 3,
        security: Default::default(),
    })
    .await?;
    let mut fleet = Vec::with_capacity(devices);
    for index in 0..devices {
        let user = &users[index / DEVICES_PER_USER];
        let committed = (index as i64 * 7) % (LOG_CHANGES + 1);
        fleet.push((uuid::Uuid::new_v4().to_string(), user.clone(), committed, index % 3 == 0));
    }
    let commits: Vec<_> = stream::iter(fleet.iter())
        .map(|(device, user, committed, _)| {
            let offsets = offsets.clone();
            let topic = topic(user);
            async move { offsets.commit(&format!("lockstep.device.{device}"), &topic, 0, *committed).await }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for commit in commits {
        commit?;
    }
    let event = |user: &str, node: usize, at_ms: i64, body: EventBody| -> anyhow::Result<(String, String, Vec<u8>)> {
        let event = Event { user_id: user.to_string(), node_id: format!("node-bench-{node}"), at_ms, body };
        Ok((events_topic.clone(), user.to_string(), encode_event(&event)?))
    };
    let mut events = Vec::new();
    for user in &users {
        events.push(event(
            user,
            0,
            now - 60_000,
            EventBody::LogAppended {
                log_generation: 0,
                first_offset: 0,
                log_end: LOG_CHANGES,
                count: LOG_CHANGES,
                origin_device_id: "bench".into(),
                first_received_at_ms: now - LOG_CHANGES * 60_000,
            },
        )?);
    }
    for (index, (device, user, committed, connected)) in fleet.iter().enumerate() {
        events.push(event(user, index % 3, now - 120_000, EventBody::DeviceAdded { device_id: device.clone() })?);
        if *committed > 0 {
            let body =
                EventBody::DeviceAcked { device_id: device.clone(), log_generation: 0, committed_offset: *committed };
            events.push(event(user, index % 3, now - 30_000, body)?);
        }
        if *connected {
            let body = EventBody::DeviceConnected {
                device_id: device.clone(),
                lease_until_ms: now + 3_600_000,
                stream_started_ms: None,
            };
            events.push(event(user, index % 3, now - 10_000, body)?);
        }
    }
    let event_count = events.len();
    produce_all(&producer, events).await?;
    metrics.add(round, &format!("wd.n{devices}.setup_s"), setup.elapsed().as_secs_f64());

    let started = Instant::now();
    let mut dashboard = Dashboard::start_binary(
        dashboard_bin.to_path_buf(),
        bootstrap,
        &[("LOCKSTEP_DASHBOARD_EVENTS__TOPIC", &events_topic), ("LOCKSTEP_LOG", "warn")],
    )
    .await?;
    // Every device shown, and two Kafka refreshes done (every offset and log end read).
    loop {
        let (_, metrics_text) = dashboard.get("/metrics").await?;
        let refreshes = metrics_text
            .lines()
            .find_map(|line| line.strip_prefix("lockstep_dashboard_refresh_seconds_count "))
            .and_then(|count| count.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        let summary = dashboard.json("/api/v1/summary").await?;
        if summary["devices"].as_u64() == Some(devices as u64)
            && summary["events_applied"].as_u64() >= Some(event_count as u64)
            && refreshes >= 2.0
        {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the dashboard never showed the fleet: {summary}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    metrics.add(round, &format!("wd.n{devices}.ready_s"), started.elapsed().as_secs_f64());

    let mut rss_max = 0;
    let mut timed = |samples: &mut Vec<f64>, started: Instant, pid: u32| {
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        rss_max = rss_max.max(procs::rss_kib(pid).unwrap_or(0));
    };
    let pid = dashboard.pid();
    metrics.add(round, &format!("wd.n{devices}.rss_ready_kib"), procs::rss_kib(pid).unwrap_or(0) as f64);
    let (mut page, mut page_all, mut api) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..10 {
        let started = Instant::now();
        let (status, body) = dashboard.get("/").await?;
        anyhow::ensure!(status == 200 && body.contains("id=\"devices\""), "page: HTTP {status}");
        timed(&mut page, started, pid);
    }
    for _ in 0..5 {
        let started = Instant::now();
        let (status, body) = lockstep_testkit::http_get(dashboard.addr(), "/?limit=1000000").await?;
        anyhow::ensure!(status == 200 && body.matches("<tr data-device").count() == devices, "every row: {status}");
        timed(&mut page_all, started, pid);
        let started = Instant::now();
        let (status, _) = dashboard.get("/api/v1/devices").await?;
        anyhow::ensure!(status == 200, "api: HTTP {status}");
        timed(&mut api, started, pid);
    }
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let (_, metrics_text) = dashboard.get("/metrics").await?;
    let sum_count = |name: &str| {
        let find = |suffix: &str| {
            metrics_text
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{name}{suffix} ")))
                .and_then(|value| value.trim().parse::<f64>().ok())
        };
        find("_sum").zip(find("_count")).map(|(sum, count)| sum / count.max(1.0))
    };
    metrics.add(round, &format!("wd.n{devices}.page_ms"), median(&mut page));
    metrics.add(round, &format!("wd.n{devices}.page_all_rows_ms"), median(&mut page_all));
    metrics.add(round, &format!("wd.n{devices}.api_ms"), median(&mut api));
    metrics.add(
        round,
        &format!("wd.n{devices}.refresh_s"),
        sum_count("lockstep_dashboard_refresh_seconds").unwrap_or(0.0),
    );
    metrics.add(round, &format!("wd.n{devices}.rss_kib"), rss_max as f64);
    dashboard.kill9();
    Ok(())
}
