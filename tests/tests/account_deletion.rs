//! Deleting an account: afterwards the server knows nothing of that user —
//! checked with an independent Kafka client (Python `confluent-kafka`) and
//! the server's database — while devices keep their local copies. A device
//! can also leave on its own. A deletion that Kafka interrupts finishes later.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context;
use lockstep_e2e::{
    cli::Cli,
    device::{Device, changes},
    kafka::Kafka,
    server::Server,
    stack::CliStack,
    wait::{eventually, failed, not_yet, ready},
};
use lockstep_proto::v1::{DeleteAccountRequest, ListDevicesRequest};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// What `confluent-kafka` sees of a topic and groups; an error of any of its
/// requests fails here (the script exits 2), never reads as "nothing there".
fn kafka_state(bootstrap: &str, topic: &str, groups: &[String]) -> anyhow::Result<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/kafka_state.py");
    let output = Command::new("python3").arg(&script).arg(bootstrap).arg(topic).args(groups).output()?;
    anyhow::ensure!(
        output.status.success(),
        "{} failed (needs confluent-kafka): {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// Rows that still name `user_id`, per table of the server's database.
/// The rows of `user_id` in the accounts database (SQLite or PostgreSQL, with the dedup index
/// and its reservations) and in the node-local SQLite (its `users` row when the accounts are in
/// PostgreSQL).
fn rows_of(server: &Server, user_id: &str) -> anyhow::Result<Vec<(String, i64)>> {
    let mut found = Vec::new();
    let tables =
        ["users", "devices", "pairing_tickets", "push_targets", "log_incidents", "pushed_changes", "push_reservations"];
    for table in tables.into_iter().chain(lockstep_broker::keys::TABLES_BY_USER) {
        let count = server.accounts_count(&format!("SELECT count(*) FROM {table} WHERE user_id = '{user_id}'"))?;
        found.push((table.to_string(), count));
    }
    let local = rusqlite::Connection::open(server.data_dir().join("lockstep.db"))?;
    let local_users: i64 = local.query_row("SELECT count(*) FROM users WHERE user_id = ?1", [user_id], |r| r.get(0))?;
    found.push(("local users".to_string(), local_users));
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_account_leaves_nothing_of_it_on_the_server() -> anyhow::Result<()> {
    let CliStack { kafka, server, device: phone } = CliStack::start("phone").await?;
    let laptop = phone.pair("laptop").await?;
    let bystander = Cli::init("bystander", &server).await?;
    let mine = phone.json(&["put", r#"{"title":"keep me locally"}"#]).await?;
    phone.sync().await?;
    laptop.sync().await?;
    laptop
        .run(&[
            "push",
            "set",
            "--webhook",
            "https://gw.example/_matrix/push/v1/notify",
            "--app-id",
            "a",
            "--pushkey",
            "k",
        ])
        .await?;
    bystander.json(&["put", r#"{"title":"not yours"}"#]).await?;
    bystander.sync().await?;

    let status = phone.json(&["status"]).await?;
    let user_id = status["user_id"].as_str().context("user_id in status")?.to_string();
    let device_ids: Vec<String> = {
        let mut ids = Vec::new();
        for cli in [&phone, &laptop] {
            ids.push(cli.json(&["status"]).await?["device_id"].as_str().context("device_id")?.to_string());
        }
        ids
    };
    let topic = format!("lockstep.user.{user_id}");
    let groups: Vec<String> = device_ids.iter().map(|id| format!("lockstep.device.{id}")).collect();
    let before = kafka_state(kafka.bootstrap(), &topic, &groups)?;
    assert_eq!(before["topic_exists"], true, "{before}");
    // Both devices synced: each group holds an offset on the user's topic that the deletion must remove.
    for group in &groups {
        let offsets = before["groups"][group]["offsets"].as_object();
        assert!(offsets.is_some_and(|o| o.contains_key(&format!("{topic}:0"))), "{group} before: {before}");
    }
    assert!(rows_of(&server, &user_id)?.iter().all(|(table, n)| {
        *n > 0
            || ["log_incidents", "pairing_tickets", "key_epochs", "sealed_epoch_keys", "push_reservations"]
                .contains(&table.as_str())
    }));

    // A wrong confirmation deletes nothing.
    let error = phone.fail(&["account", "delete", "--confirm", "not-my-account"]).await?;
    assert!(error.contains("--confirm"), "{error}");
    assert_eq!(kafka_state(kafka.bootstrap(), &topic, &[])?["topic_exists"], true);

    let deleted = phone.json(&["account", "delete", "--confirm", &user_id]).await?;
    assert_eq!(deleted["completed"], true, "{deleted}");
    assert_eq!(deleted["topic_deleted"], true, "{deleted}");
    assert_eq!(deleted["devices_removed"], 2);
    assert_eq!(deleted["device_groups_deleted"], 2);
    assert_eq!(deleted["push_targets_removed"], 1);
    assert!(deleted["dedup_entries_removed"].as_u64().unwrap_or_default() >= 1, "{deleted}");

    // Kafka, as an independent client sees it: no topic, no offsets, no group.
    let after = kafka_state(kafka.bootstrap(), &topic, &groups)?;
    assert_eq!(after["topic_exists"], false, "{after}");
    for group in &groups {
        assert_eq!(after["groups"][group]["listed"], false, "{after}");
        assert_eq!(after["groups"][group]["offsets"], serde_json::json!({}), "{group}: {after}");
    }
    // The database: no row names the user.
    for (table, count) in rows_of(&server, &user_id)? {
        assert_eq!(count, 0, "{table} still has rows of the deleted user");
    }
    // Every device is signed out; the local copies stay.
    let error = laptop.fail(&["sync"]).await?;
    assert!(error.contains("Unauthenticated"), "{error}");
    let records = phone.records().await?;
    assert!(records.to_string().contains(mine["id"].as_str().unwrap_or("?")), "{records}");
    // Someone else's account is untouched.
    assert_eq!(bystander.sync().await?["pushed"], 0);
    let bystander_user = bystander.json(&["status"]).await?["user_id"].as_str().unwrap_or_default().to_string();
    assert_eq!(kafka_state(kafka.bootstrap(), &format!("lockstep.user.{bystander_user}"), &[])?["topic_exists"], true);
    Ok(())
}

/// Through the gRPC API, alone on its Kafka with the events topic off: the topic and both
/// groups exist with their offsets before, and nothing of them after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_through_the_api_removes_the_topic_and_both_groups() -> anyhow::Result<()> {
    let kafka = Kafka::start().await?;
    let env = [("LOCKSTEP_EVENTS__ENABLED", "false")];
    let server = Server::start_with(&kafka, &env).await?;
    let phone = Device::create_account(&server, "phone").await?;
    let laptop = phone.pair(&server, "laptop").await?;
    phone.push_ok(changes(5, 16)).await?;
    // Both devices commit, so that both groups exist before the deletion.
    assert_eq!(phone.ack(4).await?, 5);
    assert_eq!(laptop.ack(2).await?, 3);
    let topic = format!("lockstep.user.{}", phone.user_id);
    let groups: Vec<String> =
        [&phone, &laptop].iter().map(|device| format!("lockstep.device.{}", device.device_id)).collect();
    let before = kafka_state(kafka.bootstrap(), &topic, &groups)?;
    assert_eq!(before["topic_exists"], true, "{before}");
    for (group, committed) in groups.iter().zip([5, 3]) {
        assert_eq!(
            before["groups"][group]["offsets"],
            serde_json::json!({ format!("{topic}:0"): committed }),
            "{before}"
        );
    }
    let answer = phone
        .accounts
        .clone()
        .delete_account(phone.request(DeleteAccountRequest { confirm_user_id: phone.user_id.clone() }))
        .await?
        .into_inner();
    assert!(answer.completed && answer.topic_deleted, "{answer:?}");
    assert_eq!(answer.device_groups_deleted, 2);
    let after = kafka_state(kafka.bootstrap(), &topic, &groups)?;
    assert_eq!(after["topic_exists"], false, "{after}");
    for group in &groups {
        assert_eq!(after["groups"][group]["listed"], false, "{after}");
        assert_eq!(after["groups"][group]["offsets"], serde_json::json!({}), "{after}");
    }
    for (table, count) in rows_of(&server, &phone.user_id)? {
        assert_eq!(count, 0, "{table}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_leaves_and_wipes_its_store() -> anyhow::Result<()> {
    let CliStack { kafka: _kafka, server: _server, device: phone } = CliStack::start("phone").await?;
    let tablet = phone.pair("tablet").await?;
    phone.json(&["put", r#"{"title":"x"}"#]).await?;
    phone.sync().await?;
    tablet.sync().await?;
    let tablet_id = tablet.json(&["status"]).await?["device_id"].as_str().context("device_id")?.to_string();
    let error = tablet.fail(&["leave"]).await?;
    assert!(error.contains("--yes"), "{error}");
    let left = tablet.json(&["leave", "--wipe", "--yes"]).await?;
    assert_eq!(left["revoked"], tablet_id.as_str());
    assert!(!tablet.store.exists(), "the local store is gone");
    // The account goes on without it.
    phone.json(&["put", r#"{"title":"y"}"#]).await?;
    assert_eq!(phone.sync().await?["pushed"], 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_kafka_interrupted_finishes_when_it_returns() -> anyhow::Result<()> {
    let mut kafka = Kafka::start().await?;
    let server = Server::start(&kafka).await?;
    let phone = Device::create_account(&server, "phone").await?;
    phone.push_ok(changes(3, 16)).await?;
    let group = format!("lockstep.device.{}", phone.device_id);
    let topic = format!("lockstep.user.{}", phone.user_id);
    assert_eq!(phone.ack(2).await?, 3);
    let before = kafka_state(kafka.bootstrap(), &topic, std::slice::from_ref(&group))?;
    assert_eq!(before["topic_exists"], true, "{before}");
    assert_eq!(before["groups"][&group]["offsets"], serde_json::json!({ format!("{topic}:0"): 3 }), "{before}");

    kafka.kill();
    let started = Instant::now();
    let answer = phone
        .accounts
        .clone()
        .delete_account(phone.request(DeleteAccountRequest { confirm_user_id: phone.user_id.clone() }))
        .await?
        .into_inner();
    assert!(!answer.completed, "Kafka is down: the deletion cannot be complete");
    assert!(started.elapsed() < Duration::from_secs(40), "answered within the deadline");
    // Closed for clients at once.
    let status = phone.accounts.clone().list_devices(phone.request(ListDevicesRequest {})).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    kafka.restart().await?;
    eventually(WAIT, "the deletion finished", || async {
        let rows = match rows_of(&server, &phone.user_id) {
            Ok(rows) => rows,
            Err(error) => return failed(error),
        };
        let gone = rows.iter().all(|(_, n)| *n == 0);
        if gone { ready(()) } else { not_yet(format!("rows left: {rows:?}\n{}", server.log())) }
    })
    .await?;
    let after = kafka_state(kafka.bootstrap(), &topic, std::slice::from_ref(&group))?;
    assert_eq!(after["groups"][&group]["listed"], false, "the group went too: {after}");
    assert_eq!(after["groups"][&group]["offsets"], serde_json::json!({}), "its offsets too: {after}");
    Ok(())
}
