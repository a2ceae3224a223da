//! `lockstep-bench`: starts Kafka, Lockstep, Redis and NATS, drives them on an
//! open-loop schedule, repeats each workload in interleaved rounds and writes
//! BENCHMARKS.md. Not part of the test suite; run it with `scripts/bench`.

mod client;
mod dashboard;
mod lockstep;
mod machine;
mod nats;
mod peer;
mod procs;
mod profile;
mod report;
mod stages;
mod stats;
mod w0;
mod w6;
mod ws;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::Parser;

use crate::{
    procs::{Nats, Redis},
    stats::Metrics,
};

#[derive(Parser, Debug)]
#[command(
    about = "Benchmarks Lockstep against raw Apache Kafka, Redis Streams and NATS JetStream; writes BENCHMARKS.md"
)]
pub struct Args {
    /// Scaled-down counts and durations, one round, no profile round: a smoke run of about a minute.
    #[arg(long)]
    pub quick: bool,
    /// Rounds; each runs every workload once, in order (default 3, 1 with --quick).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Workloads to run, in this order within each round (case does not matter: `W7` is `w7`).
    #[arg(long, value_delimiter = ',', default_value = "w0,w1,w1off,w1trace,w2,w4,w3,w5,wd,w6,ws,w7")]
    pub workloads: Vec<String>,
    /// Where the report goes.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// The lockstep server binary (a release build).
    #[arg(long, env = "LOCKSTEP_BIN", default_value = "target/release/lockstep")]
    pub lockstep_bin: PathBuf,
    /// The push worker binary (a release build), for W6.
    #[arg(long, env = "LOCKSTEP_PUSH_BIN", default_value = "target/release/lockstep-push")]
    pub push_bin: PathBuf,
    /// The dashboard binary (a release build), for WD.
    #[arg(long, env = "LOCKSTEP_DASHBOARD_BIN", default_value = "target/release/lockstep-dashboard")]
    pub dashboard_bin: PathBuf,
    /// The command-line client binary (a release build), for WS.
    #[arg(long, env = "LOCKSTEP_CLI_BIN", default_value = "target/release/lockstep-cli")]
    pub cli_bin: PathBuf,
    #[arg(long, env = "REDIS_SERVER_BIN", default_value = "redis-server")]
    pub redis_bin: PathBuf,
    /// `nats-server` (2.9 or later, JetStream), the other W5 peer.
    #[arg(long, env = "NATS_SERVER_BIN", default_value = "nats-server")]
    pub nats_bin: PathBuf,
    /// Changes per second of the open-loop latency phases of W0, W2 and W5.
    #[arg(long, default_value_t = 200.0)]
    pub latency_rate: f64,
    /// HTTP/2 streams per client connection in W3 (the server allows 64).
    #[arg(long, default_value_t = 50)]
    pub streams_per_connection: usize,
    /// Skip the extra round (not counted) that profiles the server with `perf` during W1, W2 and W4.
    #[arg(long, conflicts_with = "profile")]
    pub no_profile: bool,
    /// Run that profile round with `--quick` too (a full run has it unless `--no-profile`).
    #[arg(long)]
    pub profile: bool,
    /// The most idle devices W3 opens (the full run goes to 100,000 in its first round only).
    #[arg(long, default_value_t = 100_000)]
    pub w3_max_devices: usize,
    /// The command line to print in the report (scripts/bench passes its own).
    #[arg(long)]
    pub command: Option<String>,
}

/// W3's largest count of idle devices, measured in the first round only.
pub const W3_LARGE: usize = 100_000;
/// WD's fleet in a full run, written and measured in the first round only.
pub const WD_LARGE: usize = 10_000;

/// Sizes and durations of one run.
#[derive(Clone, Debug)]
pub struct Config {
    /// A full run (not `--quick`): its largest settings run in the first round only.
    pub full: bool,
    pub payload_bytes: usize,
    pub latency_rate: f64,
    pub latency_time: Duration,
    pub saturation_time: Duration,
    pub pushers: usize,
    pub w0_records: u64,
    pub fanout_deliveries: u64,
    pub fanout_devices: Vec<usize>,
    pub resume_records: u64,
    pub idle_devices: Vec<usize>,
    /// W3 stops below this many idle devices (`--w3-max-devices`).
    pub w3_max_devices: usize,
    pub settle_time: Duration,
    pub cpu_time: Duration,
    pub fanout_records: u64,
    pub streams_per_connection: usize,
    /// W6: users with 10 offline devices each.
    pub w6_users: usize,
    /// W6: events of a prior day written to the events topic before the worker starts.
    pub w6_backlog_events: usize,
    /// W6: the quiet before the burst (the worker reads the devices' acks and targets) and
    /// after the last wake-up (room for duplicates to show, well under the worker's min_interval).
    pub w6_quiet: Duration,
    /// WD: devices of the dashboard's fleet.
    pub wd_devices: usize,
    /// WS: timed syncs per record count and round (the round's figure is their median).
    pub sync_repeats: usize,
}

impl Config {
    fn new(args: &Args) -> Self {
        let full = !args.quick;
        Self {
            full,
            payload_bytes: 1024,
            latency_rate: args.latency_rate,
            latency_time: Duration::from_millis(if full { 8_000 } else { 500 }),
            saturation_time: Duration::from_secs(if full { 5 } else { 1 }),
            pushers: 4,
            w0_records: if full { 30_000 } else { 5_000 },
            fanout_deliveries: if full { 300_000 } else { 30_000 },
            fanout_devices: vec![1, 10, 100],
            resume_records: if full { 100_000 } else { 10_000 },
            idle_devices: if full { vec![1_000, 10_000, W3_LARGE] } else { vec![100, 500] },
            w3_max_devices: args.w3_max_devices,
            settle_time: Duration::from_secs(if full { 2 } else { 1 }),
            cpu_time: Duration::from_secs(if full { 10 } else { 1 }),
            fanout_records: 0,
            streams_per_connection: args.streams_per_connection.clamp(1, 64),
            w6_users: if full { 100 } else { 20 },
            w6_backlog_events: if full { 500_000 } else { 20_000 },
            w6_quiet: Duration::from_secs(if full { 3 } else { 1 }),
            wd_devices: if full { WD_LARGE } else { 200 },
            sync_repeats: if full { 3 } else { 1 },
        }
    }

    /// W3's idle device counts in `round`: the largest one (about 5 minutes: creating the
    /// devices and opening their streams) only in the first round, to keep the full run
    /// near 20 minutes on 2 cores.
    pub fn idle_devices_in_round(&self, round: usize) -> Vec<usize> {
        self.idle_devices
            .iter()
            .copied()
            .filter(|&count| count <= self.w3_max_devices && (round == 0 || count < W3_LARGE))
            .collect()
    }

    /// Whether WD runs in `round`: the full run's 10,000 devices (about 100 s, most of it writing
    /// the fleet to Kafka) only in the first round, like W3's largest count. WD has no target of
    /// issue 20 that a median over rounds would serve.
    pub fn wd_in_round(&self, round: usize) -> bool {
        round == 0 || !self.full
    }

    /// Whether W5 measures Redis with `appendfsync everysec` in `round`: a full run's first round
    /// only (about 35 s a round; the targets compare against `always` and NATS, so its figures are
    /// context, and one round of them is enough), and not in a smoke run (the same client code as
    /// `always`, which it runs).
    pub fn everysec_in_round(&self, round: usize) -> bool {
        round == 0 && self.full
    }

    /// Changes pushed in W2/W5 saturation with `devices` subscribers.
    pub fn with_devices(&self, devices: usize) -> Self {
        let mut config = self.clone();
        let ceiling = if self.fanout_deliveries >= 300_000 { 20_000 } else { 2_000 };
        config.fanout_records = (self.fanout_deliveries / devices as u64).clamp(ceiling / 10, ceiling);
        config
    }

    pub fn latency_count(&self) -> u64 {
        (self.latency_rate * self.latency_time.as_secs_f64()).ceil().max(10.0) as u64
    }
}

/// W5's peers, each its own process (so that the CPU table tells them apart).
struct Peers {
    redis_always: Redis,
    redis_everysec: Redis,
    nats: Nats,
}

/// W5: the W2 fan-out at each device count and the W4 resume, against each
/// peer in turn; a failure is recorded and the next setting runs. Redis with
/// `everysec`, which no target compares against, runs in the first round only
/// ([`Config::everysec_in_round`]).
async fn w5(peers: &Peers, config: &Config, processes: &[(&'static str, u32)], round: usize, metrics: &mut Metrics) {
    let mut redis = vec![("w5.redis_always", &peers.redis_always.url)];
    if config.everysec_in_round(round) {
        redis.push(("w5.redis_everysec", &peers.redis_everysec.url));
    }
    for &devices in &config.fanout_devices {
        let devices_config = config.with_devices(devices);
        for &(prefix, url) in &redis {
            let cpu = procs::CpuSnapshot::take(processes);
            let outcome = peer::fanout(url, prefix, &devices_config, devices, round, metrics).await;
            cpu.record(metrics, round, &format!("{prefix}.d{devices}"));
            if let Err(error) = outcome {
                metrics.failures.push(format!("round {} {prefix} ({devices} devices): {error:#}", round + 1));
            }
        }
        let cpu = procs::CpuSnapshot::take(processes);
        let outcome = nats::fanout(&peers.nats.url, &devices_config, devices, round, metrics).await;
        cpu.record(metrics, round, &format!("w5.nats.d{devices}"));
        if let Err(error) = outcome {
            metrics.failures.push(format!("round {} w5.nats ({devices} devices): {error:#}", round + 1));
        }
    }
    for &(prefix, url) in &redis {
        let cpu = procs::CpuSnapshot::take(processes);
        let outcome = peer::resume(url, prefix, config, round, metrics).await;
        cpu.record(metrics, round, &format!("{prefix}.resume"));
        if let Err(error) = outcome {
            metrics.failures.push(format!("round {} {prefix} resume: {error:#}", round + 1));
        }
    }
    let cpu = procs::CpuSnapshot::take(processes);
    let outcome = nats::resume(&peers.nats.url, config, round, metrics).await;
    cpu.record(metrics, round, "w5.nats.resume");
    if let Err(error) = outcome {
        metrics.failures.push(format!("round {} w5.nats resume: {error:#}", round + 1));
    }
}

/// W7: two nodes of one cluster on the round's Kafka (their accounts in a PostgreSQL of their
/// own, an events topic of their own): push → delivery with both devices on one node, then with
/// the pushing device on node 1 and the receiving one on node 2, in the same round.
async fn w7(
    binary: &std::path::Path,
    kafka: &str,
    config: &Config,
    round: usize,
    metrics: &mut Metrics,
) -> anyhow::Result<()> {
    let postgres = tokio::task::spawn_blocking(lockstep_testkit::postgres::Postgres::start).await??;
    let url = postgres.new_database()?;
    let topic = format!("lockstep.events.w7-{}-{round}", std::process::id());
    let node1 = procs::start_cluster_node(binary, kafka, &url, &topic).await?;
    let node2 = procs::start_cluster_node(binary, kafka, &url, &topic).await?;
    // Where the pushing node's time goes, per case (`stage.w7_<case>.push.*`).
    for (receiving, name) in [(&node1, "one_node"), (&node2, "across_nodes")] {
        let snapshot = stages::StageSnapshot::take(node1.admin_addr()).await;
        lockstep::w7(&node1, receiving, name, config, round, metrics).await?;
        snapshot.record(metrics, round, &format!("w7_{name}")).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::new(&args);
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 });
    let started = Instant::now();
    let load_at_start = procs::load_average();
    let mut metrics = Metrics::default();
    let mut profiles = Vec::new();
    // A smoke run has no profile round unless asked for: it is there to show that every workload runs.
    let profile_round = (args.profile || !(args.quick || args.no_profile))
        && procs::command_line("perf", &["--version"]).starts_with("perf");
    let mut discarded = Metrics::default();
    for round in 0..rounds + usize::from(profile_round) {
        let profiling = round == rounds;
        let metrics = if profiling { &mut discarded } else { &mut metrics };
        if profiling {
            eprintln!("== profile round (perf record of the server; its figures are not counted)");
        } else {
            eprintln!("== round {} of {rounds}", round + 1);
        }
        let round_started = Instant::now();
        let kafka = procs::start_kafka().await?;
        let server = procs::start_lockstep(&args.lockstep_bin, kafka.bootstrap()).await?;
        let peers = if args.workloads.iter().any(|w| w == "w5") {
            Some(Peers {
                redis_always: Redis::start(&args.redis_bin, "always").await?,
                redis_everysec: Redis::start(&args.redis_bin, "everysec").await?,
                nats: Nats::start(&args.nats_bin).await?,
            })
        } else {
            None
        };
        let processes = [
            ("server", server.pid()),
            ("kafka", kafka.pid()),
            ("redis_always", peers.as_ref().map_or(0, |peers| peers.redis_always.pid())),
            ("redis_everysec", peers.as_ref().map_or(0, |peers| peers.redis_everysec.pid())),
            ("nats", peers.as_ref().map_or(0, |peers| peers.nats.pid())),
            ("bench", std::process::id()),
        ];
        for workload in args.workloads.iter().map(|workload| workload.to_ascii_lowercase()) {
            if profiling && !matches!(workload.as_str(), "w1" | "w2" | "w4") {
                continue;
            }
            if workload == "wd" && !config.wd_in_round(round) {
                eprintln!("  wd: its fleet of {} devices runs in the first round only", config.wd_devices);
                continue;
            }
            eprintln!("  {workload}");
            let workload_started = Instant::now();
            // Per-stage histograms of the round's server (W1off, W1trace, W3 and W7 run their own).
            let stage_server = !matches!(workload.as_str(), "w1off" | "w1trace" | "w3" | "w7");
            let stage_snapshot = stages::StageSnapshot::take(server.admin_addr().filter(|_| stage_server)).await;
            let cpu = procs::CpuSnapshot::take(&processes);
            let outcome: anyhow::Result<()> = match workload.as_str() {
                "w0" => w0::run(kafka.bootstrap(), &config, round, metrics).await,
                "w1" => {
                    let profiler = profile::Profiler::start_if(profiling, server.pid(), "w1");
                    let outcome = lockstep::w1(&server, "w1", &config, round, metrics).await;
                    profiles.extend(profiler.map(profile::Profiler::finish));
                    outcome
                }
                // W1 again against a second server on the same Kafka with events off: the events' cost.
                // W1 against a server exporting traces (10 % sampled) to a real OTLP receiver.
                "w1trace" => match procs::OtlpReceiver::start().await {
                    Ok(receiver) => {
                        match procs::start_lockstep_tracing(&args.lockstep_bin, kafka.bootstrap(), &receiver.endpoint)
                            .await
                        {
                            Ok(traced) => lockstep::w1(&traced, "w1trace", &config, round, metrics).await,
                            Err(error) => Err(error),
                        }
                    }
                    Err(error) => Err(error),
                },
                "w1off" => match procs::start_lockstep_without_events(&args.lockstep_bin, kafka.bootstrap()).await {
                    Ok(without_events) => lockstep::w1(&without_events, "w1off", &config, round, metrics).await,
                    Err(error) => Err(error),
                },
                "w2" => {
                    for &devices in &config.fanout_devices {
                        let profiler = profile::Profiler::start_if(profiling, server.pid(), &format!("w2-{devices}"));
                        let setting = procs::CpuSnapshot::take(&processes);
                        let outcome =
                            lockstep::w2(&server, &config.with_devices(devices), devices, round, metrics).await;
                        setting.record(metrics, round, &format!("w2.d{devices}"));
                        profiles.extend(profiler.map(profile::Profiler::finish));
                        if let Err(error) = outcome {
                            metrics.failures.push(format!("round {} w2 ({devices} devices): {error:#}", round + 1));
                        }
                    }
                    Ok(())
                }
                "w4" => {
                    let profiler = profile::Profiler::start_if(profiling, server.pid(), "w4");
                    let outcome = lockstep::w4(&server, &config, round, metrics).await;
                    profiles.extend(profiler.map(profile::Profiler::finish));
                    outcome
                }
                "w6" => w6::run(&server, &args.push_bin, kafka.bootstrap(), &config, round, metrics).await,
                "ws" => ws::run(&server, &args.cli_bin, &config, round, metrics).await,
                "w7" => w7(&args.lockstep_bin, kafka.bootstrap(), &config, round, metrics).await,
                "wd" => dashboard::wd(&kafka, &args.dashboard_bin, config.wd_devices, round, metrics).await,
                "w3" => {
                    // A full run gives W3 a Kafka of its own; a smoke run saves its start (about 5 s).
                    let shared_kafka = args.quick.then_some(&kafka);
                    let counts = config.idle_devices_in_round(round);
                    lockstep::w3(&args.lockstep_bin, shared_kafka, &config, &counts, round, metrics).await
                }
                "w5" => match &peers {
                    Some(peers) => {
                        w5(peers, &config, &processes, round, metrics).await;
                        Ok(())
                    }
                    None => Ok(()),
                },
                other => Err(anyhow::anyhow!("unknown workload {other}")),
            };
            if workload != "w3" {
                cpu.record(metrics, round, &workload);
            }
            stage_snapshot.record(metrics, round, &workload).await;
            metrics.add(round, &format!("wall.{workload}_s"), workload_started.elapsed().as_secs_f64());
            if let Err(error) = outcome {
                eprintln!("  {workload} failed: {error:#}");
                metrics.failures.push(format!("round {} {workload}: {error:#}", round + 1));
            }
        }
        if let Ok(rss) = procs::rss_kib(server.pid()) {
            metrics.add(round, "server.rss_after_round_kib", rss as f64);
        }
        metrics.add(round, "wall.round_s", round_started.elapsed().as_secs_f64());
    }
    let elapsed = started.elapsed();
    let load = machine::Load { start: load_at_start, end: procs::load_average() };
    let text = report::render(&args, &config, rounds, &metrics, &profiles, elapsed, &load);
    std::fs::write(&args.out, text)?;
    eprintln!("wrote {} after {:.0} s", args.out.display(), elapsed.as_secs_f64());
    Ok(())
}
