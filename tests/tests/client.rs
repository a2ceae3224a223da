//! The client SDK and CLI end to end: real `lockstep-cli` processes with their
//! own stores, the real server, a real Nisshi.

use std::{collections::HashSet, time::Duration};

use anyhow::Context;
use lockstep_e2e::{
    cli::Cli,
    kafka::{Kafka, read_topic},
    server::{Server, UNTHROTTLED, lockstep_binary},
    stack::CliStack,
    wait::{eventually, failed, not_yet, ready},
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

async fn sync_all(devices: &[&Cli]) -> anyhow::Result<()> {
    // Two rounds: what the last device pushed reaches the first ones too.
    for _ in 0..2 {
        for device in devices {
            device.sync().await?;
        }
    }
    Ok(())
}

async fn topic_len(kafka: &Kafka, device: &Cli) -> anyhow::Result<(usize, usize)> {
    let status = device.json(&["status"]).await?;
    let topic = format!("lockstep.user.{}", status["user_id"].as_str().context("user id")?);
    let records = read_topic(kafka.bootstrap(), &topic).await?;
    let distinct: HashSet<String> = records.iter().map(|(_, envelope)| envelope.change_id.clone()).collect();
    Ok((records.len(), distinct.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_converge_after_offline_edits_and_a_deleted_parent() -> anyhow::Result<()> {
    let CliStack { kafka, server: _server, device: phone } = CliStack::start("phone").await?;
    let laptop = phone.pair("laptop").await?;
    let tablet = phone.pair("tablet").await?;

    let folder = phone.json(&["put", "-c", "folders", r#"{"name":"Banking"}"#]).await?;
    let folder_id = folder["id"].as_str().context("id")?.to_string();
    let login_fields = json!({"title": "Bank", "password": "first", "parent": folder_id}).to_string();
    let login = phone.json(&["put", "-c", "logins", &login_fields]).await?;
    let login_id = login["id"].as_str().context("id")?.to_string();
    sync_all(&[&phone, &laptop, &tablet]).await?;
    assert_eq!(laptop.get(&login_id).await?["fields"]["password"], "first");

    // Offline: phone and laptop edit the same field and each adds a new one;
    // the laptop's edit is the later one. The tablet deletes the parent folder.
    phone.json(&["put", "--id", &login_id, "-c", "logins", r#"{"password":"phone","note":"from phone"}"#]).await?;
    // The clock must move on, so that the laptop's edit is the later one by its timestamp.
    tokio::time::sleep(Duration::from_millis(5)).await;
    laptop.json(&["put", "--id", &login_id, "-c", "logins", r#"{"password":"laptop","url":"https://bank"}"#]).await?;
    tablet.json(&["delete", &folder_id]).await?;
    // Sync in an order that delivers the earlier edit last to some devices.
    sync_all(&[&laptop, &tablet, &phone]).await?;

    let states = [phone.records().await?, laptop.records().await?, tablet.records().await?];
    assert_eq!(states[0], states[1], "phone and laptop differ");
    assert_eq!(states[0], states[2], "phone and tablet differ");
    let login = phone.get(&login_id).await?;
    assert_eq!(login["fields"]["password"], "laptop", "the later HLC wins the shared field");
    assert_eq!(login["fields"]["note"], "from phone", "both new fields survive");
    assert_eq!(login["fields"]["url"], "https://bank");
    assert_eq!(phone.get(&folder_id).await?["deleted"], true);

    // The orphan is reported on every device, then filed away on one.
    for device in [&phone, &laptop, &tablet] {
        let check = device.json(&["check"]).await?;
        assert_eq!(
            check["orphans"],
            json!([{"record_id": login_id, "collection": "logins", "parent": folder_id, "parent_is": "deleted"}])
        );
    }
    let fixed = tablet.json(&["check", "--fix"]).await?;
    assert_eq!(fixed["moved_to_unfiled"], json!([login_id]));
    sync_all(&[&tablet, &phone, &laptop]).await?;
    for device in [&phone, &laptop, &tablet] {
        let login = device.get(&login_id).await?;
        assert_eq!(login["fields"]["parent"], "unfiled");
        assert_eq!(login["fields"]["previous_parent"], json!(folder_id));
        assert_eq!(device.json(&["check"]).await?["orphans"], json!([]));
    }
    let states = [phone.records().await?, laptop.records().await?, tablet.records().await?];
    assert!(states[0] == states[1] && states[1] == states[2]);

    // The server only ever saw ciphertext.
    let status = phone.json(&["status"]).await?;
    let topic = format!("lockstep.user.{}", status["user_id"].as_str().context("user id")?);
    for (_, envelope) in read_topic(kafka.bootstrap(), &topic).await? {
        let text = String::from_utf8_lossy(&envelope.ciphertext);
        assert!(!text.contains("laptop") && !text.contains("Banking") && !text.contains("password"), "{text}");
    }
    assert_eq!(status["outbox"], 0);
    assert_eq!(status["problems"], 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_example_the_laptops_later_password_wins() -> anyhow::Result<()> {
    let CliStack { kafka: _kafka, server: _server, device: phone } = CliStack::start("phone").await?;
    let laptop = phone.pair("laptop").await?;
    let login = phone.json(&["put", "-c", "passwords", r#"{"site":"mail","password":"hunter2"}"#]).await?;
    let id = login["id"].as_str().context("id")?.to_string();
    sync_all(&[&phone, &laptop]).await?;

    phone.json(&["put", "--id", &id, "-c", "passwords", r#"{"password":"phone-secret"}"#]).await?;
    // The clock must move on, so that the laptop's edit is the later one by its timestamp.
    tokio::time::sleep(Duration::from_millis(5)).await;
    laptop.json(&["put", "--id", &id, "-c", "passwords", r#"{"password":"laptop-secret"}"#]).await?;
    // The laptop syncs first, the phone's older edit arrives after it.
    sync_all(&[&laptop, &phone]).await?;
    for device in [&phone, &laptop] {
        let record = device.get(&id).await?;
        assert_eq!(record["fields"], json!({"site": "mail", "password": "laptop-secret"}), "{}", device.name);
    }
    Ok(())
}

/// Waits for a progress line on the child's stderr that `wanted` accepts.
async fn wait_for_progress(child: &mut tokio::process::Child, wanted: impl Fn(&str) -> bool) -> anyhow::Result<String> {
    let stderr = child.stderr.as_mut().context("piped stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if wanted(&line) {
                return Ok::<_, anyhow::Error>(Some(line));
            }
        }
        Ok(None)
    })
    .await
    .context("no progress within 60 s")??;
    found.context("the sync ended before the progress it waited for")
}

fn first_number(line: &str, after: &str) -> Option<u64> {
    line.split(after).nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_syncing_10000_changes_loses_nothing() -> anyhow::Result<()> {
    const TOTAL: u64 = 10_000;
    let CliStack { kafka, server: _server, device: writer } = CliStack::start("writer").await?;
    let reader = writer.pair("reader").await?;
    let clean = writer.pair("clean").await?;

    let import = writer.store.with_file_name("import.ndjson");
    let lines: String = (0..TOTAL)
        .map(|n| format!("{}\n", json!({"collection": "notes", "fields": {"n": n, "body": "x".repeat(200)}})))
        .collect();
    std::fs::write(&import, lines)?;
    assert_eq!(writer.json(&["import", import.to_str().context("path")?]).await?["written"], TOTAL);

    // The reader has a local edit of its own, made before it ever synced.
    let own = reader.json(&["put", "-c", "notes", r#"{"mine":true}"#]).await?;
    let own_id = own["id"].as_str().context("id")?.to_string();

    // kill -9 the writer while it pushes.
    let mut push = writer.spawn(&["sync"])?;
    let line =
        wait_for_progress(&mut push, |line| first_number(line, "pushed ").is_some_and(|done| done > 0 && done < TOTAL))
            .await?;
    push.start_kill()?;
    push.wait().await?;
    let outbox = writer.json(&["status"]).await?["outbox"].as_u64().context("outbox")?;
    assert!(outbox < TOTAL, "some changes were acknowledged before the kill ({line}); {outbox} left");
    writer.sync().await?;
    assert_eq!(writer.json(&["status"]).await?["outbox"], 0);

    // kill -9 the reader while it receives.
    let mut pull = reader.spawn(&["sync"])?;
    let line = wait_for_progress(&mut pull, |line| first_number(line, "received ").is_some_and(|n| n > 0 && n < TOTAL))
        .await?;
    pull.start_kill()?;
    pull.wait().await?;
    let cursor = reader.json(&["status"]).await?["cursor"].as_u64().unwrap_or(0);
    assert!(cursor < TOTAL, "killed mid-way ({line}), cursor {cursor}");
    reader.sync().await?;
    assert_eq!(reader.get(&own_id).await?["fields"], json!({"mine": true}), "the local edit survived");

    // Both stores equal one that synced cleanly, and the log holds every change once.
    clean.sync().await?;
    let (reader_records, clean_records) = (reader.records().await?, clean.records().await?);
    assert_eq!(reader_records.as_array().map(Vec::len), Some(TOTAL as usize + 1));
    assert_eq!(reader_records, clean_records);
    assert_eq!(writer.records().await?.as_array().map(Vec::len), Some(TOTAL as usize), "writer has not synced since");
    writer.sync().await?;
    assert_eq!(writer.records().await?, clean_records);
    let (records, distinct) = topic_len(&kafka, &writer).await?;
    assert_eq!((records, distinct), (TOTAL as usize + 1, TOTAL as usize + 1), "each change once on the topic");
    let values: HashSet<u64> =
        clean_records.as_array().context("list")?.iter().filter_map(|record| record["fields"]["n"].as_u64()).collect();
    assert_eq!(values.len(), TOTAL as usize);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_errors_say_what_to_do_and_tampering_is_reported() -> anyhow::Result<()> {
    let kafka = Kafka::start().await?;
    let server = Server::start(&kafka).await?;
    let fresh = Cli::new("fresh")?;
    assert!(fresh.fail(&["put", r#"{"a":1}"#]).await?.contains("lockstep-cli init"));
    let on_the_command_line = fresh.fail(&["pair", "redeem", "hello", "--name", "x"]).await?;
    assert!(on_the_command_line.contains("LOCKSTEP1"), "{on_the_command_line}");
    assert!(on_the_command_line.contains("visible to other users"), "{on_the_command_line}");
    let nothing_piped = fresh.fail(&["pair", "redeem", "--name", "x"]).await?;
    assert!(nothing_piped.contains("no pairing code"), "{nothing_piped}");
    let unreachable = fresh.fail(&["init", "--server", "http://127.0.0.1:9", "--name", "x"]).await?;
    assert!(unreachable.contains("cannot reach the server"), "{unreachable}");

    let phone = Cli::init("phone", &server).await?;
    assert!(phone.fail(&["put", "not json"]).await?.contains("not valid JSON"));
    assert!(phone.fail(&["put", "[1]"]).await?.contains("JSON object"));
    assert!(phone.fail(&["put", "--id", "bad id", r#"{"a":1}"#]).await?.contains("may only contain"));
    assert!(phone.fail(&["delete", "nope"]).await?.contains("no record"));
    assert!(phone.fail(&["init", "--server", &server.endpoint(), "--name", "again"]).await?.contains("already holds"));

    // A record too large for the server is kept aside locally and reported;
    // it does not block the changes queued after it.
    let small = Server::start_with(&kafka, &[("LOCKSTEP_LIMITS__MAX_CIPHERTEXT_BYTES", "4096")]).await?;
    let tight = Cli::init("tight", &small).await?;
    let big = json!({"blob": "x".repeat(10_000)}).to_string();
    tight.json(&["put", "--id", "big", &big]).await?;
    tight.json(&["put", "--id", "after", r#"{"ok":true}"#]).await?;
    let report = tight.sync().await?;
    assert_eq!((report["pushed"].as_u64(), report["rejected"].as_u64()), (Some(1), Some(1)), "{report}");
    let check = tight.json(&["check"]).await?;
    assert_eq!(check["rejected"][0]["record_id"], "big");
    assert!(check["rejected"][0]["reason"].as_str().is_some_and(|reason| reason.contains("at most 4096")), "{check}");
    assert_eq!(tight.json(&["status"]).await?["outbox"], 0);
    assert_eq!(tight.json(&["status"]).await?["outbox_rejected"], 1);

    // A ciphertext moved to another record (what a malicious server could do)
    // does not decrypt: the device reports it and applies nothing from it.
    let laptop = phone.pair("laptop").await?;
    phone.json(&["put", "--id", "note-1", r#"{"b":2}"#]).await?;
    phone.sync().await?;
    let phone_token = {
        let conn = rusqlite::Connection::open(&phone.store)?;
        conn.query_row("SELECT value FROM meta WHERE key = 'device_token'", [], |row| row.get::<_, String>(0))?
    };
    let status = phone.json(&["status"]).await?;
    let topic = format!("lockstep.user.{}", status["user_id"].as_str().context("user id")?);
    let (_, original) = read_topic(kafka.bootstrap(), &topic).await?.pop().context("the phone's change")?;
    let swapped = lockstep_proto::v1::Change {
        change_id: "swapped-1".into(),
        record_id: "note-2".into(),
        collection: original.collection.clone(),
        op: 1,
        hlc: original.hlc as u64,
        key_epoch: original.key_epoch,
        nonce: original.nonce.clone().into(),
        ciphertext: original.ciphertext.clone().into(),
    };
    let mut sync = server.sync().await?;
    let request =
        lockstep_e2e::device::with_token(lockstep_proto::v1::PushRequest { changes: vec![swapped] }, &phone_token);
    sync.push(request).await?;
    laptop.sync().await?;
    assert_eq!(laptop.get("note-1").await?["fields"], json!({"b": 2}));
    assert!(laptop.fail(&["get", "note-2"]).await?.contains("no record note-2"));
    let check = laptop.json(&["check"]).await?;
    let problems = check["problems"].as_array().context("problems")?;
    assert_eq!(problems.len(), 1, "{check}");
    assert_eq!(
        (problems[0]["record_id"].as_str(), problems[0]["kind"].as_str()),
        (Some("note-2"), Some("undecryptable"))
    );
    assert_eq!(laptop.json(&["status"]).await?["problems"], 1);

    // Revoked: the CLI says what happened and what to do.
    let laptop_id = laptop.json(&["status"]).await?["device_id"].as_str().context("id")?.to_string();
    let mut accounts = server.accounts().await?;
    let revoke = lockstep_e2e::device::with_token(
        lockstep_proto::v1::RevokeDeviceRequest { device_id: laptop_id },
        &phone_token,
    );
    accounts.revoke_device(revoke).await?;
    let revoked = laptop.fail(&["sync"]).await?;
    assert!(revoked.contains("revoked") && revoked.contains("pair it again"), "{revoked}");
    let _: Value = phone.sync().await?;
    Ok(())
}

/// Polls `get ID` until the record holds `expected` fields.
async fn wait_for_record(device: &Cli, id: &str, expected: &Value) -> anyhow::Result<()> {
    eventually(Duration::from_secs(60), format!("{}: {id} becoming {expected}", device.name), || async {
        let record = device.get(id).await?;
        anyhow::Ok(if &record["fields"] == expected { ready(()) } else { not_yet(record) })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_applies_live_changes_and_reconnects_after_a_server_crash() -> anyhow::Result<()> {
    let CliStack { kafka: _kafka, mut server, device: phone } = CliStack::start("phone").await?;
    let laptop = phone.pair("laptop").await?;
    let mut watch = laptop.spawn(&["watch"])?;

    let note = phone.json(&["put", "-c", "notes", r#"{"text":"live"}"#]).await?;
    let id = note["id"].as_str().context("id")?.to_string();
    phone.sync().await?;
    wait_for_record(&laptop, &id, &json!({"text": "live"})).await?;

    // An edit made on the watching device goes up by itself.
    let own = laptop.json(&["put", "-c", "notes", r#"{"text":"from the laptop"}"#]).await?;
    let own_id = own["id"].as_str().context("id")?.to_string();
    eventually(Duration::from_secs(60), "watch pushing the local edit", || async {
        let status = laptop.json(&["status"]).await?;
        anyhow::Ok(if status["outbox"] == 0 { ready(()) } else { not_yet(status) })
    })
    .await?;
    phone.sync().await?;
    assert_eq!(phone.get(&own_id).await?["fields"], json!({"text": "from the laptop"}));

    // The server dies and comes back on the same port: watch reconnects.
    server.kill9();
    wait_for_progress(&mut watch, |line| line.contains("reconnecting in")).await?;
    server.restart().await?;
    phone.json(&["put", "--id", &id, "-c", "notes", r#"{"text":"after the crash"}"#]).await?;
    phone.sync().await?;
    wait_for_record(&laptop, &id, &json!({"text": "after the crash"})).await?;
    assert!(watch.try_wait()?.is_none(), "watch is still running");
    watch.start_kill()?;
    Ok(())
}

/// The broker comes back without the user's log (a disk lost, a volume not
/// mounted): Kafka still knows the topic and serves it again, empty.
async fn lose_the_log(kafka: &mut Kafka, topic: &str) -> anyhow::Result<()> {
    kafka.kill();
    let partition_dir = kafka.storage_dir().join(format!("{topic}-0"));
    std::fs::remove_dir_all(&partition_dir).with_context(|| format!("removing {}", partition_dir.display()))?;
    kafka.restart().await
}

/// Syncs, retrying while the server's Kafka clients catch up with a broker change.
async fn sync_through_unavailable(device: &Cli) -> anyhow::Result<Value> {
    eventually(Duration::from_secs(60), format!("{} syncing", device.name), || async {
        match device.sync().await {
            Ok(report) => ready(report),
            Err(error) if error.to_string().contains("Unavailable") => not_yet(format!("{error:#}")),
            Err(error) => failed(error),
        }
    })
    .await
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|records| records.iter().filter_map(|record| record["id"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_lost_changes_is_repaired_from_the_devices_and_nothing_is_deleted() -> anyhow::Result<()> {
    let CliStack { mut kafka, server, device: phone } = CliStack::start_own("phone").await?;
    let laptop = phone.pair("laptop").await?;
    for n in 0..5 {
        phone.json(&["put", "--id", &format!("early-{n}"), &json!({"n": n}).to_string()]).await?;
    }
    phone.sync().await?;
    laptop.sync().await?;
    for n in 0..3 {
        phone.json(&["put", "--id", &format!("phone-only-{n}"), &json!({"n": n}).to_string()]).await?;
    }
    phone.sync().await?;
    let status = phone.json(&["status"]).await?;
    let topic = format!("lockstep.user.{}", status["user_id"].as_str().context("user id")?);

    // The log loses everything it had acknowledged.
    lose_the_log(&mut kafka, &topic).await?;
    // The server runs on through it and notices (its log guard): nothing restarts it.
    // The laptop edits meanwhile.
    laptop.json(&["put", "--id", "early-0", r#"{"edited":"offline"}"#]).await?;
    let expected_laptop: Vec<String> = (0..5).map(|n| format!("early-{n}")).collect();

    let server_log = || server.log().lines().rev().take(30).collect::<Vec<_>>().join("\n");
    let report = sync_through_unavailable(&laptop).await.with_context(server_log)?;
    assert_eq!(report["log_lost"], true, "{report}");
    assert!(
        report["notice"]
            .as_str()
            .is_some_and(|notice| notice.contains("the server's log lost changes; this device pushed back")),
        "{report}"
    );
    assert_eq!(ids(&laptop.json(&["list"]).await?), expected_laptop, "nothing deleted");
    assert_eq!(laptop.get("early-0").await?["fields"], json!({"n": 0, "edited": "offline"}));
    let status = laptop.json(&["status"]).await?;
    assert_eq!(status["resync"]["reason"], "log-lost", "{status}");
    assert!(status["resync"]["completed_at_ms"].is_i64(), "{status}");
    assert_eq!(status["outbox"], 0, "{status}");
    let check = laptop.json(&["check"]).await?;
    assert_eq!(check["resync"]["reason"], "log-lost", "{check}");

    // The phone repairs too and pushes back what only it held.
    let report = sync_through_unavailable(&phone).await?;
    assert_eq!(report["log_lost"], true, "{report}");
    assert!(report["repushed"].as_u64().is_some_and(|repushed| repushed >= 3), "{report}");
    let all: Vec<String> =
        (0..5).map(|n| format!("early-{n}")).chain((0..3).map(|n| format!("phone-only-{n}"))).collect();
    assert_eq!(ids(&phone.json(&["list"]).await?), all);
    assert_eq!(phone.get("early-0").await?["fields"], json!({"n": 0, "edited": "offline"}), "the laptop's edit");

    // The account healed: a new device gets all of it from the log.
    let tablet = phone.pair("tablet").await?;
    tablet.sync().await?;
    laptop.sync().await?;
    assert_eq!(tablet.records().await?, phone.records().await?);
    assert_eq!(laptop.records().await?, phone.records().await?);
    let (records, distinct) = topic_len(&kafka, &phone).await?;
    assert_eq!(records, distinct, "no change twice");
    Ok(())
}

/// Runs a `--json` command on a device whose clock is `clock_offset` off (e.g. "-5h").
async fn at(device: &Cli, clock_offset: &str, args: &[&str]) -> anyhow::Result<Value> {
    let output = device
        .command(args, true)
        .env("LOCKSTEP_CLOCK_OFFSET", clock_offset)
        .output()
        .await
        .with_context(|| format!("{}: starting {args:?}", device.name))?;
    anyhow::ensure!(
        output.status.success(),
        "{}: {args:?} failed: {}",
        device.name,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).with_context(|| format!("{}: {args:?} printed no JSON", device.name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_sync_at_random_moments_rejects_nothing_and_writes_each_change_once() -> anyhow::Result<()> {
    const ROUNDS: usize = 20;
    const PER_ROUND: usize = 150;
    let kafka = Kafka::start().await?;
    // Small pushes: a sync makes many round trips, so kills land between the
    // server's answer and the device recording it.
    let server = Server::start_with(&kafka, &[("LOCKSTEP_LIMITS__MAX_CHANGES_PER_PUSH", "20")]).await?;
    let writer = Cli::init("writer", &server).await?;
    let chunk = writer.store.with_file_name("chunk.ndjson");
    let mut killed_mid_push = 0;
    for round in 0..ROUNDS {
        let lines: String = (0..PER_ROUND)
            .map(|n| format!("{}\n", json!({"collection": "notes", "fields": {"n": round * PER_ROUND + n}})))
            .collect();
        std::fs::write(&chunk, lines)?;
        writer.json(&["import", chunk.to_str().context("path")?]).await?;
        let mut sync = writer.spawn(&["sync"])?;
        // Half the kills right after a push was answered (the next one is in
        // flight), half at a random moment of the whole sync.
        // The random pauses are the point: they place the kill.
        if round % 2 == 0 {
            if wait_for_progress(&mut sync, |line| line.starts_with("pushed ")).await.is_ok() {
                killed_mid_push += 1;
            }
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..30))).await;
        } else {
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..400))).await;
        }
        sync.start_kill()?;
        sync.wait().await?;
    }
    assert!(killed_mid_push > 0, "no kill landed while pushing");
    let report = writer.sync().await?;
    let status = writer.json(&["status"]).await?;
    assert_eq!(status["outbox_rejected"], 0, "a retry is never filed as rejected: {status} {report}");
    assert_eq!(status["outbox"], 0, "{status}");
    assert_eq!(writer.json(&["check"]).await?["rejected"], json!([]));
    let total = ROUNDS * PER_ROUND;
    let (records, distinct) = topic_len(&kafka, &writer).await?;
    assert_eq!((records, distinct), (total, total), "each change exactly once on the topic");
    let reader = writer.pair("reader").await?;
    reader.sync().await?;
    assert_eq!(reader.records().await?.as_array().map(Vec::len), Some(total));
    assert_eq!(reader.records().await?, writer.records().await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_whose_clocks_are_hours_apart_converge_and_nothing_is_skipped() -> anyhow::Result<()> {
    let CliStack { kafka: _kafka, server: _server, device: phone } = CliStack::start("phone").await?;
    let laptop = phone.pair("laptop").await?;
    let tablet = phone.pair("tablet").await?;
    // Syncs only at the end: its stamps never saw the laptop's fast clock.
    let quiet = phone.pair("quiet").await?;
    // The laptop's clock runs 3 hours fast, the tablet's 5 hours slow.
    let devices = [(&phone, "0s"), (&laptop, "+3h"), (&tablet, "-5h")];
    let sync_all = || async {
        for _ in 0..2 {
            for (device, offset) in devices {
                at(device, offset, &["sync"]).await?;
            }
        }
        anyhow::Ok(())
    };

    for n in 0..4 {
        at(&phone, "0s", &["put", "--id", &format!("r{n}"), &json!({"title": format!("first {n}")}).to_string()])
            .await?;
    }
    sync_all().await?;
    // Edits in real-time order: the fast laptop, then the slow tablet, which
    // has seen the laptop's edit: the tablet's is the later one and must win,
    // although its clock reads 8 hours earlier.
    at(&laptop, "+3h", &["put", "--id", "r0", r#"{"title":"laptop"}"#]).await?;
    at(&laptop, "+3h", &["sync"]).await?;
    at(&tablet, "-5h", &["sync"]).await?;
    assert_eq!(tablet.get("r0").await?["fields"]["title"], "laptop", "applied, not refused as from the future");
    at(&tablet, "-5h", &["put", "--id", "r0", r#"{"title":"tablet"}"#]).await?;
    // Concurrent edits and a delete, from all three.
    at(&phone, "0s", &["put", "--id", "r1", r#"{"title":"phone","note":"p"}"#]).await?;
    at(&laptop, "+3h", &["put", "--id", "r1", r#"{"tag":"l"}"#]).await?;
    at(&tablet, "-5h", &["delete", "r2"]).await?;
    at(&laptop, "+3h", &["put", "--id", "r3", r#"{"title":"laptop 3"}"#]).await?;
    sync_all().await?;

    let states = [phone.records().await?, laptop.records().await?, tablet.records().await?];
    assert_eq!(states[0], states[1], "phone and laptop differ");
    assert_eq!(states[0], states[2], "phone and tablet differ");
    assert_eq!(phone.get("r0").await?["fields"]["title"], "tablet", "the last edit wins, whatever the clocks");
    assert_eq!(phone.get("r1").await?["fields"], json!({"title": "phone", "note": "p", "tag": "l"}));
    assert_eq!(phone.get("r2").await?["deleted"], true);
    for (device, offset) in devices {
        let status = at(device, offset, &["status"]).await?;
        assert_eq!((status["problems"].as_i64(), status["deferred"].as_i64()), (Some(0), Some(0)), "{status}");
    }

    // A device with a tight bound sets the fast laptop's changes aside, moves
    // on, and applies them once its own clock has caught up.
    let strict = phone.pair("strict").await?;
    at(&laptop, "+3h", &["put", "--id", "r3", r#"{"title":"laptop again"}"#]).await?;
    at(&laptop, "+3h", &["sync"]).await?;
    at(&quiet, "0s", &["put", "--id", "r4", r#"{"title":"after it"}"#]).await?;
    at(&quiet, "0s", &["sync"]).await?;
    let report = at(&strict, "0s", &["--max-clock-skew", "1h", "sync"]).await?;
    assert!(report["deferred"].as_u64().is_some_and(|deferred| deferred >= 1), "{report}");
    assert_eq!(strict.get("r4").await?["fields"]["title"], "after it", "what follows is not blocked");
    let check = at(&strict, "0s", &["--max-clock-skew", "1h", "check"]).await?;
    let deferred = check["deferred"].as_array().context("deferred")?;
    assert!(deferred.iter().all(|change| change["kind"] == "clock-ahead"), "{check}");
    assert!(deferred.iter().any(|change| change["record_id"] == "r3"), "{check}");
    assert_ne!(strict.records().await?, phone.records().await?, "not applied yet");
    let report = at(&strict, "+3h", &["--max-clock-skew", "1h", "sync"]).await?;
    assert!(report["applied_from_deferred"].as_u64().is_some_and(|applied| applied >= 1), "{report}");
    assert_eq!(at(&strict, "+3h", &["status"]).await?["deferred"], 0);
    at(&phone, "0s", &["sync"]).await?;
    assert_eq!(strict.records().await?, phone.records().await?, "converged");
    assert_eq!(quiet.records().await?, phone.records().await?);
    Ok(())
}

/// With the default 15 s heartbeat interval, `sync` returns as soon as the device
/// holds the whole log: the server says so the moment a catch-up (or a live
/// batch) reaches the end, not on its next heartbeat tick (issue 18: every sync
/// with anything to do used to take 15 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_returns_when_caught_up_not_a_heartbeat_interval_later() -> anyhow::Result<()> {
    // Heartbeats ten minutes apart: a sync that waited for the next one would take minutes,
    // whatever the machine's load, while one that returns on the caught-up heartbeat takes
    // seconds even on a loaded 2-core machine (this is a behaviour check, not a speed target:
    // `scripts/bench`'s `sync` rows time it with the default interval of 15 s).
    const HEARTBEAT: Duration = Duration::from_secs(600);
    const LIMIT: Duration = Duration::from_secs(120);
    let kafka = Kafka::start().await?;
    let mut settings = UNTHROTTLED.to_vec();
    settings.push(("LOCKSTEP_DELIVERY__HEARTBEAT_INTERVAL", "600s"));
    let server = Server::start_binary(lockstep_binary()?, kafka.bootstrap(), &settings).await?;
    let writer = Cli::init("writer", &server).await?;
    let info = writer.json(&["server-info"]).await?;
    assert_eq!(info["heartbeat_interval_ms"].as_u64(), Some(HEARTBEAT.as_millis() as u64), "{info}");
    let reader = writer.pair("reader").await?;

    for count in [1u64, 300] {
        let import = writer.store.with_file_name(format!("import-{count}.ndjson"));
        let lines: String =
            (0..count).map(|n| format!("{}\n", json!({"collection": "notes", "fields": {"n": n}}))).collect();
        std::fs::write(&import, lines)?;
        writer.json(&["import", import.to_str().context("path")?]).await?;
        for (device, direction) in [(&writer, "pushed"), (&reader, "received")] {
            let started = std::time::Instant::now();
            let report = device.sync().await?;
            let took = started.elapsed();
            println!("sync of {count} changes ({direction}): {took:?}");
            assert_eq!(report[direction].as_u64(), Some(count), "{report}");
            assert!(
                took < LIMIT,
                "sync of {count} changes ({direction}) took {took:?}, heartbeats every {HEARTBEAT:?}"
            );
        }
    }
    // Nothing new: still at once.
    let started = std::time::Instant::now();
    reader.sync().await?;
    assert!(started.elapsed() < LIMIT, "an empty sync took {:?}", started.elapsed());
    Ok(())
}
