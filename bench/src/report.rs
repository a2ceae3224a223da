//! BENCHMARKS.md: the machine (its load at the start and the end), the
//! command, per workload the median and spread over rounds, and every target
//! (issue #20's, and issue 18's `sync` wall time) against its figure.

use std::{fmt::Write as _, path::Path, time::Duration};

use crate::{
    Args, Config,
    machine::{self, Load},
    procs::command_line,
    profile::Profile,
    stats::{Metrics, Summary},
    ws,
};

fn format_value(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 1000.0 {
        let whole = value.round() as i64;
        let digits = whole.abs().to_string();
        let mut grouped = String::new();
        for (index, digit) in digits.chars().enumerate() {
            if index > 0 && (digits.len() - index) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(digit);
        }
        if whole < 0 { format!("-{grouped}") } else { grouped }
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

fn summary_cells(summary: Option<Summary>) -> (String, String, String) {
    match summary {
        Some(summary) => (
            format_value(summary.median),
            format!("{} – {}", format_value(summary.min), format_value(summary.max)),
            summary.count.to_string(),
        ),
        None => ("—".into(), "—".into(), "0".into()),
    }
}

fn table(out: &mut String, metrics: &Metrics, rows: &[(String, String)]) {
    out.push_str("| figure | median | spread (min – max) | rounds |\n| --- | ---: | ---: | ---: |\n");
    for (key, label) in rows {
        if metrics.get(key).is_none() {
            continue;
        }
        let (median, spread, count) = summary_cells(metrics.summary(key));
        let _ = writeln!(out, "| {label} | {median} | {spread} | {count} |");
    }
    out.push('\n');
}

struct Target {
    name: String,
    figure: String,
    met: Option<bool>,
    /// For ratio targets: the ratio's spread across rounds, and whether it repeats within 20 %.
    repeats: String,
}

impl Target {
    fn new(name: impl Into<String>, figure: String, met: Option<bool>) -> Self {
        Self { name: name.into(), figure, met, repeats: "—".into() }
    }
}

/// How far apart a figure's rounds lie, as a share of its median: (max − min) / |median|.
fn spread_percent(summary: &Summary) -> f64 {
    (summary.max - summary.min) / summary.median.abs() * 100.0
}

/// Issue 20 asks each ratio to repeat within this spread across rounds.
const REPEAT_WITHIN_PERCENT: f64 = 20.0;

fn repeats(summary: Option<Summary>) -> String {
    match summary {
        None => "—".into(),
        Some(summary) if summary.count < 2 => "1 round: cannot tell".into(),
        Some(summary) => {
            let spread = spread_percent(&summary);
            if spread <= REPEAT_WITHIN_PERCENT {
                format!("{spread:.0} %: within 20 %")
            } else {
                format!("{spread:.0} %: **not within 20 %**")
            }
        }
    }
}

fn ratio_target(
    metrics: &Metrics,
    name: &str,
    numerator: &str,
    denominator: &str,
    passes: impl Fn(f64) -> bool,
) -> Target {
    let ratios = metrics.combine(numerator, denominator, |a, b| a / b);
    let summary = Summary::of(ratios);
    Target {
        name: name.to_string(),
        figure: summary.map_or("not measured".into(), |s| format!("{:.2}× ({:.2} – {:.2})", s.median, s.min, s.max)),
        met: summary.map(|s| passes(s.median)),
        repeats: repeats(summary),
    }
}

fn seconds_target(name: String, summary: Option<Summary>, limit_s: f64) -> Target {
    Target::new(
        name,
        summary.map_or("not measured".into(), |s| format!("{:.2} s ({:.2} – {:.2})", s.median, s.min, s.max)),
        summary.map(|s| s.median <= limit_s),
    )
}

/// The peers W5 targets compare against, by metric prefix, and their names in the report.
pub const W5_TARGET_PEERS: [(&str, &str); 2] =
    [("w5.redis_always", "Redis Streams (`appendfsync always`)"), ("w5.nats", "NATS JetStream")];

/// Issue 20's targets (latency tax p99 ≤ 1 ms at 1 device, ≤ 3 ms at 10, ≤ 10 ms at 100).
pub fn tax_limit_ms(devices: usize) -> f64 {
    match devices {
        0..=1 => 1.0,
        2..=10 => 3.0,
        _ => 10.0,
    }
}

/// Lockstep's push→delivery minus W0's produce→ack at the same quantile, rate and round.
pub fn latency_tax(metrics: &Metrics, devices: usize, quantile: &str) -> Option<Summary> {
    Summary::of(
        metrics.combine(&format!("w2.d{devices}.{quantile}_ms"), &format!("w0.ack_{quantile}_ms"), |a, b| a - b),
    )
}

fn targets(metrics: &Metrics, config: &Config) -> Vec<Target> {
    let mut targets = vec![ratio_target(
        metrics,
        "W1 ingest, one user ≥ 0.9× W0 produce (changes/s at saturation)",
        "w1.sat_changes_rps",
        "w0.produce_rps",
        |ratio| ratio >= 0.9,
    )];
    targets.push(ratio_target(
        metrics,
        "W1 tracing on (10 % sampled, OTLP export) costs ≤ 5 %: ≥ 0.95× tracing off (changes/s at saturation)",
        "w1trace.sat_changes_rps",
        "w1.sat_changes_rps",
        |ratio| ratio >= 0.95,
    ));
    targets.push(ratio_target(
        metrics,
        "W2 fan-out, 1 device ≥ 0.9× W0 live (deliveries/s; W0 live: produce at saturation while one consumer \
         tails the topic, records/s to the last one read. A live device cannot outrun what is pushed, so W0's \
         consume of a written topic, 10× faster, is W4's comparator, not this one's)",
        "w2.d1.deliveries_rps",
        "w0.tail_rps",
        |ratio| ratio >= 0.9,
    ));
    for &devices in &config.fanout_devices {
        let limit = tax_limit_ms(devices);
        let tax = latency_tax(metrics, devices, "p99");
        targets.push(Target::new(
            format!(
                "Latency tax at p99 ≤ {limit:.0} ms, {devices} {} (Lockstep push→delivery p99 − W0 produce→ack p99)",
                if devices == 1 { "device" } else { "devices" }
            ),
            tax.map_or("not measured".into(), |s| format!("{:+.2} ms ({:+.2} – {:+.2})", s.median, s.min, s.max)),
            tax.map(|s| s.median <= limit),
        ));
    }
    let largest = config
        .idle_devices
        .iter()
        .copied()
        .filter(|count| metrics.get(&format!("w3.n{count}.per_device_kib")).is_some())
        .max()
        .unwrap_or(0);
    let per_device = metrics.summary(&format!("w3.n{largest}.per_device_kib"));
    targets.push(Target::new(
        format!(
            "W3 ≤ 5 KiB RSS per idle device at {largest} devices (the target is at 100,000, or the machine's limit)"
        ),
        per_device.map_or("not measured".into(), |s| format!("{:.2} KiB ({:.2} – {:.2})", s.median, s.min, s.max)),
        per_device.map(|s| s.median <= 5.0),
    ));
    let cpu = metrics
        .get(&format!("w3.n{largest}.cpu_percent"))
        .map(|rounds| rounds.values().map(|percent| percent / (largest as f64 / 10_000.0)).collect::<Vec<_>>())
        .and_then(Summary::of);
    targets.push(Target::new(
        format!("W3 idle CPU ≤ 2 % of a core per 10,000 devices (at {largest} devices)"),
        cpu.map_or("not measured".into(), |s| format!("{:.2} % ({:.2} – {:.2})", s.median, s.min, s.max)),
        cpu.map(|s| s.median <= 2.0),
    ));
    targets.push(ratio_target(
        metrics,
        "W4 resume ≥ 0.9× W0 consume (records/s)",
        "w4.rps",
        "w0.consume_rps",
        |ratio| ratio >= 0.9,
    ));
    let losses = metrics.summary("w4.losses");
    targets.push(Target::new(
        "W4 zero losses",
        losses.map_or("not measured".into(), |s| format!("{} lost at most", format_value(s.max))),
        losses.map(|s| s.max == 0.0),
    ));
    let behind = config.resume_records;
    let catch_up = metrics
        .get("w4.rps")
        .map(|rounds| rounds.values().map(|rps| 100_000.0 / rps).collect::<Vec<_>>())
        .and_then(Summary::of);
    targets.push(seconds_target(
        if behind == 100_000 {
            "W4 a device 100,000 behind caught up in ≤ 10 s".into()
        } else {
            format!(
                "W4 a device 100,000 behind caught up in ≤ 10 s (100,000 / the records/s of a device {behind} behind)"
            )
        },
        catch_up,
        10.0,
    ));
    for (peer, peer_name) in W5_TARGET_PEERS {
        for devices in config.fanout_devices.iter().filter(|&&devices| devices >= 10) {
            targets.push(ratio_target(
                metrics,
                &format!("W5 deliveries/s ≥ 1.0× {peer_name}, {devices} devices (Lockstep / peer)"),
                &format!("w2.d{devices}.deliveries_rps"),
                &format!("{peer}.d{devices}.deliveries_rps"),
                |ratio| ratio >= 1.0,
            ));
        }
        for devices in &config.fanout_devices {
            targets.push(ratio_target(
                metrics,
                &format!(
                    "W5 push→delivery p99 ≤ 1.5× {peer_name}, {devices} {} (Lockstep / peer)",
                    if *devices == 1 { "device" } else { "devices" }
                ),
                &format!("w2.d{devices}.p99_ms"),
                &format!("{peer}.d{devices}.p99_ms"),
                |ratio| ratio <= 1.5,
            ));
        }
        targets.push(ratio_target(
            metrics,
            &format!("W5 resume records/s ≥ 1.0× {peer_name} (Lockstep / peer)"),
            "w4.rps",
            &format!("{peer}.resume.rps"),
            |ratio| ratio >= 1.0,
        ));
    }
    let wake_up = metrics.summary("w6.p99_ms");
    targets.push(Target::new(
        "W6 push → wake-up p99 ≤ 1 s over the Kafka ack, the events topic full",
        wake_up.map_or("not measured".into(), |s| format!("{:.0} ms ({:.0} – {:.0})", s.median, s.min, s.max)),
        wake_up.map(|s| s.median <= 1000.0),
    ));
    let most = metrics.summary("w6.max_wakeups_per_device");
    let missing = metrics.summary("w6.not_woken");
    targets.push(Target::new(
        "W6 one wake-up per device per burst",
        match (most, missing) {
            (Some(most), Some(missing)) => format!(
                "{} at most for one device, {} not woken at most",
                format_value(most.max),
                format_value(missing.max)
            ),
            _ => "not measured".into(),
        },
        most.zip(missing).map(|(most, missing)| most.max <= 1.0 && missing.max == 0.0),
    ));
    let heartbeat = ws::heartbeat_interval().as_secs();
    for records in [1, 300] {
        for (side, what) in [("push", "on the writing device"), ("receive", "on a second device")] {
            targets.push(seconds_target(
                format!(
                    "`lockstep-cli sync` of {records} {} {what} ≤ 1 s wall time (heartbeat interval {heartbeat} s; \
                     issue 18)",
                    if records == 1 { "change" } else { "changes" }
                ),
                metrics.summary(&format!("ws.n{records}.{side}_s")),
                1.0,
            ));
        }
    }
    targets
}

/// W5's peers as the report shows them: metric prefix and section title.
const W5_PEERS_SHOWN: [(&str, &str); 3] = [
    ("w5.redis_always", "W5 peer fan-out: Redis Streams, appendfsync always (equal durability)"),
    ("w5.redis_everysec", "W5 peer fan-out: Redis Streams, appendfsync everysec (may lose the last second)"),
    ("w5.nats", "W5 peer fan-out: NATS JetStream (file storage)"),
];

/// Issue 20's latency tax: Lockstep's push→delivery minus W0's produce→ack, both at the
/// latency rate, taken within a round, then summarised.
fn latency_tax_table(out: &mut String, metrics: &Metrics, config: &Config) {
    let _ = writeln!(
        out,
        "Latency tax: Lockstep push→delivery − W0 produce→ack (W0's open-loop phase, the same rate of {} \
         changes/s), per round, then the median (min – max). Targets at p99: ≤ 1 ms at 1 device, ≤ 3 ms at 10, \
         ≤ 10 ms at 100.\n",
        config.latency_rate
    );
    out.push_str("| devices | tax at p50, ms | tax at p99, ms | p99 target |\n| ---: | ---: | ---: | ---: |\n");
    let cell = |summary: Option<Summary>| {
        summary.map_or("—".into(), |s| format!("{:+.2} ({:+.2} – {:+.2})", s.median, s.min, s.max))
    };
    for &devices in &config.fanout_devices {
        let _ = writeln!(
            out,
            "| {devices} | {} | {} | ≤ {:.0} ms |",
            cell(latency_tax(metrics, devices, "p50")),
            cell(latency_tax(metrics, devices, "p99")),
            tax_limit_ms(devices)
        );
    }
    out.push('\n');
}

/// Where the run's time goes: each workload's wall time per round (set-up included), and each
/// round's, against issue 20's "about 20 minutes" for the whole run.
fn wall_table(out: &mut String, args: &Args, metrics: &Metrics) {
    out.push_str("## Wall time per workload

Seconds per round, from the workload's start to its end, its set-up included (a fresh server or Kafka where it starts its own); the round's own includes starting its Kafka, server and peers.

");
    let mut rows: Vec<(String, String)> =
        args.workloads.iter().map(|workload| (format!("wall.{workload}_s"), format!("{workload}, s"))).collect();
    rows.push(("wall.round_s".into(), "the whole round, s".into()));
    table(out, metrics, &rows);
}

/// Every process the CPU tables know, as `cpu.{what}.{process}_s` names them.
const PROCESSES: [&str; 6] = ["server", "kafka", "redis_always", "redis_everysec", "nats", "bench"];

/// CPU seconds per workload and process; then the CPU per change of the process that
/// served each workload, next to the workload's speed.
fn cpu_tables(out: &mut String, args: &Args, config: &Config, metrics: &Metrics) {
    out.push_str("## CPU seconds per workload and process\n\n");
    let mut settings: Vec<String> = Vec::new();
    for workload in &args.workloads {
        if workload == "w3" {
            continue;
        }
        settings.push(workload.clone());
        if workload == "w2" {
            settings.extend(config.fanout_devices.iter().map(|devices| format!("w2.d{devices}")));
        }
        if workload == "w5" {
            for (prefix, _) in W5_PEERS_SHOWN {
                settings.extend(config.fanout_devices.iter().map(|devices| format!("{prefix}.d{devices}")));
                settings.push(format!("{prefix}.resume"));
            }
        }
    }
    let mut rows = Vec::new();
    for setting in &settings {
        for process in PROCESSES {
            rows.push((format!("cpu.{setting}.{process}_s"), format!("{setting}: {process}")));
        }
    }
    table(out, metrics, &rows);

    out.push_str(
        "## CPU per delivered change\n\nThe CPU of the process that serves the workload (Lockstep's server; for W5 \
         the peer) divided by the changes it delivered to devices (W1: wrote), per round, then the median (min – \
         max); next to the workload's speed. Counted: every change of the workload's phases (saturation and \
         latency; W4 and the resumes: every delivery, duplicates included); the CPU includes the setting's set-up \
         (accounts, pairing, streams opened; W4 its preload's pushes, which `w4.catch_up` leaves out), and /proc \
         counts it in ticks of 10 ms. W1off and W1trace run their own \
         server, whose CPU is not read; W6's CPU is mostly its set-up (accounts, pairing) and is left out.\n\n\
         | workload | process | changes | CPU µs per change | speed |\n| --- | --- | ---: | ---: | ---: |\n",
    );
    let mut lines: Vec<(String, &str, String, String)> = Vec::new();
    if args.workloads.iter().any(|workload| workload == "w1") {
        lines.push(("w1".into(), "server", "w1.changes".into(), "w1.sat_changes_rps".into()));
    }
    if args.workloads.iter().any(|workload| workload == "w2") {
        for devices in &config.fanout_devices {
            let key = format!("w2.d{devices}");
            lines.push((key.clone(), "server", format!("{key}.delivered"), format!("{key}.deliveries_rps")));
        }
    }
    if args.workloads.iter().any(|workload| workload == "w4") {
        lines.push(("w4".into(), "server", "w4.delivered".into(), "w4.rps".into()));
        lines.push(("w4.catch_up".into(), "server", "w4.delivered".into(), "w4.rps".into()));
    }
    if args.workloads.iter().any(|workload| workload == "w5") {
        for (prefix, process) in
            [("w5.redis_always", "redis_always"), ("w5.redis_everysec", "redis_everysec"), ("w5.nats", "nats")]
        {
            for devices in &config.fanout_devices {
                let key = format!("{prefix}.d{devices}");
                lines.push((key.clone(), process, format!("{key}.delivered"), format!("{key}.deliveries_rps")));
            }
            let key = format!("{prefix}.resume");
            lines.push((key.clone(), process, format!("{key}.delivered"), format!("{key}.rps")));
        }
    }
    for (setting, process, changes, speed) in lines {
        let cpu = format!("cpu.{setting}.{process}_s");
        let per_change = Summary::of(metrics.combine(&cpu, &changes, |seconds, count| seconds * 1e6 / count));
        let Some(per_change) = per_change else { continue };
        let speed_unit = if setting.starts_with("w1") {
            "changes/s"
        } else if setting.ends_with("resume") || setting.starts_with("w4") {
            "records/s"
        } else {
            "deliveries/s"
        };
        let _ = writeln!(
            out,
            "| {setting} | {process} | {} | {} ({} – {}) | {} {speed_unit} |",
            metrics.summary(&changes).map_or("—".into(), |s| format_value(s.median)),
            format_value(per_change.median),
            format_value(per_change.min),
            format_value(per_change.max),
            metrics.summary(&speed).map_or("—".into(), |s| format_value(s.median)),
        );
    }
    out.push('\n');
}

/// Per workload, count and mean time of each stage of the server's stage histograms, or a
/// line saying a family is absent.
fn stage_tables(out: &mut String, args: &Args, metrics: &Metrics) {
    out.push_str(
        "## Per-stage timing (the server's `/metrics`)\n\nThe round's server's `/metrics` (admin listener) is \
         scraped before and after each workload that uses it (not W1off, W1trace, W3 or W7, which run their own; W7 scrapes its pushing node); \
         per stage: the observations during the workload and their mean time (histogram sum / count).\n\n",
    );
    for (family, short) in crate::stages::FAMILIES {
        let present = metrics.get(&format!("stages.{short}.present"));
        match present {
            None => {
                let _ = writeln!(out, "- `{family}`: not scraped (no workload used the round's server).\n");
                continue;
            }
            Some(rounds) if rounds.values().all(|&present| present == 0.0) => {
                let _ = writeln!(out, "- `{family}`: absent from `/metrics` (this server does not expose it).\n");
                continue;
            }
            Some(_) => {}
        }
        let _ = writeln!(out, "`{family}`:\n");
        out.push_str("| workload | stage | observations | mean, ms |\n| --- | --- | ---: | ---: |\n");
        // W7 scrapes its pushing node per case (`w7_one_node`, `w7_across_nodes`).
        let names = args.workloads.iter().flat_map(|workload| match workload.to_ascii_lowercase().as_str() {
            "w7" => vec!["w7_one_node".to_string(), "w7_across_nodes".to_string()],
            _ => vec![workload.clone()],
        });
        for workload in names {
            let prefix = format!("stage.{workload}.{short}.");
            for key in metrics.values.keys().filter(|key| key.starts_with(&prefix) && key.ends_with(".count")) {
                let stage = &key[prefix.len()..key.len() - ".count".len()];
                let mean = metrics.summary(&format!("{prefix}{stage}.mean_ms"));
                let _ = writeln!(
                    out,
                    "| {workload} | {stage} | {} | {} |",
                    metrics.summary(key).map_or("—".into(), |s| format_value(s.median)),
                    mean.map_or("—".into(), |s| format!(
                        "{} ({} – {})",
                        format_value(s.median),
                        format_value(s.min),
                        format_value(s.max)
                    )),
                );
            }
        }
        out.push('\n');
    }
}

pub fn render(
    args: &Args,
    config: &Config,
    rounds: usize,
    metrics: &Metrics,
    profiles: &[Profile],
    elapsed: Duration,
    load: &Load,
) -> String {
    let mut out = String::new();
    let date = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    out.push_str("# Benchmarks\n\n");
    let _ = writeln!(
        out,
        "Written by `lockstep-bench` (crate `bench/`) on {date} after {:.0} s. Every figure is the median over \
         {rounds} interleaved round(s) ({}, then again), with the spread (min – max). Ratios are taken within a \
         round, then summarised. This machine is shared and noisy: compare ratios, not absolutes.\n",
        elapsed.as_secs_f64(),
        args.workloads.iter().map(|workload| workload.to_uppercase()).collect::<Vec<_>>().join(", ")
    );
    let command = args.command.clone().unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
    let _ = writeln!(out, "Command: `{command}`\n");
    out.push_str("## Machine\n\n");
    machine::table(&mut out, args, load);

    out.push_str("## Method\n\n");
    let _ = writeln!(
        out,
        "- Each round starts a fresh Apache Kafka, a fresh `lockstep` (release build, default settings, less the \
         abuse limits), two fresh `redis-server`s (`--appendonly yes --save ''`, one with `appendfsync always`, \
         the equal-durability peer, one with `everysec`, measured in a full run's first round only) and a \
         fresh `nats-server` (JetStream on, file storage in a temporary directory, its default \
         `sync_interval` of 2 minutes), all on 127.0.0.1, with the load generator in the same machine. W3 \
         starts its own fresh Kafka (a smoke run: the round's) and server each round and creates its devices \
         there.\n\
         - Kafka: one combined KRaft node (broker and controller in one JVM, the machine table has its heap and \
         JVM options, full JIT), `scripts/kafka/server.properties` (2 network and 2 I/O threads, replication \
         factor 1, 64 MiB segments), its log (`log.dirs`) in a temporary directory on the machine's disk, not a \
         tmpfs. Kafka's default flush policy: no fsync per write (`log.flush.interval.messages` unset), so an \
         acks=all write is acknowledged once it is in the page cache of the one replica. Redis `always` fsyncs \
         its AOF before it answers a write (stricter than this Kafka), `everysec` once a second; JetStream \
         answers a publish once its file store has it, in the page cache.\n\
         - Ciphertext {} bytes. Saturation phases push batches of 100 changes from {} concurrent pushers; W4's \
         preload uses batches of 500.\n\
         - Latency phases are open-loop: message `i` is due at `start + i / rate` and is sent then whatever happened \
         before; latency runs from the due time, so a stall is charged to every message it delayed (no coordinated \
         omission). HDR histograms, 3 significant digits. W0, W2 and W5 latency at {} changes/s for {} s; W1 at half \
         of its measured saturation push rate.\n\
         - W0 uses Lockstep's producer settings (`lockstep_kafka::change_producer_config` with the server's defaults: idempotent, acks=all, linger {} ms, no compression) and the settings \
         of its catch-up readers (fetch.wait.max.ms 100). Its measured phases run on a warm broker, like \
         every workload after it: the same produce and consume run once first on a topic of their own (the \
         warm-up figure in W0's table). W0's produce at saturation runs as long as W1's saturation phases ({} s) \
         and its consume reads as many records as W4's device is behind: a burst of a few tenths of a second \
         (W0's divisor until 2026-12-07) measured librdkafka's queue and the page cache more than Kafka, and \
         swung by a third between rounds.\n\
         - W2/W5 saturation: {} deliveries in total per setting (changes = that / devices, clamped), rate = all \
         deliveries / (last delivery − first push). Devices ack every batch they receive (one ack in flight, newest \
         offset wins).\n\
         - W5 peers, the W2 shape: one stream per user, one consumer per device that acks every batch it reads \
         (up to 256 messages): Redis one consumer group per device (XADD pipelines of 100, XREADGROUP, XACK); NATS \
         one durable pull consumer per device (publishes of 100 awaited for their acks, a pull stream of batches of \
         256, `AckPolicy::All` on each batch's last message).\n\
         - W4: the device is {} changes behind; half-way its stream is dropped without waiting for its acks and it \
         subscribes again from its committed offset; records/s include the reconnection. Redis: the same crash after \
         a read and before its XACK, then the pending entries (`0`) and new ones (`>`). NATS: the same crash; the \
         durable consumer acks explicitly (each message of a batch once the batch is read: under `AckPolicy::All` \
         the first ack after the crash would also ack the crashed batch before it came back) and JetStream \
         redelivers the crashed batch after the consumer's `ack_wait` of {} s.\n\
         - W3: idle devices, {} per user, {} streams per HTTP/2 connection, on a server whose subscription and \
         connection limits are raised to hold them (defaults: 20,000 and 10,000); RSS from /proc/PID/status after \
         {} s of settling, CPU from /proc/PID/stat over {} s (at 100,000, the target's count: one lease \
         interval of the server, 30 s, so that the figure holds exactly one renewal pass of every stream's \
         `DeviceConnected` lease).\n",
        config.payload_bytes,
        config.pushers,
        config.latency_rate,
        config.latency_time.as_secs_f64(),
        lockstep_kafka::KafkaSettings::default().linger_ms,
        config.saturation_time.as_secs(),
        config.fanout_deliveries,
        config.resume_records,
        crate::nats::RESUME_ACK_WAIT.as_secs(),
        100,
        config.streams_per_connection,
        config.settle_time.as_secs(),
        config.cpu_time.as_secs()
    );

    out.push_str(
        "## Targets (issue #20; `sync` wall time: issue 18)\n\nRatios are taken within a round; \"repeats\" is \
         the ratio's spread across rounds, (max − min) / median, against issue 20's 20 %.\n\n| target | figure: \
         median (min – max) | repeats | |\n| --- | --- | --- | --- |\n",
    );
    for target in targets(metrics, config) {
        let verdict = match target.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not measured",
        };
        let _ = writeln!(out, "| {} | {} | {} | {verdict} |", target.name, target.figure, target.repeats);
    }
    out.push('\n');

    let row = |key: &str, label: &str| (key.to_string(), label.to_string());
    out.push_str("## W0 raw: rdkafka → Apache Kafka → rdkafka\n\n");
    table(
        &mut out,
        metrics,
        &[
            row(
                "w0.cold_produce_rps",
                "warm-up: the same produce first on the fresh broker, records/s (not a divisor)",
            ),
            row(
                "w0.burst_produce_rps",
                "a burst: the warm-up's produce again, on the warm broker, records/s (not a divisor)",
            ),
            row("w0.produce_rps", "produce at saturation for as long as W1's, records/s"),
            row("w0.consume_rps", "consume as many records as W4's device is behind, records/s"),
            row("w0.tail_rps", "live: produce at saturation while a consumer tails, records/s consumed"),
            row("w0.p50_ms", "produce→consume p50, ms"),
            row("w0.p99_ms", "produce→consume p99, ms"),
            row("w0.ack_p50_ms", "produce→ack p50 (same schedule), ms"),
            row("w0.ack_p99_ms", "produce→ack p99 (same schedule), ms"),
            row("w0.batch100_ms", "produce 100 records and wait for every ack (median of 30), ms"),
        ],
    );
    out.push_str("## W1 ingest: Push through gRPC\n\n");
    table(
        &mut out,
        metrics,
        &[
            row("w1.sat_changes_rps", "saturation, changes/s"),
            row("w1.sat_pushes_rps", "saturation, pushes/s (100 changes each)"),
            row("w1.sat_users_changes_rps", "saturation with each pusher its own user, changes/s"),
            row("w1.lat_rate_pushes", "latency phase rate, pushes/s"),
            row("w1.p50_ms", "push→ack p50, ms"),
            row("w1.p99_ms", "push→ack p99, ms"),
            row("w1.failed_pushes", "failed pushes"),
            row("w1off.sat_changes_rps", "events off: saturation, changes/s"),
            row("w1off.p50_ms", "events off: push→ack p50, ms"),
            row("w1off.p99_ms", "events off: push→ack p99, ms"),
            row("w1trace.sat_changes_rps", "tracing on (10 %): saturation, changes/s"),
            row("w1trace.p99_ms", "tracing on (10 %): push→ack p99, ms"),
        ],
    );
    for (prefix, title) in W5_PEERS_SHOWN.iter().fold(vec![("w2", "W2 fan-out: Lockstep")], |mut all, peer| {
        all.push(*peer);
        all
    }) {
        let _ = writeln!(out, "## {title}\n");
        if prefix == "w5.redis_everysec" {
            out.push_str(if config.full {
                "In the first round only: no target compares against it, and its settings took about 35 s a round. \
                 Its rows, here, in W5 resume and in the CPU tables, have one round.\n\n"
            } else {
                "Not in a smoke run: its client code is `always`'s, which runs.\n\n"
            });
        }
        let mut rows = Vec::new();
        for devices in &config.fanout_devices {
            let key = format!("{prefix}.d{devices}");
            rows.push((format!("{key}.deliveries_rps"), format!("{devices} devices: deliveries/s")));
            rows.push((format!("{key}.push_rps"), format!("{devices} devices: changes pushed/s meanwhile")));
            rows.push((format!("{key}.p50_ms"), format!("{devices} devices: push→delivery p50, ms")));
            rows.push((format!("{key}.p99_ms"), format!("{devices} devices: push→delivery p99, ms")));
            rows.push((format!("{key}.first_stream_s"), format!("{devices} devices: first stream's first message, s")));
            rows.push((format!("{key}.other_streams_s"), format!("{devices} devices: the other streams', s")));
        }
        table(&mut out, metrics, &rows);
        if prefix == "w2" {
            latency_tax_table(&mut out, metrics, config);
        }
    }
    out.push_str("## W4 resume\n\n");
    table(
        &mut out,
        metrics,
        &[
            row("w4.rps", "Lockstep catch-up, records/s"),
            row("w4.duplicates", "Lockstep duplicates"),
            row("w4.losses", "Lockstep losses"),
            row("w4.ack_window", "Lockstep unacked window at the crash"),
        ],
    );
    out.push_str("The same resume through the W5 peers:\n\n");
    let mut rows = Vec::new();
    for (prefix, title) in W5_PEERS_SHOWN {
        let peer = title.trim_start_matches("W5 peer fan-out: ");
        rows.push((format!("{prefix}.resume.rps"), format!("{peer}: catch-up, records/s")));
        rows.push((format!("{prefix}.resume.duplicates"), format!("{peer}: duplicates")));
        rows.push((format!("{prefix}.resume.losses"), format!("{peer}: losses")));
        rows.push((format!("{prefix}.resume.ack_window"), format!("{peer}: unacked window at the crash")));
    }
    table(&mut out, metrics, &rows);
    out.push_str("## W6 wake-ups: push → wake-up received (lockstep-push, local push service)\n\n");
    let _ = writeln!(
        out,
        "{} users × 10 offline devices with Web Push targets; every user pushes a burst of 100 changes (10 \
         pushes), all users at once. Latency: Kafka's ack of a user's first change → each of its devices' \
         wake-up arriving (VAPID verified, body decrypted) at tests/go/push_service (Go's standard library; the \
         Python push service of the tests answers a few hundred requests a second, which a burst of a thousand \
         wake-ups would measure instead of the worker). Target: p99 ≤ 1 s, \
         1 wake-up per device per burst. W6 runs last in its round, on the broker and the server that the \
         earlier workloads loaded: the events topic (`lockstep.events`) already holds their events, and before \
         the push worker starts W6 writes a prior day's traffic to it: {} events of {} users (3 devices each: \
         added and connected, then appends of 10 changes each followed by the 3 devices' acks, 100 events a \
         user, `at_ms` spread over the last day, no push target), straight to Kafka with the schema's encoder \
         (`lockstep_schemas::encode_event`, key = user id, as the server writes them). The push worker, a new \
         consumer group, reads the whole topic from the start (row \"events already in the topic\") before it \
         acts; so does the server's own follower of the topic.\n",
        config.w6_users,
        format_value(config.w6_backlog_events as f64),
        format_value(config.w6_backlog_events.div_ceil(100) as f64),
    );
    table(
        &mut out,
        metrics,
        &[
            row("w6.backlog_written", "prior day's events written before the worker starts"),
            row("w6.backlog_users", "users of those events"),
            row("w6.backlog_write_s", "writing them, s"),
            row(
                "w6.events_before",
                "events already in the topic when the worker starts (the earlier workloads' and those)",
            ),
            row("w6.worker_acting_s", "push worker start → partitions assigned, s"),
            row("w6.p50_ms", "ack → wake-up p50, ms"),
            row("w6.p99_ms", "ack → wake-up p99, ms"),
            row("w6.max_ms", "ack → wake-up max, ms"),
            row("w6.wakeups_per_device", "wake-ups per device per burst"),
            row("w6.max_wakeups_per_device", "most wake-ups of one device"),
            row("w6.not_woken", "devices not woken"),
            row("w6.unverified", "wake-ups the push service could not verify or decrypt"),
            row("w6.premature", "wake-ups before the burst (devices were caught up)"),
        ],
    );
    if metrics.get("w7.across_nodes.p99_ms").is_some() || metrics.get("w7.one_node.p99_ms").is_some() {
        out.push_str("## W7 across nodes: push → delivery, device A on node 1, device B on node 2\n\n");
        let _ = writeln!(
            out,
            "Two `lockstep` nodes on the round's Kafka sharing a PostgreSQL (accounts) and an events topic. \
             Device A pushes single changes through node 1 at {} changes/s for {} s; device B, of the same \
             account, receives and acks through node 1 (one node), then through node 2 (across nodes: node 2 \
             learns of each change from its LogAppended event and reads it from the user's topic), in the same \
             round. Latency: the change's scheduled push → B receiving it.\n",
            config.latency_rate,
            config.latency_time.as_secs_f64()
        );
        table(
            &mut out,
            metrics,
            &[
                row("w7.one_node.p50_ms", "one node: push → delivery p50, ms"),
                row("w7.one_node.p99_ms", "one node: push → delivery p99, ms"),
                row("w7.across_nodes.p50_ms", "across nodes: push → delivery p50, ms"),
                row("w7.across_nodes.p99_ms", "across nodes: push → delivery p99, ms"),
                row("w7.across_nodes.delivered", "across nodes: changes delivered"),
            ],
        );
    }
    let _ = writeln!(
        out,
        "## WS `lockstep-cli sync` wall time (heartbeat interval {} s, the server's default)\n",
        ws::heartbeat_interval().as_secs()
    );
    let _ = writeln!(
        out,
        "Two devices of one account, each a store of the `lockstep-cli` binary (release build), against the round's \
         server. The writing device imports N records (a 200-character field each), then `lockstep-cli sync` is \
         timed on it (it pushes N changes) and on the second device (it receives them): process start to exit, \
         the median of {} such syncs per round. Before issue 18's fix every sync with something to do took one \
         heartbeat interval.\n",
        config.sync_repeats
    );
    let mut rows = vec![row("ws.idle_s", "sync with nothing to do, s")];
    for records in ws::SIZES {
        rows.push((format!("ws.n{records}.push_s"), format!("{records} changes: sync on the writing device, s")));
        rows.push((format!("ws.n{records}.receive_s"), format!("{records} changes: sync on the second device, s")));
    }
    table(&mut out, metrics, &rows);

    out.push_str("## W3 idle devices\n\n");
    let counts = config.idle_devices.iter().map(|count| format_value(*count as f64)).collect::<Vec<_>>().join(", ");
    if config.idle_devices.contains(&crate::W3_LARGE) {
        let _ = writeln!(
            out,
            "Counts: {counts} (at most `--w3-max-devices`, {}); {} only in the first round (creating the devices \
             and opening their streams takes about 5 minutes on 2 cores), so its rows have one round.\n",
            format_value(config.w3_max_devices as f64),
            format_value(crate::W3_LARGE as f64),
        );
    } else {
        let _ = writeln!(out, "Counts: {counts} (a smoke run: 100,000 is for the full run).\n");
    }
    for note in &metrics.notes {
        let _ = writeln!(out, "- {note}");
    }
    if !metrics.notes.is_empty() {
        out.push('\n');
    }
    let mut rows = vec![row("w3.rss0_kib", "server RSS with the devices created, no stream, KiB")];
    for count in &config.idle_devices {
        rows.push((format!("w3.n{count}.rss_kib"), format!("{count} devices: server RSS, KiB")));
        rows.push((format!("w3.n{count}.per_device_kib"), format!("{count} devices: KiB per device")));
        rows.push((format!("w3.n{count}.cpu_percent"), format!("{count} devices: idle CPU, % of one core")));
        rows.push((format!("w3.n{count}.cpu_window_s"), format!("{count} devices: idle CPU read over, s")));
        rows.push((
            format!("w3.n{count}.first_s"),
            format!("{count} devices: opening each new user's first stream, s"),
        ));
        rows.push((format!("w3.n{count}.open_s"), format!("{count} devices: opening the other new streams, s")));
    }
    table(&mut out, metrics, &rows);

    out.push_str("## WD the dashboard with a large fleet\n\n");
    let count = config.wd_devices;
    if config.full {
        let _ = writeln!(
            out,
            "{} devices of {} users, in the first round only (writing the fleet to Kafka takes about 85 s on 2 \
             cores), so its rows have one round.\n",
            format_value(count as f64),
            format_value(count.div_ceil(crate::dashboard::DEVICES_PER_USER) as f64),
        );
    } else {
        let _ = writeln!(out, "{count} devices (a smoke run: 10,000 is for the full run).\n");
    }
    let rows: Vec<(String, String)> = [
        ("setup_s", "writing the fleet to Kafka (topics, changes, offsets, events), s"),
        ("ready_s", "dashboard start until every device is shown and two refreshes ran, s"),
        ("page_ms", "the page (summary + 500 worst rows), ms"),
        ("page_all_rows_ms", "the page with every row, ms"),
        ("api_ms", "/api/v1/devices (every device), ms"),
        ("refresh_s", "one Kafka refresh (watermarks, offsets, record times), s"),
        ("rss_ready_kib", "dashboard RSS once it shows the fleet, KiB"),
        ("rss_kib", "dashboard RSS, KiB (max while serving the page and the API)"),
    ]
    .iter()
    .map(|(key, label)| (format!("wd.n{count}.{key}"), format!("{count} devices: {label}")))
    .collect();
    table(&mut out, metrics, &rows);

    cpu_tables(&mut out, args, config, metrics);
    stage_tables(&mut out, args, metrics);
    wall_table(&mut out, args, metrics);

    if !profiles.is_empty() {
        out.push_str("## Where the server's time goes (`perf record -g` of `lockstep` in an extra round whose figures are not counted)\n\n");
        for profile in profiles {
            let _ = writeln!(
                out,
                "### {}\n\nBy thread:\n\n```\n{}\n```\n\nBy symbol (self time):\n\n```\n{}\n```\n",
                profile.name, profile.by_thread, profile.by_symbol
            );
        }
    }
    if !metrics.failures.is_empty() {
        out.push_str("## Failures\n\n");
        for failure in &metrics.failures {
            let _ = writeln!(out, "- {}", failure.replace('\n', " "));
        }
        out.push('\n');
    }
    let analysis = Path::new(env!("CARGO_MANIFEST_DIR")).join("ANALYSIS.md");
    if let Ok(text) = std::fs::read_to_string(&analysis) {
        out.push_str("## Analysis (bench/ANALYSIS.md, written by hand from the measurements)\n\n");
        out.push_str(text.trim());
        out.push('\n');
    }
    out
}
