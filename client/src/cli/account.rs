//! The account and its devices: `init`, `devices`, `revoke`, `leave`, `account delete`.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::{Ctx, open_empty, protect_new, server_info};
use crate::{
    store::{Account, Store},
    sync::{self, Syncer},
};

#[derive(Debug, Subcommand)]
pub(super) enum AccountCommand {
    /// Delete the account from the server: its Kafka topic, every device's offsets, devices, tokens,
    /// push targets. Every device is signed out; local stores keep their records.
    Delete {
        /// The account's user id, repeated to confirm (`lockstep-cli status` shows it).
        #[arg(long)]
        confirm: String,
    },
}

/// `init`: a new account with this store as its first device.
pub(super) async fn init(
    ctx: &Ctx<'_>,
    server: &str,
    name: &str,
    registration_secret: Option<&str>,
    invite: Option<&str>,
    invite_file: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let (args, rpc_timeout, trust) = (ctx.args, ctx.args.rpc_timeout, &ctx.trust);
    let mut store = open_empty(args)?;
    let invite = server_info::invite_code(invite, invite_file)?;
    let registration =
        sync::Registration { secret: registration_secret, invite_code: invite.as_ref().map(|code| code.as_str()) };
    let account = sync::create_account(server, name, &registration, rpc_timeout, trust).await?;
    protect_new(args, &mut store)?;
    store.save_account(&account)?;
    register_device_key(store, rpc_timeout, trust, Duration::ZERO).await;
    print_new_device(
        args.json,
        &args.store,
        &account,
        &[
            format!("created user {} with this device ({name}) as {}", account.user_id, account.device_id),
            "next: `lockstep-cli put '{\"title\":\"hello\"}'`, then `lockstep-cli sync`; add a device with `lockstep-cli pair show`".into(),
        ],
    );
    Ok(())
}

/// `devices`: the account's devices.
pub(super) async fn devices(ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let (args, rpc_timeout, trust) = (ctx.args, ctx.args.rpc_timeout, &ctx.trust);
    let account = ctx.open()?.account()?;
    let devices = sync::list_devices(&account, rpc_timeout, trust).await?;
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
    Ok(())
}

/// `account delete`: the server's copy of everything.
pub(super) async fn delete(ctx: &Ctx<'_>, command: &AccountCommand) -> anyhow::Result<()> {
    let AccountCommand::Delete { confirm } = command;
    let (args, rpc_timeout, trust) = (ctx.args, ctx.args.rpc_timeout, &ctx.trust);
    let account = ctx.open()?.account()?;
    if *confirm != account.user_id {
        bail!("--confirm must be this account's user id ({}): deleting it cannot be undone", account.user_id);
    }
    let deleted = sync::account::delete_account(&account, rpc_timeout, trust).await?;
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
        println!("this device's local store still holds its records: delete {} to remove them", args.store.display());
    } else {
        println!(
            "account {} is closed: every device is signed out; the server finishes deleting its Kafka data \
             in the background (Kafka did not answer in time)",
            account.user_id
        );
    }
    Ok(())
}

/// `leave`: this device leaves the account.
pub(super) async fn leave(ctx: &Ctx<'_>, wipe: bool, yes: bool) -> anyhow::Result<()> {
    let (args, rpc_timeout, trust) = (ctx.args, ctx.args.rpc_timeout, &ctx.trust);
    if !yes {
        bail!("leaving revokes this device (pair again to come back); run again with --yes");
    }
    let account = ctx.open()?.account()?;
    sync::account::leave(&account, rpc_timeout, trust).await?;
    let mut wiped = Vec::new();
    if wipe {
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
        if wipe {
            println!("deleted its local store: {}", wiped.join(", "));
        }
    }
    Ok(())
}

/// What `init` and `pair redeem` print once the store holds the new device.
pub(super) fn print_new_device(as_json: bool, store: &std::path::Path, account: &Account, lines: &[String]) {
    if as_json {
        println!("{}", json!({"user_id": account.user_id, "device_id": account.device_id, "store": store}));
    } else {
        lines.iter().for_each(|line| println!("{line}"));
    }
}

/// Registers a new device's public key and, if the account is past epoch 1,
/// waits up to `key_wait` for another device to share the epoch keys. A
/// failure is only a notice: the next `sync` registers and fetches again.
pub(super) async fn register_device_key(store: Store, rpc_timeout: Duration, trust: &sync::Trust, key_wait: Duration) {
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
pub(super) async fn revoke(ctx: &Ctx<'_>, device_id: &str) -> anyhow::Result<()> {
    let (store, rpc_timeout, trust, as_json) = (ctx.open()?, ctx.args.rpc_timeout, &ctx.trust, ctx.args.json);
    let account = store.account()?;
    if device_id == account.device_id {
        sync::revoke_device(&account, device_id, rpc_timeout, trust).await?;
        if as_json {
            println!("{}", json!({"revoked": device_id, "started_epoch": null}));
        } else {
            println!("revoked this device; the account's other devices start a new key epoch at their next sync");
        }
        return Ok(());
    }
    let mut syncer = Syncer::new(store)?.with_rpc_timeout(rpc_timeout).with_trust(trust.clone());
    let (keys, _pushed) = syncer.revoke(device_id).await.with_context(|| {
        format!(
            "revoking device {device_id} did not finish (if the server revoked it, its token no longer works); \
             the revocation is recorded here and the next `lockstep-cli sync` of this device finishes the key \
             rotation and tells the other devices"
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
