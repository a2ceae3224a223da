//! A cluster as `scripts/cluster` runs it (issue 21): three `lockstep` nodes sharing a
//! three-broker Apache Kafka cluster (replication 3, `min.insync.replicas=2`) and one
//! PostgreSQL, behind Debian's HAProxy (gRPC over h2c, `/readyz` health checks, a device kept
//! on one node by a hash of its token). Devices connected through HAProxy receive a steady
//! stream of pushes; the node carrying most of them is killed with `kill -9`; they reconnect
//! through HAProxy to the other nodes, resume from their committed offsets, and every
//! acknowledged change reaches every device — judged by the fault suite's history checker
//! (`lockstep_e2e::history`: I1, I2, I4, I5, once) and its outcome checks.
//!
//! What it catches: HAProxy not moving a dead node's devices (no health check, no redispatch:
//! they never receive again), a new stream on another node starting anywhere but the
//! committed offset (a hole or a rewind: I4), a committed offset lost or moved backwards with
//! the node (I4 at the end), live delivery across nodes broken (the changes of the pusher's
//! node never reach the others' streams before the kill), and changes lost or duplicated
//! while a node dies (I1, I2, once).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use lockstep_e2e::{
    device::Device,
    fault_run::{pid_alive, port_refused},
    haproxy::{Backend, HaProxy},
    history::History,
    kafka::{KafkaCluster, committed_offset, read_topic},
    outcome::{Evidence, Expect, Fault, FaultWindow, Outcome, PUSHERS_DEADLINE, ProcessGone},
    server::Server,
    wait::eventually,
    workload::{Plan, SimDevice, Workload},
};
use lockstep_testkit::postgres::Postgres;

const WAIT: Duration = Duration::from_secs(60);
const RECEIVERS: usize = 6;

/// How many streams of `device_id` node `node` started, by its log ("stream started", at
/// debug level, which the test kit turns on).
fn streams_started(node: &Server, device_id: &str) -> usize {
    node.log().lines().filter(|line| line.contains("stream started") && line.contains(device_id)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_a_node_while_its_devices_receive_they_reconnect_through_haproxy_and_get_every_acknowledged_change()
-> anyhow::Result<()> {
    let kafka = KafkaCluster::start(3).await?;
    let database = tokio::task::spawn_blocking(Postgres::start).await??;
    let url = database.new_database()?;
    let settings = [("LOCKSTEP_DATABASE__URL", url.as_str()), ("LOCKSTEP_KAFKA__REPLICATION_FACTOR", "3")];
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(Server::start_with_kafka(kafka.bootstrap(), &settings).await?);
    }
    for node in &nodes {
        eventually(WAIT, "the node's admin listener", || async { node.admin_addr().is_some() }).await?;
    }
    let backends: Vec<Backend> = nodes
        .iter()
        .enumerate()
        .map(|(index, node)| Backend::of(&format!("node{}", index + 1), node))
        .collect::<anyhow::Result<_>>()?;
    let haproxy = HaProxy::start(&backends).await?;

    // The account and its devices made through node 1 (PostgreSQL: every node knows them).
    let phone = Device::create_account(&nodes[0], "phone").await?;
    let mut receivers = Vec::new();
    for index in 0..RECEIVERS {
        receivers.push(phone.pair(&nodes[0], &format!("receiver-{index}")).await?);
    }
    let history =
        Arc::new(History::new(std::iter::once(&phone).chain(&receivers).map(|device| (device.device_id.clone(), 0))));
    // Devices that go silent reopen their streams after 5 s (not the default 15 s): a stream
    // that a dead node left hanging is given up within the wait.
    let plan =
        Plan { batches_per_device: 90, pause_ms: 40..120, stream_idle: Duration::from_secs(5), ..Plan::default() };
    let through_haproxy = receivers
        .iter()
        .map(|device| SimDevice::new(device, &haproxy.endpoint(), history.clone(), plan.call_timeout))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let receiving = Workload::subscribe_only(&through_haproxy, &plan);

    // Where HAProxy put each receiver's stream: exactly one node each.
    let placement = eventually(WAIT, "every receiver streaming from one node", || async {
        let mut placement = BTreeMap::new();
        for device in &receivers {
            let on: Vec<usize> =
                (0..nodes.len()).filter(|node| streams_started(&nodes[*node], &device.device_id) > 0).collect();
            match on.as_slice() {
                [] => return anyhow::Ok(None),
                [node] => placement.insert(device.device_id.clone(), *node),
                _ => anyhow::bail!(
                    "{} streamed from nodes {on:?}: HAProxy does not keep a device on one node",
                    device.device_id
                ),
            };
        }
        anyhow::Ok(Some(placement))
    })
    .await?;
    let mut per_node = [0usize; 3];
    for node in placement.values() {
        per_node[*node] += 1;
    }
    // Six receivers on three nodes: one node carries at least two.
    let victim = (0..3).max_by_key(|node| (per_node[*node], std::cmp::Reverse(*node))).expect("three nodes");
    let victims: Vec<String> =
        placement.iter().filter(|(_, node)| **node == victim).map(|(device, _)| device.clone()).collect();
    anyhow::ensure!(victims.len() >= 2, "receivers per node {per_node:?}");
    // The phone pushes straight to another node: its pushes never meet the kill, what the
    // victims receive reaches their node through the events topic (the doorbell).
    let pusher_node = (victim + 1) % 3;
    let pusher = SimDevice::new(&phone, &nodes[pusher_node].endpoint(), history.clone(), plan.call_timeout)?;
    let mut pushing = Workload::start(std::slice::from_ref(&pusher), &plan, 21);
    println!(
        "receivers per node {per_node:?}; killing node {} (carrying {victims:?}); pushing to node {}",
        victim + 1,
        pusher_node + 1
    );

    // The victims receive live from their node before it dies.
    eventually(WAIT, "the victims receiving through their node", || async {
        let applied = history.applied_until();
        victims.iter().all(|device| applied.get(device).copied().unwrap_or(0) >= 40)
    })
    .await?;
    let streams_before: Vec<usize> = (0..3)
        .filter(|node| *node != victim)
        .map(|node| victims.iter().map(|device| streams_started(&nodes[node], device)).sum())
        .collect();
    anyhow::ensure!(
        streams_before.iter().all(|started| *started == 0),
        "victims already elsewhere: {streams_before:?}"
    );

    let errors_before = history.stats().errors;
    let killed_at = std::time::Instant::now();
    let (pid, port) = (nodes[victim].pid(), nodes[victim].addr().port());
    let alive_before = pid_alive(pid);
    nodes[victim].kill9();
    let gone = ProcessGone {
        pid,
        alive_before,
        pid_gone_after: !pid_alive(pid),
        port_refused_after: port_refused(port).await,
    };
    let victim_name = format!("node{}", victim + 1);
    eventually(WAIT, "haproxy taking the killed node out", || async {
        let states = haproxy.server_states()?;
        anyhow::Ok(states.iter().any(|(server, state)| *server == victim_name && state == "DOWN"))
    })
    .await?;

    // Every victim streams again, from a node that lives, through HAProxy.
    eventually(WAIT, "the victims streaming from the other nodes", || async {
        victims
            .iter()
            .all(|device| (0..3).filter(|node| *node != victim).any(|node| streams_started(&nodes[node], device) > 0))
    })
    .await?;

    let pushers_finished = pushing.pushers_done(PUSHERS_DEADLINE).await;
    let device_errors = history.stats().errors - errors_before;
    let written_after_kill = history.first_answered_written_after(killed_at).is_some();
    let topic = format!("lockstep.user.{}", phone.user_id);
    let log: Vec<(i64, String)> =
        eventually(WAIT, "reading the user's log", || async { read_topic(kafka.bootstrap(), &topic).await.map(Some) })
            .await?
            .into_iter()
            .map(|(offset, envelope)| (offset, envelope.change_id))
            .collect();
    let log_end = log.last().map_or(0, |(offset, _)| offset + 1);
    let settled = receiving.settle(&history, log_end, WAIT).await;
    let planned = pushing.planned_changes();
    pushing.stop().await;
    receiving.stop().await;
    let mut committed = BTreeMap::new();
    for device in std::iter::once(&phone).chain(&receivers) {
        let group = format!("lockstep.device.{}", device.device_id);
        let offset = eventually(Duration::from_secs(30), format!("{group}'s committed offset"), || async {
            committed_offset(kafka.bootstrap(), &group, &topic).await.map(Some)
        })
        .await
        .map_err(|error| format!("{error:#}"));
        committed.insert(device.device_id.clone(), offset);
    }

    let report = history.check(&log, &committed);
    let stats = history.stats();
    let outcome = Outcome {
        planned,
        acknowledged: stats.pushes_ok,
        log_len: log.len(),
        log_changes: log.iter().map(|(_, id)| id.as_str()).collect::<std::collections::BTreeSet<_>>().len(),
        received: history.received_of_log(&log),
        pushers_finished,
        windows: vec![FaultWindow {
            what: format!("node {} killed", victim + 1),
            fault: Fault::ServerKilled,
            evidence: Evidence { device_errors, process_gone: Some(gone), ..Evidence::default() },
        }],
    };
    let mut problems = outcome.problems(&Expect::default());
    if !settled {
        problems.push(format!("not every device applied the log (end {log_end}): {:?}", history.applied_until()));
    }
    if !written_after_kill {
        problems.push("no change was written after the kill: the victims' reconnection proves nothing".into());
    }
    println!(
        "cluster-node-kill9 {} errors={} log={} {} victims={} committed={committed:?}",
        outcome.summary(),
        stats.errors,
        log.len(),
        report.verdicts(),
        victims.len()
    );
    assert!(report.ok() && problems.is_empty(), "{report}\n{}\nhaproxy:\n{}", problems.join("\n"), haproxy.log_tail());
    Ok(())
}
