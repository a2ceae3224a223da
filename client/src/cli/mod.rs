//! The `lockstep-cli` commands. Human-readable output by default, one JSON
//! document per command with `--json`; progress goes to stderr.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::bail;
use clap::{Parser, Subcommand};

mod account;
mod pair;
mod passphrase;
mod push;
mod records;
mod secrets;
mod server_info;
mod show;
mod syncing;

use self::{
    account::AccountCommand,
    pair::PairCommand,
    passphrase::PassphraseCommand,
    push::PushCommand,
    secrets::{PassphraseSource, kdf_params},
};
use crate::{store::Store, sync};

/// Lockstep client: an end-to-end-encrypted local store that syncs through a Lockstep server.
#[derive(Debug, Parser)]
#[command(version, after_help = TWO_DEVICES, next_help_heading = "Global options")]
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
    /// Allow `http://` (no TLS) to a server beyond loopback: the device token then crosses
    /// the network in the clear. Off: such an address is refused (use `https://`).
    #[arg(long, env = "LOCKSTEP_ALLOW_PLAINTEXT", global = true)]
    allow_plaintext: bool,
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

/// The top-level help's closing lines: the walkthrough of the README, in short.
const TWO_DEVICES: &str = "\
Two devices, one account (a server from `scripts/run` on this machine):
  lockstep-cli --store laptop.db init --server http://127.0.0.1:50051 --name laptop
  lockstep-cli --store laptop.db put -c notes '{\"title\":\"Milk\"}'
  lockstep-cli --store laptop.db sync
  lockstep-cli --store laptop.db pair show           # a one-time code; on the new device:
  lockstep-cli --store phone.db pair redeem --name phone
  lockstep-cli --store phone.db sync
  lockstep-cli --store phone.db list

Each device is one store (--store, or LOCKSTEP_STORE). `lockstep-cli <command> --help` says more.";

#[derive(Debug, Subcommand)]
enum Command {
    /// Create an account on a server; this store becomes its first device.
    #[command(after_help = "\
Examples:
  lockstep-cli --store laptop.db init --server http://127.0.0.1:50051 --name laptop
  lockstep-cli --store laptop.db init --server https://sync.example.org --name laptop --invite-file invite.txt
  lockstep-cli server-info --server https://sync.example.org     # what a new account needs there

Another device joins the account with `pair`, not `init`.")]
    Init {
        /// e.g. https://sync.example.org (or http://127.0.0.1:50051 on this machine)
        #[arg(long)]
        server: String,
        /// A name for this device, e.g. laptop.
        #[arg(long)]
        name: String,
        /// The server's registration secret, when it asks for one (`server-info` says).
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
    #[command(after_help = "\
Examples:
  lockstep-cli server-info --server https://sync.example.org
  lockstep-cli --json server-info --server http://127.0.0.1:50051   # vapid_public_key: for Web Push")]
    ServerInfo {
        /// e.g. https://sync.example.org; default: this store's server.
        #[arg(long)]
        server: Option<String>,
    },
    /// Add a device: `pair show` on a device that has the account, `pair redeem` on the new one.
    #[command(after_help = "\
Examples:
  lockstep-cli --store laptop.db pair show                 # on a device of the account
  lockstep-cli --store phone.db pair redeem --name phone   # on the new one; paste the code
  lockstep-cli --store phone.db pair redeem --name phone --code-file code.txt")]
    Pair {
        #[command(subcommand)]
        command: PairCommand,
    },
    /// Write fields into a record (JSON object; `-` reads stdin). Prints the record.
    #[command(after_help = "\
Examples:
  lockstep-cli put -c notes '{\"title\":\"Milk\",\"done\":false}'   # a new record; prints its id
  lockstep-cli put -c notes --id <ID> '{\"done\":true}'         # change one field of it
  lockstep-cli put -c notes --id <ID> '{\"title\":null}'        # remove a field
  echo '{\"title\":\"Eggs\"}' | lockstep-cli put -c notes -

The change stays local (in the outbox) until `sync` or `watch` pushes it.")]
    Put {
        /// The collection (the kind of record: notes, passwords, …).
        #[arg(long, short, default_value = "items")]
        collection: String,
        /// The record to change; a new record (with a new id) if omitted.
        #[arg(long)]
        id: Option<String>,
        /// Fields as a JSON object, e.g. '{"title":"Milk","done":false}'; null removes a field.
        fields: String,
    },
    /// Write many records: one JSON object per line, {"collection":…,"id":…,"fields":{…}}.
    #[command(after_help = "\
Example:
  printf '%s\\n' '{\"collection\":\"notes\",\"fields\":{\"title\":\"Milk\"}}' | lockstep-cli import -")]
    Import {
        /// A file, or `-` for stdin.
        file: PathBuf,
    },
    /// Show one record.
    Get {
        /// The record's id (`put` and `list` print it).
        id: String,
    },
    /// List records.
    #[command(after_help = "\
Examples:
  lockstep-cli list
  lockstep-cli --json list -c notes")]
    List {
        /// Only this collection.
        #[arg(long, short)]
        collection: Option<String>,
        /// Include deleted records.
        #[arg(long)]
        deleted: bool,
    },
    /// Delete a record (it leaves a tombstone that syncs like an edit).
    Delete {
        /// The record's id (`list` prints it).
        id: String,
    },
    /// Push local changes, receive everything new, then stop.
    #[command(after_help = "\
Examples:
  lockstep-cli --store laptop.db sync
  lockstep-cli --store laptop.db --json sync     # a report: pushed, received, cursor, …

Progress goes to stderr; `watch` stays connected instead.")]
    Sync,
    /// The account's server moved to a new address (same server, same data).
    SetServer {
        /// e.g. https://sync.example.org:443
        server: String,
    },
    /// Stay connected: push local changes as they are made, apply incoming ones live.
    #[command(after_help = "\
Example:
  lockstep-cli --store laptop.db watch     # until Ctrl-C; then prints what it did")]
    Watch,
    /// This device: cursor, lag at the last sync, outbox, problems, key epoch.
    Status,
    /// The account's devices.
    Devices,
    /// Revoke a device (a lost or stolen one): its token stops working.
    ///
    /// This device then starts a new key epoch sealed to the remaining devices only,
    /// so the revoked device cannot read what is written from now on.
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

/// What every command gets: the global flags, and whom to trust on the way to the server.
struct Ctx<'a> {
    args: &'a Args,
    trust: sync::Trust,
}

impl Ctx<'_> {
    /// The device's store (see [`open_store`]).
    fn open(&self) -> anyhow::Result<Store> {
        open_store(self.args)
    }
}

/// Only dispatches: each command lives in the module of its group.
async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(traceparent) = &args.traceparent {
        sync::send_traceparent(traceparent).map_err(anyhow::Error::msg)?;
    }
    if args.allow_plaintext {
        sync::allow_plaintext();
    }
    let ctx = Ctx { args: &args, trust: trust(&args)? };
    let json = args.json;
    match &args.command {
        Command::Init { server, name, registration_secret, invite, invite_file } => {
            let (secret, invite) = (registration_secret.as_deref(), invite.as_deref());
            account::init(&ctx, server, name, secret, invite, invite_file.as_deref()).await
        }
        Command::ServerInfo { server } => server_info::run(&ctx, server.as_deref()).await,
        Command::Pair { command } => pair::run(&ctx, command).await,
        Command::Put { collection, id, fields } => records::put(&ctx, collection, id.as_deref(), fields),
        Command::Import { file } => records::import(&ctx, file),
        Command::Get { id } => records::get(&ctx, id),
        Command::List { collection, deleted } => records::list(&ctx, collection.as_deref(), *deleted),
        Command::Delete { id } => records::delete(&ctx, id),
        Command::Sync => syncing::sync(&ctx).await,
        Command::Watch => syncing::watch(&ctx).await,
        Command::SetServer { server } => syncing::set_server(&ctx, server),
        Command::Status => show::status(&ctx.open()?.status()?, json),
        Command::Devices => account::devices(&ctx).await,
        Command::Revoke { device_id } => account::revoke(&ctx, device_id).await,
        Command::Check { fix } => show::check(&mut ctx.open()?, *fix, json),
        Command::Push { command } => push::run(&ctx, command, &ctx.open()?.account()?).await,
        Command::Account { command } => account::delete(&ctx, command).await,
        Command::Passphrase { command } => passphrase::run(&args, command),
        Command::Leave { wipe, yes } => account::leave(&ctx, *wipe, *yes).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
    }

    /// `--help` of every command says what each of its arguments is.
    #[test]
    fn every_command_and_argument_says_what_it_is() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && !arg.is_hide_set() && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands().filter(|sub| sub.get_name() != "help") {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(format!("{path} (what it does)"));
                }
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Args::command(), "lockstep-cli", &mut missing);
        assert!(missing.is_empty(), "without a help text: {missing:?}");
    }
}
