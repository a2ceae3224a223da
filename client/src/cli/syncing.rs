//! Talking to the server: `sync`, `watch`, `set-server`, and their progress lines.

use std::{
    io::{IsTerminal, Write},
    time::{Duration, Instant},
};

use serde_json::json;

use super::{Ctx, show::print_report};
use crate::sync::{self, Progress, Report, Syncer, Until};

/// `sync`: push, receive everything new, stop.
pub(super) async fn sync(ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let (args, rpc_timeout, trust) = (ctx.args, ctx.args.rpc_timeout, &ctx.trust);
    let store = ctx.open()?;
    let mut syncer = Syncer::new(store)?.with_rpc_timeout(rpc_timeout).with_trust(trust.clone());
    let mut reporter = Reporter::new();
    reporter.quiet = args.json && !std::io::stderr().is_terminal() && std::env::var_os("LOCKSTEP_PROGRESS").is_none();
    let report = syncer.sync_once(&mut |progress| reporter.show(progress)).await?;
    print_report(&report, args.json);
    Ok(())
}

/// `set-server`: the account's server moved.
pub(super) fn set_server(ctx: &Ctx<'_>, server: &str) -> anyhow::Result<()> {
    let args = ctx.args;
    let mut store = ctx.open()?;
    store.set_server(server)?;
    if args.json {
        println!("{}", json!({"server": server}));
    } else {
        println!("this device now syncs with {server}");
    }
    Ok(())
}

/// `watch`: stay connected until Ctrl-C.
pub(super) async fn watch(ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let syncer = Syncer::new(ctx.open()?)?.with_rpc_timeout(ctx.args.rpc_timeout).with_trust(ctx.trust.clone());
    watch_with(syncer, ctx.args.json).await
}

async fn watch_with(mut syncer: Syncer, as_json: bool) -> anyhow::Result<()> {
    let mut attempt = 0u32;
    let mut reporter = Reporter::new();
    let mut report = Report::default();
    let mut stop = Box::pin(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    loop {
        let outcome = async {
            syncer.sync_keys_before_receiving().await?;
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
        // Only lines of the same stream of progress thin each other out: a live change right after
        // a heartbeat's "up to date" line is still shown.
        if !forced {
            if self.last.elapsed() < Duration::from_millis(200) {
                return;
            }
            self.last = Instant::now();
        }
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
