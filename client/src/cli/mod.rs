//! The `lockstep-cli` commands. Human-readable output by default, one JSON
//! document per command with `--json`; progress goes to stderr.

use std::{
    io::{BufRead, IsTerminal, Read, Write},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Map, Value, json};

mod secrets;
mod server_info;
mod show;

use self::{
    secrets::{PassphraseSource, kdf_params},
    show::print_report,
};
use crate::{
    pairing::PairingCode,
    store::{Account, Record, Store},
    sync::{self, Progress, Report, Syncer, Until},
};

/// Lockstep client: an end-to-end-encrypted local store that syncs through a Lockstep server.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// The local store (SQLite; holds the account key, keep it private).
    #[arg(long, env = "LOCKSTEP_STORE", default_value = "lockstep-client.db", global = true)]
    store: PathBuf,
    /// The store's passphrase, as the first line of this file (else from LOCKSTEP_PASSPHRASE, else asked
    /// on the terminal). `init` and `pair redeem` given one create a protected store.
    #[arg(long, env = "LOCKSTEP_PASSPHRASE_FILE", global = true)]
    passphrase_file: Option<PathBuf>,
    /// Print one JSON document instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Incoming changes stamped further than this in the future wait (`status`
    /// shows them) until this device's clock catches up, instead of winning
    /// every later conflict.
    #[arg(long, default_value = "7d", value_parser = humantime_duration, global = true)]
    max_clock_skew: Duration,
    /// The deadline of each call to the server (and of a stream's first answer).
    #[arg(long, default_value = "30s", value_parser = humantime_duration, global = true)]
    rpc_timeout: Duration,
    /// A W3C trace context (00-<trace id>-<span id>-<flags>) to send with every request, so that
    /// the server's traces (when it exports them) join the caller's trace.
    #[arg(long, env = "TRACEPARENT", global = true)]
    traceparent: Option<String>,
    /// For an `https://` server: trust only this CA certificate (PEM), e.g. a self-hosted
    /// server's own CA; without it, the system's roots.
    #[arg(long, env = "LOCKSTEP_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Shift this device's clock, e.g. -3h (tests of devices whose clocks differ).
    #[arg(
        long,
        env = "LOCKSTEP_CLOCK_OFFSET",
        default_value = "0s",
        value_parser = signed_duration_ms,
        allow_hyphen_values = true,
        global = true,
        hide = true
    )]
    clock_offset: i64,
    #[command(subcommand)]
    command: Command,
}

/// A duration with an optional sign, in milliseconds: `-3h`, `+90s`, `10m`.
fn signed_duration_ms(text: &str) -> Result<i64, String> {
    let (sign, magnitude) = match text.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, text.strip_prefix('+').unwrap_or(text)),
    };
    let duration = humantime_duration(magnitude)?;
    let ms = i64::try_from(duration.as_millis()).map_err(|_| format!("{text:?}: too large"))?;
    Ok(sign * ms)
}

fn humantime_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let number: u64 = number.parse().map_err(|_| format!("{text:?}: expected e.g. 90s, 10m, 1h"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: expected e.g. 90s, 10m, 1h")),
    };
    Ok(Duration::from_secs(number * seconds))
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create an account on a server; this store becomes its first device.
    Init {
        /// e.g. https://sync.example.org (or http://127.0.0.1:50051 on this machine)
        #[arg(long)]
        server: String,
        /// A name for this device, e.g. laptop.
        #[arg(long)]
        name: String,
        #[arg(long, env = "LOCKSTEP_REGISTRATION_SECRET", hide_env_values = true)]
        registration_secret: Option<String>,
        /// A single-use invite code from the server's operator (`lsi_…`).
        #[arg(long, env = "LOCKSTEP_INVITE", hide_env_values = true, conflicts_with = "invite_file")]
        invite: Option<String>,
        /// A file holding the invite code (`-` reads stdin).
        #[arg(long)]
        invite_file: Option<PathBuf>,
    },
    /// What a server needs for a new account, and the limits it sets (no account needed).
    ServerInfo {
        /// e.g. https://sync.example.org; default: this store's server.
        #[arg(long)]
        server: Option<String>,
    },
    /// Add a device: `pair show` on a device that has the account, `pair redeem` on the new one.
    Pair {
        #[command(subcommand)]
        command: PairCommand,
    },
    /// Write fields into a record (JSON object; `-` reads stdin). Prints the record.
    Put {
        #[arg(long, short, default_value = "items")]
        collection: String,
        /// The record to change; a new record (with a new id) if omitted.
        #[arg(long)]
        id: Option<String>,
        /// Fields as a JSON object, e.g. '{"title":"Milk","done":false}'; null removes a field.
        fields: String,
    },
    /// Write many records: one JSON object per line, {"collection":…,"id":…,"fields":{…}}.
    Import {
        /// A file, or `-` for stdin.
        file: PathBuf,
    },
    /// Show one record.
    Get { id: String },
    /// List records.
    List {
        #[arg(long, short)]
        collection: Option<String>,
        /// Include deleted records.
        #[arg(long)]
        deleted: bool,
    },
    /// Delete a record (it leaves a tombstone that syncs like an edit).
    Delete { id: String },
    /// Push local changes, receive everything new, then stop.
    Sync,
    /// The account's server moved to a new address (same server, same data).
    SetServer {
        /// e.g. https://sync.example.org:443
        server: String,
    },
    /// Stay connected: push local changes as they are made, apply incoming ones live.
    Watch,
    /// This device: cursor, lag at the last sync, outbox, problems, key epoch.
    Status,
    /// The account's devices.
    Devices,
    /// Revoke a device (a lost or stolen one): its token stops working, and this
    /// device starts a new key epoch sealed to the remaining devices only, so the
    /// revoked device cannot read what is written from now on.
    Revoke {
        /// The device id (`lockstep-cli devices` lists them).
        device_id: String,
    },
    /// Integrity: records whose parent is gone (orphans) and incoming changes that could not be applied.
    Check {
        /// Move orphans to the "unfiled" parent (a local edit that syncs).
        #[arg(long)]
        fix: bool,
    },
    /// The account on the server: `account delete` deletes the server's copy of everything.
    Account {
        #[command(subcommand)]
        command: AccountCommand,
    },
    /// This device leaves the account: the server revokes it; with --wipe, its local store is deleted too.
    Leave {
        /// Also delete this device's local store (the other devices keep their copies).
        #[arg(long)]
        wipe: bool,
        /// Do it: leaving cannot be undone (pair again to come back).
        #[arg(long)]
        yes: bool,
    },
    /// Where this device is woken when it is offline and behind (Web Push or a Matrix push gateway).
    Push {
        #[command(subcommand)]
        command: PushCommand,
    },
    /// Protect the store's secrets (account key, device token, device and epoch keys) with a passphrase.
    Passphrase {
        #[command(subcommand)]
        command: PassphraseCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PassphraseCommand {
    /// Seal the store's secrets under a passphrase (Argon2id, 64 MiB), or change it. The first
    /// passphrase comes like any (--passphrase-file, LOCKSTEP_PASSPHRASE, the terminal); to change
    /// one, the current one comes so and the new one from --new-passphrase-file,
    /// LOCKSTEP_NEW_PASSPHRASE or the terminal.
    Set {
        /// The new passphrase, as the first line of this file.
        #[arg(long, env = "LOCKSTEP_NEW_PASSPHRASE_FILE")]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Keep the store's secrets in the clear again (the store file's permissions protect them).
    Remove,
}

#[derive(Debug, Subcommand)]
enum AccountCommand {
    /// Delete the account from the server: its Kafka topic, every device's offsets, devices, tokens,
    /// push targets. Every device is signed out; local stores keep their records.
    Delete {
        /// The account's user id, repeated to confirm (`lockstep-cli status` shows it).
        #[arg(long)]
        confirm: String,
    },
}

#[derive(Debug, Subcommand)]
enum PushCommand {
    /// Set (replace) this device's push target. The wake-up it gets carries no content;
    /// on a wake-up, the app runs `lockstep-cli sync`.
    Set {
        /// A Web Push subscription as JSON (`PushSubscription.toJSON()`:
        /// {"endpoint":…,"keys":{"p256dh":…,"auth":…}}); a file, or `-` for stdin.
        #[arg(long, conflicts_with_all = ["endpoint", "webhook"])]
        subscription: Option<PathBuf>,
        /// A Web Push / UnifiedPush endpoint URL (with --p256dh and --auth).
        #[arg(long, requires_all = ["p256dh", "auth"], conflicts_with = "webhook")]
        endpoint: Option<String>,
        /// The subscription's public key, base64url (65 bytes).
        #[arg(long)]
        p256dh: Option<String>,
        /// The subscription's auth secret, base64url (16 bytes).
        #[arg(long)]
        auth: Option<String>,
        /// A Matrix push gateway, e.g. https://push.example.org/_matrix/push/v1/notify (with --app-id and --pushkey).
        #[arg(long, requires_all = ["app_id", "pushkey"])]
        webhook: Option<String>,
        #[arg(long)]
        app_id: Option<String>,
        #[arg(long)]
        pushkey: Option<String>,
    },
    /// Show this device's push target (its URL only with --reveal: it is a secret).
    Show {
        #[arg(long)]
        reveal: bool,
    },
    /// Remove this device's push target.
    Remove,
}

#[derive(Debug, Subcommand)]
enum PairCommand {
    /// Issue a one-time pairing code for a new device (QR code and text).
    Show {
        /// Print the text only, no QR code.
        #[arg(long)]
        no_qr: bool,
    },
    /// Join the account of the device that showed a code: paste the code when asked, or pipe it
    /// in (`< code.txt`), or give --code-file.
    Redeem {
        /// Discouraged: a code here is visible to other users of the machine and stays in shell history.
        code: Option<String>,
        /// Read the code from this file.
        #[arg(long, conflicts_with = "code")]
        code_file: Option<PathBuf>,
        #[arg(long)]
        name: String,
        /// If the account rotated its keys (a device was revoked), wait this long
        /// for a device of the account to share the newer epoch keys (it does at
        /// its next sync); `sync` fetches them later otherwise.
        #[arg(long, default_value = "60s", value_parser = humantime_duration)]
        key_wait: Duration,
    },
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn record_json(record: &Record) -> Value {
    json!({
        "id": record.record_id,
        "collection": record.collection,
        "deleted": record.state.is_deleted(),
        "fields": record.state.visible().unwrap_or_default(),
    })
}

fn print_record(record: &Record) {
    let fields =
        record.state.visible().map_or_else(|| "(deleted)".to_string(), |fields| Value::Object(fields).to_string());
    println!("{}  {}  {}", record.record_id, record.collection, fields);
}

fn read_arg(text: &str) -> anyhow::Result<String> {
    if text == "-" {
        let mut input = String::new();
        std::io::stdin().read_to_string(&mut input).context("reading stdin")?;
        return Ok(input);
    }
    Ok(text.to_string())
}

fn parse_fields(text: &str) -> anyhow::Result<Map<String, Value>> {
    match serde_json::from_str(text) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => bail!("fields must be a JSON object, e.g. '{{\"title\":\"Milk\"}}'"),
        Err(error) => bail!("fields are not valid JSON ({error}); e.g. '{{\"title\":\"Milk\"}}'"),
    }
}

/// Progress on stderr, at most a few lines per second.
struct Reporter {
    last: Instant,
    quiet: bool,
}

impl Reporter {
    fn new() -> Self {
        Self { last: Instant::now() - Duration::from_secs(1), quiet: false }
    }

    fn show(&mut self, progress: Progress) {
        if self.quiet {
            return;
        }
        let forced = matches!(progress, Progress::Resync { .. } | Progress::Rebuilt { .. } | Progress::CaughtUp { .. });
        if !forced && self.last.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.last = Instant::now();
        let line = match progress {
            Progress::Pushed { done, total } => format!("pushed {done}/{total} local changes"),
            Progress::Received { applied, cursor, log_end: Some(end) } => {
                format!("received {applied} changes (at offset {cursor} of {end})")
            }
            Progress::Received { applied, cursor, log_end: None } => {
                format!("received {applied} changes (at offset {cursor})")
            }
            Progress::Resync { log_start, reason } => {
                format!("{}: rebuilding from offset {log_start}, every local record kept", reason.describe())
            }
            Progress::Rebuilt { reason, repushed } => {
                format!("{}: rebuilt; {repushed} records the log lacked go back up", reason.describe())
            }
            Progress::CaughtUp { cursor } => format!("up to date at offset {cursor}"),
        };
        let mut stderr = std::io::stderr().lock();
        let _ = writeln!(stderr, "{line}");
    }
}

/// Where the store's (current) passphrase comes from.
fn passphrase_source(args: &Args) -> PassphraseSource<'_> {
    PassphraseSource { file: args.passphrase_file.as_deref(), env: "LOCKSTEP_PASSPHRASE" }
}

/// The store at `--store`, its clock as the flags say, its secrets unlocked
/// when a passphrase protects them.
fn open_store(args: &Args) -> anyhow::Result<Store> {
    let mut store = Store::open(&args.store, args.max_clock_skew)?;
    store.set_clock_offset_ms(args.clock_offset);
    secrets::unlock(&mut store, &passphrase_source(args))?;
    Ok(store)
}

/// A new device's store gets a passphrase before it holds any secret, when
/// one is given (file or environment; `init` never asks).
fn protect_new(args: &Args, store: &mut Store) -> anyhow::Result<()> {
    if store.is_protected() {
        return Ok(());
    }
    if let Some(passphrase) = passphrase_source(args).given()? {
        store.protect(passphrase.as_bytes(), kdf_params())?;
    }
    Ok(())
}

/// The store for a new device: it must not hold an account yet.
fn open_empty(args: &Args) -> anyhow::Result<Store> {
    let path = &args.store;
    let store = open_store(args)?;
    if let Some(account) = store.try_account()? {
        bail!(
            "{} already holds device {} of user {}; use another --store",
            path.display(),
            account.device_id,
            account.user_id
        );
    }
    Ok(store)
}

/// The CAs an `https://` server's certificate must chain to (`--ca-file`, else the system's).
fn trust(args: &Args) -> anyhow::Result<sync::Trust> {
    Ok(match &args.ca_file {
        Some(path) => sync::Trust::ca_file(path)?,
        None => sync::Trust::SystemRoots,
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(traceparent) = &args.traceparent {
        sync::send_traceparent(traceparent).map_err(anyhow::Error::msg)?;
    }
    let open = || open_store(&args);
    let rpc_timeout = args.rpc_timeout;
    let trust = trust(&args)?;
    match &args.command {
        Command::Init { server, name, registration_secret, invite, invite_file } => {
            let mut store = open_empty(&args)?;
            let invite = server_info::invite_code(invite.as_deref(), invite_file.as_deref())?;
            let registration = sync::Registration {
                secret: registration_secret.as_deref(),
                invite_code: invite.as_ref().map(|code| code.as_str()),
            };
            let account = sync::create_account(server, name, &registration, rpc_timeout, &trust).await?;
            protect_new(&args, &mut store)?;
            store.save_account(&account)?;
            register_device_key(store, rpc_timeout, &trust, Duration::ZERO).await;
            print_new_device(
                args.json,
                &args.store,
                &account,
                &[
                    format!("created user {} with this device ({name}) as {}", account.user_id, account.device_id),
                    "next: `lockstep-cli put '{\"title\":\"hello\"}'`, then `lockstep-cli sync`; add a device with `lockstep-cli pair show`".into(),
                ],
            );
        }
        Command::ServerInfo { server } => {
            let server = match server {
                Some(server) => server.clone(),
                None => open()?.account().context("no --server, and this store holds no account")?.server,
            };
            server_info::show(&server, rpc_timeout, &trust, args.json).await?;
        }
        Command::Pair { command: PairCommand::Show { no_qr } } => {
            let store = open()?;
            let account = store.account()?;
            let (ticket, expires_at_ms) = sync::pairing_ticket(&account, rpc_timeout, &trust).await?;
            let code = PairingCode { server: account.server.clone(), ticket, key: account.key.clone() };
            let text = code.encode();
            if args.json {
                println!("{}", json!({"code": &*text, "expires_at_ms": expires_at_ms}));
            } else {
                if !no_qr {
                    println!("{}", code.qr());
                }
                let minutes = (expires_at_ms - now_ms()).max(0) / 60_000;
                println!("{}", &*text);
                println!();
                println!(
                    "On the new device: lockstep-cli pair redeem --name <its name>, then paste the code when asked \
                     (or save it to a file and run lockstep-cli pair redeem --name <its name> < code.txt)"
                );
                println!(
                    "The code works once, for about {minutes} minutes. It contains the account key: show it to nobody else."
                );
            }
        }
        Command::Pair { command: PairCommand::Redeem { code, code_file, name, key_wait } } => {
            let mut store = open_empty(&args)?;
            let code = secrets::pairing_code(code.as_deref(), code_file.as_deref())?;
            let account = sync::redeem(&code.server, &code.ticket, code.key.clone(), name, rpc_timeout, &trust).await?;
            protect_new(&args, &mut store)?;
            store.save_account(&account)?;
            register_device_key(store, rpc_timeout, &trust, *key_wait).await;
            print_new_device(
                args.json,
                &args.store,
                &account,
                &[
                    format!("this device ({name}) joined user {} as {}", account.user_id, account.device_id),
                    "next: `lockstep-cli sync` to receive the account's records".into(),
                ],
            );
        }
        Command::Put { collection, id, fields } => {
            let mut store = open()?;
            store.account()?;
            let fields = parse_fields(&read_arg(fields)?)?;
            let record = store.put(collection, id.as_deref(), &fields)?;
            if args.json {
                println!("{}", record_json(&record));
            } else {
                print_record(&record);
            }
        }
        Command::Import { file } => {
            let mut store = open()?;
            store.account()?;
            let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
                Box::new(std::io::stdin().lock())
            } else {
                Box::new(std::io::BufReader::new(
                    std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
                ))
            };
            let mut written = 0u64;
            let mut pending: Vec<(String, Option<String>, Map<String, Value>)> = Vec::new();
            let flush = |store: &mut Store, pending: &mut Vec<(String, Option<String>, Map<String, Value>)>| {
                let puts: Vec<_> = pending
                    .iter()
                    .map(|(collection, id, fields)| (collection.as_str(), id.as_deref(), fields))
                    .collect();
                let result = store.put_many(&puts).map(|records| records.len() as u64);
                pending.clear();
                result
            };
            for (number, line) in reader.lines().enumerate() {
                let line = line.context("reading the import")?;
                if line.trim().is_empty() {
                    continue;
                }
                let entry: Value = serde_json::from_str(&line)
                    .with_context(|| format!("line {}: not JSON (imported so far: {written})", number + 1))?;
                let collection = entry.get("collection").and_then(Value::as_str).unwrap_or("items").to_string();
                let id = entry.get("id").and_then(Value::as_str).map(str::to_string);
                let Some(Value::Object(fields)) = entry.get("fields") else {
                    bail!("line {}: needs \"fields\": {{…}} (imported so far: {written})", number + 1);
                };
                pending.push((collection, id, fields.clone()));
                if pending.len() == 1000 {
                    written += flush(&mut store, &mut pending)
                        .with_context(|| format!("lines up to {} (imported so far: {written})", number + 1))?;
                }
            }
            written += flush(&mut store, &mut pending)
                .with_context(|| format!("the last lines (imported so far: {written})"))?;
            if args.json {
                println!("{}", json!({"written": written}));
            } else {
                println!("wrote {written} records; `lockstep-cli sync` sends them");
            }
        }
        Command::Get { id } => {
            let store = open()?;
            let Some(record) = store.get(id)? else { bail!("no record {id} on this device (try `lockstep-cli sync`)") };
            if args.json {
                println!("{}", record_json(&record));
            } else {
                print_record(&record);
            }
        }
        Command::List { collection, deleted } => {
            let store = open()?;
            let records = store.list(collection.as_deref(), *deleted)?;
            if args.json {
                println!("{}", Value::Array(records.iter().map(record_json).collect()));
            } else {
                records.iter().for_each(print_record);
            }
        }
        Command::Delete { id } => {
            let mut store = open()?;
            store.account()?;
            let record = store.delete(id)?;
            if args.json {
                println!("{}", record_json(&record));
            } else {
                println!("deleted {id}; `lockstep-cli sync` sends it");
            }
        }
        Command::Sync => {
            let store = open()?;
            let mut syncer = Syncer::new(store)?.with_rpc_timeout(rpc_timeout).with_trust(trust.clone());
            let mut reporter = Reporter::new();
            reporter.quiet =
                args.json && !std::io::stderr().is_terminal() && std::env::var_os("LOCKSTEP_PROGRESS").is_none();
            let report = syncer.sync_once(&mut |progress| reporter.show(progress)).await?;
            print_report(&report, args.json);
        }
        Command::Watch => {
            watch(Syncer::new(open()?)?.with_rpc_timeout(rpc_timeout).with_trust(trust.clone()), args.json).await?
        }
        Command::SetServer { server } => {
            let mut store = open()?;
            store.set_server(server)?;
            if args.json {
                println!("{}", json!({"server": server}));
            } else {
                println!("this device now syncs with {server}");
            }
        }
        Command::Status => show::status(&open()?.status()?, args.json)?,
        Command::Devices => {
            let account = open()?.account()?;
            let devices = sync::list_devices(&account, rpc_timeout, &trust).await?;
            if args.json {
                let devices: Vec<Value> = devices
                    .iter()
                    .map(|device| {
                        json!({"device_id": device.device_id, "name": device.name, "created_at_ms": device.created_at_ms,
                               "revoked_at_ms": device.revoked_at_ms, "committed_offset": device.committed_offset,
                               "this_device": device.device_id == account.device_id})
                    })
                    .collect();
                println!("{}", Value::Array(devices));
            } else {
                for device in devices {
                    let state = if device.revoked_at_ms > 0 { "revoked" } else { "active" };
                    let this = if device.device_id == account.device_id { "  (this device)" } else { "" };
                    println!("{}  {:<7}  {}{this}", device.device_id, state, device.name);
                }
            }
        }
        Command::Revoke { device_id } => revoke(open()?, device_id, rpc_timeout, &trust, args.json).await?,
        Command::Check { fix } => show::check(&mut open()?, *fix, args.json)?,
        Command::Push { command } => push(&args, command, &open()?.account()?).await?,
        Command::Account { command: AccountCommand::Delete { confirm } } => {
            let account = open()?.account()?;
            if *confirm != account.user_id {
                bail!("--confirm must be this account's user id ({}): deleting it cannot be undone", account.user_id);
            }
            let deleted = sync::account::delete_account(&account, rpc_timeout, &trust).await?;
            if args.json {
                println!(
                    "{}",
                    json!({
                        "topic_deleted": deleted.topic_deleted,
                        "device_groups_deleted": deleted.device_groups_deleted,
                        "devices_removed": deleted.devices_removed,
                        "push_targets_removed": deleted.push_targets_removed,
                        "dedup_entries_removed": deleted.dedup_entries_removed,
                        "completed": deleted.completed,
                    })
                );
            } else if deleted.completed {
                println!("deleted account {} from the server:", account.user_id);
                println!("  its Kafka topic (every change it held)");
                println!("  {} device consumer groups (their offsets)", deleted.device_groups_deleted);
                println!("  {} devices and their tokens", deleted.devices_removed);
                println!("  {} push targets", deleted.push_targets_removed);
                println!("  {} deduplication entries", deleted.dedup_entries_removed);
                println!(
                    "this device's local store still holds its records: delete {} to remove them",
                    args.store.display()
                );
            } else {
                println!(
                    "account {} is closed: every device is signed out; the server finishes deleting its Kafka data \
                     in the background (Kafka did not answer in time)",
                    account.user_id
                );
            }
        }
        Command::Passphrase { command } => passphrase(&args, command)?,
        Command::Leave { wipe, yes } => {
            if !yes {
                bail!("leaving revokes this device (pair again to come back); run again with --yes");
            }
            let account = open()?.account()?;
            sync::account::leave(&account, rpc_timeout, &trust).await?;
            let mut wiped = Vec::new();
            if *wipe {
                for suffix in ["", "-wal", "-shm"] {
                    let path = PathBuf::from(format!("{}{suffix}", args.store.display()));
                    if path.exists() {
                        std::fs::remove_file(&path).with_context(|| format!("cannot delete {}", path.display()))?;
                        wiped.push(path.display().to_string());
                    }
                }
            }
            if args.json {
                println!("{}", json!({"revoked": account.device_id, "wiped": wiped}));
            } else {
                println!("this device ({}) left the account", account.device_id);
                if *wipe {
                    println!("deleted its local store: {}", wiped.join(", "));
                }
            }
        }
    }
    Ok(())
}

/// `passphrase set` and `passphrase remove`.
fn passphrase(args: &Args, command: &PassphraseCommand) -> anyhow::Result<()> {
    let mut store = open_store(args)?;
    match command {
        PassphraseCommand::Set { new_passphrase_file } => {
            let new = if store.is_protected() {
                PassphraseSource { file: new_passphrase_file.as_deref(), env: "LOCKSTEP_NEW_PASSPHRASE" }
                    .new_passphrase(
                        "this store has a passphrase: give the new one with --new-passphrase-file PATH or \
                     LOCKSTEP_NEW_PASSPHRASE, or run in a terminal to be asked",
                    )?
            } else {
                PassphraseSource {
                    file: new_passphrase_file.as_deref().or(args.passphrase_file.as_deref()),
                    env: "LOCKSTEP_PASSPHRASE",
                }
                .new_passphrase(
                    "give the passphrase with --passphrase-file PATH (its first line), LOCKSTEP_PASSPHRASE, or run \
                     in a terminal to be asked",
                )?
            };
            let params = kdf_params();
            let scrubbed = store.protect(new.as_bytes(), params)?;
            if args.json {
                println!("{}", json!({"protected": true, "kdf": params, "plaintext_removed": scrubbed}));
            } else {
                println!("the store's secrets are sealed under the passphrase ({params}); every command now needs it");
            }
            if !scrubbed {
                eprintln!(
                    "warning: another process has {} open: the old plaintext may stay in its -wal file until \
                     it closes; run `lockstep-cli passphrase set` again once it has",
                    args.store.display()
                );
            }
        }
        PassphraseCommand::Remove => {
            let was = store.is_protected();
            store.remove_protection()?;
            if args.json {
                println!("{}", json!({"protected": false}));
            } else if was {
                println!(
                    "the store's secrets are in the clear again (readable by whoever can read {})",
                    args.store.display()
                );
            } else {
                println!("this store has no passphrase");
            }
        }
    }
    Ok(())
}

/// What `init` and `pair redeem` print once the store holds the new device.
fn print_new_device(as_json: bool, store: &std::path::Path, account: &Account, lines: &[String]) {
    if as_json {
        println!("{}", json!({"user_id": account.user_id, "device_id": account.device_id, "store": store}));
    } else {
        lines.iter().for_each(|line| println!("{line}"));
    }
}

/// Registers a new device's public key and, if the account is past epoch 1,
/// waits up to `key_wait` for another device to share the epoch keys. A
/// failure is only a notice: the next `sync` registers and fetches again.
async fn register_device_key(store: Store, rpc_timeout: Duration, trust: &sync::Trust, key_wait: Duration) {
    let mut syncer = match Syncer::new(store) {
        Ok(syncer) => syncer.with_rpc_timeout(rpc_timeout).with_trust(trust.clone()),
        Err(error) => return eprintln!("note: {error}; the next `lockstep-cli sync` registers this device's key"),
    };
    let started = Instant::now();
    let mut told = false;
    loop {
        match syncer.sync_keys().await {
            Ok(keys) if keys.held_epoch >= keys.current_epoch => return,
            Ok(keys) if started.elapsed() >= key_wait => {
                return eprintln!(
                    "note: the account is at key epoch {}; this device holds keys up to epoch {}. A device of the \
                     account shares the newer keys at its next sync; `lockstep-cli sync` here fetches them then.",
                    keys.current_epoch, keys.held_epoch
                );
            }
            Ok(keys) => {
                if !std::mem::replace(&mut told, true) {
                    eprintln!(
                        "the account rotated its keys (epoch {}): waiting up to {} s for a device of the account to \
                         share them — run `lockstep-cli sync` on the device that showed the code",
                        keys.current_epoch,
                        key_wait.as_secs()
                    );
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => {
                return eprintln!("note: {error}; the next `lockstep-cli sync` registers this device's key");
            }
        }
    }
}

/// Revokes a device, then starts the next key epoch for the remaining ones.
async fn revoke(
    store: Store,
    device_id: &str,
    rpc_timeout: Duration,
    trust: &sync::Trust,
    as_json: bool,
) -> anyhow::Result<()> {
    let account = store.account()?;
    sync::revoke_device(&account, device_id, rpc_timeout, trust).await?;
    if device_id == account.device_id {
        if as_json {
            println!("{}", json!({"revoked": device_id, "started_epoch": null}));
        } else {
            println!("revoked this device; the account's other devices start a new key epoch at their next sync");
        }
        return Ok(());
    }
    let mut syncer = Syncer::new(store)?.with_rpc_timeout(rpc_timeout).with_trust(trust.clone());
    let keys = syncer.sync_keys().await.with_context(|| {
        format!(
            "device {device_id} is revoked (its token no longer works), but the key rotation did not finish; \
             the next `lockstep-cli sync` of any remaining device finishes it"
        )
    })?;
    if !keys.supported {
        bail!(
            "device {device_id} is revoked (its token no longer works), but this server cannot rotate keys (it has \
             no Keys service): the revoked device can still read what is written from now on if it gets hold of it"
        );
    }
    if as_json {
        println!(
            "{}",
            json!({"revoked": device_id, "started_epoch": keys.started_epoch, "key_epoch": keys.held_epoch})
        );
    } else {
        println!("revoked {device_id}: its token no longer works");
        match keys.started_epoch {
            Some(epoch) => println!(
                "started key epoch {epoch}: what is written from now on is readable by the remaining devices only \
                 (the revoked device keeps what it had already received)"
            ),
            None => println!("key epoch {} (another device started it already)", keys.held_epoch),
        }
    }
    Ok(())
}

async fn watch(mut syncer: Syncer, as_json: bool) -> anyhow::Result<()> {
    let mut attempt = 0u32;
    let mut reporter = Reporter::new();
    let mut report = Report::default();
    let mut stop = Box::pin(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    loop {
        let outcome = async {
            syncer.sync_keys().await?;
            syncer.push(&mut report, &mut |progress| reporter.show(progress)).await?;
            attempt = 0;
            syncer.receive(Until::Stopped, &mut report, &mut |progress| reporter.show(progress), &mut stop).await
        }
        .await;
        match outcome {
            // Stopped by Ctrl-C.
            Ok(()) => {
                print_report(&report, as_json);
                return Ok(());
            }
            Err(error) if error.is_transient() => {
                syncer.disconnect();
                // A busy server says how long to stay away; never come back sooner.
                let delay = sync::backoff(attempt).max(error.retry_after().unwrap_or_default());
                attempt += 1;
                eprintln!("{error}; reconnecting in {:.1} s", delay.as_secs_f64());
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = &mut stop => {
                        print_report(&report, as_json);
                        return Ok(());
                    }
                }
            }
            Err(error) => return Err(error.into()),
        }
    }
}

use crate::hlc::unix_ms as now_ms;

async fn push(args: &Args, command: &PushCommand, account: &Account) -> anyhow::Result<()> {
    use crate::sync::push_target::{self, PushTarget, decode_base64url};
    let rpc_timeout = args.rpc_timeout;
    let trust = trust(args)?;
    match command {
        PushCommand::Set { subscription, endpoint, p256dh, auth, webhook, app_id, pushkey } => {
            let target = if let Some(file) = subscription {
                let text = if file.as_os_str() == "-" {
                    read_arg("-")?
                } else {
                    std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?
                };
                PushTarget::from_subscription_json(&text).map_err(anyhow::Error::msg)?
            } else if let Some(endpoint) = endpoint {
                let key = |name: &str, value: &Option<String>| -> anyhow::Result<Vec<u8>> {
                    let value = value.as_deref().with_context(|| format!("--{name} is missing"))?;
                    decode_base64url(value).with_context(|| format!("--{name} is not base64url"))
                };
                PushTarget::WebPush {
                    endpoint: endpoint.clone(),
                    p256dh: key("p256dh", p256dh)?,
                    auth: key("auth", auth)?,
                }
            } else if let Some(url) = webhook {
                PushTarget::Webhook {
                    url: url.clone(),
                    app_id: app_id.clone().unwrap_or_default(),
                    pushkey: pushkey.clone().unwrap_or_default(),
                }
            } else {
                bail!("say where to wake this device: --subscription, --endpoint or --webhook");
            };
            let (kind, origin) = (target.kind(), target.origin().to_string());
            push_target::set(account, target, rpc_timeout, &trust).await?;
            if args.json {
                println!("{}", json!({"kind": kind, "origin": origin}));
            } else {
                println!("this device is woken through {kind} at {origin} when it is offline and behind");
            }
        }
        PushCommand::Show { reveal } => match push_target::get(account, rpc_timeout, &trust).await? {
            None if args.json => println!("{}", json!({"target": null})),
            None => println!("this device has no push target (set one with `lockstep-cli push set`)"),
            Some((target, updated_at_ms)) => {
                let url = if *reveal { target.url().to_string() } else { format!("{}/…", target.origin()) };
                if args.json {
                    println!("{}", json!({"kind": target.kind(), "url": url, "updated_at_ms": updated_at_ms}));
                } else {
                    println!("{}  {url}  (set {} s ago)", target.kind(), (now_ms() - updated_at_ms).max(0) / 1000);
                }
            }
        },
        PushCommand::Remove => {
            let removed = push_target::remove(account, rpc_timeout, &trust).await?;
            if args.json {
                println!("{}", json!({"removed": removed}));
            } else if removed {
                println!("push target removed: this device is no longer woken");
            } else {
                println!("this device had no push target");
            }
        }
    }
    Ok(())
}
