//! What a fault run must show besides the history invariants
//! ([`crate::history`]), which an empty or idle run passes:
//!
//! - **work happened**: at least a stated share of the planned changes was
//!   acknowledged, the log holds at least every acknowledged change, every
//!   device received the whole log, and the pushers finished in time;
//! - **each fault hit**: evidence observed during its window (the killed
//!   process gone, the proxy's count of what it did to the traffic, or the
//!   devices' errors), see [`Fault::hit`].
//!
//! Pure functions over what a run collected, so that unit tests can feed
//! them an empty run or a fault that did nothing.

use std::{collections::BTreeMap, fmt, time::Duration};

use crate::proxy::ProxyCounts;

/// The share of planned changes a fault run must get acknowledged, unless its
/// scenario says otherwise.
///
/// Why 0.8: a device retries a change that failed retryably for 90 s
/// (`Plan::retry_for`), longer than any fault of the suite lasts (at most
/// 8 s, three times a run), so those all land. What a working server may
/// lose for good are the batches a device pushes once and never retries
/// (`Plan::no_retry`, 10% of batches) when they fail during a fault: even if
/// every one of them failed, about 10% of the changes (13% at two standard
/// deviations over 120 batches of 1 to 8 changes). Below 80% the server
/// refused work it should have taken.
pub const DEFAULT_MIN_ACKNOWLEDGED_SHARE: f64 = 0.8;

/// How long the pushers of a run get to finish their batches after the faults.
pub const PUSHERS_DEADLINE: Duration = Duration::from_secs(180);

/// The kind of fault a window applied, which says what proves it hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Kafka `kill -9`: its process must be seen gone.
    KafkaKilled,
    /// The server `kill -9`: its process must be seen gone.
    ServerKilled,
    /// The proxy cut the link: it must have closed or held connections.
    LinkCut,
    /// The proxy froze the link: it must have held connections or chunks.
    LinkFrozen,
    /// The proxy slowed the link: it must have delayed chunks.
    LinkSlowed,
    /// Kafka's disk filled: pushes must have failed (the devices saw errors).
    DiskFull,
    /// One broker of a cluster `kill -9`: its process must be seen gone.
    BrokerKilled,
    /// One broker of a cluster stopped with SIGTERM (a controlled shutdown): its
    /// process must be seen gone.
    BrokerTerminated,
    /// One broker of a cluster frozen with SIGSTOP: its process must be seen
    /// stopped, and the broker seen out of the ISR of the user's topic.
    BrokerIsolated,
}

/// What was observed while one fault window lasted (from the fault until the
/// next fault, or until the pushers finished: a timeout a fault causes may
/// surface after the link is back).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evidence {
    /// Errors the devices saw: failed calls, changes a push answered with an
    /// error, streams that broke.
    pub device_errors: usize,
    /// How much the server's `lockstep_errors_total` rose (None: not
    /// comparable, e.g. the server was restarted or could not be scraped).
    pub server_errors: Option<u64>,
    /// For a kill: the process was alive before, and afterwards its pid was
    /// gone and its port refused connections. None: nothing was killed.
    pub process_gone: Option<ProcessGone>,
    /// For a fault of the link: what the proxy did to the traffic.
    pub proxy: Option<ProxyCounts>,
    /// For a SIGSTOP: whether the process was seen stopped (state `T`). None: nothing was stopped.
    pub process_stopped: Option<bool>,
    /// For a broker of a cluster: whether the ISR of the user's topic was seen without it.
    /// None: not looked at.
    pub left_isr: Option<bool>,
}

/// What the kill of one process looked like from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessGone {
    pub pid: u32,
    pub alive_before: bool,
    pub pid_gone_after: bool,
    pub port_refused_after: bool,
}

impl ProcessGone {
    pub fn observed(&self) -> bool {
        self.alive_before && self.pid_gone_after && self.port_refused_after
    }
}

impl Fault {
    /// Whether `evidence` shows that this fault took effect, and why not.
    pub fn hit(self, evidence: &Evidence) -> Result<(), String> {
        let proxy = evidence.proxy.unwrap_or_default();
        let hit = match self {
            Fault::KafkaKilled | Fault::ServerKilled | Fault::BrokerKilled | Fault::BrokerTerminated => {
                evidence.process_gone.is_some_and(|gone| gone.observed())
            }
            Fault::BrokerIsolated => evidence.process_stopped == Some(true) && evidence.left_isr == Some(true),
            Fault::LinkCut => proxy.connections_cut + proxy.connections_blackholed > 0,
            Fault::LinkFrozen => proxy.chunks_held + proxy.connections_blackholed > 0,
            Fault::LinkSlowed => proxy.chunks_delayed > 0,
            Fault::DiskFull => evidence.device_errors > 0,
        };
        if hit {
            return Ok(());
        }
        let wanted = match self {
            Fault::KafkaKilled | Fault::ServerKilled | Fault::BrokerKilled | Fault::BrokerTerminated => {
                "the process alive before, its pid gone and its port refusing after"
            }
            Fault::BrokerIsolated => "the process seen stopped and the broker seen out of the ISR",
            Fault::LinkCut => "connections cut or blackholed by the proxy",
            Fault::LinkFrozen => "connections or chunks held by the proxy",
            Fault::LinkSlowed => "chunks delayed by the proxy",
            Fault::DiskFull => "pushes failing while the disk was full",
        };
        Err(format!("wanted {wanted}; observed {evidence}"))
    }
}

impl fmt::Display for Evidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device errors {}", self.device_errors)?;
        match self.server_errors {
            Some(errors) => write!(f, ", server errors +{errors}")?,
            None => write!(f, ", server errors not comparable")?,
        }
        if let Some(gone) = self.process_gone {
            write!(
                f,
                ", pid {} alive before: {}, gone after: {}, port refused after: {}",
                gone.pid, gone.alive_before, gone.pid_gone_after, gone.port_refused_after
            )?;
        }
        if let Some(proxy) = self.proxy {
            write!(f, ", {proxy}")?;
        }
        if let Some(stopped) = self.process_stopped {
            write!(f, ", process seen stopped: {stopped}")?;
        }
        if let Some(left) = self.left_isr {
            write!(f, ", seen out of the ISR: {left}")?;
        }
        Ok(())
    }
}

/// One fault of a run and what was seen while it lasted.
#[derive(Debug, Clone)]
pub struct FaultWindow {
    /// As in the timeline, e.g. "kafka killed".
    pub what: String,
    pub fault: Fault,
    pub evidence: Evidence,
}

/// What a fault run did, in numbers.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Distinct changes the run set out to push (its workload's batches and
    /// any changes a scenario pushed itself).
    pub planned: usize,
    /// Distinct changes acknowledged with an offset.
    pub acknowledged: usize,
    /// Records in the user's log at the end.
    pub log_len: usize,
    /// Distinct change ids in the log.
    pub log_changes: usize,
    /// Per device, how many of the log's distinct changes it received.
    pub received: BTreeMap<String, usize>,
    /// Whether every pusher finished its batches within [`PUSHERS_DEADLINE`].
    pub pushers_finished: bool,
    pub windows: Vec<FaultWindow>,
}

/// What a scenario asks of its runs beyond the invariants.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// Share of planned changes that must be acknowledged (0 to 1).
    pub min_acknowledged_share: f64,
    /// Whether the run must have faults (false only for the baseline).
    pub faults: bool,
}

impl Default for Expect {
    fn default() -> Self {
        Self { min_acknowledged_share: DEFAULT_MIN_ACKNOWLEDGED_SHARE, faults: true }
    }
}

impl Outcome {
    /// Everything the run fails to show, one line each (empty: it showed it all).
    pub fn problems(&self, expect: &Expect) -> Vec<String> {
        let mut problems = Vec::new();
        if self.planned == 0 {
            problems.push("the run planned no changes: it proves nothing".to_string());
        }
        // Less a hair, so that 100 × 0.8 never rounds up to 81.
        let wanted = (self.planned as f64 * expect.min_acknowledged_share - 1e-9).ceil() as usize;
        if self.acknowledged < wanted.max(1) {
            problems.push(format!(
                "{} of {} planned changes acknowledged, wanted at least {wanted} ({:.0}%)",
                self.acknowledged,
                self.planned,
                expect.min_acknowledged_share * 100.0
            ));
        }
        if self.log_len < self.acknowledged {
            problems.push(format!(
                "the log holds {} records, fewer than the {} acknowledged",
                self.log_len, self.acknowledged
            ));
        }
        if self.received.is_empty() {
            problems.push("the run had no devices".to_string());
        }
        for (device, received) in &self.received {
            if *received < self.log_changes {
                problems.push(format!("{device} received {received} of the log's {} changes", self.log_changes));
            }
        }
        if !self.pushers_finished {
            problems.push(format!("the pushers did not finish within {PUSHERS_DEADLINE:?}"));
        }
        if expect.faults && self.windows.is_empty() {
            problems.push("no fault was applied".to_string());
        }
        for window in &self.windows {
            if let Err(why) = window.fault.hit(&window.evidence) {
                problems.push(format!("the fault \"{}\" did not hit: {why}", window.what));
            }
        }
        problems
    }

    /// `planned=… acked=… delivered=min…max/log`.
    pub fn summary(&self) -> String {
        let least = self.received.values().min().copied().unwrap_or(0);
        format!("planned={} acked={} delivered={least}/{}", self.planned, self.acknowledged, self.log_changes)
    }
}

/// Sums every sample of `counter` in a Prometheus text exposition (None if
/// it has none).
pub fn counter_sum(metrics: &str, counter: &str) -> Option<f64> {
    let mut found = None;
    for line in metrics.lines().filter(|line| !line.starts_with('#')) {
        let Some(rest) = line.strip_prefix(counter) else { continue };
        // `name{labels} value` or `name value`, not `name_suffix …`.
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(value) = rest.rsplit(' ').next().and_then(|value| value.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

/// Whether `LOCKSTEP_ALLOW_SKIP` (names separated by commas or spaces) lets
/// the test `name` skip what it cannot set up; a skip that is not allowed
/// is a failure.
pub fn skip_allowed(name: &str) -> bool {
    skip_allowed_by(std::env::var("LOCKSTEP_ALLOW_SKIP").ok().as_deref(), name)
}

fn skip_allowed_by(allowed: Option<&str>, name: &str) -> bool {
    allowed.is_some_and(|allowed| allowed.split([',', ' ']).any(|allowed| allowed.trim() == name))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::history::{CommittedAtEnd, History, PushOutcome};

    fn working_run() -> Outcome {
        Outcome {
            planned: 100,
            acknowledged: 95,
            log_len: 96,
            log_changes: 96,
            received: BTreeMap::from([("a".into(), 96), ("b".into(), 96)]),
            pushers_finished: true,
            windows: vec![FaultWindow {
                what: "kafka killed".into(),
                fault: Fault::KafkaKilled,
                evidence: Evidence {
                    device_errors: 4,
                    server_errors: Some(4),
                    process_gone: Some(ProcessGone {
                        pid: 42,
                        alive_before: true,
                        pid_gone_after: true,
                        port_refused_after: true,
                    }),
                    proxy: None,
                    ..Evidence::default()
                },
            }],
        }
    }

    #[test]
    fn a_working_run_whose_fault_hit_passes() {
        let problems = working_run().problems(&Expect::default());
        assert!(problems.is_empty(), "{problems:#?}");
    }

    #[test]
    fn an_empty_history_fails_although_every_invariant_holds() {
        // A server that refused every push: nothing acknowledged, nothing in the log.
        let history = History::new([("a".to_string(), 0), ("b".to_string(), 0)]);
        for index in 0..10 {
            let refused = PushOutcome::CallFailed { code: tonic::Code::Unavailable, retryable: true };
            history.push("a", &format!("c{index}"), refused, false);
        }
        let log = Vec::new();
        let committed: BTreeMap<String, CommittedAtEnd> =
            BTreeMap::from([("a".into(), Ok(None)), ("b".into(), Ok(None))]);
        let report = history.check(&log, &committed);
        assert!(report.ok(), "the invariants alone pass an empty run: {report}");
        let outcome = Outcome {
            planned: 10,
            acknowledged: history.stats().pushes_ok,
            log_len: log.len(),
            log_changes: 0,
            received: history.received_of_log(&log),
            pushers_finished: true,
            windows: working_run().windows,
        };
        let problems = outcome.problems(&Expect::default());
        assert_eq!(problems, ["0 of 10 planned changes acknowledged, wanted at least 8 (80%)"], "{problems:#?}");
        // And a run that planned nothing proves nothing either.
        let problems = Outcome { planned: 0, ..outcome }.problems(&Expect::default());
        assert!(problems.iter().any(|problem| problem.contains("planned no changes")), "{problems:#?}");
    }

    #[test]
    fn a_fault_that_did_nothing_fails() {
        let idle = Evidence { device_errors: 0, server_errors: Some(0), ..Evidence::default() };
        let still_alive = ProcessGone { pid: 42, alive_before: true, pid_gone_after: false, port_refused_after: false };
        let never_started = ProcessGone { pid: 0, alive_before: false, pid_gone_after: true, port_refused_after: true };
        let cases = [
            (Fault::KafkaKilled, Evidence { process_gone: Some(still_alive), device_errors: 3, ..idle.clone() }),
            (Fault::ServerKilled, Evidence { process_gone: Some(never_started), ..idle.clone() }),
            (Fault::LinkCut, Evidence { proxy: Some(ProxyCounts::default()), ..idle.clone() }),
            (
                Fault::LinkFrozen,
                Evidence { proxy: Some(ProxyCounts { chunks_delayed: 9, ..Default::default() }), ..idle.clone() },
            ),
            (Fault::LinkSlowed, Evidence { proxy: None, device_errors: 2, ..idle.clone() }),
            (Fault::DiskFull, idle.clone()),
            (Fault::BrokerKilled, Evidence { process_gone: Some(still_alive), ..idle.clone() }),
            (Fault::BrokerIsolated, Evidence { process_stopped: Some(true), left_isr: Some(false), ..idle.clone() }),
            (Fault::BrokerIsolated, Evidence { process_stopped: Some(false), left_isr: Some(true), ..idle.clone() }),
        ];
        for (fault, evidence) in cases {
            let mut outcome = working_run();
            outcome.windows = vec![FaultWindow { what: format!("{fault:?}"), fault, evidence }];
            let problems = outcome.problems(&Expect::default());
            assert_eq!(problems.len(), 1, "{fault:?}: {problems:#?}");
            assert!(problems[0].contains("did not hit"), "{fault:?}: {problems:#?}");
        }
        // The same faults with what proves them pass.
        let hits = [
            (
                Fault::LinkCut,
                Evidence { proxy: Some(ProxyCounts { connections_cut: 2, ..Default::default() }), ..idle.clone() },
            ),
            (
                Fault::LinkFrozen,
                Evidence { proxy: Some(ProxyCounts { chunks_held: 1, ..Default::default() }), ..idle.clone() },
            ),
            (
                Fault::LinkSlowed,
                Evidence { proxy: Some(ProxyCounts { chunks_delayed: 5, ..Default::default() }), ..idle.clone() },
            ),
            (Fault::DiskFull, Evidence { device_errors: 1, ..idle.clone() }),
            (Fault::BrokerIsolated, Evidence { process_stopped: Some(true), left_isr: Some(true), ..idle.clone() }),
        ];
        for (fault, evidence) in hits {
            assert_eq!(fault.hit(&evidence), Ok(()), "{fault:?}");
        }
        // A run with faults planned but none applied.
        let mut outcome = working_run();
        outcome.windows.clear();
        assert_eq!(outcome.problems(&Expect::default()), ["no fault was applied"]);
        assert!(outcome.problems(&Expect { faults: false, ..Expect::default() }).is_empty());
    }

    #[test]
    fn a_short_log_an_undelivered_device_and_late_pushers_fail() {
        let mut outcome = working_run();
        outcome.log_len = 90;
        outcome.received.insert("b".into(), 95);
        outcome.pushers_finished = false;
        let problems = outcome.problems(&Expect::default());
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(problems[0].contains("fewer than the 95 acknowledged"), "{problems:#?}");
        assert!(problems[1].contains("b received 95 of the log's 96"), "{problems:#?}");
        assert!(problems[2].contains("did not finish"), "{problems:#?}");
    }

    #[test]
    fn the_acknowledged_share_is_the_scenarios() {
        let outcome = Outcome { acknowledged: 70, ..working_run() };
        assert_eq!(outcome.problems(&Expect::default()).len(), 1);
        assert!(outcome.problems(&Expect { min_acknowledged_share: 0.7, ..Expect::default() }).is_empty());
        let everything = Expect { min_acknowledged_share: 1.0, ..Expect::default() };
        assert_eq!(Outcome { acknowledged: 99, log_len: 99, ..working_run() }.problems(&everything).len(), 1);
    }

    #[test]
    fn counters_are_summed_over_labels_and_exact_names_only() {
        let metrics = "# HELP lockstep_errors_total Requests answered with an error.\n\
                       # TYPE lockstep_errors_total counter\n\
                       lockstep_errors_total{code=\"unavailable\"} 3\n\
                       lockstep_errors_total{code=\"internal\"} 1\n\
                       lockstep_errors_total_other 100\n";
        assert_eq!(counter_sum(metrics, "lockstep_errors_total"), Some(4.0));
        assert_eq!(counter_sum("lockstep_acks_total 2\n", "lockstep_errors_total"), None);
        assert_eq!(counter_sum("lockstep_errors_total 7\n", "lockstep_errors_total"), Some(7.0));
    }

    #[test]
    fn only_the_named_tests_may_skip() {
        assert!(!skip_allowed_by(None, "kafka_disk_fills_up"));
        assert!(!skip_allowed_by(Some(""), "kafka_disk_fills_up"));
        assert!(!skip_allowed_by(Some("kafka_disk"), "kafka_disk_fills_up"));
        assert!(skip_allowed_by(Some("kafka_disk_fills_up"), "kafka_disk_fills_up"));
        assert!(skip_allowed_by(Some("tls, kafka_disk_fills_up"), "kafka_disk_fills_up"));
    }
}
