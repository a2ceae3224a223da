//! The notes PWA (`clients/web/app/`) in a real headless Chromium (Debian's `chromium`, driven
//! by `playwright-core` through `clients/web/tools/browser-driver.ts`), against a real server
//! and a `lockstep-cli` device of the same account: edits both ways (a conflict on one field,
//! new fields on both sides) end identical; the PWA works with the server stopped and pushes
//! its outbox when it returns; a reload in the middle of a sync loses nothing; a Web Push
//! delivered to its service worker (the DevTools protocol's `ServiceWorker.deliverPushMessage`)
//! makes it sync with no page of the app open, and so does exactly the payload the real
//! `lockstep-push` worker sent (decrypted by the local push service), which holds only `v` and
//! `log_end`; a CLI device revoked by another cannot read what the PWA writes afterwards (it
//! writes under the new key epoch).
//!
//! Needs Node.js and npm (the web client is built here: `npm ci` when `node_modules` is
//! missing, then `npm run build -w clients/web`), python3 (serves the static files) and
//! chromium (installed with apt-get when missing).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use lockstep_client::{crypto::Binding, store::Store as ClientStore};
use lockstep_e2e::{
    cli::Cli,
    dashboard::chromium,
    device::with_token,
    free_port,
    kafka::read_topic,
    push::{PushService, PushWorker, SERVER_ALLOWS_LOCAL_PUSH, WORKER_ALLOWS_LOCAL_PUSH},
    server::Server,
    stack::Broker,
    wait::{eventually, not_yet, ready},
};
use lockstep_proto::v1::{PushTarget as ProtoTarget, SetPushTargetRequest, WebPushTarget, push_target::Target};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout, Command},
};

const WAIT: Duration = Duration::from_secs(90);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the web client and its PWA, once for the tests of this binary (they run at once).
async fn build_web_client() -> anyhow::Result<PathBuf> {
    static BUILT: tokio::sync::OnceCell<PathBuf> = tokio::sync::OnceCell::const_new();
    BUILT.get_or_try_init(build_once).await.cloned()
}

async fn build_once() -> anyhow::Result<PathBuf> {
    let root = repo_root();
    let run = |args: &'static [&'static str]| {
        let root = root.clone();
        async move {
            let output = Command::new("npm").args(args).current_dir(&root).output().await.context("running npm")?;
            ensure!(
                output.status.success(),
                "npm {args:?} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            anyhow::Ok(())
        }
    };
    if !root.join("node_modules/playwright-core").is_dir() {
        run(&["ci", "--no-audit", "--no-fund"]).await?;
    }
    run(&["run", "--silent", "build", "-w", "clients/web"]).await?;
    Ok(root.join("clients/web/dist"))
}

/// The PWA's static files, served by python3's http.server on 127.0.0.1.
struct StaticServer {
    _child: Child,
    origin: String,
}

impl StaticServer {
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        let port = free_port()?;
        let child = Command::new("python3")
            .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting python3 -m http.server")?;
        let origin = format!("http://127.0.0.1:{port}");
        eventually(WAIT, "the static server", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map(|_| true)
        })
        .await?;
        Ok(Self { _child: child, origin })
    }
}

/// The browser, one JSON command per line (see browser-driver.ts).
struct Browser {
    _child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Browser {
    async fn start(dist: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new("node")
            .arg(dist.join("tools/browser-driver.js"))
            .env("LOCKSTEP_CHROMIUM", chromium::binary()?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the browser driver (node)")?;
        let stdin = child.stdin.take().context("the driver's stdin")?;
        let lines = BufReader::new(child.stdout.take().context("the driver's stdout")?).lines();
        Ok(Self { _child: child, stdin, lines })
    }

    async fn call(&mut self, command: Value) -> anyhow::Result<Value> {
        self.stdin.write_all(format!("{command}\n").as_bytes()).await?;
        let line = tokio::time::timeout(Duration::from_secs(180), self.lines.next_line())
            .await
            .with_context(|| format!("the browser did not answer {command}"))??
            .context("the browser driver exited")?;
        let answer: Value = serde_json::from_str(&line)?;
        match answer.get("error") {
            Some(error) => bail!("browser: {command}: {}", error.as_str().unwrap_or_default()),
            None => Ok(answer["ok"].clone()),
        }
    }
}

/// The visible fields of every live record of `notes` on the CLI device.
async fn cli_notes(cli: &Cli) -> anyhow::Result<Value> {
    let records = cli.json(&["list", "--collection", "notes"]).await?;
    let list = records.as_array().or_else(|| records["records"].as_array()).context("list --json")?;
    Ok(Value::Object(
        list.iter()
            .map(|record| {
                let id = record["id"].as_str().or_else(|| record["record_id"].as_str()).unwrap_or_default();
                (id.to_string(), record["fields"].clone())
            })
            .collect(),
    ))
}

/// Syncs the CLI device until `check` holds for its notes.
async fn cli_until(cli: &Cli, what: &str, check: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    eventually(WAIT, what, || async {
        cli.sync().await?;
        let notes = cli_notes(cli).await?;
        anyhow::Ok(if check(&notes) { ready(notes) } else { not_yet(notes) })
    })
    .await
}

/// Waits until the PWA's notes (as its store holds them) pass `check`; returns them.
async fn pwa_until(browser: &mut Browser, what: &str, check: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    browser_until(browser, json!({"cmd": "records"}), what, check).await
}

/// Waits until the notes the page lists pass `check`; returns them.
async fn page_until(browser: &mut Browser, what: &str, check: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    browser_until(browser, json!({"cmd": "notes"}), what, check).await
}

async fn browser_until(
    browser: &mut Browser,
    command: Value,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let seen = browser.call(command.clone()).await?;
        if check(&seen) {
            return Ok(seen);
        }
        ensure!(tokio::time::Instant::now() < deadline, "the PWA never got to: {what}; it holds {seen}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How the PWA pairs with the CLI device's `pair show`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pairing {
    /// Pastes what it printed, whole (after checking that scanning without a camera says why).
    Paste,
    /// Scans the QR code it drew, shown to Chromium's fake camera.
    Scan,
}

/// Kafka, a server that lets the PWA's origin call it, the PWA's static files, a CLI device
/// (`laptop`) and the PWA in Chromium, paired with what `pair show` printed.
struct PwaStack {
    kafka: Broker,
    server: Server,
    cli: Cli,
    browser: Browser,
    url: String,
    _web: StaticServer,
    /// The real `lockstep-push` worker and the local push service, when asked for.
    push: Option<(PushWorker, PushService)>,
    /// The fake camera's video file, while Chromium may read it.
    _camera: Option<tempfile::TempDir>,
}

impl PwaStack {
    async fn start() -> anyhow::Result<Self> {
        Self::start_with(false, Pairing::Paste).await
    }

    /// With `push`, the server advertises the VAPID key of a real `lockstep-push` worker (on
    /// the server's events topic) that may wake targets at the local push service.
    async fn start_with(push: bool, pairing: Pairing) -> anyhow::Result<Self> {
        let dist = build_web_client().await?;
        let web = StaticServer::start(&dist.join("pwa")).await?;
        let kafka = Broker::shared().await?;
        let unique = uuid::Uuid::new_v4();
        let events_topic = format!("lockstep.events.test-{unique}");
        let origins = format!("[\"{}\"]", web.origin);
        let mut env =
            vec![("LOCKSTEP_WEB__ALLOWED_ORIGINS", origins.as_str()), ("LOCKSTEP_EVENTS__TOPIC", &events_topic)];
        let mut worker = None;
        let key;
        if push {
            let group = format!("lockstep.push-worker.test-{unique}");
            let prepared = PushWorker::prepare(
                kafka.bootstrap(),
                &[
                    WORKER_ALLOWS_LOCAL_PUSH,
                    ("LOCKSTEP_PUSH_EVENTS__TOPIC", &events_topic),
                    ("LOCKSTEP_PUSH_EVENTS__GROUP", &group),
                    // A wake-up made while the page closed must not hold back the next one.
                    ("LOCKSTEP_PUSH_WAKE__MIN_INTERVAL", "1s"),
                ],
            )?;
            key = prepared.vapid_public_key().to_string();
            env.extend([
                ("LOCKSTEP_PUSH__VAPID_PUBLIC_KEY", key.as_str()),
                SERVER_ALLOWS_LOCAL_PUSH,
                // Leases of 3 s: the closed page's stream stops counting soon.
                ("LOCKSTEP_EVENTS__LEASE_INTERVAL", "1s"),
            ]);
            worker = Some(prepared);
        }
        let server = Server::start_with(&kafka, &env).await?;
        let push = match worker {
            Some(mut worker) => {
                // The server created the events topic; the worker subscribes to it now.
                worker.restart()?;
                worker.wait_until_acting(1).await?;
                Some((worker, PushService::start().await?))
            }
            None => None,
        };
        let cli = Cli::init("laptop", &server).await?;
        let printed = cli.run(&["pair", "show"]).await?;
        assert!(printed.contains("LOCKSTEP1:"), "{printed}");
        let camera = match pairing {
            Pairing::Scan => {
                let dir = tempfile::tempdir()?;
                let video = dir.path().join("pairing-qr.y4m");
                std::fs::write(&video, qr_video_frame(&printed)?)?;
                Some((dir, video))
            }
            Pairing::Paste => None,
        };
        let mut browser = Browser::start(&dist).await?;
        let url = format!("{}/", web.origin);
        let mut open = json!({"cmd": "open", "url": url});
        if let Some((_, video)) = &camera {
            open["camera"] = json!(video.to_string_lossy());
        }
        let shown = browser.call(open).await?;
        assert_eq!(shown, "not paired yet");
        match pairing {
            Pairing::Paste => {
                // No camera in this Chromium: the page says why and what to do instead.
                let said = browser.call(json!({"cmd": "scanProblem"})).await?;
                let said = said.as_str().unwrap_or_default();
                assert!(said.contains("camera") && said.contains("paste the code"), "{said}");
                browser.call(json!({"cmd": "pair", "code": printed, "name": "browser"})).await?;
            }
            Pairing::Scan => {
                let said = browser.call(json!({"cmd": "scanPair", "name": "scanned browser"})).await?;
                assert_eq!(said, "Pairing code scanned.");
            }
        }
        Ok(Self { kafka, server, cli, browser, url, _web: web, push, _camera: camera.map(|(dir, _)| dir) })
    }
}

/// The QR code `lockstep-cli pair show` drew (Unicode half blocks, light modules inked for a
/// dark terminal) as one frame of a Y4M video for Chromium's fake camera: dark modules black,
/// light ones white, 6 pixels each, centred on white. Nothing else draws it: this is what a
/// phone's camera would see of the terminal.
fn qr_video_frame(printed: &str) -> anyhow::Result<Vec<u8>> {
    let block = |c: char| matches!(c, ' ' | '▀' | '▄' | '█');
    let lines: Vec<Vec<char>> = printed
        .lines()
        .map(|line| line.chars().collect::<Vec<_>>())
        .skip_while(|chars| !(chars.len() > 20 && chars.iter().all(|&c| block(c)) && chars.contains(&'█')))
        .take_while(|chars| chars.len() > 20 && chars.iter().all(|&c| block(c)))
        .collect();
    let size = lines.first().context("pair show drew no QR code")?.len();
    ensure!(lines.iter().all(|line| line.len() == size), "the QR code's lines differ in width");
    // Two module rows per line; the last line of an odd-sized code has only its top half.
    ensure!(lines.len() * 2 >= size && lines.len() * 2 <= size + 1, "{} lines for {size} modules", lines.len());
    let light = |x: usize, y: usize| {
        let c = lines[y / 2][x];
        if y % 2 == 0 { matches!(c, '▀' | '█') } else { matches!(c, '▄' | '█') }
    };
    let (width, height, scale) = (640_usize, 480_usize, 6_usize);
    ensure!(size * scale <= height, "a QR code of {size} modules does not fit");
    let (left, top) = ((width - size * scale) / 2, (height - size * scale) / 2);
    let mut luma = vec![235_u8; width * height];
    for y in 0..size * scale {
        for x in 0..size * scale {
            if !light(x / scale, y / scale) {
                luma[(top + y) * width + left + x] = 16;
            }
        }
    }
    let mut video = format!("YUV4MPEG2 W{width} H{height} F10:1 Ip A1:1 C420jpeg\nFRAME\n").into_bytes();
    video.extend_from_slice(&luma);
    video.extend(std::iter::repeat_n(128_u8, width * height / 2));
    Ok(video)
}

fn id_of(put: &Value) -> anyhow::Result<String> {
    Ok(put["id"].as_str().context("put --json prints the id")?.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pwa_and_a_cli_device_sync_offline_reloads_and_push_wake_ups_included() -> anyhow::Result<()> {
    let PwaStack { kafka: _kafka, mut server, cli, mut browser, url, _web, .. } = PwaStack::start().await?;

    // The CLI's note reaches the page; the page's note reaches the CLI.
    let shared = cli.json(&["put", "-c", "notes", r#"{"title":"from the laptop","body":"one"}"#]).await?;
    let shared_id = id_of(&shared)?;
    cli.sync().await?;
    pwa_until(&mut browser, "the laptop's note", |notes| notes[&shared_id]["title"] == "from the laptop").await?;
    page_until(&mut browser, "the page listing the laptop's note", |notes| {
        notes[&shared_id]["title"] == "from the laptop"
    })
    .await?;
    let web_id = browser.call(json!({"cmd": "addNote", "title": "from the browser", "body": "two"})).await?;
    let web_id = web_id.as_str().context("the new note's id")?.to_string();
    cli_until(&cli, "the browser's note on the laptop", |notes| notes[&web_id]["title"] == "from the browser").await?;

    // A conflict on one field, and a new field on each side, written before either saw the other.
    browser.call(json!({"cmd": "put", "id": shared_id, "fields": {"title": "browser title", "web_only": "w"}})).await?;
    cli.json(&["put", "-c", "notes", "--id", &shared_id, r#"{"title":"laptop title","cli_only":"c"}"#]).await?;
    let on_cli = cli_until(&cli, "both sides' fields on the laptop", |notes| {
        notes[&shared_id]["web_only"] == "w" && notes[&shared_id]["cli_only"] == "c"
    })
    .await?;
    let on_pwa = pwa_until(&mut browser, "the same notes as the laptop", |notes| *notes == on_cli).await?;
    assert_eq!(on_pwa, on_cli);
    let title = &on_cli[&shared_id]["title"];
    assert!(title == "browser title" || title == "laptop title", "one title wins: {title}");
    if let Some(path) = std::env::var_os("LOCKSTEP_PWA_SCREENSHOT") {
        // docs/pwa.png is this picture: `LOCKSTEP_PWA_SCREENSHOT=$PWD/docs/pwa.png cargo test -p lockstep-e2e --test web_pwa`.
        status_until(&mut browser, "live").await?;
        browser.call(json!({"cmd": "screenshot", "path": path.to_string_lossy()})).await?;
    }

    // The server stops: the PWA keeps working, says it is offline, keeps the edit through a reload.
    ensure!(server.terminate()?, "the server was running");
    let offline_id = browser.call(json!({"cmd": "addNote", "title": "written offline", "body": "three"})).await?;
    let offline_id = offline_id.as_str().context("the offline note's id")?.to_string();
    let status = status_until(&mut browser, "offline").await?;
    assert!(status["shown"].as_str().unwrap_or_default().contains("waiting to be sent"), "{status}");
    browser.call(json!({"cmd": "reload"})).await?;
    page_until(&mut browser, "the offline note listed after a reload", |notes| {
        notes[&offline_id]["title"] == "written offline"
    })
    .await?;
    server.restart().await?;
    cli_until(&cli, "the note written offline on the laptop", |notes| notes[&offline_id]["title"] == "written offline")
        .await?;

    // A reload in the middle of a sync, both ways: nothing is lost.
    let lines: String = (0..200)
        .map(|i| {
            format!(
                "{}\n",
                json!({"collection": "notes", "id": format!("bulk-{i:03}"), "fields": {"title": format!("bulk {i}")}})
            )
        })
        .collect();
    let import = cli.write_file("bulk.jsonl", &lines)?;
    cli.run(&["import", import.to_str().context("path")?]).await?;
    cli.sync().await?;
    for i in 0..30 {
        browser
            .call(json!({"cmd": "put", "id": format!("web-{i:02}"), "fields": {"title": format!("web {i}")}}))
            .await?;
    }
    browser.call(json!({"cmd": "reload"})).await?;
    let on_cli = cli_until(&cli, "the browser's 30 notes on the laptop", |notes| {
        (0..30).all(|i| notes[format!("web-{i:02}")]["title"] == format!("web {i}"))
    })
    .await?;
    pwa_until(&mut browser, "every note of the laptop after the reload", |notes| *notes == on_cli).await?;

    // A push wakes the service worker with no page of the app open: it syncs.
    browser.call(json!({"cmd": "close"})).await?;
    let woken = cli.json(&["put", "-c", "notes", r#"{"title":"wake up"}"#]).await?;
    let woken_id = id_of(&woken)?;
    cli.sync().await?;
    let before = browser.call(json!({"cmd": "stored", "id": woken_id})).await?;
    assert!(before["record"].is_null(), "nothing has synced it yet: {before}");
    browser.call(json!({"cmd": "wake", "payload": {"reason": "behind", "log_end_offset": 1}})).await?;
    let stored = browser_until(
        &mut browser,
        json!({"cmd": "stored", "id": woken_id}),
        "the service worker's sync after the push",
        |stored| !stored["record"].is_null(),
    )
    .await?;
    assert!(stored["record"]["state"].as_str().unwrap_or_default().contains("wake up"), "{stored}");
    assert_eq!(stored["lastWake"]["payload"]["reason"], "behind", "{stored}");

    // The page, reopened, is up to date.
    browser.call(json!({"cmd": "open", "url": url})).await?;
    status_until(&mut browser, "live").await?;
    page_until(&mut browser, "the reopened page listing the note the push brought", |notes| {
        notes[&woken_id]["title"] == "wake up"
    })
    .await?;
    browser.call(json!({"cmd": "quit"})).await?;
    Ok(())
}

/// Waits until the PWA's sync status is `state`; returns it (with the words the page shows).
async fn status_until(browser: &mut Browser, state: &str) -> anyhow::Result<Value> {
    browser_until(browser, json!({"cmd": "status"}), state, |status| status["state"] == state).await
}

/// After the laptop revokes a stolen device, the PWA gets the new epoch's key (sealed to it by
/// the laptop), writes under it, and the stolen device's keys cannot open what it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_cli_device_cannot_read_what_the_pwa_writes_afterwards() -> anyhow::Result<()> {
    let PwaStack { kafka, server: _server, cli: laptop, mut browser, url: _url, _web, .. } = PwaStack::start().await?;
    let stolen = laptop.pair("stolen").await?;
    let before_id = id_of(&laptop.json(&["put", "-c", "notes", r#"{"title":"before"}"#]).await?)?;
    laptop.sync().await?;
    stolen.sync().await?;
    pwa_until(&mut browser, "the note written before the revocation", |notes| notes[&before_id]["title"] == "before")
        .await?;

    let status = stolen.json(&["status"]).await?;
    let stolen_id = status["device_id"].as_str().context("device id")?.to_string();
    let user_id = status["user_id"].as_str().context("user id")?.to_string();
    let revoked = laptop.json(&["revoke", &stolen_id]).await?;
    assert_eq!(revoked["started_epoch"], 2, "the laptop started epoch 2: {revoked}");

    let after_id = browser.call(json!({"cmd": "addNote", "title": "after the revocation"})).await?;
    let after_id = after_id.as_str().context("the new note's id")?.to_string();
    cli_until(&laptop, "the PWA's note on the laptop", |notes| notes[&after_id]["title"] == "after the revocation")
        .await?;
    let refused = stolen.fail(&["sync"]).await?;
    assert!(refused.contains("Unauthenticated"), "{refused}");

    // The log as Kafka holds it: the PWA wrote under epoch 2, which the stolen keys do not open.
    let log = read_topic(kafka.bootstrap(), &format!("lockstep.user.{user_id}")).await?;
    let written = log
        .iter()
        .rev()
        .map(|(_, envelope)| envelope)
        .find(|envelope| envelope.record_id == after_id)
        .context("the PWA's change is in the log")?;
    assert_eq!(written.key_epoch, 2, "the PWA sealed its change under the new epoch");
    let stolen_account = ClientStore::open(&stolen.store, Duration::from_secs(3600))?.account()?;
    let laptop_account = ClientStore::open(&laptop.store, Duration::from_secs(3600))?.account()?;
    let binding = Binding {
        user_id: &written.user_id,
        record_id: &written.record_id,
        collection: &written.collection,
        op: lockstep_proto::v1::Op::from(written.op) as i32,
        key_epoch: written.key_epoch,
    };
    assert!(stolen_account.epoch_keys.get(2).is_none(), "the stolen device holds no key of epoch 2");
    assert!(stolen_account.keyring().open(&binding, &written.nonce, &written.ciphertext).is_err());
    assert!(stolen_account.key.open(&binding, &written.nonce, &written.ciphertext).is_err());
    assert!(laptop_account.keyring().open(&binding, &written.nonce, &written.ciphertext).is_ok());
    browser.call(json!({"cmd": "quit"})).await?;
    Ok(())
}

/// The PWA revokes a CLI device from its device list (after a confirmation, which can be
/// declined): it records the revocation, starts key epoch 2 sealed to the remaining devices
/// only, and writes under it. The revoked device can no longer sync and holds no key that
/// opens what the PWA wrote afterwards; the remaining CLI device reads the old and the new
/// notes and took the PWA's control record as a revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pwa_revokes_a_cli_device_and_starts_a_key_epoch_it_never_gets() -> anyhow::Result<()> {
    let PwaStack { kafka, server: _server, cli: laptop, mut browser, url: _url, _web, .. } = PwaStack::start().await?;
    let stolen = laptop.pair("stolen").await?;
    let before_id = browser.call(json!({"cmd": "addNote", "title": "before the revocation"})).await?;
    let before_id = before_id.as_str().context("the new note's id")?.to_string();
    for cli in [&laptop, &stolen] {
        cli_until(cli, "the PWA's first note", |notes| notes[&before_id]["title"] == "before the revocation").await?;
    }
    let status = stolen.json(&["status"]).await?;
    let stolen_id = status["device_id"].as_str().context("device id")?.to_string();
    let user_id = status["user_id"].as_str().context("user id")?.to_string();

    let declined = browser.call(json!({"cmd": "revoke", "deviceId": stolen_id, "accept": false})).await?;
    assert!(declined["asked"].as_str().unwrap_or_default().contains("cannot be undone"), "{declined}");
    assert!(declined["said"].as_str().unwrap_or_default().contains("was not revoked"), "{declined}");
    stolen.sync().await.context("the stolen device still syncs after a declined revocation")?;

    let revoked = browser.call(json!({"cmd": "revoke", "deviceId": stolen_id, "accept": true})).await?;
    let said = revoked["said"].as_str().unwrap_or_default();
    assert!(said.starts_with("Revoked") && said.contains("key epoch 2 started"), "{revoked}");
    let after_id = browser.call(json!({"cmd": "addNote", "title": "after the revocation"})).await?;
    let after_id = after_id.as_str().context("the new note's id")?.to_string();

    let on_laptop = cli_until(&laptop, "both notes on the remaining device", |notes| {
        notes[&before_id]["title"] == "before the revocation" && notes[&after_id]["title"] == "after the revocation"
    })
    .await?;
    assert_eq!(on_laptop.as_object().map(|notes| notes.len()), Some(2), "{on_laptop}");
    let refused = stolen.fail(&["sync"]).await?;
    assert!(refused.contains("Unauthenticated"), "{refused}");

    // The log as Kafka holds it: the PWA wrote under epoch 2, which the stolen keys do not open.
    let log = read_topic(kafka.bootstrap(), &format!("lockstep.user.{user_id}")).await?;
    let written = log
        .iter()
        .rev()
        .map(|(_, envelope)| envelope)
        .find(|envelope| envelope.record_id == after_id)
        .context("the PWA's change is in the log")?;
    assert_eq!(written.key_epoch, 2, "the PWA sealed its change under the epoch it started");
    let control = log
        .iter()
        .map(|(_, envelope)| envelope)
        .find(|envelope| envelope.record_id == format!("revoked:{stolen_id}"))
        .context("the PWA's revocation record is in the log")?;
    assert_eq!(control.key_epoch, 2, "the revocation record went up under the new epoch");
    let stolen_store = ClientStore::open(&stolen.store, Duration::from_secs(3600))?;
    let stolen_account = stolen_store.account()?;
    let laptop_store = ClientStore::open(&laptop.store, Duration::from_secs(3600))?;
    let laptop_account = laptop_store.account()?;
    let binding = Binding {
        user_id: &written.user_id,
        record_id: &written.record_id,
        collection: &written.collection,
        op: lockstep_proto::v1::Op::from(written.op) as i32,
        key_epoch: written.key_epoch,
    };
    assert!(stolen_account.epoch_keys.get(2).is_none(), "the stolen device holds no key of epoch 2");
    assert!(stolen_account.keyring().open(&binding, &written.nonce, &written.ciphertext).is_err());
    assert!(stolen_account.key.open(&binding, &written.nonce, &written.ciphertext).is_err());
    assert!(stolen_store.get(&after_id)?.is_none(), "the stolen device never got the new note");
    assert!(laptop_account.keyring().open(&binding, &written.nonce, &written.ciphertext).is_ok());
    let revoked_on_laptop = laptop_store.revoked_devices()?;
    assert!(
        revoked_on_laptop.iter().any(|device| device.device_id == stolen_id && device.public_key.len() == 32),
        "the laptop read the PWA's control record as a revocation: {revoked_on_laptop:?}"
    );
    browser.call(json!({"cmd": "quit"})).await?;
    Ok(())
}

/// The PWA pairs from the QR code the CLI drew, seen through Chromium's fake camera (a video
/// file made from `pair show`'s output), then syncs with the CLI device both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pwa_pairs_by_scanning_the_clis_qr_code_and_syncs() -> anyhow::Result<()> {
    let PwaStack { kafka: _kafka, server: _server, cli, mut browser, .. } =
        PwaStack::start_with(false, Pairing::Scan).await?;
    let devices = cli.json(&["devices"]).await?;
    assert!(devices.to_string().contains("scanned browser"), "the scanned pairing made a device: {devices}");
    let from_cli = id_of(&cli.json(&["put", "-c", "notes", r#"{"title":"from the laptop"}"#]).await?)?;
    cli.sync().await?;
    pwa_until(&mut browser, "the laptop's note", |notes| notes[&from_cli]["title"] == "from the laptop").await?;
    let from_web = browser.call(json!({"cmd": "addNote", "title": "from the scanned browser"})).await?;
    let from_web = from_web.as_str().context("the new note's id")?.to_string();
    cli_until(&cli, "the browser's note", |notes| notes[&from_web]["title"] == "from the scanned browser").await?;
    browser.call(json!({"cmd": "quit"})).await?;
    Ok(())
}

/// What `docs/push.md` says a Web Push wake-up carries: `{"v":1,"log_end":N}`, two integers and
/// nothing else; none of `secrets` (record ids, collections, field values) appears in its text.
fn metadata_only(payload: &str, secrets: &[&str]) -> anyhow::Result<Value> {
    let value: Value = serde_json::from_str(payload).with_context(|| format!("the payload is JSON: {payload}"))?;
    let fields = value.as_object().with_context(|| format!("the payload is an object: {payload}"))?;
    let mut names: Vec<&str> = fields.keys().map(String::as_str).collect();
    names.sort_unstable();
    ensure!(names == ["log_end", "v"], "the payload holds {names:?}, not only v and log_end: {payload}");
    ensure!(fields.values().all(Value::is_u64), "the payload's values are not all integers: {payload}");
    for secret in secrets {
        ensure!(!payload.contains(secret), "the payload names {secret:?}: {payload}");
    }
    Ok(value)
}

/// The real push worker wakes the PWA's device at a push service (the local one, which decrypts
/// RFC 8291 with the subscription's keys) while no page of the app is open; exactly the payload
/// it decrypted is delivered to the service worker, which syncs; the payload is metadata only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_push_workers_own_wake_up_reaches_the_service_worker_and_holds_metadata_only() -> anyhow::Result<()> {
    let PwaStack { kafka: _kafka, server, cli, mut browser, url: _url, _web, push, .. } =
        PwaStack::start_with(true, Pairing::Paste).await?;
    let (_worker, service) = push.context("the stack has a push worker")?;

    // The PWA's device (its own token) sets a Web Push target at the local push service.
    let account = browser
        .call(json!({"cmd": "eval", "expression": "window.lockstep.store.account().then((a) => ({ userId: a.userId, deviceId: a.deviceId, token: a.token }))"}))
        .await?;
    let token = account["token"].as_str().context("the PWA's token")?;
    let user_id = account["userId"].as_str().context("the PWA's user id")?.to_string();
    let subscription = service.subscribe().await?;
    let unb64 = |text: &str| base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, text);
    let target = Target::WebPush(WebPushTarget {
        endpoint: subscription.endpoint.clone(),
        p256dh: unb64(&subscription.p256dh)?.into(),
        auth: unb64(&subscription.auth)?.into(),
    });
    let request = SetPushTargetRequest { target: Some(ProtoTarget { target: Some(target), updated_at_ms: 0 }) };
    server.push_targets().await?.set_push_target(with_token(request, token)).await?;
    status_until(&mut browser, "live").await?;

    // The page closes (its stream's lease runs out); the laptop writes.
    browser.call(json!({"cmd": "close"})).await?;
    let woken = cli.json(&["put", "-c", "notes", r#"{"title":"secret title","body":"secret body"}"#]).await?;
    let woken_id = id_of(&woken)?;
    cli.sync().await?;
    let before = browser.call(json!({"cmd": "stored", "id": woken_id})).await?;
    assert!(before["record"].is_null(), "nothing has synced it yet: {before}");

    // The worker's wake-up, as the push service verified (VAPID) and decrypted it.
    let seen = service.wait_for(&subscription.id, 1, WAIT).await?;
    let wake_up = seen.last().context("a wake-up")?;
    assert_eq!(wake_up.error(), None, "the push service verified and decrypted it: {:?}", wake_up.raw);
    let payload = wake_up.raw["payload"].as_str().with_context(|| format!("a body: {:?}", wake_up.raw))?.to_string();
    let sent = metadata_only(&payload, &[&woken_id, "notes", "secret title", "secret body", &user_id])?;
    assert_eq!(sent["v"], 1, "{payload}");

    // Exactly that payload, delivered to the service worker with no page open: it syncs.
    browser.call(json!({"cmd": "wake", "data": payload})).await?;
    let stored = browser_until(
        &mut browser,
        json!({"cmd": "stored", "id": woken_id}),
        "the service worker's sync after the push",
        |stored| !stored["record"].is_null(),
    )
    .await?;
    assert!(stored["record"]["state"].as_str().unwrap_or_default().contains("secret title"), "{stored}");
    assert_eq!(stored["lastWake"]["payload"], sent, "the service worker got the worker's payload: {stored}");
    browser.call(json!({"cmd": "quit"})).await?;
    Ok(())
}
