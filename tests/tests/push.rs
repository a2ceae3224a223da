//! Wake-ups end to end: Kafka, the real `lockstep` server publishing events,
//! the real `lockstep-push` worker, and a local push service written apart
//! from the worker (`tests/python/push_service.py`: it verifies the VAPID JWT
//! and decrypts the `aes128gcm` body with the subscription's private key).

use std::{
    collections::{BTreeMap, HashSet},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use lockstep_e2e::{
    device::{Device, changes, receive_changes, with_token},
    kafka::{EventRecord, Kafka, read_events},
    push::{PushService, PushWorker, SERVER_ALLOWS_LOCAL_PUSH, Seen, Subscription, WORKER_ALLOWS_LOCAL_PUSH},
    server::Server,
    wait::{eventually, not_yet, ready},
};
use lockstep_proto::v1::{
    GetServerInfoRequest, PushTarget as ProtoTarget, SetPushTargetRequest, WebPushTarget, WebhookTarget,
    push_target::Target,
};
use lockstep_schemas::{EventBody, TargetRemovedReason, WakeUpOutcome};

const WAIT: Duration = Duration::from_secs(60);
const EVENTS_TOPIC: &str = "lockstep.events";
/// Leases of 3 s (renewed every second), so a stream that ended stops counting soon.
const SERVER_ENV: &[(&str, &str)] = &[("LOCKSTEP_EVENTS__LEASE_INTERVAL", "1s")];

struct PushStack {
    kafka: Kafka,
    server: Server,
    worker: PushWorker,
    service: PushService,
}

/// Kafka, a server that advertises the worker's VAPID key, the worker (with
/// `worker_env`), the push service; returns once the worker joined its group.
async fn push_stack(worker_env: &[(&str, &str)]) -> anyhow::Result<PushStack> {
    push_stack_with(PushService::start().await?, worker_env).await
}

/// [`push_stack`] with another push service.
async fn push_stack_with(service: PushService, worker_env: &[(&str, &str)]) -> anyhow::Result<PushStack> {
    let kafka = Kafka::start().await?;
    // The server advertises the worker's key and creates the events topic; the
    // worker subscribes to it after.
    // The push service listens on 127.0.0.1, which targets may not name unless allowed.
    let mut worker_env = worker_env.to_vec();
    worker_env.push(WORKER_ALLOWS_LOCAL_PUSH);
    let mut worker = PushWorker::prepare(kafka.bootstrap(), &worker_env)?;
    let key = worker.vapid_public_key().to_string();
    let mut env = SERVER_ENV.to_vec();
    env.push(("LOCKSTEP_PUSH__VAPID_PUBLIC_KEY", &key));
    env.push(SERVER_ALLOWS_LOCAL_PUSH);
    let server = Server::start_with(&kafka, &env).await?;
    worker.restart()?;
    worker.wait_until_acting(1).await?;
    Ok(PushStack { kafka, server, worker, service })
}

fn unb64(text: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(text).expect("base64url")
}

async fn set_web_push(server: &Server, device: &Device, subscription: &Subscription) -> anyhow::Result<()> {
    let target = Target::WebPush(WebPushTarget {
        endpoint: subscription.endpoint.clone(),
        p256dh: Bytes::from(unb64(&subscription.p256dh)),
        auth: Bytes::from(unb64(&subscription.auth)),
    });
    let request = SetPushTargetRequest { target: Some(ProtoTarget { target: Some(target), updated_at_ms: 0 }) };
    server.push_targets().await?.set_push_target(with_token(request, &device.token)).await?;
    Ok(())
}

async fn set_webhook(server: &Server, device: &Device, url: &str, pushkey: &str) -> anyhow::Result<()> {
    let target =
        Target::Webhook(WebhookTarget { url: url.into(), app_id: "org.example.notes".into(), pushkey: pushkey.into() });
    let request = SetPushTargetRequest { target: Some(ProtoTarget { target: Some(target), updated_at_ms: 0 }) };
    server.push_targets().await?.set_push_target(with_token(request, &device.token)).await?;
    Ok(())
}

/// Pushes `count` changes in pushes of 100 (a burst); returns the log end.
async fn burst(device: &Device, count: usize) -> anyhow::Result<i64> {
    let mut last = 0;
    for _ in 0..count / 100 {
        last = *device.push_ok(changes(100, 64)).await?.last().expect("100 offsets");
    }
    Ok(last + 1)
}

/// Reads the events topic until `until` holds.
async fn events_until(
    kafka: &Kafka,
    what: &str,
    until: impl Fn(&[EventRecord]) -> bool,
) -> anyhow::Result<Vec<EventRecord>> {
    eventually(WAIT, format!("the events topic showing {what}"), || async {
        let events = read_events(kafka.bootstrap(), EVENTS_TOPIC).await?;
        if until(&events) {
            return anyhow::Ok(ready(events));
        }
        let kinds: Vec<String> = events.iter().map(|(_, _, _, e)| format!("{} {:?}", e.node_id, e.body)).collect();
        Ok(not_yet(format!("it holds: {kinds:#?}")))
    })
    .await
}

fn wake_ups(events: &[EventRecord], device_id: &str) -> Vec<(WakeUpOutcome, i32, i64, String)> {
    events
        .iter()
        .filter_map(|(_, _, _, e)| match &e.body {
            EventBody::WakeUp { device_id: d, outcome, http_status, log_end } if d == device_id => {
                Some((*outcome, *http_status, *log_end, e.node_id.clone()))
            }
            _ => None,
        })
        .collect()
}

/// A verified, decrypted, content-free wake-up announcing a log end in
/// `1..=log_end` (a wake-up sent in the middle of a burst announces the log end then).
fn assert_clean_wake_up(seen: &Seen, log_end: i64) {
    assert_eq!(seen.error(), None, "the push service verified VAPID and decrypted: {:?}", seen.raw);
    assert_eq!(seen.status(), 201);
    let payload = seen.payload().expect("a body");
    let keys: Vec<&String> = payload.as_object().expect("a JSON object").keys().collect();
    assert_eq!(keys, ["log_end", "v"], "nothing but the version and the log end: {payload}");
    assert_eq!(payload["v"].as_i64(), Some(1));
    let announced = payload["log_end"].as_i64().expect("log_end");
    assert!((1..=log_end).contains(&announced), "announced log end {announced} of {log_end}");
    let text = payload.to_string();
    assert!(!text.contains("notes") && !text.contains("\"r"), "no collection or record id: {text}");
    assert_eq!(seen.header("ttl"), Some("86400"));
    assert_eq!(seen.header("urgency"), Some("normal"));
    assert_eq!(seen.header("topic"), Some("lockstep-sync"));
    assert_eq!(seen.header("content_encoding"), Some("aes128gcm"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_gets_one_wake_up_per_burst_a_connected_or_acked_one_none() -> anyhow::Result<()> {
    let PushStack { kafka, server, worker, service } = push_stack(&[]).await?;
    let info = server.sync().await?.get_server_info(GetServerInfoRequest {}).await?.into_inner();
    assert_eq!(info.vapid_public_key, worker.vapid_public_key(), "the server advertises the worker's key");

    let laptop = Device::create_account(&server, "laptop").await?;
    let phone = laptop.pair(&server, "phone").await?;
    let tablet = laptop.pair(&server, "tablet").await?;
    let desk = laptop.pair(&server, "desk").await?;
    let (phone_sub, tablet_sub, desk_sub) =
        (service.subscribe().await?, service.subscribe().await?, service.subscribe().await?);
    set_web_push(&server, &phone, &phone_sub).await?;
    set_web_push(&server, &tablet, &tablet_sub).await?;
    set_web_push(&server, &desk, &desk_sub).await?;
    // The tablet stays connected; the desk is connected through the burst and acks it all.
    let mut tablet_stream = tablet.subscribe(None).await?;
    let mut desk_stream = desk.subscribe(None).await?;
    events_until(&kafka, "both streams connected", |events| {
        [&tablet.device_id, &desk.device_id].iter().all(|id| {
            events
                .iter()
                .any(|(_, _, _, e)| matches!(&e.body, EventBody::DeviceConnected { device_id, .. } if device_id == *id))
        })
    })
    .await?;

    let log_end = burst(&laptop, 1_000).await?;
    assert_eq!(log_end, 1_000);
    receive_changes(&mut desk_stream, 1_000, WAIT).await?;
    desk.ack(log_end - 1).await?;
    events_until(&kafka, "the desk's ack", |events| {
        events.iter().any(|(_, _, _, e)| {
            matches!(&e.body, EventBody::DeviceAcked { device_id, committed_offset, .. }
                if *device_id == desk.device_id && *committed_offset == log_end)
        })
    })
    .await?;
    drop(desk_stream);

    let seen = service.wait_for(&phone_sub.id, 1, WAIT).await?;
    assert_clean_wake_up(&seen[0], log_end);
    // Past the 3 s lease a stale "connected" would have expired, and far past the
    // worker's reaction time: still one wake-up, none for the connected tablet or the
    // desk that acked everything. Waiting is the point: a lease can only expire in time.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(service.requests_to(&phone_sub.id).await?.len(), 1, "exactly one wake-up for 1,000 changes");
    assert_eq!(service.requests_to(&tablet_sub.id).await?.len(), 0, "the tablet is connected");
    assert_eq!(service.requests_to(&desk_sub.id).await?.len(), 0, "the desk acked to the log end");
    let events =
        events_until(&kafka, "the phone's wake-up event", |events| !wake_ups(events, &phone.device_id).is_empty())
            .await?;
    let phone_wakes = wake_ups(&events, &phone.device_id);
    assert_eq!(phone_wakes.len(), 1, "{phone_wakes:?}");
    assert_eq!((phone_wakes[0].0, phone_wakes[0].1), (WakeUpOutcome::Sent, 201));
    assert_eq!(Some(phone_wakes[0].2), seen[0].payload().and_then(|p| p["log_end"].as_i64()));
    assert!(phone_wakes[0].3.starts_with("push-"), "published by the worker: {}", phone_wakes[0].3);
    // The worker's events share the user's partition (the server's partitioner), so a
    // replay of that partition sees "already woken".
    let partitions: HashSet<i32> =
        events.iter().filter(|(_, _, _, e)| e.user_id == laptop.user_id).map(|(p, _, _, _)| *p).collect();
    assert_eq!(partitions.len(), 1, "{partitions:?}");
    // Not one byte of what was pushed to the service reaches the events topic.
    let ciphertext = seen[0].ciphertext();
    assert!(ciphertext.len() > 16);
    for (_, _, raw, _) in &events {
        assert!(!raw.windows(16).any(|window| ciphertext.windows(16).any(|c| c == window)));
    }

    // The tablet goes away without acking: now it is woken, once.
    receive_changes(&mut tablet_stream, 1_000, WAIT).await?;
    drop(tablet_stream);
    let seen = service.wait_for(&tablet_sub.id, 1, WAIT).await?;
    assert_clean_wake_up(&seen[0], log_end);
    // Time passes to show that nothing more happens: no second wake-up for the tablet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(service.requests_to(&tablet_sub.id).await?.len(), 1);
    assert!(!worker.log().contains(&phone_sub.endpoint), "the worker never logs an endpoint");

    // Its /metrics count the wake-ups (aggregates only) and pass promtool.
    let metrics_addr = worker.metrics_addr().ok_or_else(|| anyhow::anyhow!("no metrics address in the log"))?;
    let (code, text) = lockstep_e2e::http_get(metrics_addr, "/metrics").await?;
    assert_eq!(code, 200);
    let sent = text
        .lines()
        .find_map(|line| line.strip_prefix(r#"lockstep_push_wakeup_attempts_total{outcome="SENT"} "#))
        .and_then(|value| value.trim().parse::<f64>().ok());
    assert!(sent.is_some_and(|sent| sent >= 2.0), "{text}");
    assert!(!text.contains(&phone.device_id) && !text.contains(&laptop.user_id), "no per-device labels");
    lockstep_e2e::promtool_check(&text)?;
    assert_eq!(lockstep_e2e::http_get(metrics_addr, "/healthz").await?.0, 200);
    Ok(())
}

/// The benchmark's W6 wakes its devices at the Go push service, not the Python
/// one (which answers a few hundred requests a second): the Go one must verify
/// and decrypt the worker's wake-ups as strictly, or W6 would count wake-ups no
/// real push service would take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_push_service_of_the_benchmark_verifies_and_decrypts_real_wake_ups() -> anyhow::Result<()> {
    // Kafka and the worker are bound, not `..`-dropped: dropping them stops them.
    let PushStack { kafka: _kafka, server, worker: _worker, service } =
        push_stack_with(PushService::start_go().await?, &[]).await?;
    let laptop = Device::create_account(&server, "laptop").await?;
    let phones = [laptop.pair(&server, "phone").await?, laptop.pair(&server, "tablet").await?];
    let mut subscriptions = Vec::new();
    for phone in &phones {
        let subscription = service.subscribe().await?;
        set_web_push(&server, phone, &subscription).await?;
        subscriptions.push(subscription);
    }
    let log_end = burst(&laptop, 200).await?;
    for subscription in &subscriptions {
        let seen = service.wait_for(&subscription.id, 1, WAIT).await?;
        assert_clean_wake_up(&seen[0], log_end);
        assert!(seen[0].header("vapid_sub").is_some_and(|sub| sub.starts_with("mailto:") || sub.starts_with("https:")));
    }
    // A request that is not the worker's is refused: no VAPID, or another subscription's keys.
    let endpoint = subscriptions[0].endpoint.strip_prefix("http://").expect("an http:// endpoint");
    let (address, path) = endpoint.split_at(endpoint.find('/').expect("a path"));
    let (status, _, _) = lockstep_e2e::http_request(address.parse()?, "POST", path, &[], "not a wake-up").await?;
    assert_eq!(status, 401);
    let seen = service.requests_to(&subscriptions[0].id).await?;
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].error(), Some("no vapid authorization"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_service_answers_410_429_413_500_and_webhook_rejections_are_honoured() -> anyhow::Result<()> {
    let worker_env = [("LOCKSTEP_PUSH_WAKE__MIN_INTERVAL", "1s"), ("LOCKSTEP_PUSH_WAKE__RETRY_BASE_DELAY", "200ms")];
    let PushStack { kafka, server, worker: _worker, service } = push_stack(&worker_env).await?;

    // 410: the target is forgotten, an event says so, and later changes wake nothing.
    let gone_owner = Device::create_account(&server, "gone-pusher").await?;
    let gone = gone_owner.pair(&server, "gone").await?;
    let gone_sub = service.subscribe().await?;
    set_web_push(&server, &gone, &gone_sub).await?;
    service.fail(410, 1, None, Some(&gone_sub.id)).await?;
    gone_owner.push_ok(changes(3, 16)).await?;
    service.wait_for(&gone_sub.id, 1, WAIT).await?;
    events_until(&kafka, "the target removed as GONE", |events| {
        events.iter().any(|(_, _, _, e)| {
            matches!(&e.body, EventBody::PushTargetRemoved { device_id, reason: TargetRemovedReason::Gone }
                if *device_id == gone.device_id)
        }) && wake_ups(events, &gone.device_id).iter().any(|w| w.0 == WakeUpOutcome::Gone && w.1 == 410)
    })
    .await?;
    gone_owner.push_ok(changes(3, 16)).await?;

    // 429 with Retry-After: 2: the next request to that origin waits ≥ 2 s.
    let slow_owner = Device::create_account(&server, "slow-pusher").await?;
    let slow = slow_owner.pair(&server, "slow").await?;
    let slow_sub = service.subscribe().await?;
    set_web_push(&server, &slow, &slow_sub).await?;
    service.fail(429, 1, Some(2), Some(&slow_sub.id)).await?;
    slow_owner.push_ok(changes(3, 16)).await?;
    let seen = service.wait_for(&slow_sub.id, 2, WAIT).await?;
    assert_eq!((seen[0].status(), seen[1].status()), (429, 201));
    let all = service.requests().await?;
    let throttled_at = seen[0].arrived();
    let next = all.iter().map(Seen::arrived).filter(|at| *at > throttled_at).fold(f64::MAX, f64::min);
    assert!(next - throttled_at >= 2.0, "next request to the origin {:.3} s after the 429", next - throttled_at);
    assert_clean_wake_up(&seen[1], 3);

    // 500 twice: retried with backoff, then delivered.
    let flaky_owner = Device::create_account(&server, "flaky-pusher").await?;
    let flaky = flaky_owner.pair(&server, "flaky").await?;
    let flaky_sub = service.subscribe().await?;
    set_web_push(&server, &flaky, &flaky_sub).await?;
    service.fail(500, 2, None, Some(&flaky_sub.id)).await?;
    flaky_owner.push_ok(changes(3, 16)).await?;
    let seen = service.wait_for(&flaky_sub.id, 3, WAIT).await?;
    let statuses: Vec<i64> = seen.iter().map(Seen::status).collect();
    assert_eq!(statuses, [500, 500, 201]);
    assert_clean_wake_up(&seen[2], 3);

    // 413: the wake-up is sent again without a body.
    let big_owner = Device::create_account(&server, "big-pusher").await?;
    let big = big_owner.pair(&server, "big").await?;
    let big_sub = service.subscribe().await?;
    set_web_push(&server, &big, &big_sub).await?;
    service.fail(413, 1, None, Some(&big_sub.id)).await?;
    big_owner.push_ok(changes(3, 16)).await?;
    let seen = service.wait_for(&big_sub.id, 2, WAIT).await?;
    assert_eq!((seen[0].status(), seen[1].status()), (413, 201));
    assert_eq!((seen[1].raw["body_len"].as_i64(), seen[1].error()), (Some(0), None), "{:?}", seen[1].raw);

    // A Matrix-gateway webhook: the notification shape, then a rejected pushkey.
    let hook_owner = Device::create_account(&server, "hook-pusher").await?;
    let hook = hook_owner.pair(&server, "hook").await?;
    let (url, pushkey) = service.webhook().await?;
    set_webhook(&server, &hook, &url, &pushkey).await?;
    hook_owner.push_ok(changes(2, 16)).await?;
    let seen = service.wait_for(&pushkey, 1, WAIT).await?;
    let notification = &seen[0].raw["webhook"]["notification"];
    assert_eq!(notification["prio"], "high");
    assert_eq!(notification["devices"][0]["app_id"], "org.example.notes");
    assert_eq!(notification["devices"][0]["data"], serde_json::json!({ "log_end": 2 }));
    service.reject(&pushkey).await?;
    // The worker's 1 s min_interval must pass, or the next wake-up is held back by it
    // and the rejected pushkey is never tried again.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    hook_owner.push_ok(changes(2, 16)).await?;
    service.wait_for(&pushkey, 2, WAIT).await?;
    events_until(&kafka, "the webhook target removed as REJECTED", |events| {
        events.iter().any(|(_, _, _, e)| {
            matches!(&e.body, EventBody::PushTargetRemoved { device_id, reason: TargetRemovedReason::Rejected }
                if *device_id == hook.device_id)
        })
    })
    .await?;

    // Gone and rejected targets get nothing more (the 410 device was pushed to again above).
    // Past the 1 s min_interval, so that only the removed target can hold a wake-up back;
    // then time passes to show that nothing more happens.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    hook_owner.push_ok(changes(2, 16)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(service.requests_to(&gone_sub.id).await?.len(), 1, "a gone target is not woken again");
    assert_eq!(service.requests_to(&pushkey).await?.len(), 2, "a rejected pushkey is not woken again");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_restarts_without_a_storm_and_wakes_who_is_still_behind() -> anyhow::Result<()> {
    let worker_env = [("LOCKSTEP_PUSH_WAKE__MIN_INTERVAL", "60s")];
    let PushStack { kafka, server, mut worker, service } = push_stack(&worker_env).await?;
    // Five users with an offline device each, woken before the kill.
    let mut woken = Vec::new();
    for index in 0..5 {
        let owner = Device::create_account(&server, &format!("owner-{index}")).await?;
        let device = owner.pair(&server, &format!("device-{index}")).await?;
        let subscription = service.subscribe().await?;
        set_web_push(&server, &device, &subscription).await?;
        owner.push_ok(changes(10, 16)).await?;
        woken.push((owner, device, subscription));
    }
    for (_, _, subscription) in &woken {
        service.wait_for(&subscription.id, 1, WAIT).await?;
    }
    events_until(&kafka, "every wake-up recorded", |events| {
        woken
            .iter()
            .all(|(_, device, _)| wake_ups(events, &device.device_id).iter().any(|w| w.0 == WakeUpOutcome::Sent))
    })
    .await?;

    worker.kill9();
    // While it is down: a new user's device falls behind.
    let late_owner = Device::create_account(&server, "late-owner").await?;
    let late = late_owner.pair(&server, "late").await?;
    let late_sub = service.subscribe().await?;
    set_web_push(&server, &late, &late_sub).await?;
    late_owner.push_ok(changes(10, 16)).await?;

    worker.restart()?;
    worker.wait_until_acting(2).await?;
    let seen = service.wait_for(&late_sub.id, 1, WAIT).await?;
    assert_clean_wake_up(&seen[0], 10);
    // Time passes to show that nothing more happens: no storm of wake-ups after the restart.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (_, device, subscription) in &woken {
        let count = service.requests_to(&subscription.id).await?.len();
        assert_eq!(count, 1, "device {} was woken again after the restart", device.device_id);
    }
    assert_eq!(service.requests_to(&late_sub.id).await?.len(), 1);
    // SIGTERM: it commits what it acted on and leaves the group cleanly.
    assert!(worker.terminate()?, "lockstep-push exited with an error on SIGTERM:\n{}", worker.log());
    assert!(worker.log().contains("lockstep-push stopped"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_split_the_partitions_and_wake_each_device_once() -> anyhow::Result<()> {
    let PushStack { kafka, server, worker: mut first, service } = push_stack(&[]).await?;
    let mut second = PushWorker::start(kafka.bootstrap(), &[WORKER_ALLOWS_LOCAL_PUSH]).await?;
    second.wait_until_acting(1).await?;
    // The first worker gave up half of its partitions in the rebalance.
    first.wait_for_log("partitions revoked", 1, WAIT).await?;
    first.wait_until_acting(2).await?;

    let mut devices = Vec::new();
    for index in 0..16 {
        let owner = Device::create_account(&server, &format!("owner-{index}")).await?;
        let device = owner.pair(&server, &format!("device-{index}")).await?;
        let subscription = service.subscribe().await?;
        set_web_push(&server, &device, &subscription).await?;
        owner.push_ok(changes(5, 16)).await?;
        devices.push((owner, device, subscription));
    }
    for (_, _, subscription) in &devices {
        service.wait_for(&subscription.id, 1, WAIT).await?;
    }
    // Time passes to show that nothing more happens: no device is woken by both workers.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = events_until(&kafka, "every wake-up recorded", |events| {
        devices.iter().all(|(_, device, _)| !wake_ups(events, &device.device_id).is_empty())
    })
    .await?;
    let mut by_worker: BTreeMap<String, usize> = BTreeMap::new();
    for (_, device, subscription) in &devices {
        assert_eq!(service.requests_to(&subscription.id).await?.len(), 1, "device {}", device.device_id);
        let wakes = wake_ups(&events, &device.device_id);
        assert_eq!(wakes.len(), 1, "{wakes:?}");
        *by_worker.entry(wakes[0].3.clone()).or_default() += 1;
    }
    // 16 users over 16 partitions split between two workers: both took part.
    assert_eq!(by_worker.len(), 2, "wake-ups by worker: {by_worker:?}");
    let partitions: HashSet<i32> = events.iter().map(|(p, _, _, _)| *p).collect();
    assert!(partitions.len() > 1, "{partitions:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_kafka_client_reads_the_scenario_and_no_content_from_the_events_topic() -> anyhow::Result<()> {
    let PushStack { kafka, server, worker: _worker, service } = push_stack(&[]).await?;
    let laptop = Device::create_account(&server, "laptop").await?;
    let phone = laptop.pair(&server, "phone").await?;
    let subscription = service.subscribe().await?;
    set_web_push(&server, &phone, &subscription).await?;

    // Changes whose record ids, collection, nonces and ciphertexts must never reach the topic.
    let mut forbidden: Vec<Vec<u8>> = Vec::new();
    let pushed: Vec<_> = (0..20)
        .map(|_| {
            let record_id = uuid::Uuid::new_v4().to_string();
            let mut change = lockstep_e2e::device::change(&record_id, 64);
            change.collection = format!("diary-{}", uuid::Uuid::new_v4().simple());
            forbidden.extend([
                record_id.into_bytes(),
                change.collection.clone().into_bytes(),
                change.nonce.to_vec(),
                change.ciphertext.to_vec(),
            ]);
            change
        })
        .collect();
    laptop.push_ok(pushed).await?;
    let seen = service.wait_for(&subscription.id, 1, WAIT).await?;
    assert_clean_wake_up(&seen[0], 20);
    forbidden.push(seen[0].ciphertext());

    // The woken phone syncs, acks and goes; then it removes its target.
    let mut stream = phone.subscribe(None).await?;
    receive_changes(&mut stream, 20, WAIT).await?;
    phone.ack(19).await?;
    drop(stream);
    let request = with_token(lockstep_proto::v1::RemovePushTargetRequest {}, &phone.token);
    server.push_targets().await?.remove_push_target(request).await?;
    events_until(&kafka, "the scenario's last events", |events| {
        let phone_events = |kind: &str| {
            events.iter().any(|(_, _, _, e)| e.body.kind() == kind && e.body.device_id() == Some(&phone.device_id))
        };
        phone_events("DeviceAcked") && phone_events("DeviceDisconnected") && phone_events("PushTargetRemoved")
    })
    .await?;

    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut child = std::process::Command::new("python3")
        .arg(manifest.join("python/events_check.py"))
        .arg(kafka.bootstrap())
        .arg(EVENTS_TOPIC)
        .arg(manifest.join("../schemas/avro/event.avsc"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped");
        for needle in &forbidden {
            writeln!(stdin, "{}", hex::encode(needle))?;
        }
        // A control: the subscription's public key is in the topic (the target), so the
        // scan must find it.
        writeln!(stdin, "{}", hex::encode(unb64(&subscription.p256dh)))?;
    }
    let output = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    assert!(output.status.success(), "events_check.py: {}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let control = hex::encode(unb64(&subscription.p256dh));
    assert_eq!(report["forbidden_found"], serde_json::json!([control]), "content reached the events topic");

    let mine: Vec<&serde_json::Value> =
        report["events"].as_array().expect("events").iter().filter(|e| e["user_id"] == laptop.user_id).collect();
    let position = |kind: &str, device: Option<&str>, extra: &dyn Fn(&serde_json::Value) -> bool| {
        mine.iter()
            .position(|e| e["kind"] == kind && device.is_none_or(|d| e["body"]["device_id"] == d) && extra(&e["body"]))
            .unwrap_or_else(|| panic!("no {kind} for {device:?} among {mine:#?}"))
    };
    let any = |_: &serde_json::Value| true;
    let phone_id = Some(phone.device_id.as_str());
    let added = position("DeviceAdded", phone_id, &any);
    let target_set = position("PushTargetSet", phone_id, &|b| b["target"]["branch"] == "WebPushTarget");
    let appended = position("LogAppended", None, &|b| b["log_end"] == 20 && b["count"] == 20);
    let woken = position("WakeUp", phone_id, &|b| b["outcome"] == "SENT" && b["http_status"] == 201);
    let acked = position("DeviceAcked", phone_id, &|b| b["committed_offset"] == 20);
    let removed = position("PushTargetRemoved", phone_id, &|b| b["reason"] == "REMOVED_BY_DEVICE");
    assert!(added < target_set && target_set < appended && appended < woken && woken < acked && acked < removed);
    let partitions: HashSet<i64> = mine.iter().filter_map(|e| e["partition"].as_i64()).collect();
    assert_eq!(partitions.len(), 1, "one user, one partition: {partitions:?}");
    Ok(())
}

/// SIGTERM while the worker still waits for the events topic (no server created it yet):
/// it exits, instead of a blocking wait keeping the stopped process alive (which held
/// `scripts/run`'s Ctrl-C, and Kafka's shutdown after it, forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_while_it_waits_for_the_events_topic_exits() -> anyhow::Result<()> {
    let kafka = lockstep_e2e::kafka::Kafka::shared().await?;
    let topic = format!("lockstep.events.never-{}", uuid::Uuid::new_v4());
    let mut worker = PushWorker::start(kafka.bootstrap(), &[("LOCKSTEP_PUSH_EVENTS__TOPIC", topic.as_str())]).await?;
    worker.wait_for_log("waiting for the events topic to exist", 1, WAIT).await?;
    assert!(worker.terminate()?, "a clean exit on SIGTERM:\n{}", worker.log());
    Ok(())
}
