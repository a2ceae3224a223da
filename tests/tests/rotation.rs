//! Key rotation end to end (real `lockstep-cli` devices, the real server, a
//! real Kafka): after a device is revoked, what is written later is sealed
//! under a new random epoch key that the revoked device's keys — kept here,
//! store and all — cannot open, while every remaining device and a device
//! paired after the rotation read old and new changes alike; a push under the
//! old epoch is refused.

use std::{path::Path, time::Duration};

use anyhow::Context;
use lockstep_client::{crypto::Binding, store::Store};
use lockstep_e2e::{
    cli::Cli,
    device::with_token,
    kafka::read_topic,
    stack::CliStack,
    wait::{eventually, failed, not_yet, ready},
};
use lockstep_proto::v1::{Change, PushRequest, sync_client::SyncClient};
use lockstep_schemas::ChangeEnvelope;
use serde_json::Value;

fn store_of(device: &Cli) -> anyhow::Result<Store> {
    Ok(Store::open(Path::new(&device.store), Duration::from_secs(3600))?)
}

/// Opens a change from the log with a device's keys, as its store holds them.
fn open_with(device: &Cli, envelope: &ChangeEnvelope) -> anyhow::Result<Result<Vec<u8>, String>> {
    let account = store_of(device)?.account()?;
    let binding = Binding {
        user_id: &envelope.user_id,
        record_id: &envelope.record_id,
        collection: &envelope.collection,
        op: wire_op(envelope),
        key_epoch: envelope.key_epoch,
    };
    Ok(account
        .keyring()
        .open(&binding, &envelope.nonce, &envelope.ciphertext)
        .map(|plaintext| plaintext.to_vec())
        .map_err(|error| error.to_string()))
}

fn wire_op(envelope: &ChangeEnvelope) -> i32 {
    lockstep_proto::v1::Op::from(envelope.op) as i32
}

fn id_of(record: &Value) -> anyhow::Result<String> {
    Ok(record["id"].as_str().context("a record id")?.to_string())
}

async fn key_epoch(device: &Cli) -> anyhow::Result<u64> {
    device.json(&["status"]).await?["key_epoch"].as_u64().context("status has key_epoch")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_cannot_read_what_is_written_after_the_rotation() -> anyhow::Result<()> {
    let CliStack { kafka, server, device: laptop } = CliStack::start("laptop").await?;
    let phone = laptop.pair("phone").await?;
    let stolen = laptop.pair("stolen").await?;
    let before = id_of(&laptop.json(&["put", "-c", "notes", r#"{"text":"before"}"#]).await?)?;
    for device in [&laptop, &phone, &stolen] {
        device.sync().await?;
    }
    assert_eq!(stolen.get(&before).await?["fields"]["text"], "before");
    let status = stolen.json(&["status"]).await?;
    let stolen_id = status["device_id"].as_str().context("device id")?.to_string();
    let user_id = status["user_id"].as_str().context("user id")?.to_string();
    assert_eq!(key_epoch(&laptop).await?, 1);

    let revoked = laptop.json(&["revoke", &stolen_id]).await?;
    assert_eq!(revoked["started_epoch"], 2, "{revoked}");
    assert_eq!(key_epoch(&laptop).await?, 2);
    let devices = laptop.json(&["devices"]).await?;
    let listed = devices.as_array().context("devices")?;
    assert!(listed.iter().any(|device| device["device_id"] == stolen_id && device["revoked_at_ms"].as_i64() > Some(0)));

    let after = id_of(&laptop.json(&["put", "-c", "notes", r#"{"text":"after the revocation"}"#]).await?)?;
    laptop.sync().await?;
    phone.sync().await?;
    assert_eq!(phone.get(&after).await?["fields"]["text"], "after the revocation");
    assert_eq!(key_epoch(&phone).await?, 2);
    let refused = stolen.fail(&["sync"]).await?;
    assert!(refused.contains("Unauthenticated"), "{refused}");

    // The log as Kafka holds it: the later change is under epoch 2.
    let log = read_topic(kafka.bootstrap(), &format!("lockstep.user.{user_id}")).await?;
    let envelope_of = |record_id: &str| {
        log.iter().rev().map(|(_, envelope)| envelope).find(|envelope| envelope.record_id == record_id).cloned()
    };
    let old = envelope_of(&before).context("the earlier change is in the log")?;
    let new = envelope_of(&after).context("the later change is in the log")?;
    assert_eq!((old.key_epoch, new.key_epoch), (1, 2));

    // The revoked device's keys open what it could read before, not what came after…
    assert!(open_with(&stolen, &old)?.is_ok(), "the harness opens what the stolen keys can open");
    let stolen_account = store_of(&stolen)?.account()?;
    assert!(stolen_account.epoch_keys.get(2).is_none());
    let opened = open_with(&stolen, &new)?;
    assert!(opened.is_err(), "the revoked device read a change written after its revocation");
    // …not even by deriving epoch 2 from the account key, as epoch 1 is derived.
    let binding = Binding {
        user_id: &new.user_id,
        record_id: &new.record_id,
        collection: &new.collection,
        op: wire_op(&new),
        key_epoch: 2,
    };
    assert!(stolen_account.key.open(&binding, &new.nonce, &new.ciphertext).is_err());
    // Every remaining device opens it.
    for device in [&laptop, &phone] {
        assert!(open_with(device, &new)?.is_ok(), "{} cannot open the new change", device.name);
        assert!(open_with(device, &old)?.is_ok(), "{} cannot open the old change", device.name);
    }

    // A push under the old epoch is refused.
    let phone_token = store_of(&phone)?.account()?.token.to_string();
    let mut sync = SyncClient::connect(server.endpoint()).await?;
    let stale = Change {
        change_id: uuid::Uuid::now_v7().to_string(),
        record_id: "stale".into(),
        collection: "notes".into(),
        op: 1,
        hlc: 1 << 40,
        key_epoch: 1,
        nonce: vec![0; 24].into(),
        ciphertext: vec![1; 32].into(),
    };
    let status = sync
        .push(with_token(PushRequest { changes: vec![stale.clone()] }, &phone_token))
        .await
        .expect_err("a push under a stale epoch");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("older than the account's current key epoch 2"), "{}", status.message());
    let current = Change { key_epoch: 2, change_id: uuid::Uuid::now_v7().to_string(), ..stale };
    sync.push(with_token(PushRequest { changes: vec![current] }, &phone_token)).await?;

    // A device paired after the rotation: `pair redeem` waits for a device to
    // share the epoch keys, which the laptop does at its next sync.
    let shown = laptop.json(&["pair", "show"]).await?;
    let code = shown["code"].as_str().context("pair show --json has a code")?.to_string();
    let tablet = Cli::new("tablet")?;
    let code_file = tablet.write_file("code.txt", &code)?.to_string_lossy().to_string();
    let mut redeem =
        tablet.command(&["pair", "redeem", "--code-file", &code_file, "--name", "tablet", "--key-wait", "60s"], true);
    let redeem = tokio::spawn(async move { redeem.output().await });
    // The laptop's syncs are what hands the tablet the epoch keys: one per poll.
    eventually(Duration::from_secs(60), "pair redeem receiving the epoch keys", || async {
        if redeem.is_finished() {
            return ready(());
        }
        match laptop.sync().await {
            Ok(_) => not_yet("pair redeem still waits"),
            Err(error) => failed(error),
        }
    })
    .await?;
    let output = redeem.await??;
    anyhow::ensure!(output.status.success(), "pair redeem failed: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(key_epoch(&tablet).await?, 2, "the tablet holds the current epoch before its first sync");
    tablet.sync().await?;
    assert_eq!(tablet.get(&before).await?["fields"]["text"], "before");
    assert_eq!(tablet.get(&after).await?["fields"]["text"], "after the revocation");
    // The one problem is the test's own junk change under epoch 2 (pushed raw above).
    let check = tablet.json(&["check"]).await?;
    let problems = check["problems"].as_array().context("check lists problems")?;
    let unreadable: Vec<&Value> = problems.iter().map(|problem| &problem["record_id"]).collect();
    assert_eq!(unreadable, [&Value::from("stale")], "{check}");

    // What the tablet writes, the phone reads; the stolen keys still do not.
    let from_tablet = id_of(&tablet.json(&["put", "-c", "notes", r#"{"text":"from the tablet"}"#]).await?)?;
    tablet.sync().await?;
    phone.sync().await?;
    assert_eq!(phone.get(&from_tablet).await?["fields"]["text"], "from the tablet");
    let log = read_topic(kafka.bootstrap(), &format!("lockstep.user.{user_id}")).await?;
    let written = log.iter().map(|(_, envelope)| envelope).find(|envelope| envelope.record_id == from_tablet);
    let written = written.context("the tablet's change is in the log")?;
    assert_eq!(written.key_epoch, 2);
    assert!(open_with(&stolen, written)?.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_was_offline_during_the_rotation_writes_under_the_new_epoch() -> anyhow::Result<()> {
    let CliStack { kafka, server: _server, device: laptop } = CliStack::start("laptop").await?;
    let phone = laptop.pair("phone").await?;
    let stolen = laptop.pair("stolen").await?;
    for device in [&laptop, &phone, &stolen] {
        device.sync().await?;
    }
    // The phone writes while offline; meanwhile the laptop revokes and rotates.
    let pending = id_of(&phone.json(&["put", "-c", "notes", r#"{"text":"written offline"}"#]).await?)?;
    let stolen_id = stolen.json(&["status"]).await?["device_id"].as_str().context("id")?.to_string();
    laptop.json(&["revoke", &stolen_id]).await?;

    // Its next sync learns epoch 2 before it seals and pushes.
    phone.sync().await?;
    assert_eq!(key_epoch(&phone).await?, 2);
    laptop.sync().await?;
    assert_eq!(laptop.get(&pending).await?["fields"]["text"], "written offline");
    let user_id = laptop.json(&["status"]).await?["user_id"].as_str().context("user")?.to_string();
    let log = read_topic(kafka.bootstrap(), &format!("lockstep.user.{user_id}")).await?;
    let epochs: Vec<u32> =
        log.iter().filter(|(_, envelope)| envelope.record_id == pending).map(|(_, e)| e.key_epoch).collect();
    assert_eq!(epochs, [2]);
    Ok(())
}

/// The server's device list is no authority on who may read (issue #25): a
/// server that marks a revoked phone active again gets no epoch key sealed to
/// it, a later revocation still starts a new epoch, and a change the phone
/// writes under its old epoch (appended to the log behind the server's checks)
/// is flagged on every remaining device and never applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_relists_a_revoked_device_gets_no_new_epoch_key_for_it() -> anyhow::Result<()> {
    use lockstep_client::{
        crypto::Binding,
        hlc,
        record::{ChangePayload, RecordState, Stamp},
    };
    use lockstep_proto::v1::{GetEpochKeysRequest, keys_client::KeysClient};
    use lockstep_schemas::{ChangeEnvelope, Op, encode_change};
    use rdkafka::{
        ClientConfig,
        producer::{FutureProducer, FutureRecord},
    };

    let CliStack { kafka, mut server, device: laptop } = CliStack::start("laptop").await?;
    let desk = laptop.pair("desk").await?;
    let phone = laptop.pair("phone").await?;
    let tablet = laptop.pair("tablet").await?;
    for device in [&laptop, &desk, &phone, &tablet] {
        device.sync().await?;
    }
    let device_id = |device: &Cli| -> anyhow::Result<String> { Ok(store_of(device)?.account()?.device_id) };
    let (phone_id, tablet_id) = (device_id(&phone)?, device_id(&tablet)?);
    let user_id = store_of(&laptop)?.account()?.user_id;

    let revoked = laptop.json(&["revoke", &phone_id]).await?;
    assert_eq!(revoked["started_epoch"], 2, "{revoked}");

    // The server marks the phone active again (restarted, so that its token works again too).
    let relisted =
        server.accounts_execute(&format!("UPDATE devices SET revoked_at_ms = NULL WHERE device_id = '{phone_id}'"))?;
    assert_eq!(relisted, 1);
    server.restart().await?;
    let listed = laptop.json(&["devices"]).await?;
    let phone_entry = listed.as_array().context("devices")?.iter().find(|device| device["device_id"] == phone_id);
    assert_eq!(phone_entry.context("the phone is listed")?["revoked_at_ms"].as_i64().unwrap_or(0), 0, "{listed}");

    // Every remaining device syncs (sharing keys with devices the server says lack them; the desk
    // learns of the phone's revocation from the log in this very sync), then the
    // laptop revokes the tablet: a new epoch although the server, counting one revocation fewer,
    // says none is due.
    laptop.sync().await?;
    desk.sync().await?;
    let revoked = laptop.json(&["revoke", &tablet_id]).await?;
    assert_eq!(revoked["started_epoch"], 3, "{revoked}");
    desk.sync().await?;
    assert_eq!(key_epoch(&desk).await?, 3);
    let after = id_of(&laptop.json(&["put", "-c", "notes", r#"{"text":"after both revocations"}"#]).await?)?;
    laptop.sync().await?;
    desk.sync().await?;
    assert_eq!(desk.get(&after).await?["fields"]["text"], "after both revocations");

    // No copy of epoch 2 or 3 was ever sealed to the phone, and its keys open nothing written since.
    let phone_token = store_of(&phone)?.account()?.token.to_string();
    let mut keys = KeysClient::new(server.channel().await?);
    let sealed_to_phone = keys
        .get_epoch_keys(with_token(GetEpochKeysRequest { since_epoch: 0, unopened_epochs: Vec::new() }, &phone_token))
        .await?
        .into_inner();
    assert_eq!(sealed_to_phone.current_epoch, 3);
    assert!(sealed_to_phone.sealed_keys.is_empty(), "sealed to the phone: {:?}", sealed_to_phone.sealed_keys);
    let refused = phone.fail(&["sync"]).await?;
    assert!(refused.contains("no device of the account has shared that epoch's key"), "{refused}");
    let log = read_topic(kafka.bootstrap(), &format!("lockstep.user.{user_id}")).await?;
    let written = log.iter().map(|(_, envelope)| envelope).rfind(|envelope| envelope.record_id == after);
    let written = written.context("the change after both revocations is in the log")?;
    assert_eq!(written.key_epoch, 3);
    assert!(open_with(&phone, written)?.is_err(), "the re-listed phone read a change written after its revocation");

    // The phone writes under epoch 1, the newest it holds, and the change lands in the log behind
    // the server's epoch check (the server refuses such a push; a server working with the phone would not).
    let phone_account = store_of(&phone)?.account()?;
    let hlc = hlc::from_physical_ms(hlc::unix_ms() as u64);
    let mut state = RecordState::default();
    let fields = serde_json::json!({"text": "injected by the revoked phone"});
    state.set(fields.as_object().context("fields")?, &Stamp { hlc, device: phone_id.clone() });
    let binding = Binding { user_id: &user_id, record_id: "injected", collection: "notes", op: 1, key_epoch: 1 };
    let (nonce, ciphertext) = phone_account.keyring().seal(&binding, &ChangePayload::new(state).encode())?;
    let envelope = ChangeEnvelope {
        schema_version: 1,
        user_id: user_id.clone(),
        origin_device_id: phone_id.clone(),
        change_id: uuid::Uuid::now_v7().to_string(),
        record_id: "injected".into(),
        collection: "notes".into(),
        op: Op::Upsert,
        hlc: hlc as i64,
        key_epoch: 1,
        nonce,
        ciphertext,
        received_at_ms: hlc::unix_ms(),
    };
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", kafka.bootstrap()).create()?;
    let topic = format!("lockstep.user.{user_id}");
    let payload = encode_change(&envelope)?;
    let record = FutureRecord::to(&topic).partition(0).key("injected").payload(&payload);
    producer.send(record, Duration::from_secs(10)).await.map_err(|(error, _)| error)?;

    for device in [&laptop, &desk] {
        device.sync().await?;
        let refused = device.fail(&["get", "injected"]).await?;
        assert!(refused.contains("no record injected"), "{}: {refused}", device.name);
        let check = device.json(&["check"]).await?;
        let problems = check["problems"].as_array().context("check lists problems")?;
        let flagged: Vec<(&Value, &Value)> =
            problems.iter().map(|problem| (&problem["record_id"], &problem["kind"])).collect();
        assert_eq!(flagged, [(&Value::from("injected"), &Value::from("stale-epoch"))], "{}: {check}", device.name);
        let status = device.json(&["status"]).await?;
        assert_eq!((&status["problems"], &status["revoked_devices"]), (&Value::from(1), &Value::from(2)), "{status}");
    }
    Ok(())
}

/// One bad copy of an epoch key does not block the epoch for its recipient
/// (issue #25): the desk reports the copy that does not open, the server
/// forgets it, and the laptop's next sync shares a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_an_epoch_key_that_does_not_open_is_replaced() -> anyhow::Result<()> {
    let CliStack { kafka: _kafka, server, device: laptop } = CliStack::start("laptop").await?;
    let desk = laptop.pair("desk").await?;
    let stolen = laptop.pair("stolen").await?;
    for device in [&laptop, &desk, &stolen] {
        device.sync().await?;
    }
    let stolen_id = store_of(&stolen)?.account()?.device_id;
    let desk_id = store_of(&desk)?.account()?.device_id;
    assert_eq!(laptop.json(&["revoke", &stolen_id]).await?["started_epoch"], 2);
    let after = id_of(&laptop.json(&["put", "-c", "notes", r#"{"text":"after"}"#]).await?)?;
    laptop.sync().await?;

    // The desk's copy of epoch 2 is damaged on the server (same length, other bytes).
    let other_bytes: Vec<u8> = (0..136).map(|_| rand::random()).collect();
    let damaged = server.accounts_execute(&format!(
        "UPDATE sealed_epoch_keys SET sealed = {} WHERE device_id = '{desk_id}' AND epoch = 2",
        server.accounts_blob_literal(&other_bytes)
    ))?;
    assert_eq!(damaged, 1);
    let refused = desk.fail(&["sync"]).await?;
    assert!(refused.contains("no device of the account has shared that epoch's key"), "{refused}");
    assert_eq!(key_epoch(&desk).await?, 1);

    // Reported: the laptop sees the desk missing epoch 2 again and shares a fresh copy.
    laptop.sync().await?;
    desk.sync().await?;
    assert_eq!(key_epoch(&desk).await?, 2);
    assert_eq!(desk.get(&after).await?["fields"]["text"], "after");
    Ok(())
}

/// A device that learns of a revocation from the log starts an epoch after it
/// if none exists, and leaves the revoked device out — here a revocation the
/// server never heard of (its list still shows the device active, its token
/// still works): the client decides who reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_learned_from_the_log_starts_an_epoch_without_the_revoked_device() -> anyhow::Result<()> {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    use lockstep_client::{
        hlc,
        record::{ChangePayload, RecordState, Stamp},
        store::REVOCATIONS_COLLECTION,
    };
    use lockstep_proto::v1::{GetEpochKeysRequest, keys_client::KeysClient};

    let CliStack { kafka: _kafka, server, device: laptop } = CliStack::start("laptop").await?;
    let desk = laptop.pair("desk").await?;
    let stolen = laptop.pair("stolen").await?;
    for device in [&laptop, &desk, &stolen] {
        device.sync().await?;
    }
    let laptop_account = store_of(&laptop)?.account()?;
    let stolen_account = store_of(&stolen)?.account()?;
    let stolen_key = store_of(&stolen)?.device_secret()?.public_key();

    // The laptop's revocation record, pushed under epoch 1 as if the laptop stopped right after.
    let record_id = format!("revoked:{}", stolen_account.device_id);
    let hlc = hlc::from_physical_ms(hlc::unix_ms() as u64);
    let mut state = RecordState::default();
    let fields = serde_json::json!({
        "device_id": stolen_account.device_id,
        "public_key": URL_SAFE_NO_PAD.encode(stolen_key),
        "revoked_in_epoch": 1,
    });
    state.set(fields.as_object().context("fields")?, &Stamp { hlc, device: laptop_account.device_id.clone() });
    let binding = Binding {
        user_id: &laptop_account.user_id,
        record_id: &record_id,
        collection: REVOCATIONS_COLLECTION,
        op: 1,
        key_epoch: 1,
    };
    let (nonce, ciphertext) = laptop_account.keyring().seal(&binding, &ChangePayload::new(state).encode())?;
    let change = Change {
        change_id: uuid::Uuid::now_v7().to_string(),
        record_id: record_id.clone(),
        collection: REVOCATIONS_COLLECTION.into(),
        op: 1,
        hlc,
        key_epoch: 1,
        nonce: nonce.into(),
        ciphertext: ciphertext.into(),
    };
    let mut sync = SyncClient::connect(server.endpoint()).await?;
    sync.push(with_token(PushRequest { changes: vec![change] }, &laptop_account.token)).await?;

    // The desk applies it and starts epoch 2 for itself and the laptop only.
    desk.sync().await?;
    assert_eq!(key_epoch(&desk).await?, 2);
    assert_eq!(desk.json(&["status"]).await?["revoked_devices"], 1);
    laptop.sync().await?;
    assert_eq!(key_epoch(&laptop).await?, 2);
    let mut keys = KeysClient::new(server.channel().await?);
    let request = GetEpochKeysRequest { since_epoch: 0, unopened_epochs: Vec::new() };
    let sealed_to_stolen = keys.get_epoch_keys(with_token(request, &stolen_account.token)).await?.into_inner();
    assert_eq!(sealed_to_stolen.current_epoch, 2);
    assert!(sealed_to_stolen.sealed_keys.is_empty(), "{:?}", sealed_to_stolen.sealed_keys);
    let after = id_of(&desk.json(&["put", "-c", "notes", r#"{"text":"after"}"#]).await?)?;
    desk.sync().await?;
    laptop.sync().await?;
    assert_eq!(laptop.get(&after).await?["fields"]["text"], "after");
    let refused = stolen.fail(&["sync"]).await?;
    assert!(refused.contains("no device of the account has shared that epoch's key"), "{refused}");
    Ok(())
}
