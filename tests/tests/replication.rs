//! Replication faults: the real `lockstep` binary on a three-node Apache Kafka
//! cluster (combined KRaft nodes; user topics and the events topic at replication
//! factor 3, `min.insync.replicas=2`, unclean leader election off), brokers killed,
//! stopped or frozen while simulated devices push, receive and ack. Each run is
//! judged like the rest of the fault suite (`tests/tests/faults.rs`): the history
//! checker's I1, I2, I4, I5 and "once", enough planned changes acknowledged, every
//! device holding the log, each fault's evidence that it hit; and its summary line
//! adds the recovery times: from the fault (or its end) to the first change written
//! after it, to every device holding that change, and to the first ack committed:
//!
//! `fault=leader-kill9 seed=1 ops=… planned=… acked=… delivered=…/… … recovery=11.2s/11.3s/11.4s secs=52`
//!
//! What each scenario shows:
//! - **leader kill -9** during pushes: the partition leader of the user's topic dies
//!   without handing over; pushes fail retryably until the controller fences it (its
//!   session, 9 s) and elects a new leader from the ISR, then resume; no acknowledged
//!   change is lost (acks=all: each was on two replicas at least) or written twice (the
//!   idempotent producer across the leader change). The node rejoins the ISR.
//! - **group coordinator kill -9** during acks: the node holding the device groups'
//!   offsets (the leader of their `__consumer_offsets` partition, cross-checked with
//!   Kafka's `ConsumerGroupCommand`) dies while devices are subscribed and acking; acks
//!   fail until the partition has a new leader, no committed offset moves backwards (I4),
//!   and devices resume from their committed offsets without holes (I4) or losses (I2).
//! - **rolling restart**: each node in turn SIGTERM (a controlled shutdown: leaderships
//!   handed over first), restarted, and back in the ISR before the next, during a
//!   three-device workload: what an operator's upgrade does.
//! - **one broker isolated** (SIGSTOP of a follower of the user's topic): it stays
//!   connected but answers nothing; acks=all writes wait until the controller fences it
//!   and the ISR shrinks without it (shown with the ISR as Kafka publishes it), then go
//!   on with two replicas; resumed, it catches up and is back in the ISR.
//! - **two brokers down** (kill -9 of two nodes: the leader and a follower, or both
//!   followers): one replica alive and no controller quorum, so nothing can be written
//!   with `min.insync.replicas=2`. Pushes answer UNAVAILABLE within the client deadline
//!   (the producer's message timeout, `kafka.produce_timeout`, expires first and the
//!   server maps it to UNAVAILABLE, retryable; DEADLINE_EXCEEDED would mean the server
//!   outwaited the client's deadline); no change is acknowledged while they are down
//!   (every acknowledged change is in the log read afterwards: I1); when one node returns
//!   the quorum, a leader and a second in-sync replica are back and pushes resume.
//!
//! One cluster at a time (three JVMs per scenario on a small machine), one seed per
//! scenario by default: a run takes 35-70 s, most of it Kafka's own failure detection
//! (9 s sessions) and restarts; `LOCKSTEP_FAULT_SEEDS=N` or `LOCKSTEP_FAULT_SEED=K` as in
//! the rest of the suite.

use std::time::{Duration, Instant};

use anyhow::Context;
use lockstep_e2e::{
    device::change,
    fault_run::{Run, SETTLE, Scenario},
    history::PushOutcome,
    wait::{eventually, not_yet, ready},
    workload::Plan,
};
use rand::{Rng, seq::SliceRandom};
use tokio::sync::Mutex;
use tonic::Code;

/// One cluster at a time: the tests of this file run one after another.
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// How long a node may take to rejoin the ISR, or the ISR to shrink.
const ISR_TIMEOUT: Duration = Duration::from_secs(60);

fn scenario(test: &'static str, fault: &'static str, devices: usize, plan: Plan) -> Scenario {
    Scenario::new(test, fault, devices, plan).on_cluster(3).seeds_by_default(1)
}

/// Devices that keep pushing through a fault of about 10-20 s (they retry for 90 s).
fn long_pushing_plan(batches_per_device: usize) -> Plan {
    Plan { batches_per_device, pause_ms: 50..250, ..Plan::default() }
}

/// Waits until the user's topic has a leader other than `old`; notes how long it took.
async fn wait_for_new_leader(run: &mut Run, old: usize) -> anyhow::Result<usize> {
    let started = Instant::now();
    let this = &*run;
    let leader = eventually(ISR_TIMEOUT, format!("a leader of the user's topic other than node {old}"), || async {
        let leader = this.user_topic_leader().await?;
        anyhow::Ok(leader.filter(|leader| *leader != old))
    })
    .await?;
    run.notes.push(format!("new leader of the user's topic: node {leader}, {:.1?} after", started.elapsed()));
    Ok(leader)
}

/// Waits until the devices got `changes` changes acknowledged: the fault hits pushes under way.
async fn wait_until_written(run: &Run, changes: usize) -> anyhow::Result<()> {
    eventually(SETTLE, format!("{changes} changes written"), || async {
        let written = run.history.stats().pushes_ok;
        if written >= changes { ready(()) } else { not_yet(format!("{written} written")) }
    })
    .await
}

/// Waits until every device applied something (and so acked it).
async fn wait_until_devices_acked(run: &Run) -> anyhow::Result<()> {
    eventually(SETTLE, "every device receiving something", || async { run.history.all_applied(1) }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_of_the_user_topic_killed_during_pushes() -> anyhow::Result<()> {
    let _cluster = ONE_CLUSTER_AT_A_TIME.lock().await;
    scenario("leader_of_the_user_topic_killed_during_pushes", "leader-kill9", 3, long_pushing_plan(60))
        .run(async |run: &mut Run| {
            run.start_workload();
            wait_until_written(run, 30).await?;
            run.pause(200..1000).await;
            let leader = run.user_topic_leader().await?.context("the user's topic has no leader")?;
            run.measure_recovery_from(&format!("kill -9 of node {leader}, the leader"));
            run.kill_broker(leader, "leader of the user's topic").await;
            wait_for_new_leader(run, leader).await?;
            run.pause(1000..3000).await;
            run.restart_broker(leader).await?;
            run.wait_in_isr(leader, ISR_TIMEOUT).await?;
            anyhow::ensure!(run.push_probe("after-leader-kill").await, "a push after the recovery failed");
            Ok(())
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_coordinator_of_device_groups_killed_during_acks() -> anyhow::Result<()> {
    let _cluster = ONE_CLUSTER_AT_A_TIME.lock().await;
    scenario("group_coordinator_of_device_groups_killed_during_acks", "coordinator-kill9", 3, long_pushing_plan(80))
        .run(async |run: &mut Run| {
            run.start_workload();
            wait_until_devices_acked(run).await?;
            // Which node coordinates which device's group, by Kafka's partitioning rule,
            // checked against what Kafka's own tool reports for the first device.
            let mut coordinated_by = vec![Vec::new(); run.stack.cluster().size()];
            for device in &run.devices {
                let group = format!("lockstep.device.{}", device.id);
                let node = run.stack.cluster().group_coordinator(&group).await?.context("no coordinator")?;
                coordinated_by[node].push(device.id.clone());
            }
            let first_group = format!("lockstep.device.{}", run.devices[0].id);
            let by_rule = run.stack.cluster().group_coordinator(&first_group).await?;
            let by_tool = run.stack.cluster().group_coordinator_by_kafka_tools(&first_group).await?;
            anyhow::ensure!(
                by_rule == by_tool,
                "group_coordinator says node {by_rule:?}, ConsumerGroupCommand node {by_tool:?}"
            );
            // The node coordinating the most device groups, preferably not the leader of the
            // user's topic (whose kill would also stop pushes: the leader scenario's fault).
            let leader = run.user_topic_leader().await?;
            let (coordinator, devices) = coordinated_by
                .iter()
                .enumerate()
                .filter(|(_, devices)| !devices.is_empty())
                .max_by_key(|(node, devices)| (Some(*node) != leader, devices.len()))
                .map(|(node, devices)| (node, devices.clone()))
                .context("no devices")?;
            run.notes.push(format!(
                "node {coordinator} coordinates the groups of {} of {} devices (ConsumerGroupCommand agrees for the \
                 first: node {by_tool:?}); the user's topic leader is node {leader:?}",
                devices.len(),
                run.devices.len()
            ));
            run.pause(200..800).await;
            run.measure_recovery_of_acks_from(&format!("kill -9 of node {coordinator}, the coordinator"), devices);
            run.kill_broker(coordinator, "coordinator of the device groups").await;
            run.pause(2000..4000).await;
            run.restart_broker(coordinator).await?;
            run.wait_in_isr(coordinator, ISR_TIMEOUT).await?;
            anyhow::ensure!(run.push_probe("after-coordinator-kill").await, "a push after the recovery failed");
            Ok(())
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_all_three_brokers() -> anyhow::Result<()> {
    let _cluster = ONE_CLUSTER_AT_A_TIME.lock().await;
    scenario("rolling_restart_of_all_three_brokers", "rolling-restart", 3, long_pushing_plan(120))
        .run(async |run: &mut Run| {
            run.start_workload();
            wait_until_written(run, 30).await?;
            run.pause(200..1000).await;
            let mut order: Vec<usize> = (0..run.stack.cluster().size()).collect();
            order.shuffle(&mut run.rng);
            for node in order {
                let role = match run.user_topic_leader().await? {
                    Some(leader) if leader == node => "the leader",
                    _ => "a follower",
                };
                run.measure_recovery_from(&format!("SIGTERM to node {node}, {role}"));
                run.terminate_broker(node).await?;
                run.pause(200..1000).await;
                run.restart_broker(node).await?;
                run.wait_in_isr(node, ISR_TIMEOUT).await?;
            }
            anyhow::ensure!(run.push_probe("after-rolling-restart").await, "a push after the restarts failed");
            Ok(())
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_broker_isolated_until_it_leaves_the_isr() -> anyhow::Result<()> {
    let _cluster = ONE_CLUSTER_AT_A_TIME.lock().await;
    scenario("one_broker_isolated_until_it_leaves_the_isr", "isolated-broker", 3, long_pushing_plan(80))
        .run(async |run: &mut Run| {
            run.start_workload();
            wait_until_written(run, 30).await?;
            run.pause(200..1000).await;
            let leader = run.user_topic_leader().await?.context("the user's topic has no leader")?;
            let followers: Vec<usize> = (0..run.stack.cluster().size()).filter(|node| *node != leader).collect();
            let frozen = followers[run.rng.random_range(0..followers.len())];
            run.measure_recovery_from(&format!("SIGSTOP of node {frozen}, a follower"));
            run.stop_broker(frozen, "a follower of the user's topic").await?;
            run.wait_out_of_isr(frozen, ISR_TIMEOUT).await?;
            run.pause(1000..3000).await;
            run.end_fault().await;
            run.measure_recovery_from(&format!("SIGCONT of node {frozen}"));
            run.resume_broker(frozen)?;
            run.wait_in_isr(frozen, ISR_TIMEOUT).await?;
            anyhow::ensure!(run.push_probe("after-isolation").await, "a push after the recovery failed");
            Ok(())
        })
        .await
}

/// What one push answered while two brokers were down, and how long it took.
struct Probe {
    outcome: PushOutcome,
    elapsed: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_brokers_down_nothing_acknowledged_and_all_resumes_when_one_returns() -> anyhow::Result<()> {
    let _cluster = ONE_CLUSTER_AT_A_TIME.lock().await;
    let plan = long_pushing_plan(60);
    let client_deadline = plan.call_timeout;
    scenario("two_brokers_down_nothing_acknowledged_and_all_resumes_when_one_returns", "two-down", 3, plan)
        .run(async |run: &mut Run| {
            run.start_workload();
            wait_until_written(run, 30).await?;
            run.pause(200..1000).await;
            let leader = run.user_topic_leader().await?.context("the user's topic has no leader")?;
            let mut followers: Vec<usize> = (0..run.stack.cluster().size()).filter(|node| *node != leader).collect();
            followers.shuffle(&mut run.rng);
            let (down, survivor) = match run.rng.random_bool(0.5) {
                true => ([leader, followers[0]], followers[1]),
                false => ([followers[0], followers[1]], leader),
            };
            for node in down {
                let role = if node == leader { "the leader" } else { "a follower" };
                run.kill_broker(node, role).await;
            }
            let both_down = Instant::now();
            run.notes.push(format!(
                "node {survivor} alone ({})",
                if survivor == leader { "the leader" } else { "a follower" }
            ));
            // Probes from the first device, each once with the client deadline.
            let mut probes = Vec::new();
            for index in 0..3 {
                run.plan_changes(1);
                let pushed = [change(&format!("two-down-{index}"), 64)];
                let started = Instant::now();
                let outcome = run.devices[0].push_once(&pushed, false).await.remove(0);
                probes.push((pushed, Probe { outcome, elapsed: started.elapsed() }));
            }
            let written_while_down = run.history.first_answered_written_after(both_down + Duration::from_secs(1));
            let returning = down[run.rng.random_range(0..2)];
            run.end_fault().await;
            run.measure_recovery_from(&format!("restart of node {returning}, one of the two"));
            let answers: Vec<String> = probes
                .iter()
                .map(|(_, probe)| match &probe.outcome {
                    PushOutcome::Written { offset, .. } => format!("written at {offset} after {:.1?}", probe.elapsed),
                    PushOutcome::Failed { code, .. } | PushOutcome::CallFailed { code, .. } => {
                        format!("{code:?} after {:.1?}", probe.elapsed)
                    }
                })
                .collect();
            run.notes.push(format!("pushes with two brokers down: {}", answers.join(", ")));
            for (_, probe) in &probes {
                let code = match &probe.outcome {
                    PushOutcome::Written { .. } => None,
                    PushOutcome::Failed { code, .. } | PushOutcome::CallFailed { code, .. } => Some(*code),
                };
                if code != Some(Code::Unavailable) || probe.elapsed >= client_deadline {
                    run.problems.push(format!(
                        "a push with two brokers down answered {:?} after {:.1?}: want UNAVAILABLE within the \
                         client deadline of {client_deadline:?}",
                        probe.outcome, probe.elapsed
                    ));
                }
            }
            if let Some((_, offset)) = written_while_down {
                run.problems.push(format!(
                    "offset {offset} was acknowledged while two of three brokers were down (more than 1 s after \
                     the second kill)"
                ));
            }
            run.restart_broker(returning).await?;
            // The probes again, until written: everything resumes with two of three.
            for (pushed, _) in &probes {
                let device = run.devices[0].clone();
                let offsets = device.push_with_retries(pushed, Duration::from_secs(90), &mut run.rng).await;
                anyhow::ensure!(
                    offsets.iter().all(Option::is_some),
                    "a probe was not written after node {returning} returned"
                );
            }
            run.wait_in_isr(returning, ISR_TIMEOUT).await?;
            Ok(())
        })
        .await
}
