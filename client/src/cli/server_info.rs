//! `init`'s invite code (flag, file or environment) and `server-info`: what a
//! server needs for a new account and the limits it advertises.

use std::{path::Path, time::Duration};

use anyhow::Context;
use serde_json::json;
use zeroize::Zeroizing;

use crate::sync::{self, Trust, describe_mode};

/// The invite code from `--invite` (or LOCKSTEP_INVITE) or `--invite-file`, trimmed.
pub(super) fn invite_code(
    invite: Option<&str>,
    invite_file: Option<&Path>,
) -> anyhow::Result<Option<Zeroizing<String>>> {
    let text = match (invite, invite_file) {
        (Some(code), _) => Zeroizing::new(code.to_string()),
        (None, Some(path)) if path == Path::new("-") => Zeroizing::new(super::records::read_arg("-")?),
        (None, Some(path)) => Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the invite code from {}", path.display()))?,
        ),
        (None, None) => return Ok(None),
    };
    let code = text.trim();
    anyhow::ensure!(!code.is_empty(), "the invite code is empty");
    Ok(Some(Zeroizing::new(code.to_string())))
}

pub(super) async fn show(server: &str, rpc_timeout: Duration, trust: &Trust, as_json: bool) -> anyhow::Result<()> {
    let info = sync::server_info(server, rpc_timeout, trust).await?;
    let registration = describe_mode(info.registration());
    let push_rate = info.push_rate_limit.unwrap_or_default();
    if as_json {
        println!(
            "{}",
            json!({
                "server": server,
                "server_version": info.server_version,
                "registration": info.registration().as_str_name(),
                "max_devices_per_account": info.max_devices_per_account,
                "push_rate_limit": {"burst": push_rate.burst, "per_hour": push_rate.per_hour},
                "max_subscriptions_per_user": info.max_subscriptions_per_user,
                "max_changes_per_push": info.max_changes_per_push,
                "max_ciphertext_bytes": info.max_ciphertext_bytes,
                "max_request_bytes": info.max_request_bytes,
                "max_batch_bytes": info.max_batch_bytes,
                "heartbeat_interval_ms": info.heartbeat_interval_ms,
                "request_timeout_ms": info.request_timeout_ms,
                "stream_send_timeout_ms": info.stream_send_timeout_ms,
                "max_concurrent_requests_per_device": info.max_concurrent_requests_per_device,
                "web_push": !info.vapid_public_key.is_empty(),
                // What a web app passes to PushManager.subscribe({applicationServerKey}).
                "vapid_public_key": (!info.vapid_public_key.is_empty()).then_some(&info.vapid_public_key),
            })
        );
        return Ok(());
    }
    println!("server {server} (lockstep {})", info.server_version);
    println!("new accounts need: {registration}");
    println!("devices per account: at most {}", info.max_devices_per_account);
    println!("pushes per account: bursts of {}, {} an hour", push_rate.burst, push_rate.per_hour);
    println!("live streams per account: at most {}", info.max_subscriptions_per_user);
    println!("calls of one device at once: at most {}", info.max_concurrent_requests_per_device);
    println!(
        "per push: at most {} changes, {} bytes of ciphertext each, {} bytes in all",
        info.max_changes_per_push, info.max_ciphertext_bytes, info.max_request_bytes
    );
    println!(
        "calls end after {} ms; a stream whose device reads nothing for {} ms ends",
        info.request_timeout_ms, info.stream_send_timeout_ms
    );
    if info.vapid_public_key.is_empty() {
        println!("web push wake-ups: not configured");
    } else {
        println!("web push wake-ups: available, VAPID public key {}", info.vapid_public_key);
    }
    Ok(())
}

/// `server-info`: what a server needs for a new account, and its limits.
pub(super) async fn run(ctx: &super::Ctx<'_>, server: Option<&str>) -> anyhow::Result<()> {
    let (args, rpc_timeout, trust) = (ctx.args, ctx.args.rpc_timeout, &ctx.trust);
    let server = match server {
        Some(server) => server.to_string(),
        None => ctx.open()?.account().context("no --server, and this store holds no account")?.server,
    };
    show(&server, rpc_timeout, trust, args.json).await?;
    Ok(())
}
