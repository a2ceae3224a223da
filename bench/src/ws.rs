//! WS `sync` wall time: what a person waits for. The `lockstep-cli` binary (a
//! release build) against the round's server with its default settings (the
//! heartbeat interval included): one device imports N records, then
//! `lockstep-cli sync` is timed on it (push) and on a second paired device
//! (receive), for each N of [`SIZES`]. Before issue 18's fix every such sync
//! took a heartbeat interval (15 s), whatever N.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::{process::Command, time::Instant};

use crate::{Config, procs::Lockstep, stats::Metrics};

/// Records imported before each timed pair of syncs.
pub const SIZES: [u64; 3] = [1, 300, 3_000];

/// The server's default `delivery.heartbeat_interval`, which the round's server runs with.
pub fn heartbeat_interval() -> Duration {
    lockstep_broker::settings::Settings::default().delivery.heartbeat_interval
}

/// One device: `lockstep-cli --store <store> --json …`.
struct CliDevice {
    name: &'static str,
    binary: PathBuf,
    store: PathBuf,
}

impl CliDevice {
    /// Runs a command that must succeed; returns its stdout (one JSON document).
    async fn json(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new(&self.binary)
            .arg("--store")
            .arg(&self.store)
            .arg("--json")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("{}: starting {args:?}", self.name))?;
        if !output.status.success() {
            bail!("{}: {args:?} failed: {}", self.name, String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    /// `sync`, timed; returns the wall time and the sync's report.
    async fn timed_sync(&self) -> anyhow::Result<(f64, String)> {
        let started = Instant::now();
        let report = self.json(&["sync"]).await?;
        Ok((started.elapsed().as_secs_f64(), report))
    }
}

/// The value of `"key":` in a flat JSON document the CLI printed (a number or a string).
fn json_field<'a>(document: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("\"{key}\":");
    let start = document.find(&pattern)? + pattern.len();
    let rest = document[start..].trim_start();
    match rest.strip_prefix('"') {
        Some(text) => text.split('"').next(),
        None => rest.split([',', '}']).next().map(str::trim),
    }
}

fn json_count(document: &str, key: &str) -> anyhow::Result<u64> {
    json_field(document, key)
        .and_then(|value| value.parse().ok())
        .with_context(|| format!("no {key:?} count in {document}"))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub async fn run(
    lockstep: &Lockstep,
    cli_bin: &Path,
    config: &Config,
    round: usize,
    metrics: &mut Metrics,
) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("lockstep-bench-ws-").tempdir()?;
    let device = |name: &'static str| CliDevice {
        name,
        binary: cli_bin.to_path_buf(),
        store: dir.path().join(format!("{name}.db")),
    };
    let (writer, reader) = (device("writer"), device("reader"));
    writer.json(&["init", "--server", &lockstep.endpoint(), "--name", writer.name]).await?;
    let shown = writer.json(&["pair", "show"]).await?;
    let code = json_field(&shown, "code").context("pair show printed no code")?;
    let code_file = dir.path().join("pairing-code");
    std::fs::write(&code_file, code)?;
    let code_file = code_file.to_str().context("a UTF-8 path")?;
    reader.json(&["pair", "redeem", "--name", reader.name, "--code-file", code_file]).await?;
    // Both caught up with the pairing before anything is timed.
    writer.json(&["sync"]).await?;
    reader.json(&["sync"]).await?;

    let (idle_s, _) = writer.timed_sync().await?;
    metrics.add(round, "ws.idle_s", idle_s);
    let import = dir.path().join("import.ndjson");
    let import_arg = import.to_str().context("a UTF-8 path")?.to_string();
    let mut next_record = 0u64;
    for records in SIZES {
        let (mut pushes, mut receives) = (Vec::new(), Vec::new());
        for _ in 0..config.sync_repeats {
            let lines: String = (next_record..next_record + records)
                .map(|n| {
                    format!("{{\"collection\":\"notes\",\"fields\":{{\"n\":{n},\"body\":\"{}\"}}}}\n", "x".repeat(200))
                })
                .collect();
            next_record += records;
            std::fs::write(&import, lines)?;
            let imported = writer.json(&["import", &import_arg]).await?;
            anyhow::ensure!(json_count(&imported, "written")? == records, "import wrote {imported}");

            let (seconds, report) = writer.timed_sync().await?;
            let pushed = json_count(&report, "pushed")?;
            anyhow::ensure!(pushed == records, "the writer's sync pushed {pushed} of {records}: {report}");
            pushes.push(seconds);

            let (seconds, report) = reader.timed_sync().await?;
            let received = json_count(&report, "received")?;
            anyhow::ensure!(received >= records, "the second device's sync received {received} of {records}: {report}");
            receives.push(seconds);
        }
        eprintln!("    ws: {records} records: push {pushes:.2?} s, receive {receives:.2?} s");
        metrics.add(round, &format!("ws.n{records}.push_s"), median(pushes));
        metrics.add(round, &format!("ws.n{records}.receive_s"), median(receives));
    }
    Ok(())
}
