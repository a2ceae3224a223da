//! The fault suite: the real `lockstep` binary and a real Apache Kafka
//! under faults, while simulated devices push, receive and ack. Every run is
//! checked by the history checker (`lockstep_e2e::history`: I1, I2, I4, I5
//! and "once") and by what a run must show (`lockstep_e2e::outcome`: enough
//! planned changes acknowledged, the log and every device holding them, each
//! fault's evidence that it hit), and prints one line (shape only, then a
//! line per fault window with its evidence):
//!
//! `fault=kafka-kill9 seed=3 ops=412 planned=396 acked=380 delivered=383/383 errors=32 faults=2 I1=ok I2=ok I4=ok I5=ok once=ok unwritten=3 log=383 secs=21`
//!
//! Faults: Kafka `kill -9` during pushes and during delivery; the link
//! between Lockstep and Kafka cut, partitioned without resets, or slowed by
//! seconds (a proxy: the broker advertises the proxy's port); the server `kill -9`
//! during pushes; Kafka's data on a small tmpfs that fills up; and a baseline
//! without faults (what fails there is no fault's doing). Plus two contracts: with Kafka
//! unreachable, Push, Ack and Subscribe answer UNAVAILABLE within their
//! deadline; after an outage that timed pushes out, pushes succeed again within
//! seconds of Kafka's return, without restarting Lockstep.
//!
//! Seeds (they pick timings, counts and sizes): `LOCKSTEP_FAULT_SEEDS=N` runs
//! seeds 1..=N of each fault (default 2), `LOCKSTEP_FAULT_SEED=K` seed K only.
//! `scripts/soak` runs many and prints every summary line.

use std::{
    io::Write,
    path::Path,
    time::{Duration, Instant},
};

use lockstep_e2e::{
    device::{change, changes},
    fault_run::{Run, Scenario, StackOptions, fault_settings, judge},
    history::PushOutcome,
    outcome::{Expect, Fault},
    wait::eventually,
    workload::{Plan, SimDevice},
};
use lockstep_proto::v1::subscribe_response::Event;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::Code;

/// The client deadline the contract tests give each call.
const CLIENT_DEADLINE: Duration = Duration::from_secs(30);

/// Devices that push for a few seconds.
fn pushing_plan() -> Plan {
    Plan { batches_per_device: 40, pause_ms: 30..150, ..Plan::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fault_baseline_with_devices_reconnecting() -> anyhow::Result<()> {
    // The same workload without faults, devices dropping and reopening their
    // streams while others push: whatever fails here is no fault's doing.
    let plan = Plan { reconnect_ms: Some(100..800), ..pushing_plan() };
    let mut scenario = Scenario::new("no_fault_baseline_with_devices_reconnecting", "none", 4, plan);
    // Nothing fails without faults: every planned change is acknowledged.
    scenario.expect = Expect { min_acknowledged_share: 1.0, faults: false };
    scenario
        .run(async |run: &mut Run| {
            run.start_workload();
            Ok(())
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_kill9_during_pushes() -> anyhow::Result<()> {
    Scenario::new("kafka_kill9_during_pushes", "kafka-kill9", 3, pushing_plan())
        .run(async |run: &mut Run| {
            run.start_workload();
            run.fault_rounds(1..=2, 300..1500, 1000..4000, Run::kill_kafka, Run::restart_kafka).await
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_kill9_during_delivery() -> anyhow::Result<()> {
    // Small batches applied slowly: the devices catch up for a few seconds.
    let plan =
        Plan { batches_per_device: 8, apply_delay: Duration::from_millis(15), pause_ms: 50..200, ..Plan::default() };
    let mut scenario = Scenario::new("kafka_kill9_during_delivery", "kafka-kill9-delivery", 3, plan);
    scenario.options.settings.push(("LOCKSTEP_DELIVERY__BATCH_MAX_CHANGES", "20"));
    scenario
        .run(async |run: &mut Run| {
            let backlog = run.rng.random_range(1000..2000);
            run.plan_changes(backlog);
            for batch in changes(backlog, 128).chunks(250) {
                let offsets = run.devices[0].push_with_retries(batch, Duration::from_secs(30), &mut run.rng).await;
                anyhow::ensure!(offsets.iter().all(Option::is_some), "the backlog was not written before the faults");
            }
            run.start_workload();
            run.fault_rounds(1..=2, 200..1500, 1000..4000, Run::kill_kafka, Run::restart_kafka).await
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_to_kafka_cut_and_restored() -> anyhow::Result<()> {
    Scenario::new("link_to_kafka_cut_and_restored", "link-cut", 3, pushing_plan())
        .behind_proxy()
        .run(async |run: &mut Run| {
            run.start_workload();
            run.fault_rounds(1..=2, 300..1500, 2000..6000, Run::cut_link, Run::restore_link_now).await
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_to_kafka_partitioned_without_resets() -> anyhow::Result<()> {
    // Open connections go silent instead of closing: only the server's own
    // timeouts can notice. Devices reconnect now and then, so new streams need
    // Kafka during the partition too.
    let plan = Plan { reconnect_ms: Some(1000..3000), ..pushing_plan() };
    Scenario::new("link_to_kafka_partitioned_without_resets", "link-partition", 3, plan)
        .behind_proxy()
        .run(async |run: &mut Run| {
            run.start_workload();
            run.fault_rounds(1..=2, 300..1500, 2000..8000, Run::freeze_link, Run::restore_link_now).await
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_to_kafka_slowed_by_seconds() -> anyhow::Result<()> {
    Scenario::new("link_to_kafka_slowed_by_seconds", "link-slow", 3, pushing_plan())
        .behind_proxy()
        .run(async |run: &mut Run| {
            run.start_workload();
            run.pause(300..1000).await;
            // Each way, so a request waits twice this: around the 3 s produce timeout.
            let delay = Duration::from_millis(run.rng.random_range(1000..3000));
            run.slow_link(delay).await;
            run.pause(3000..8000).await;
            run.restore_link();
            Ok(())
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_kill9_during_pushes() -> anyhow::Result<()> {
    Scenario::new("server_kill9_during_pushes", "server-kill9", 4, pushing_plan())
        .run(async |run: &mut Run| {
            run.start_workload();
            run.fault_rounds(2..=3, 300..1500, 200..1000, Run::kill_server, Run::restart_server).await
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_kill9_and_restart_while_kafka_is_down() -> anyhow::Result<()> {
    // A server restarted during a Kafka outage serves once Kafka returns (it waits
    // for Kafka before it listens: devices meanwhile see connections refused).
    Scenario::new("server_kill9_and_restart_while_kafka_is_down", "server-kill9-kafka-down", 3, pushing_plan())
        .behind_proxy()
        .run(async |run: &mut Run| {
            run.start_workload();
            run.pause(300..1500).await;
            let killed = run.rng.random_bool(0.5);
            match killed {
                true => run.kill_kafka().await,
                false => run.cut_link().await,
            }
            run.pause(500..1500).await;
            run.kill_server().await;
            run.pause(200..800).await;
            run.timeline("server restarting, kafka still away");
            let kafka_away = Duration::from_millis(run.rng.random_range(1000..4000));
            let (server, kafka, proxy) = (&mut run.stack.server, &mut run.stack.kafka, run.stack.proxy.as_ref());
            let kafka_back = async {
                // The outage's length, the seed's pick: the server must wait it out.
                tokio::time::sleep(kafka_away).await;
                match (killed, proxy) {
                    (true, _) => kafka.restart().await?,
                    (false, Some(proxy)) => proxy.restore(),
                    (false, None) => anyhow::bail!("no proxy"),
                }
                anyhow::Ok(Instant::now())
            };
            let (restarted, back) = tokio::join!(server.restart(), kafka_back);
            let listening_after = back?.elapsed();
            restarted?;
            run.timeline(&format!("restored: kafka back, the server listening {listening_after:.1?} later"));
            Ok(())
        })
        .await
}

/// Fills the filesystem of `dir` with a ballast file, leaving about `leave` bytes.
fn fill_leaving(dir: &Path, leave: u64) -> std::io::Result<u64> {
    let path = dir.join("ballast");
    let mut file = std::fs::File::create(&path)?;
    let chunk = vec![0xA5u8; 1 << 20];
    loop {
        match file.write_all(&chunk) {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(28) => break, // ENOSPC
            Err(error) => return Err(error),
        }
    }
    let keep = file.metadata()?.len().saturating_sub(leave);
    file.set_len(keep)?;
    Ok(keep)
}

/// Needs a tmpfs it can mount (root or CAP_SYS_ADMIN); where it cannot, it
/// fails unless `LOCKSTEP_ALLOW_SKIP=kafka_disk_fills_up` lets it skip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_disk_fills_up() -> anyhow::Result<()> {
    let plan = Plan { batches_per_device: 40, ciphertext_bytes: 8 * 1024, pause_ms: 10..60, ..Plan::default() };
    let mut scenario = Scenario::new("kafka_disk_fills_up", "kafka-disk-full", 3, plan);
    scenario.options.storage_tmpfs_mib = Some(32);
    scenario
        .run(async |run: &mut Run| {
            let leave = run.rng.random_range(1..4) << 20;
            let ballast = fill_leaving(run.stack.kafka.storage_dir(), leave)?;
            run.notes.push(format!("ballast {} MiB, about {} MiB left", ballast >> 20, leave >> 20));
            // The window opens before the first push: every error of it counts.
            run.fault(Fault::DiskFull, "pushing onto the nearly full disk").await;
            run.start_workload();
            // Push until the disk is full and pushes fail (or 30 s); the window
            // check fails the run if none did, so the wait's own failure is not needed.
            let history = run.history.clone();
            let _ = eventually(Duration::from_secs(30), "a push failing on the full disk", || async {
                history.stats().errors > 0
            })
            .await;
            let failed_while_full = run.history.stats().errors;
            run.notes.push(format!("{failed_while_full} errors when the disk filled"));
            run.pause(1000..3000).await;
            run.end_fault().await;
            // Space freed; Kafka carries on by itself, or is restarted on it.
            std::fs::remove_file(run.stack.kafka.storage_dir().join("ballast"))?;
            if run.rng.random_bool(0.5) {
                run.stack.kafka.restart().await?;
                run.timeline("restored: space freed, Kafka restarted");
            } else {
                run.timeline("restored: space freed, Kafka not restarted");
            }
            Ok(())
        })
        .await
}

/// What a call answered and how long it took.
fn describe(code: Result<(), Code>, elapsed: Duration) -> String {
    match code {
        Ok(()) => format!("OK after {elapsed:.1?}"),
        Err(code) => format!("{code:?} after {elapsed:.1?}"),
    }
}

/// The first message of a new stream, or the error that ended it, within the client deadline.
async fn first_stream_answer(device: &SimDevice) -> Result<(), Code> {
    let opened = tokio::time::timeout(CLIENT_DEADLINE, async {
        let mut stream = device.subscribe(false).await?;
        match stream.message().await? {
            Some(message) => Ok(message.event),
            None => Err(tonic::Status::unknown("stream ended without a status")),
        }
    })
    .await;
    match opened {
        Err(_) => Err(Code::DeadlineExceeded),
        Ok(Err(status)) => Err(status.code()),
        Ok(Ok(Some(Event::Resync(_)))) => Err(Code::FailedPrecondition),
        Ok(Ok(_)) => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_kafka_unreachable_push_ack_and_subscribe_answer_unavailable_within_their_deadline() -> anyhow::Result<()>
{
    // The server's own settings (default Kafka timeouts): what production does.
    let plan = Plan { call_timeout: CLIENT_DEADLINE, ..Plan::default() };
    let options = StackOptions { behind_proxy: true, ..Default::default() };
    let mut run = Run::start("kafka-unreachable", 0, options, 4, &plan).await?;
    // Each change is retried until written: all of them must be acknowledged.
    run.expect.min_acknowledged_share = 1.0;
    let mut rng = StdRng::seed_from_u64(0);
    let before = changes(10, 64);
    run.plan_changes(before.len());
    anyhow::ensure!(
        run.devices[0].push_with_retries(&before, Duration::from_secs(30), &mut rng).await.iter().all(Option::is_some)
    );

    let mut problems = Vec::new();
    let mut failed_pushes = Vec::new();
    let messages = std::sync::Mutex::new(Vec::new());
    for outage in ["link cut", "link frozen", "kafka killed"] {
        match outage {
            "link cut" => run.cut_link().await,
            "link frozen" => run.freeze_link().await,
            _ => run.kill_kafka().await,
        }
        // Devices 1..3 never subscribed nor acked successfully: the server knows nothing about them
        // that it did not read from Kafka.
        let pushed = vec![change("during-outage", 64)];
        run.plan_changes(pushed.len());
        let started = Instant::now();
        let (push, ack, subscribe) = tokio::join!(
            async {
                let outcome = run.devices[1].push_once(&pushed, false).await;
                let code = match &outcome[0] {
                    PushOutcome::Written { .. } => Ok(()),
                    PushOutcome::Failed { code, .. } | PushOutcome::CallFailed { code, .. } => Err(*code),
                };
                (code, started.elapsed())
            },
            async {
                let acked = run.devices[2].ack(3).await.map(|_| ()).map_err(|status| {
                    messages.lock().unwrap().push(status.message().to_string());
                    status.code()
                });
                (acked, started.elapsed())
            },
            async { (first_stream_answer(&run.devices[3]).await, started.elapsed()) },
        );
        // What the device reads names no internal address: Kafka's (behind the proxy
        // here, on 127.0.0.1) or the group-offset client's.
        for message in messages.lock().unwrap().drain(..) {
            if message.contains("127.0.0.1") || !message.contains("(ref ") {
                problems.push(format!("{outage}: Ack's message {message:?} shows an address or lacks a log reference"));
            }
        }
        failed_pushes.push(pushed);
        let line = format!(
            "kafka-unreachable ({outage}): Push {}, Ack {}, Subscribe {}",
            describe(push.0, push.1),
            describe(ack.0, ack.1),
            describe(subscribe.0, subscribe.1)
        );
        println!("{line}");
        for (call, (code, elapsed)) in [("Push", push), ("Ack", ack), ("Subscribe", subscribe)] {
            if code != Err(Code::Unavailable) || elapsed >= CLIENT_DEADLINE {
                problems.push(format!(
                    "{outage}: {call} answered {} (want UNAVAILABLE within {CLIENT_DEADLINE:?})",
                    describe(code, elapsed)
                ));
            }
        }
        match outage {
            "kafka killed" => run.restart_kafka().await?,
            _ => run.restore_link(),
        }
        // Kafka is back: the device retries its change until it is written.
        let offsets = run.devices[1]
            .push_with_retries(&failed_pushes[failed_pushes.len() - 1], Duration::from_secs(60), &mut rng)
            .await;
        if offsets.iter().any(Option::is_none) {
            problems.push(format!(
                "{outage}: the change pushed during the outage was not written within 60 s of Kafka's return"
            ));
        }
    }
    // Everything acknowledged reaches every device.
    run.start_subscribers();
    let verdict = run.finish().await?;
    if !verdict.ok {
        problems.push(format!("{}\n{}", verdict.line, verdict.details));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kafka_outage_pushes_succeed_again_within_seconds_without_restarting_lockstep() -> anyhow::Result<()> {
    /// Kafka has been back this long at most when pushes must work again.
    const RECOVERY: Duration = Duration::from_secs(30);
    let plan = Plan::default();
    let options = StackOptions { settings: fault_settings(), ..Default::default() };
    let mut run = Run::start("producer-recovery", 0, options, 2, &plan).await?;
    // 20 before the outage, 5 during it (retried until written), 5 after: all acknowledged.
    run.expect.min_acknowledged_share = 1.0;
    run.plan_changes(30);
    let mut rng = StdRng::seed_from_u64(0);
    let phone = run.devices[0].clone();
    anyhow::ensure!(
        phone.push_with_retries(&changes(20, 64), Duration::from_secs(30), &mut rng).await.iter().all(Option::is_some)
    );

    // Kafka goes away while the device pushes: its changes time out in the producer
    // (on Nisshi, the broker used before, the idempotent producer's epoch bump then failed
    // for good; the producer is replaced either way).
    run.kill_kafka().await;
    let during = changes(5, 64);
    let outage_ends = Instant::now() + Duration::from_secs(8);
    let mut timed_out = 0;
    while Instant::now() < outage_ends {
        let outcomes = phone.push_once(&during, false).await;
        timed_out += outcomes.iter().filter(|outcome| outcome.offset().is_none()).count();
    }
    anyhow::ensure!(timed_out > 0, "no push failed while Kafka was down: the outage did not bite");
    run.restart_kafka().await?;
    let back = Instant::now();
    // The same changes again until they are written (a little past the bound, to measure).
    let offsets = phone.push_with_retries(&during, RECOVERY + Duration::from_secs(10), &mut rng).await;
    let recovered_after = back.elapsed();
    let recovered = offsets.iter().all(Option::is_some);
    println!(
        "producer-recovery: pushes written again {recovered_after:.1?} after Kafka's return (recovered: {recovered})"
    );
    // New changes go through at once as well.
    let fresh = phone.push_with_retries(&changes(5, 64), Duration::from_secs(10), &mut rng).await;

    run.start_subscribers();
    let evidence = run.stack.evidence();
    let verdict = run.finish().await?;
    assert!(
        recovered && recovered_after < RECOVERY,
        "pushes did not succeed within {RECOVERY:?} of Kafka's return (recovered: {recovered} after {recovered_after:.1?}) \
         without restarting Lockstep\n{evidence}"
    );
    assert!(fresh.iter().all(Option::is_some), "a new push after the recovery failed");
    judge(vec![verdict]);
    Ok(())
}

/// A device catching up while Kafka answers slowly (each way of the link delayed 2 s, so one
/// Kafka round trip takes longer than a client's 3-heartbeat idle limit) keeps getting
/// heartbeats between the changes: a busy Kafka must not look like a dead connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_catching_up_from_a_slow_kafka_keeps_getting_heartbeats() -> anyhow::Result<()> {
    use lockstep_e2e::{device::Device, fault_run::Stack};
    const CHANGES: usize = 600;
    let stack = Stack::start(StackOptions { behind_proxy: true, ..Default::default() }).await?;
    let phone = Device::create_account(&stack.server, "phone").await?;
    let laptop = phone.pair(&stack.server, "laptop").await?;
    for _ in 0..3 {
        phone.push_ok(changes(CHANGES / 3, 64)).await?;
    }
    stack.proxy().set_delay(Duration::from_secs(2));
    // The laptop never subscribed: it reads everything from Kafka (256 changes a chunk).
    let mut stream = tokio::time::timeout(CLIENT_DEADLINE, laptop.subscribe(Some(0))).await??;
    let (mut received, mut heartbeat_times_ms, mut longest_wait) = (0, Vec::new(), Duration::ZERO);
    let mut last = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(120);
    while received < CHANGES {
        anyhow::ensure!(Instant::now() < deadline, "{received} of {CHANGES} changes in 120 s");
        let message = tokio::time::timeout(CLIENT_DEADLINE, stream.message()).await??;
        longest_wait = longest_wait.max(last.elapsed());
        last = Instant::now();
        match message.and_then(|message| message.event) {
            Some(Event::Changes(batch)) => received += batch.changes.len(),
            Some(Event::Heartbeat(heartbeat)) => heartbeat_times_ms.push(heartbeat.server_time_ms),
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    stack.proxy().set_delay(Duration::ZERO);
    let longest_silence_ms = longest_heartbeat_gap_ms(&heartbeat_times_ms);
    println!(
        "slow kafka: {received} changes, {} heartbeats, longest gap between heartbeats {longest_silence_ms:?} ms \
         (server clock), longest wait for a message {longest_wait:?} (test clock, not asserted)",
        heartbeat_times_ms.len()
    );
    // Heartbeats every second (the test kit's delivery.heartbeat_interval); a client gives up
    // after three without anything. Measured on the heartbeats' own server timestamps, so a
    // test process starved of CPU on a busy machine reading late does not count as silence;
    // 2.5 s leaves 1.5 s of slack for the server's own scheduling. The catch-up takes at
    // least three Kafka round trips of 4 s: at least two heartbeats.
    anyhow::ensure!(heartbeat_times_ms.len() >= 2, "heartbeats while Kafka answered slowly: {heartbeat_times_ms:?}");
    assert!(
        longest_silence_ms.is_some_and(|gap| gap < 2500),
        "the server sent no heartbeat for {longest_silence_ms:?} ms: {heartbeat_times_ms:?}"
    );
    Ok(())
}

/// The longest time between consecutive heartbeats, by their server timestamps.
fn longest_heartbeat_gap_ms(server_times_ms: &[i64]) -> Option<i64> {
    server_times_ms.windows(2).map(|pair| pair[1] - pair[0]).max()
}

#[test]
fn the_longest_heartbeat_gap_is_measured_on_server_timestamps() {
    assert_eq!(longest_heartbeat_gap_ms(&[]), None);
    assert_eq!(longest_heartbeat_gap_ms(&[1_000]), None);
    assert_eq!(longest_heartbeat_gap_ms(&[1_000, 2_001, 5_100, 6_000]), Some(3_099));
}
