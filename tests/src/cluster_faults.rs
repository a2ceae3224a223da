//! The faults of a [`KafkaCluster`](crate::kafka::KafkaCluster)'s brokers for the
//! replication scenarios (`tests/tests/replication.rs`), applied through the [`Run`] so
//! that each collects the evidence that it hit, like the suite's other faults; and the
//! recovery times a run measures from a fault (or its end) to the first change written
//! after it and to every device holding that change.

use std::{
    fmt,
    time::{Duration, Instant},
};

use crate::{
    device::change,
    fault_run::{Run, pid_alive},
    history::History,
    outcome::Fault,
    wait::{eventually, not_yet, ready},
};

impl Run {
    /// The node that leads the user's topic now (None while it has no leader).
    pub async fn user_topic_leader(&self) -> anyhow::Result<Option<usize>> {
        self.stack.cluster().leader_of(&self.topic, 0).await
    }

    /// The nodes in the ISR of the user's topic, as the controller last published it.
    pub async fn user_topic_isr(&self) -> anyhow::Result<Vec<usize>> {
        self.stack.cluster().isr_of(&self.topic, 0).await
    }

    /// `kill -9` of node `node`, observed from outside (its pid gone, its port refusing).
    pub async fn kill_broker(&mut self, node: usize, role: &str) {
        self.begin_fault(Fault::BrokerKilled, &format!("kafka node {node} killed ({role})")).await;
        let cluster = self.stack.cluster_mut();
        let (pid, port) = (cluster.pid(node), cluster.port(node));
        let alive_before = pid_alive(pid);
        cluster.kill(node);
        self.observe_gone(pid, port, alive_before).await;
    }

    /// SIGTERM to node `node` (a controlled shutdown: it hands over its leaderships),
    /// waiting for it to exit, observed from outside.
    pub async fn terminate_broker(&mut self, node: usize) -> anyhow::Result<()> {
        self.begin_fault(Fault::BrokerTerminated, &format!("kafka node {node} stopped (SIGTERM)")).await;
        let cluster = self.stack.cluster_mut();
        let (pid, port) = (cluster.pid(node), cluster.port(node));
        let alive_before = pid_alive(pid);
        // Blocks for the controlled shutdown (about 2 s): off the workload's worker.
        tokio::task::block_in_place(|| cluster.stop_gracefully(node))?;
        self.observe_gone(pid, port, alive_before).await;
        Ok(())
    }

    /// SIGSTOP to node `node`: it freezes with its connections open. Evidence: its
    /// process in state `T` afterwards.
    pub async fn stop_broker(&mut self, node: usize, role: &str) -> anyhow::Result<()> {
        self.begin_fault(Fault::BrokerIsolated, &format!("kafka node {node} frozen (SIGSTOP, {role})")).await;
        let cluster = self.stack.cluster();
        cluster.stop(node)?;
        // Every thread of the JVM stops, the main one (whose state /proc shows) not at once.
        let pid = cluster.pid(node);
        // Not stopped within 2 s is the evidence's "no": the fault window then fails the run.
        let stopped = eventually(Duration::from_secs(2), format!("node {node} stopped"), || async {
            let state = process_state(pid);
            if state == Some('T') { ready(()) } else { not_yet(format!("process state {state:?}")) }
        })
        .await
        .is_ok();
        if let Some(open) = self.open_window.as_mut() {
            open.process_stopped = Some(stopped);
        }
        Ok(())
    }

    /// SIGCONT to node `node` after [`Run::stop_broker`].
    pub fn resume_broker(&mut self, node: usize) -> anyhow::Result<()> {
        self.stack.cluster().resume(node)?;
        self.timeline(&format!("restored: kafka node {node} resumed (SIGCONT)"));
        Ok(())
    }

    /// Starts node `node` again with its data and waits until it serves.
    pub async fn restart_broker(&mut self, node: usize) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.stack.cluster_mut().restart(node).await?;
        let took = started.elapsed();
        self.timeline(&format!("restored: kafka node {node} serving again ({took:.1?} to restart)"));
        Ok(took)
    }

    /// Waits until the ISR of the user's topic is published without node `node`, and
    /// records whether it was in the open fault window's evidence. Returns how long that took.
    pub async fn wait_out_of_isr(&mut self, node: usize, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let this = &*self;
        let left = eventually(timeout, format!("node {node} out of the ISR of {}", self.topic), || async {
            let isr = this.user_topic_isr().await?;
            anyhow::Ok(if isr.contains(&node) { not_yet(format!("ISR {isr:?}")) } else { ready(isr) })
        })
        .await;
        if let Some(open) = self.open_window.as_mut() {
            open.left_isr = Some(left.is_ok());
        }
        let isr = left?;
        self.notes.push(format!("ISR without node {node} after {:.1?}: {isr:?}", started.elapsed()));
        Ok(started.elapsed())
    }

    /// Waits until node `node` is back in the ISR of the user's topic; notes how long that took.
    pub async fn wait_in_isr(&mut self, node: usize, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.stack.cluster().wait_in_isr(&self.topic, 0, node, timeout).await?;
        let took = started.elapsed();
        let isr = self.user_topic_isr().await.unwrap_or_default();
        self.timeline(&format!("restored: kafka node {node} back in the ISR after {took:.1?}: {isr:?}"));
        Ok(took)
    }

    /// Pushes one fresh change from the first device, retried until written (or 90 s):
    /// a write after the faults even if the workload ended before they did.
    pub async fn push_probe(&mut self, label: &str) -> bool {
        self.plan_changes(1);
        let probe = [change(label, 64)];
        let device = self.devices[0].clone();
        let offsets = device.push_with_retries(&probe, Duration::from_secs(90), &mut self.rng).await;
        offsets.iter().all(Option::is_some)
    }
}

/// A process's state letter in `/proc/<pid>/stat` (`T`: stopped).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S …": comm may hold spaces and parentheses, the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// How a run recovered from one fault (or the end of one).
#[derive(Debug, Clone)]
pub struct Recovery {
    pub from: String,
    /// The first change written after the mark: how long after it, at which offset.
    pub first_write: Option<(Duration, i64)>,
    /// When every device held that change, after the mark.
    pub everywhere: Option<Duration>,
    /// The first ack committed after the mark (of the devices the mark names, else of any).
    pub first_ack: Option<Duration>,
    /// Whether the mark named devices whose acks must resume (a coordinator's).
    pub acks_must_resume: bool,
}

impl Recovery {
    pub fn measure(history: &History, from: &str, mark: Instant, ack_devices: &[String]) -> Self {
        let first_write = history.first_written_after(mark).map(|(at, offset)| (at.duration_since(mark), offset));
        let everywhere = first_write
            .and_then(|(_, offset)| history.all_applied_at(offset + 1))
            .map(|at| at.saturating_duration_since(mark));
        let first_ack = history.first_ack_after(mark, ack_devices).map(|at| at.duration_since(mark));
        Self { from: from.to_string(), first_write, everywhere, first_ack, acks_must_resume: !ack_devices.is_empty() }
    }

    /// Why this recovery fails the run: pushes, delivery, or the named devices' acks never resumed.
    pub fn problem(&self) -> Option<String> {
        if self.acks_must_resume && self.first_ack.is_none() {
            return Some(format!("no ack of the devices it concerned was committed after \"{}\"", self.from));
        }
        match (self.first_write, self.everywhere) {
            (None, _) => Some(format!("no change was written after \"{}\"", self.from)),
            (Some((_, offset)), None) => {
                Some(format!("not every device received offset {offset}, the first written after \"{}\"", self.from))
            }
            _ => None,
        }
    }

    /// ` recovery=<first write>/<every device holding it>/<first ack>`, each the slowest
    /// over the run's recoveries ("" without any).
    pub fn summary(recoveries: &[Recovery]) -> String {
        if recoveries.is_empty() {
            return String::new();
        }
        let seconds =
            |duration: Option<Duration>| duration.map_or("never".to_string(), |d| format!("{:.1}s", d.as_secs_f64()));
        let worst = |durations: Vec<Option<Duration>>| {
            durations.into_iter().try_fold(Duration::ZERO, |worst, d| d.map(|d| worst.max(d)))
        };
        let push = worst(recoveries.iter().map(|r| r.first_write.map(|(d, _)| d)).collect());
        let everywhere = worst(recoveries.iter().map(|r| r.everywhere).collect());
        let ack = worst(recoveries.iter().map(|r| r.first_ack).collect());
        format!(" recovery={}/{}/{}", seconds(push), seconds(everywhere), seconds(ack))
    }
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "recovery from \"{}\": ", self.from)?;
        match self.first_write {
            Some((after, offset)) => write!(f, "first change written {after:.1?} after (offset {offset})")?,
            None => write!(f, "no change written after it")?,
        }
        match self.everywhere {
            Some(after) => write!(f, ", every device held it {after:.1?} after")?,
            None => write!(f, ", not every device held it")?,
        }
        match self.first_ack {
            Some(after) => write!(f, ", first ack committed {after:.1?} after"),
            None => write!(f, ", no ack committed after it"),
        }
    }
}
