//! `push set|show|remove`: where this device is woken when it is offline and behind.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::json;

use super::{Ctx, records::read_arg};
use crate::{hlc::unix_ms as now_ms, store::Account};

#[derive(Debug, Subcommand)]
pub(super) enum PushCommand {
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
        /// The app id the gateway knows this app by, e.g. org.example.notes (with --webhook).
        #[arg(long)]
        app_id: Option<String>,
        /// The device's push key at that gateway (with --webhook).
        #[arg(long)]
        pushkey: Option<String>,
    },
    /// Show this device's push target (its URL only with --reveal: it is a secret).
    Show {
        /// Print the target's URL too.
        #[arg(long)]
        reveal: bool,
    },
    /// Remove this device's push target.
    Remove,
}

pub(super) async fn run(ctx: &Ctx<'_>, command: &PushCommand, account: &Account) -> anyhow::Result<()> {
    let args = ctx.args;
    use crate::sync::push_target::{self, PushTarget, decode_base64url};
    let rpc_timeout = args.rpc_timeout;
    let trust = &ctx.trust;
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
            push_target::set(account, target, rpc_timeout, trust).await?;
            if args.json {
                println!("{}", json!({"kind": kind, "origin": origin}));
            } else {
                println!("this device is woken through {kind} at {origin} when it is offline and behind");
            }
        }
        PushCommand::Show { reveal } => match push_target::get(account, rpc_timeout, trust).await? {
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
            let removed = push_target::remove(account, rpc_timeout, trust).await?;
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
