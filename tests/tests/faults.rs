//! The fault suite: the real `lockstep` binary and a real Kafka (Nisshi)
//! under faults, while simulated devices push, receive and ack. Every run is
//! checked by the history checker (`lockstep_e2e::history`: I1, I2, I4, I5
//! and "once") and prints one line:
//!
//! `fault=kafka-kill9 seed=3 ops=412 pushes_ok=380 errors=32 faults=2 I1=ok I2=ok I4=ok I5=ok once=ok unwritten=3 log=383 secs=21`
//!
//! Faults: Kafka `kill -9` during pushes and during delivery; the link
//! between Lockstep and Kafka cut, partitioned without resets, or slowed by
//! seconds (a proxy: Nisshi advertises the proxy's port); the server `kill -9`
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
    fault_run::{Run, StackOptions, fault_settings, judge, seeds},
    history::PushOutcome,
    nisshi::TmpfsRefused,
    workload::{Plan, SimDevice, Workload},
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
    let mut verdicts = Vec::new();
    for seed in seeds() {
        let plan = Plan { reconnect_ms: Some(100..800), ..pushing_plan() };
        let options = StackOptions { settings: fault_settings(), ..Default::default() };
        let run = Run::start("none", seed, options, 4, &plan).await?;
        let workload = Workload::start(&run.devices, &plan, seed);
        verdicts.push(run.finish(workload).await?);
    }
    judge(verdicts);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_kill9_during_pushes() -> anyhow::Result<()> {
    let mut verdicts = Vec::new();
    for seed in seeds() {
        let plan = pushing_plan();
        let options = StackOptions { settings: fault_settings(), ..Default::default() };
        let mut run = Run::start("kafka-kill9", seed, options, 3, &plan).await?;
        let workload = Workload::start(&run.devices, &plan, seed);
        for _ in 0..run.rng.random_range(1..=2) {
            run.pause(300..1500).await;
            run.stack.nisshi.kill();
            run.timeline("kafka killed");
            run.pause(1000..4000).await;
            run.stack.nisshi.restart().await?;
            run.timeline("restored");
        }
        verdicts.push(run.finish(workload).await?);
    }
    judge(verdicts);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_kill9_during_delivery() -> anyhow::Result<()> {
    let mut verdicts = Vec::new();
    for seed in seeds() {
        // Small batches applied slowly: the devices catch up for a few seconds.
        let plan = Plan {
            batches_per_device: 8,
            apply_delay: Duration::from_millis(15),
            pause_ms: 50..200,
            ..Plan::default()
        };
        let mut settings = fault_settings();
        settings.push(("LOCKSTEP_DELIVERY__BATCH_MAX_CHANGES", "20"));
        let options = StackOptions { settings, ..Default::default() };
        let mut run = Run::start("kafka-kill9-delivery", seed, options, 3, &plan).await?;
        let backlog = run.rng.random_range(1000..2000);
        for batch in changes(backlog, 128).chunks(250) {
            let offsets = run.devices[0].push_with_retries(batch, Duration::from_secs(30), &mut run.rng).await;
            anyhow::ensure!(offsets.iter().all(Option::is_some), "the backlog was not written before the faults");
        }
        let workload = Workload::start(&run.devices, &plan, seed);
        for _ in 0..run.rng.random_range(1..=2) {
            run.pause(200..1500).await;
            run.stack.nisshi.kill();
            run.timeline("kafka killed");
            run.pause(1000..4000).await;
            run.stack.nisshi.restart().await?;
            run.timeline("restored");
        }
        verdicts.push(run.finish(workload).await?);
    }
    judge(verdicts);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_to_kafka_cut_and_restored() -> anyhow::Result<()> {
    let mut verdicts = Vec::new();
    for seed in seeds() {
        let plan = pushing_plan();
        let options = StackOptions { behind_proxy: true, settings: fault_settings(), ..Default::default() };
        let mut run = Run::start("link-cut", seed, options, 3, &plan).await?;
        let workload = Workload::start(&run.devices, &plan, seed);
        for _ in 0..run.rng.random_range(1..=2) {
            run.pause(300..1500).await;
            run.stack.proxy().cut();
            run.timeline("link cut");
            run.pause(2000..6000).await;
            run.stack.proxy().restore();
            run.timeline("restored");
        }
        verdicts.push(run.finish(workload).await?);
    }
    judge(verdicts);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_to_kafka_partitioned_without_resets() -> anyhow::Result<()> {
    // Open connections go silent instead of closing: only the server's own
    // timeouts can notice. Devices reconnect now and then, so new streams need
    // Kafka during the partition too.
    let mut verdicts = Vec::new();
    for seed in seeds() {
        let plan = Plan { reconnect_ms: Some(1000..3000), ..pushing_plan() };
        let options = StackOptions { behind_proxy: true, settings: fault_settings(), ..Default::default() };
        let mut run = Run::start("link-partition", seed, options, 3, &plan).await?;
        let workload = Workload::start(&run.devices, &plan, seed);
        for _ in 0..run.rng.random_range(1..=2) {
            run.pause(300..1500).await;
            run.stack.proxy().freeze();
            run.timeline("link frozen");
            run.pause(2000..8000).await;
            run.stack.proxy().restore();
            run.timeline("restored");
        }
        verdicts.push(run.finish(workload).await?);
    }
    judge(verdicts);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_to_kafka_slowed_by_seconds() -> anyhow::Result<()> {
    let mut verdicts = Vec::new();
    for seed in seeds() {
        let plan = pushing_plan();
        let options = StackOptions { behind_proxy: true, settings: fault_settings(), ..Default::default() };
        let mut run = Run::start("link-slow", seed, options, 3, &plan).await?;
        let workload = Workload::start(&run.devices, &plan, seed);
        run.pause(300..1000).await;
        // Each way, so a request waits twice this: around the 3 s produce timeout.
        let delay = Duration::from_millis(run.rng.random_range(1000..3000));
        run.stack.proxy().set_delay(delay);
        run.timeline(&format!("link delayed by {delay:?} each way"));
        run.pause(3000..8000).await;
        run.stack.proxy().set_delay(Duration::ZERO);
        run.timeline("restored");
        verdicts.push(run.finish(workload).await?);
    }
    judge(verdicts);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_kill9_during_pushes() -> anyhow::Result<()> {
    let mut verdicts = Vec::new();
    for seed in seeds() {
        let plan = pushing_plan();
        let options = StackOptions { settings: fault_settings(), ..Default::default() };
        let mut run = Run::start("server-kill9", seed, options, 4, &plan).await?;
        let workload = Workload::start(&run.devices, &plan, seed);
        for _ in 0..run.rng.random_range(2..=3) {
            run.pause(300..1500).await;
            run.stack.server.kill9();
            run.timeline("server killed");
            run.pause(200..1000).await;
            run.stack.server.restart().await?;
            run.timeline("restored");
        }
        verdicts.push(run.finish(workload).await?);
    }
    judge(verdicts);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_kill9_and_restart_while_kafka_is_down() -> anyhow::Result<()> {
    // A server restarted during a Kafka outage serves once Kafka returns (it waits
    // for Kafka before it listens: devices meanwhile see connections refused).
    let mut verdicts = Vec::new();
    for seed in seeds() {
        let plan = pushing_plan();
        let options = StackOptions { behind_proxy: true, settings: fault_settings(), ..Default::default() };
        let mut run = Run::start("server-kill9-kafka-down", seed, options, 3, &plan).await?;
        let workload = Workload::start(&run.devices, &plan, seed);
        run.pause(300..1500).await;
        let killed = run.rng.random_bool(0.5);
        match killed {
            true => run.stack.nisshi.kill(),
            false => run.stack.proxy().cut(),
        }
        run.timeline(if killed { "kafka killed" } else { "link cut" });
        run.pause(500..1500).await;
        run.stack.server.kill9();
        run.timeline("server killed");
        run.pause(200..800).await;
        run.timeline("server restarting, kafka still away");
        let kafka_away = Duration::from_millis(run.rng.random_range(1000..4000));
        let (server, nisshi, proxy) = (&mut run.stack.server, &mut run.stack.nisshi, run.stack.proxy.as_ref());
        let kafka_back = async {
            tokio::time::sleep(kafka_away).await;
            match (killed, proxy) {
                (true, _) => nisshi.restart().await?,
                (false, Some(proxy)) => proxy.restore(),
                (false, None) => anyhow::bail!("no proxy"),
            }
            anyhow::Ok(Instant::now())
        };
        let (restarted, back) = tokio::join!(server.restart(), kafka_back);
        let listening_after = back?.elapsed();
        restarted?;
        run.timeline(&format!("restored: kafka back, the server listening {listening_after:.1?} later"));
        verdicts.push(run.finish(workload).await?);
    }
    judge(verdicts);
    Ok(())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_disk_fills_up() -> anyhow::Result<()> {
    let mut verdicts = Vec::new();
    for seed in seeds() {
        let plan = Plan { batches_per_device: 40, ciphertext_bytes: 8 * 1024, pause_ms: 10..60, ..Plan::default() };
        let options = StackOptions { storage_tmpfs_mib: Some(32), settings: fault_settings(), ..Default::default() };
        let mut run = match Run::start("kafka-disk-full", seed, options, 3, &plan).await {
            Err(error) if error.downcast_ref::<TmpfsRefused>().is_some() => {
                println!("fault=kafka-disk-full SKIPPED: {error} (needs root or CAP_SYS_ADMIN to mount a tmpfs)");
                return Ok(());
            }
            other => other?,
        };
        let leave = run.rng.random_range(1..4) << 20;
        let ballast = fill_leaving(run.stack.nisshi.storage_dir(), leave)?;
        run.notes.push(format!("ballast {} MiB, about {} MiB left", ballast >> 20, leave >> 20));
        let workload = Workload::start(&run.devices, &plan, seed);
        run.timeline("pushing onto the nearly full disk");
        // Push until the disk is full and pushes fail (or 30 s).
        let full_by = Instant::now() + Duration::from_secs(30);
        while run.history.stats().errors == 0 && Instant::now() < full_by {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let failed_while_full = run.history.stats().errors;
        if failed_while_full == 0 {
            run.problems.push("no push failed within 30 s: the disk never filled".into());
        }
        run.notes.push(format!("{failed_while_full} errors when the disk filled"));
        run.pause(1000..3000).await;
        // Space freed; Kafka carries on by itself, or is restarted on it.
        std::fs::remove_file(run.stack.nisshi.storage_dir().join("ballast"))?;
        if run.rng.random_bool(0.5) {
            run.stack.nisshi.restart().await?;
            run.timeline("restored: space freed, Kafka restarted");
        } else {
            run.timeline("restored: space freed, Kafka not restarted");
        }
        verdicts.push(run.finish(workload).await?);
    }
    judge(verdicts);
    Ok(())
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
    let mut rng = StdRng::seed_from_u64(0);
    let before = changes(10, 64);
    anyhow::ensure!(
        run.devices[0].push_with_retries(&before, Duration::from_secs(30), &mut rng).await.iter().all(Option::is_some)
    );

    let mut problems = Vec::new();
    let mut failed_pushes = Vec::new();
    let messages = std::sync::Mutex::new(Vec::new());
    for outage in ["link cut", "link frozen", "kafka killed"] {
        match outage {
            "link cut" => run.stack.proxy().cut(),
            "link frozen" => run.stack.proxy().freeze(),
            _ => run.stack.nisshi.kill(),
        }
        run.faults += 1;
        // Devices 1..3 never subscribed nor acked successfully: the server knows nothing about them
        // that it did not read from Kafka.
        let pushed = vec![change("during-outage", 64)];
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
            "kafka killed" => run.stack.nisshi.restart().await?,
            _ => run.stack.proxy().restore(),
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
    let workload = Workload::subscribe_only(&run.devices, &plan);
    let verdict = run.finish(workload).await?;
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
    let mut rng = StdRng::seed_from_u64(0);
    let phone = run.devices[0].clone();
    anyhow::ensure!(
        phone.push_with_retries(&changes(20, 64), Duration::from_secs(30), &mut rng).await.iter().all(Option::is_some)
    );

    // Kafka goes away while the device pushes: its changes time out in the producer
    // (with Nisshi, the idempotent producer's epoch bump then fails for good).
    run.stack.nisshi.kill();
    run.faults += 1;
    let during = changes(5, 64);
    let outage_ends = Instant::now() + Duration::from_secs(8);
    let mut timed_out = 0;
    while Instant::now() < outage_ends {
        let outcomes = phone.push_once(&during, false).await;
        timed_out += outcomes.iter().filter(|outcome| outcome.offset().is_none()).count();
    }
    anyhow::ensure!(timed_out > 0, "no push failed while Kafka was down: the outage did not bite");
    run.stack.nisshi.restart().await?;
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

    let workload = Workload::subscribe_only(&run.devices, &plan);
    let evidence = run.stack.evidence();
    let verdict = run.finish(workload).await?;
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
    let (mut received, mut heartbeats, mut longest_gap) = (0, 0, Duration::ZERO);
    let mut last = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(120);
    while received < CHANGES {
        anyhow::ensure!(Instant::now() < deadline, "{received} of {CHANGES} changes in 120 s");
        let message = tokio::time::timeout(CLIENT_DEADLINE, stream.message()).await??;
        longest_gap = longest_gap.max(last.elapsed());
        last = Instant::now();
        match message.and_then(|message| message.event) {
            Some(Event::Changes(batch)) => received += batch.changes.len(),
            Some(Event::Heartbeat(_)) => heartbeats += 1,
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    stack.proxy().set_delay(Duration::ZERO);
    println!("slow kafka: {received} changes, {heartbeats} heartbeats, longest silence {longest_gap:?}");
    // Heartbeats every second (the test kit's delivery.heartbeat_interval); a client gives up
    // after three without anything.
    assert!(longest_gap < Duration::from_millis(2500), "the stream was silent for {longest_gap:?}");
    assert!(heartbeats > 0, "heartbeats while Kafka answered slowly");
    Ok(())
}
