//! `pair show` on a device that has the account, `pair redeem` on the new one.

use std::{path::PathBuf, time::Duration};

use clap::Subcommand;
use serde_json::json;

use super::{
    Ctx,
    account::{print_new_device, register_device_key},
    humantime_duration, open_empty, protect_new, secrets,
};
use crate::{hlc::unix_ms as now_ms, pairing::PairingCode, sync};

#[derive(Debug, Subcommand)]
pub(super) enum PairCommand {
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
        /// A name for this device, e.g. phone.
        #[arg(long)]
        name: String,
        /// If the account rotated its keys (a device was revoked), wait this long
        /// for a device of the account to share the newer epoch keys (it does at
        /// its next sync); `sync` fetches them later otherwise.
        #[arg(long, default_value = "60s", value_parser = humantime_duration)]
        key_wait: Duration,
    },
}

pub(super) async fn run(ctx: &Ctx<'_>, command: &PairCommand) -> anyhow::Result<()> {
    match command {
        PairCommand::Show { no_qr } => show(ctx, *no_qr).await,
        PairCommand::Redeem { code, code_file, name, key_wait } => {
            redeem(ctx, code.as_deref(), code_file.as_deref(), name, *key_wait).await
        }
    }
}

async fn show(ctx: &Ctx<'_>, no_qr: bool) -> anyhow::Result<()> {
    let (args, rpc_timeout, trust) = (ctx.args, ctx.args.rpc_timeout, &ctx.trust);
    let store = ctx.open()?;
    let account = store.account()?;
    let (ticket, expires_at_ms) = sync::pairing_ticket(&account, rpc_timeout, trust).await?;
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
    Ok(())
}

async fn redeem(
    ctx: &Ctx<'_>,
    code: Option<&str>,
    code_file: Option<&std::path::Path>,
    name: &str,
    key_wait: Duration,
) -> anyhow::Result<()> {
    let (args, rpc_timeout, trust) = (ctx.args, ctx.args.rpc_timeout, &ctx.trust);
    let mut store = open_empty(args)?;
    let code = secrets::pairing_code(code, code_file)?;
    let account = sync::redeem(&code.server, &code.ticket, code.key.clone(), name, rpc_timeout, trust).await?;
    protect_new(args, &mut store)?;
    store.save_account(&account)?;
    register_device_key(store, rpc_timeout, trust, key_wait).await;
    print_new_device(
        args.json,
        &args.store,
        &account,
        &[
            format!("this device ({name}) joined user {} as {}", account.user_id, account.device_id),
            "next: `lockstep-cli sync` to receive the account's records".into(),
        ],
    );
    Ok(())
}
