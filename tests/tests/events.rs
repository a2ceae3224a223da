//! The metadata-only events topic, read back by a plain Kafka consumer:
//! what the server publishes after each durable fact, that no content ever
//! reaches it, push targets (validation, ownership, revocation), and that
//! pushes go on while the events cluster is down.

use std::time::Duration;

use bytes::Bytes;
use lockstep_e2e::{
    device::{Device, changes, receive_changes, with_token},
    kafka::{EventRecord, Kafka, read_events},
    leaks::{contains, content_in, traceable_changes},
    server::Server,
    stack::Stack,
    wait::{eventually, failed, not_yet, ready},
};
use lockstep_proto::v1::{
    Change, GetPushTargetRequest, GetServerInfoRequest, PushTarget as ProtoTarget, RemovePushTargetRequest,
    RevokeDeviceRequest, SetPushTargetRequest, WebPushTarget, WebhookTarget, push_target::Target,
    push_targets_client::PushTargetsClient,
};
use lockstep_schemas::{EventBody, PushTarget, TargetRemovedReason};
use tonic::{Code, transport::Channel};

const WAIT: Duration = Duration::from_secs(60);
/// The server's default events topic (tests on a broker of their own).
const DEFAULT_EVENTS_TOPIC: &str = "lockstep.events";

/// An events topic of the test's own (servers on the shared broker).
fn own_events_topic() -> String {
    format!("lockstep.events.test-{}", uuid::Uuid::new_v4())
}

/// Reads the events topic until `until` holds for the events of `user_id`. A read
/// that fails (a broker coming back) is tried again until the deadline.
async fn events_until(
    bootstrap: &str,
    topic: &str,
    user_id: &str,
    what: &str,
    until: impl Fn(&[EventRecord]) -> bool,
) -> anyhow::Result<Vec<EventRecord>> {
    eventually(WAIT, format!("the events topic showing {what}"), || async {
        let mine: Vec<EventRecord> =
            read_events(bootstrap, topic).await?.into_iter().filter(|(_, _, _, e)| e.user_id == user_id).collect();
        if until(&mine) {
            return anyhow::Ok(ready(mine));
        }
        let kinds: Vec<String> = mine.iter().map(|(_, _, _, e)| format!("{:?}", e.body)).collect();
        Ok(not_yet(format!("it holds for this user: {kinds:#?}")))
    })
    .await
}

fn has(events: &[EventRecord], matches: impl Fn(&EventBody) -> bool) -> bool {
    events.iter().any(|(_, _, _, event)| matches(&event.body))
}

fn web_push(endpoint: &str, p256dh: Vec<u8>, auth: Vec<u8>) -> SetPushTargetRequest {
    SetPushTargetRequest {
        target: Some(ProtoTarget {
            target: Some(Target::WebPush(WebPushTarget {
                endpoint: endpoint.into(),
                p256dh: Bytes::from(p256dh),
                auth: Bytes::from(auth),
            })),
            updated_at_ms: 0,
        }),
    }
}

fn p256dh() -> Vec<u8> {
    let mut key = vec![7u8; 65];
    key[0] = 0x04;
    key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tell_what_happened_and_never_the_content() -> anyhow::Result<()> {
    let topic = own_events_topic();
    let env = [("LOCKSTEP_EVENTS__LEASE_INTERVAL", "1s"), ("LOCKSTEP_EVENTS__TOPIC", topic.as_str())];
    let Stack { kafka, server, device: alice } = Stack::start_with("alice-phone", &env).await?;
    let bootstrap = kafka.bootstrap().to_string();
    let laptop = alice.pair(&server, "alice-laptop").await?;
    let user = alice.user_id.clone();
    events_until(&bootstrap, &topic, &user, "both devices added", |events| {
        has(events, |b| matches!(b, EventBody::DeviceAdded { device_id } if *device_id == alice.device_id))
            && has(events, |b| matches!(b, EventBody::DeviceAdded { device_id } if *device_id == laptop.device_id))
    })
    .await?;

    // A stream, a push, an ack.
    let mut stream = laptop.subscribe(None).await?;
    // Record ids long and unique enough that the scan below could find them.
    let pushed: Vec<Change> = traceable_changes(3, 64);
    alice.push_ok(pushed.clone()).await?;
    receive_changes(&mut stream, 3, WAIT).await?;
    laptop.ack(2).await?;
    let events = events_until(&bootstrap, &topic, &user, "the append, the ack and a renewed lease", |events| {
        let leases = events
            .iter()
            .filter(|(_, _, _, e)| matches!(&e.body, EventBody::DeviceConnected { device_id, .. } if *device_id == laptop.device_id))
            .count();
        has(events, |b| matches!(b, EventBody::LogAppended { log_end: 3, .. }))
            && has(events, |b| matches!(b, EventBody::DeviceAcked { committed_offset: 3, device_id, .. } if *device_id == laptop.device_id))
            && leases >= 2
    })
    .await?;
    let appended = events.iter().find_map(|(_, _, _, e)| match &e.body {
        EventBody::LogAppended { first_offset, log_end: 3, count, origin_device_id, first_received_at_ms, .. } => {
            Some((*first_offset, *count, origin_device_id.clone(), *first_received_at_ms, e.at_ms, e.node_id.clone()))
        }
        _ => None,
    });
    let (first, count, origin, received_at, at, node) = appended.expect("found above");
    assert_eq!((first, count, origin.as_str()), (0, 3, alice.device_id.as_str()));
    assert!(received_at > 0 && received_at <= at, "received_at {received_at} is before the event {at}");
    assert!(node.starts_with("node-"), "node id {node}");
    let lease = events.iter().find_map(|(_, _, _, e)| match &e.body {
        EventBody::DeviceConnected { lease_until_ms, .. } => Some(lease_until_ms - e.at_ms),
        _ => None,
    });
    assert_eq!(lease, Some(3_000), "a lease runs three lease intervals");
    // One user, one partition, so the user's events keep their order.
    let partitions: std::collections::HashSet<i32> = events.iter().map(|(p, _, _, _)| *p).collect();
    assert_eq!(partitions.len(), 1, "{partitions:?}");

    // Push targets: set, read back, other devices and bad input.
    let mut targets: PushTargetsClient<Channel> = server.push_targets().await?;
    let endpoint = "https://push.example.net/wpush/v2/secret-endpoint-token";
    targets.set_push_target(with_token(web_push(endpoint, p256dh(), vec![9; 16]), &laptop.token)).await?;
    let shown = targets.get_push_target(with_token(GetPushTargetRequest {}, &laptop.token)).await?.into_inner();
    match shown.target.and_then(|t| t.target) {
        Some(Target::WebPush(target)) => {
            assert_eq!(target.endpoint, endpoint);
            assert_eq!(target.auth.as_ref(), &[9; 16]);
        }
        other => panic!("unexpected target {other:?}"),
    }
    let status = targets.get_push_target(with_token(GetPushTargetRequest {}, &alice.token)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "another device's target is not the caller's: {status:?}");
    let bad = [
        ("not a URL", web_push("not a url", p256dh(), vec![9; 16])),
        ("10 KB URL", web_push(&format!("https://push.example/{}", "a".repeat(10_000)), p256dh(), vec![9; 16])),
        ("plain http", web_push("http://push.example/x", p256dh(), vec![9; 16])),
        ("short p256dh", web_push(endpoint, vec![4; 33], vec![9; 16])),
        ("long auth", web_push(endpoint, p256dh(), vec![9; 32])),
        ("no target", SetPushTargetRequest { target: None }),
    ];
    for (what, request) in bad {
        let status = targets.set_push_target(with_token(request, &laptop.token)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(!status.message().contains("aaaaaaaaaa"), "{what}: the message does not echo the URL");
    }
    let status = targets
        .set_push_target(with_token(web_push(endpoint, p256dh(), vec![9; 16]), "lst_not-a-token"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // The bad requests changed nothing.
    let still = targets.get_push_target(with_token(GetPushTargetRequest {}, &laptop.token)).await?.into_inner();
    assert!(matches!(still.target.and_then(|t| t.target), Some(Target::WebPush(t)) if t.endpoint == endpoint));
    events_until(&bootstrap, &topic, &user, "the web push target", |events| {
        has(events, |b| matches!(b, EventBody::PushTargetSet { target: PushTarget::WebPush { endpoint: e, .. }, .. } if e == endpoint))
    })
    .await?;

    targets.remove_push_target(with_token(RemovePushTargetRequest {}, &laptop.token)).await?;
    let status = targets.remove_push_target(with_token(RemovePushTargetRequest {}, &laptop.token)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    events_until(&bootstrap, &topic, &user, "the removal", |events| {
        has(events, |b| matches!(b, EventBody::PushTargetRemoved { reason: TargetRemovedReason::RemovedByDevice, .. }))
    })
    .await?;
    let webhook = SetPushTargetRequest {
        target: Some(ProtoTarget {
            target: Some(Target::Webhook(WebhookTarget {
                url: "https://gateway.example.org/_matrix/push/v1/notify".into(),
                app_id: "org.example.lockstep".into(),
                pushkey: "pushkey-1".into(),
            })),
            updated_at_ms: 0,
        }),
    };
    targets.set_push_target(with_token(webhook, &laptop.token)).await?;

    // Revocation ends the stream, the membership and the target.
    alice
        .accounts
        .clone()
        .revoke_device(alice.request(RevokeDeviceRequest { device_id: laptop.device_id.clone() }))
        .await?;
    let status = targets.get_push_target(with_token(GetPushTargetRequest {}, &laptop.token)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // Its consumer group (it had committed 3) is gone with it.
    let group = format!("lockstep.device.{}", laptop.device_id);
    let user_topic = format!("lockstep.user.{user}");
    eventually(WAIT, "the revoked device's offsets deleted", || async {
        let committed = lockstep_e2e::kafka::committed_offset(&bootstrap, &group, &user_topic).await?;
        anyhow::Ok(committed.map_or_else(|| ready(()), |offset| not_yet(format!("committed {offset}"))))
    })
    .await?;
    let events = events_until(&bootstrap, &topic, &user, "the revocation", |events| {
        let last_target = events.iter().rev().find_map(|(_, _, _, e)| match &e.body {
            EventBody::PushTargetSet { .. } | EventBody::PushTargetRemoved { .. } => Some(e.body.clone()),
            _ => None,
        });
        let last_presence = events.iter().rev().find_map(|(_, _, _, e)| match &e.body {
            EventBody::DeviceConnected { device_id, .. } | EventBody::DeviceDisconnected { device_id }
                if *device_id == laptop.device_id =>
            {
                Some(e.body.clone())
            }
            _ => None,
        });
        has(events, |b| matches!(b, EventBody::DeviceRevoked { device_id } if *device_id == laptop.device_id))
            && matches!(
                last_target,
                Some(EventBody::PushTargetRemoved { reason: TargetRemovedReason::DeviceRevoked, .. })
            )
            && matches!(last_presence, Some(EventBody::DeviceDisconnected { .. }))
    })
    .await?;

    // Not one byte of content: no record id, no change id, no 12-byte window of any ciphertext
    // or nonce. The scan reads the raw records: it finds the revoked device's id, which they carry.
    assert!(
        events.iter().any(|(_, _, raw, _)| contains(raw, laptop.device_id.as_bytes())),
        "the scan does not see what the records hold"
    );
    for (partition, offset, raw, event) in &events {
        for change in &pushed {
            let found = content_in(raw, change);
            assert!(
                found.is_empty(),
                "event {partition}/{offset} ({}) holds the {found:?} of a pushed change",
                event.body.kind()
            );
        }
        assert!(!contains(raw, b"notes"), "a collection name in {}", event.body.kind());
    }

    // The server advertises the VAPID key it was given (none here).
    let info = alice.sync.clone().get_server_info(GetServerInfoRequest {}).await?.into_inner();
    assert_eq!(info.vapid_public_key, "");
    drop(server);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_go_on_while_the_events_cluster_is_down() -> anyhow::Result<()> {
    let kafka = Kafka::start().await?;
    let mut events_kafka = Kafka::start().await?;
    let events_bootstrap = events_kafka.bootstrap().to_string();
    // A short produce timeout, so that the outage outlasts librdkafka's own retries.
    let env =
        [("LOCKSTEP_EVENTS__BOOTSTRAP_SERVERS", events_bootstrap.as_str()), ("LOCKSTEP_KAFKA__PRODUCE_TIMEOUT", "2s")];
    let server = Server::start_with(&kafka, &env).await?;
    let phone = Device::create_account(&server, "phone").await?;
    let laptop = phone.pair(&server, "laptop").await?;
    phone.push_ok(changes(5, 64)).await?;
    events_until(&events_bootstrap, DEFAULT_EVENTS_TOPIC, &phone.user_id, "the first append", |events| {
        has(events, |b| matches!(b, EventBody::LogAppended { log_end: 5, .. }))
    })
    .await?;

    // The events cluster goes away; pushes, streams and acks do not notice.
    events_kafka.kill();
    let mut stream = laptop.subscribe(None).await?;
    for _ in 0..10 {
        phone.push_ok(changes(10, 64)).await?;
    }
    let received = receive_changes(&mut stream, 105, WAIT).await?;
    laptop.ack(received.offsets().last().copied().unwrap_or_default()).await?;
    drop(stream);
    eventually(WAIT, "the publisher noticing the outage", || async { server.log().contains("events not published") })
        .await?;

    // It comes back: the facts arrive, coalesced (the latest log end and ack).
    events_kafka.restart().await?;
    let events =
        events_until(&events_bootstrap, DEFAULT_EVENTS_TOPIC, &phone.user_id, "the facts of the outage", |events| {
            has(events, |b| matches!(b, EventBody::LogAppended { log_end: 105, .. }))
                && has(events, |b| matches!(b, EventBody::DeviceAcked { committed_offset: 105, .. }))
        })
        .await?;
    let appends = events.iter().filter(|(_, _, _, e)| matches!(e.body, EventBody::LogAppended { .. })).count();
    assert!(appends < 11, "facts about one log were coalesced while the cluster was down ({appends} appends)");
    Ok(())
}

/// `lockstep-cli push set|show|remove`, as a user types them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_shows_and_removes_its_push_target() -> anyhow::Result<()> {
    use lockstep_e2e::stack::CliStack;
    let CliStack { kafka: _kafka, server: _server, device: phone } = CliStack::start("phone").await?;
    let laptop = phone.pair("laptop").await?;
    let shown = phone.json(&["push", "show"]).await?;
    assert_eq!(shown["target"], serde_json::Value::Null);

    // A browser's PushSubscription.toJSON(), from a file.
    let p256dh = {
        let mut key = vec![4u8; 65];
        key[1] = 9;
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&key)
    };
    let subscription = serde_json::json!({
        "endpoint": "https://push.example.net/wpush/v2/very-secret",
        "expirationTime": null,
        "keys": {"p256dh": p256dh, "auth": "AAECAwQFBgcICQoLDA0ODw"}
    });
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("subscription.json");
    std::fs::write(&file, subscription.to_string())?;
    let set = phone.json(&["push", "set", "--subscription", file.to_str().unwrap_or_default()]).await?;
    assert_eq!(set["origin"], "https://push.example.net");
    let shown = phone.json(&["push", "show"]).await?;
    assert_eq!(shown["kind"], "web-push");
    assert_eq!(shown["url"], "https://push.example.net/…", "the endpoint is a secret: hidden by default");
    let revealed = phone.json(&["push", "show", "--reveal"]).await?;
    assert_eq!(revealed["url"], "https://push.example.net/wpush/v2/very-secret");
    // The other device has its own (none).
    assert_eq!(laptop.json(&["push", "show"]).await?["target"], serde_json::Value::Null);

    // Bad input is refused with the server's reason, and changes nothing.
    let error = phone
        .fail(&["push", "set", "--endpoint", "https://push.example/x", "--p256dh", "AAAA", "--auth", "AAAA"])
        .await?;
    assert!(error.contains("p256dh") && error.contains("InvalidArgument"), "{error}");
    let error = phone
        .fail(&["push", "set", "--webhook", "https://gw.example/notify", "--app-id", "a", "--pushkey", "k"])
        .await?;
    assert!(error.contains("_matrix/push/v1/notify"), "{error}");
    assert_eq!(
        phone.json(&["push", "show", "--reveal"]).await?["url"],
        "https://push.example.net/wpush/v2/very-secret"
    );

    let webhook = [
        "push",
        "set",
        "--webhook",
        "https://gw.example.org/_matrix/push/v1/notify",
        "--app-id",
        "org.example",
        "--pushkey",
        "pk",
    ];
    assert_eq!(phone.json(&webhook).await?["kind"], "webhook");
    assert_eq!(phone.json(&["push", "remove"]).await?["removed"], true);
    assert_eq!(phone.json(&["push", "remove"]).await?["removed"], false);
    assert_eq!(phone.json(&["push", "show"]).await?["target"], serde_json::Value::Null);
    Ok(())
}

/// A push worker found a target gone (404/410): the server forgets it, unless
/// the device set a new one after the worker's verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_a_push_worker_found_gone_is_forgotten() -> anyhow::Result<()> {
    use lockstep_schemas::{Event, encode_event};
    use rdkafka::{
        ClientConfig,
        producer::{FutureProducer, FutureRecord},
    };
    let topic = own_events_topic();
    let Stack { kafka, server, device: phone } =
        Stack::start_with("phone", &[("LOCKSTEP_EVENTS__TOPIC", topic.as_str())]).await?;
    let laptop = phone.pair(&server, "laptop").await?;
    // "following the events topic failed; retrying" does not count: it is not following yet.
    // Until it follows, what the server said about the events topic is what a failure shows.
    let following = |log: String| {
        if log.lines().any(|line| line.contains("following the events topic") && !line.contains("failed")) {
            return ready(());
        }
        let said: Vec<&str> = log.lines().filter(|line| line.contains("events")).collect();
        not_yet(format!("the server's log lines about events:\n{}", said.join("\n")))
    };
    eventually(WAIT, "the server following the events topic", || async { following(server.log()) }).await?;
    let mut targets = server.push_targets().await?;
    for device in [&phone, &laptop] {
        let endpoint = format!("https://push.example.net/{}", device.device_id);
        targets.set_push_target(with_token(web_push(&endpoint, p256dh(), vec![9; 16]), &device.token)).await?;
    }
    let set_at = lockstep_broker::db::now_ms();

    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", kafka.bootstrap()).create()?;
    let gone = |device: &Device, at_ms: i64| Event {
        user_id: phone.user_id.clone(),
        node_id: "push-worker-test".into(),
        at_ms,
        body: EventBody::PushTargetRemoved { device_id: device.device_id.clone(), reason: TargetRemovedReason::Gone },
    };
    // A verdict from before the phone's target was set: stale, ignored. Then a current one for the laptop.
    for event in [gone(&phone, set_at - 60_000), gone(&laptop, set_at + 1)] {
        let payload = encode_event(&event)?;
        let record = FutureRecord::to(&topic).key(&event.user_id).payload(&payload);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(error, _)| error)?;
    }
    let (laptop_token, server) = (&laptop.token, &server);
    eventually(WAIT, "the laptop's gone target forgotten", || {
        let mut targets = targets.clone();
        async move {
            match targets.get_push_target(with_token(GetPushTargetRequest {}, laptop_token)).await {
                Err(status) if status.code() == Code::NotFound => ready(()),
                Ok(target) => not_yet(format!("{:?}\n{}", target.into_inner(), server.log())),
                Err(status) => failed(anyhow::anyhow!("unexpected {status:?}")),
            }
        }
    })
    .await?;
    // Same user, same partition: the stale verdict was read before; it changed nothing.
    targets.get_push_target(with_token(GetPushTargetRequest {}, &phone.token)).await?;
    Ok(())
}
