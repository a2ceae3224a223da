//! What the devices of one user saw during a fault run, and the invariants
//! it must satisfy once the faults are over.
//!
//! Devices record, in one shared order, every push result per change (an
//! offset, a duplicate, or an error code), every stream they opened, every
//! change delivered to them, and every ack result. [`History::check`] then
//! compares that with the user's log as Kafka holds it at the end:
//!
//! - **I1** every change acknowledged with an offset is in the log at that
//!   offset and was delivered to every other device of the user.
//! - **I2** every device received exactly the change ids of the log, each at
//!   its log offset (convergence).
//! - **I4** each device applied offsets contiguously from where it started
//!   (no hole; a stream's batches are consecutive), and its committed offset
//!   never moved backwards (ack answers, where a new stream starts, what
//!   Kafka holds at the end; an offset that could not be read at the end is
//!   a violation, not a check skipped).
//! - **I5** nothing but pushed changes reaches a device or the log; a change
//!   that failed for good (a push answered `retryable: false`, none with an
//!   offset) is in no log and reached no device; a change whose every push
//!   failed and that is not in the log reached nobody.
//! - **once**: no change id is in the log twice, and a change pushed again
//!   after it was acknowledged gets `duplicate = true` and its first offset.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    sync::Mutex,
    time::Instant,
};

use tonic::Code;

/// How one push attempt ended for one change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    Written {
        offset: i64,
        duplicate: bool,
    },
    /// The call answered with an error for this change.
    Failed {
        code: Code,
        retryable: bool,
    },
    /// The whole call failed (recorded for every change of it).
    CallFailed {
        code: Code,
        retryable: bool,
    },
}

impl PushOutcome {
    pub fn offset(&self) -> Option<i64> {
        match self {
            PushOutcome::Written { offset, .. } => Some(*offset),
            PushOutcome::Failed { .. } | PushOutcome::CallFailed { .. } => None,
        }
    }

    /// Whether pushing the same change again may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            PushOutcome::Written { .. } => false,
            PushOutcome::Failed { retryable, .. } | PushOutcome::CallFailed { retryable, .. } => *retryable,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Push { device: String, change_id: String, outcome: PushOutcome, again: bool },
    Call { call: &'static str, failed: Option<Code> },
    Subscribed { device: String, session: u64 },
    Delivered { device: String, session: u64, offset: i64, change_id: String },
    Resync { device: String, log_start: i64, reason: String },
    Acked { device: String, offset: i64, committed: Result<i64, Code> },
}

/// Shared by every simulated device of one run.
#[derive(Default)]
pub struct History {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The user's devices, with the offset each starts applying at.
    devices: BTreeMap<String, i64>,
    events: Vec<Event>,
    /// Per device: every offset below this was applied (progress for waiting).
    applied_until: HashMap<String, i64>,
    /// Each change written (acknowledged with an offset, not as a duplicate), in the
    /// order the answers came: when its push was sent, when answered, its offset.
    written_at: Vec<(Instant, Instant, i64)>,
    /// Per device, when its `applied_until` rose to each value: for recovery times.
    applied_at: HashMap<String, Vec<(Instant, i64)>>,
    /// When each ack was answered with a committed offset, and whose: for recovery times.
    acked_at: Vec<(Instant, String)>,
}

/// The log as Kafka holds it at the end: (offset, change id), in offset order.
pub type Log = Vec<(i64, String)>;

/// A device's committed offset as Kafka holds it at the end: `Ok(None)` if
/// none is committed, `Err` with the reason if it could not be read.
pub type CommittedAtEnd = Result<Option<i64>, String>;

impl History {
    /// `devices`: each device of the user with the offset it starts at (0 for a fresh one).
    pub fn new(devices: impl IntoIterator<Item = (String, i64)>) -> Self {
        let devices: BTreeMap<String, i64> = devices.into_iter().collect();
        let applied_until = devices.iter().map(|(device, start)| (device.clone(), *start)).collect();
        let inner = Inner { devices, applied_until, ..Inner::default() };
        Self { inner: Mutex::new(inner) }
    }

    fn record(&self, event: Event) {
        self.lock().events.push(event);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One RPC (`push`, `ack`, `subscribe`) and whether it failed as a whole.
    pub fn call(&self, call: &'static str, failed: Option<Code>) {
        self.record(Event::Call { call, failed });
    }

    /// `again`: a deliberate push of a change that was acknowledged before.
    pub fn push(&self, device: &str, change_id: &str, outcome: PushOutcome, again: bool) {
        self.push_sent_at(device, change_id, outcome, again, Instant::now());
    }

    /// [`History::push`] of a push sent at `sent_at`.
    pub fn push_sent_at(&self, device: &str, change_id: &str, outcome: PushOutcome, again: bool, sent_at: Instant) {
        let mut inner = self.lock();
        if let PushOutcome::Written { offset, duplicate: false } = outcome {
            inner.written_at.push((sent_at, Instant::now(), offset));
        }
        inner.events.push(Event::Push { device: device.into(), change_id: change_id.into(), outcome, again });
    }

    pub fn subscribed(&self, device: &str, session: u64) {
        self.record(Event::Subscribed { device: device.into(), session });
    }

    pub fn delivered(&self, device: &str, session: u64, offset: i64, change_id: &str) {
        let mut inner = self.lock();
        let until = inner.applied_until.entry(device.to_string()).or_default();
        if offset == *until {
            *until = offset + 1;
            inner.applied_at.entry(device.to_string()).or_default().push((Instant::now(), offset + 1));
        }
        inner.events.push(Event::Delivered { device: device.into(), session, offset, change_id: change_id.into() });
    }

    pub fn resync(&self, device: &str, log_start: i64, reason: &str) {
        self.record(Event::Resync { device: device.into(), log_start, reason: reason.into() });
    }

    pub fn acked(&self, device: &str, offset: i64, committed: Result<i64, Code>) {
        let mut inner = self.lock();
        if committed.is_ok() {
            inner.acked_at.push((Instant::now(), device.to_string()));
        }
        inner.events.push(Event::Acked { device: device.into(), offset, committed });
    }

    /// When the first ack of one of `devices` (every device: empty) after `since` was committed.
    pub fn first_ack_after(&self, since: Instant, devices: &[String]) -> Option<Instant> {
        let inner = self.lock();
        let of_interest = |device: &String| devices.is_empty() || devices.contains(device);
        inner.acked_at.iter().find(|(at, device)| *at >= since && of_interest(device)).map(|(at, _)| *at)
    }

    /// Whether every device applied every offset below `log_end`.
    pub fn all_applied(&self, log_end: i64) -> bool {
        self.lock().applied_until.values().all(|until| *until >= log_end)
    }

    /// The first change written (not as a duplicate) by a push sent after `since`: when
    /// its answer came, and its offset.
    pub fn first_written_after(&self, since: Instant) -> Option<(Instant, i64)> {
        let inner = self.lock();
        inner.written_at.iter().find(|(sent, _, _)| *sent >= since).map(|(_, answered, offset)| (*answered, *offset))
    }

    /// The first change answered as written (not as a duplicate) after `since`, whenever
    /// its push was sent: when, and its offset.
    pub fn first_answered_written_after(&self, since: Instant) -> Option<(Instant, i64)> {
        let inner = self.lock();
        inner
            .written_at
            .iter()
            .find(|(_, answered, _)| *answered >= since)
            .map(|(_, answered, offset)| (*answered, *offset))
    }

    /// When the last device got to apply every offset below `log_end` (None: some device never did).
    pub fn all_applied_at(&self, log_end: i64) -> Option<Instant> {
        let inner = self.lock();
        let mut latest = None;
        for device in inner.devices.keys() {
            let progress = inner.applied_at.get(device)?;
            let (at, _) = progress.iter().find(|(_, until)| *until >= log_end)?;
            latest = latest.max(Some(*at));
        }
        latest
    }

    /// Per device, the offset below which it applied everything.
    pub fn applied_until(&self) -> BTreeMap<String, i64> {
        self.lock().applied_until.iter().map(|(device, until)| (device.clone(), *until)).collect()
    }

    pub fn stats(&self) -> Stats {
        let inner = self.lock();
        let mut stats = Stats::default();
        let mut written = BTreeSet::new();
        let mut pushed = BTreeSet::new();
        for event in &inner.events {
            if let Event::Push { change_id, .. } = event {
                pushed.insert(change_id);
            }
            match event {
                Event::Call { call, failed } => {
                    stats.ops += 1;
                    if let Some(code) = failed {
                        stats.errors += 1;
                        *stats.error_codes.entry(format!("{call}:{code:?}")).or_default() += 1;
                    }
                }
                Event::Push { change_id, outcome: PushOutcome::Written { .. }, .. } => {
                    written.insert(change_id.clone());
                }
                Event::Push { outcome: PushOutcome::Failed { code, .. }, .. } => {
                    stats.errors += 1;
                    *stats.error_codes.entry(format!("push-change:{code:?}")).or_default() += 1;
                }
                Event::Delivered { .. } => stats.deliveries += 1,
                _ => {}
            }
        }
        stats.pushes_ok = written.len();
        stats.unwritten = pushed.iter().filter(|change_id| !written.contains(**change_id)).count();
        stats
    }

    /// Per device, how many distinct change ids of `log` it received.
    pub fn received_of_log(&self, log: &Log) -> BTreeMap<String, usize> {
        let inner = self.lock();
        let in_log: BTreeSet<&str> = log.iter().map(|(_, id)| id.as_str()).collect();
        let mut received: BTreeMap<&str, BTreeSet<&str>> =
            inner.devices.keys().map(|device| (device.as_str(), BTreeSet::new())).collect();
        for event in &inner.events {
            if let Event::Delivered { device, change_id, .. } = event
                && in_log.contains(change_id.as_str())
            {
                received.entry(device).or_default().insert(change_id);
            }
        }
        received.into_iter().map(|(device, ids)| (device.to_string(), ids.len())).collect()
    }

    /// Checks the invariants against the final `log` and, per device, the
    /// committed offset Kafka holds at the end (`Ok(None)`: no offset
    /// committed; `Err`: it could not be read, a violation of I4).
    pub fn check(&self, log: &Log, committed_at_end: &BTreeMap<String, CommittedAtEnd>) -> Report {
        let inner = self.lock();
        let mut report = Report::default();
        let log_at: BTreeMap<i64, &str> = log.iter().map(|(offset, id)| (*offset, id.as_str())).collect();
        let mut log_ids: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
        for (offset, id) in log {
            log_ids.entry(id.as_str()).or_default().push(*offset);
        }

        // What the devices did, gathered in event order.
        let mut pushed: BTreeMap<&str, &str> = BTreeMap::new(); // change id -> origin device
        let mut first_written: BTreeMap<&str, i64> = BTreeMap::new();
        // Change id -> the first answer that said it will never be written.
        let mut failed_for_good: BTreeMap<&str, &PushOutcome> = BTreeMap::new();
        let mut delivered: BTreeMap<&str, BTreeMap<&str, i64>> = BTreeMap::new(); // device -> id -> offset
        let mut progress: BTreeMap<&str, DeviceProgress> = inner
            .devices
            .iter()
            .map(|(device, start)| (device.as_str(), DeviceProgress::starting_at(*start)))
            .collect();
        for event in &inner.events {
            match event {
                Event::Push { device, change_id, outcome, again } => {
                    pushed.entry(change_id).or_insert(device);
                    if matches!(outcome, PushOutcome::Failed { .. } | PushOutcome::CallFailed { .. })
                        && !outcome.retryable()
                    {
                        failed_for_good.entry(change_id).or_insert(outcome);
                    }
                    let PushOutcome::Written { offset, duplicate } = outcome else { continue };
                    match first_written.get(change_id.as_str()) {
                        None => {
                            first_written.insert(change_id, *offset);
                        }
                        Some(first) if first != offset || !duplicate => report.once.push(format!(
                            "{change_id} acknowledged at {first}, then again at {offset} (duplicate = {duplicate})"
                        )),
                        Some(_) => {}
                    }
                    if *again && !duplicate {
                        report.once.push(format!("{change_id} pushed again after its ack was not marked duplicate"));
                    }
                }
                Event::Subscribed { device, session } => {
                    if let Some(progress) = progress.get_mut(device.as_str()) {
                        progress.session = Some(*session);
                        progress.session_next = None;
                        progress.resynced = false;
                    }
                }
                Event::Delivered { device, session, offset, change_id } => {
                    delivered.entry(device).or_default().insert(change_id, *offset);
                    if let Some(progress) = progress.get_mut(device.as_str()) {
                        progress.delivered(device, *session, *offset, &mut report.i4);
                    }
                    match log_at.get(offset) {
                        Some(id) if id == change_id => {}
                        other => report.i2.push(format!(
                            "{device} received {change_id} at offset {offset}, the log holds {other:?} there"
                        )),
                    }
                }
                Event::Resync { device, log_start, reason } => {
                    // No retention here, and a lost log shows in I1: a Resync is a false alarm
                    // that makes the device download everything again.
                    report.i4.push(format!("{device} got a Resync ({reason}) to {log_start}, but no history expired"));
                    if let Some(progress) = progress.get_mut(device.as_str()) {
                        progress.resynced = true;
                    }
                }
                Event::Acked { device, offset, committed: Ok(committed) } => {
                    if let Some(progress) = progress.get_mut(device.as_str()) {
                        if *committed < progress.committed {
                            report.i4.push(format!(
                                "{device}: ack of {offset} answered committed {committed} after an earlier {}",
                                progress.committed
                            ));
                        }
                        progress.committed = progress.committed.max(*committed);
                    }
                }
                Event::Acked { .. } | Event::Call { .. } => {}
            }
        }

        // I1: acknowledged means in the log there, and delivered to the others.
        for (change_id, offset) in &first_written {
            if log_at.get(offset) != Some(change_id) {
                report.i1.push(format!(
                    "{change_id} was acknowledged at offset {offset}, the log holds {:?} there",
                    log_at.get(offset)
                ));
            }
            let origin = pushed.get(change_id).copied().unwrap_or_default();
            for device in inner.devices.keys().filter(|device| device.as_str() != origin) {
                if !delivered.get(device.as_str()).is_some_and(|ids| ids.contains_key(change_id)) {
                    report.i1.push(format!("{change_id} (acknowledged at {offset}) never reached {device}"));
                }
            }
        }
        // I2: every device holds exactly the log's change ids.
        for device in inner.devices.keys() {
            let received: BTreeSet<&str> =
                delivered.get(device.as_str()).map(|ids| ids.keys().copied().collect()).unwrap_or_default();
            let missing: Vec<&&str> = log_ids.keys().filter(|id| !received.contains(**id)).collect();
            let extra: Vec<&&str> = received.iter().filter(|id| !log_ids.contains_key(**id)).collect();
            if !missing.is_empty() {
                report.i2.push(format!(
                    "{device} is missing {} of the log's {} changes, e.g. {:?}",
                    missing.len(),
                    log_ids.len(),
                    &missing[..missing.len().min(3)]
                ));
            }
            if !extra.is_empty() {
                report.i2.push(format!(
                    "{device} received {} changes the log does not hold, e.g. {:?}",
                    extra.len(),
                    &extra[..extra.len().min(3)]
                ));
            }
        }
        // I4, at the end: Kafka's committed offset is not below what acks answered.
        for (device, progress) in &progress {
            let acked = (progress.committed > i64::MIN).then_some(progress.committed);
            let end = match committed_at_end.get(*device) {
                None => {
                    report.i4.push(format!("{device}: its committed offset at the end was never read"));
                    continue;
                }
                Some(Err(error)) => {
                    report.i4.push(format!("{device}: reading its committed offset at the end failed: {error}"));
                    continue;
                }
                Some(Ok(end)) => *end,
            };
            match (end, acked) {
                (None, Some(acked)) => {
                    report.i4.push(format!("{device}: Kafka holds no committed offset, acks had answered {acked}"))
                }
                (Some(end), Some(acked)) if end < acked => {
                    report.i4.push(format!("{device}: Kafka holds committed offset {end}, acks had answered {acked}"))
                }
                _ => {}
            }
            let log_end = log.last().map_or(0, |(offset, _)| offset + 1);
            if let Some(end) = end
                && end > log_end
            {
                report.i4.push(format!("{device}: committed offset {end} is beyond the log end {log_end}"));
            }
        }
        // I5: only pushed changes anywhere; a failed change outside the log reached nobody.
        for (id, _) in log_ids.iter().filter(|(id, _)| !pushed.contains_key(**id)) {
            report.i5.push(format!("the log holds {id}, which no device pushed"));
        }
        // A change that failed for good: "never written" was the server's word.
        for (id, outcome) in failed_for_good.iter().filter(|(id, _)| !first_written.contains_key(**id)) {
            if let Some(offsets) = log_ids.get(id) {
                report.i5.push(format!("{id} failed for good ({outcome:?}), yet the log holds it at {offsets:?}"));
            }
            for (device, ids) in &delivered {
                if let Some(offset) = ids.get(id) {
                    report.i5.push(format!("{id} failed for good ({outcome:?}), yet {device} received it at {offset}"));
                }
            }
        }
        for (device, ids) in &delivered {
            for id in ids.keys().filter(|id| !pushed.contains_key(**id)) {
                report.i5.push(format!("{device} received {id}, which no device pushed"));
            }
            for id in ids.keys().filter(|id| !first_written.contains_key(**id) && !log_ids.contains_key(**id)) {
                report.i5.push(format!("{device} received {id}: its push failed and the log does not hold it"));
            }
        }
        // once: each change at most once in the log.
        for (id, offsets) in log_ids.iter().filter(|(_, offsets)| offsets.len() > 1) {
            report.once.push(format!("{id} is in the log {} times, at {offsets:?}", offsets.len()));
        }
        report
    }
}

/// A device's position while the checker replays its events.
struct DeviceProgress {
    /// Every offset below this was applied.
    next: i64,
    /// The highest committed offset an ack answered.
    committed: i64,
    session: Option<u64>,
    /// The offset the current stream must deliver next (None before its first batch).
    session_next: Option<i64>,
    /// The current stream started with a Resync (reported already): it restarts below.
    resynced: bool,
}

impl DeviceProgress {
    fn starting_at(start: i64) -> Self {
        Self { next: start, committed: i64::MIN, session: None, session_next: None, resynced: false }
    }

    fn delivered(&mut self, device: &str, session: u64, offset: i64, violations: &mut Vec<String>) {
        if self.session != Some(session) {
            violations.push(format!("{device}: delivery on session {session} outside its stream"));
        }
        match self.session_next {
            None => {
                // A stream (without from_offset) starts at the committed offset.
                if offset < self.committed && !std::mem::take(&mut self.resynced) {
                    violations.push(format!(
                        "{device}: committed offset moved backwards: an ack answered {}, the next stream started at {offset}",
                        self.committed
                    ));
                }
            }
            Some(expected) if offset != expected => violations.push(format!(
                "{device}: stream {session} delivered offset {offset} after {} (not consecutive)",
                expected - 1
            )),
            Some(_) => {}
        }
        self.session_next = Some(offset + 1);
        if offset > self.next {
            violations.push(format!(
                "{device}: hole: offset {offset} delivered while {}..{offset} were never applied",
                self.next
            ));
        }
        self.next = self.next.max(offset + 1);
    }
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// RPCs made (push, ack, subscribe).
    pub ops: usize,
    /// RPCs that failed as a whole, plus changes a push call answered with an error.
    pub errors: usize,
    /// Distinct changes acknowledged with an offset.
    pub pushes_ok: usize,
    /// Distinct changes pushed that never got an offset (given up on).
    pub unwritten: usize,
    pub deliveries: usize,
    /// Errors by `call:code` (`push:Unavailable` a failed call, `push-change:Unavailable` a
    /// change a push answered with an error, `stream:…` a stream that broke).
    pub error_codes: BTreeMap<String, usize>,
}

/// Violations per invariant (empty: it held).
#[derive(Debug, Default)]
pub struct Report {
    pub i1: Vec<String>,
    pub i2: Vec<String>,
    pub i4: Vec<String>,
    pub i5: Vec<String>,
    pub once: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.invariants().iter().all(|(_, violations)| violations.is_empty())
    }

    fn invariants(&self) -> [(&'static str, &Vec<String>); 5] {
        [("I1", &self.i1), ("I2", &self.i2), ("I4", &self.i4), ("I5", &self.i5), ("once", &self.once)]
    }

    /// `I1=ok I2=FAIL(3) …`
    pub fn verdicts(&self) -> String {
        self.invariants()
            .iter()
            .map(|(name, violations)| {
                if violations.is_empty() { format!("{name}=ok") } else { format!("{name}=FAIL({})", violations.len()) }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl fmt::Display for Report {
    /// The first violations of each invariant that failed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, violations) in self.invariants() {
            for violation in violations.iter().take(5) {
                writeln!(f, "  {name}: {violation}")?;
            }
            if violations.len() > 5 {
                writeln!(f, "  {name}: … and {} more", violations.len() - 5)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(offset: i64) -> PushOutcome {
        PushOutcome::Written { offset, duplicate: false }
    }

    fn log(ids: &[&str]) -> Log {
        ids.iter().enumerate().map(|(offset, id)| (offset as i64, id.to_string())).collect()
    }

    fn two_devices() -> History {
        History::new([("a".to_string(), 0), ("b".to_string(), 0)])
    }

    /// Kafka's committed offsets at the end: `a` committed nothing, `b` as given.
    fn committed_b(b: Option<i64>) -> BTreeMap<String, CommittedAtEnd> {
        BTreeMap::from([("a".to_string(), Ok(None)), ("b".to_string(), Ok(b))])
    }

    fn deliver_all(history: &History, device: &str, session: u64, ids: &[&str]) {
        history.subscribed(device, session);
        for (offset, id) in ids.iter().enumerate() {
            history.delivered(device, session, offset as i64, id);
        }
    }

    #[test]
    fn a_clean_run_passes() {
        let history = two_devices();
        history.push("a", "c0", PushOutcome::Failed { code: Code::Unavailable, retryable: true }, false);
        history.push("a", "c0", written(0), false);
        history.push("a", "c1", written(1), false);
        history.push("a", "c1", PushOutcome::Written { offset: 1, duplicate: true }, true);
        deliver_all(&history, "a", 1, &["c0", "c1"]);
        deliver_all(&history, "b", 1, &["c0", "c1"]);
        history.acked("b", 1, Ok(2));
        let report = history.check(&log(&["c0", "c1"]), &committed_b(Some(2)));
        assert!(report.ok(), "{report}");
        assert!(history.all_applied(2));
        assert_eq!(report.verdicts(), "I1=ok I2=ok I4=ok I5=ok once=ok");
    }

    #[test]
    fn an_acknowledged_change_that_never_arrives_fails_i1_and_i2() {
        let history = two_devices();
        history.push("a", "c0", written(0), false);
        history.push("a", "c1", written(1), false);
        deliver_all(&history, "a", 1, &["c0", "c1"]);
        deliver_all(&history, "b", 1, &["c0"]);
        let report = history.check(&log(&["c0", "c1"]), &committed_b(None));
        assert_eq!(report.i1.len(), 1, "{report}");
        assert_eq!(report.i2.len(), 1, "{report}");
        assert!(!history.all_applied(2));
    }

    #[test]
    fn an_acknowledged_change_the_log_lost_fails_i1() {
        let history = two_devices();
        history.push("a", "c0", written(0), false);
        let report = history.check(&log(&[]), &committed_b(None));
        assert!(report.i1.iter().any(|violation| violation.contains("the log holds None")), "{report}");
    }

    #[test]
    fn holes_backward_commits_and_non_consecutive_batches_fail_i4() {
        let history = two_devices();
        for (offset, id) in ["c0", "c1", "c2", "c3"].iter().enumerate() {
            history.push("a", id, written(offset as i64), false);
        }
        deliver_all(&history, "a", 1, &["c0", "c1", "c2", "c3"]);
        history.subscribed("b", 1);
        history.delivered("b", 1, 0, "c0");
        history.delivered("b", 1, 2, "c2"); // skipped 1
        history.acked("b", 2, Ok(3));
        history.subscribed("b", 2);
        history.delivered("b", 2, 1, "c1"); // below the committed 3
        history.delivered("b", 2, 2, "c2");
        history.delivered("b", 2, 3, "c3");
        history.acked("b", 3, Ok(2)); // backwards
        let report = history.check(&log(&["c0", "c1", "c2", "c3"]), &committed_b(Some(1)));
        let text = report.to_string();
        assert!(text.contains("hole"), "{text}");
        assert!(text.contains("not consecutive"), "{text}");
        assert!(text.contains("started at 1"), "{text}");
        assert!(text.contains("answered committed 2"), "{text}");
        assert!(text.contains("Kafka holds committed offset 1"), "{text}");
        assert!(report.i1.is_empty() && report.i2.is_empty(), "{text}");
    }

    #[test]
    fn failed_changes_reaching_a_device_fail_i5_unless_the_log_has_them() {
        let history = two_devices();
        let failed = PushOutcome::Failed { code: Code::Unavailable, retryable: true };
        history.push("a", "landed", failed.clone(), false);
        history.push("a", "lost", failed, false);
        deliver_all(&history, "a", 1, &["landed"]);
        deliver_all(&history, "b", 1, &["landed"]);
        // A failed push that is in the log is delivered like any other.
        assert!(history.check(&log(&["landed"]), &committed_b(None)).ok());
        // A failed push that is not, and a change nobody pushed, must not arrive.
        history.delivered("b", 1, 1, "lost");
        history.delivered("b", 1, 2, "stranger");
        let report = history.check(&log(&["landed"]), &committed_b(None));
        assert!(report.i5.iter().any(|violation| violation.contains("lost")), "{report}");
        assert!(report.i5.iter().any(|violation| violation.contains("stranger")), "{report}");
    }

    #[test]
    fn a_change_appended_twice_or_answered_with_another_offset_fails_once() {
        let history = two_devices();
        history.push("a", "c0", written(0), false);
        history.push("a", "c0", written(1), true);
        let report = history.check(&log(&["c0", "c0"]), &committed_b(None));
        assert_eq!(report.once.len(), 3, "{report}");
    }

    #[test]
    fn a_change_that_failed_for_good_in_the_log_or_on_a_device_fails_i5() {
        let history = two_devices();
        let for_good = PushOutcome::Failed { code: Code::InvalidArgument, retryable: false };
        history.push("a", "c0", written(0), false);
        history.push("a", "refused", for_good.clone(), false);
        history.push("a", "refused-call", PushOutcome::CallFailed { code: Code::Internal, retryable: false }, false);
        deliver_all(&history, "a", 1, &["c0"]);
        deliver_all(&history, "b", 1, &["c0"]);
        assert!(history.check(&log(&["c0"]), &committed_b(None)).ok(), "refused changes nowhere: fine");
        // The same refusals, yet both changes landed: the log holds them and b received them.
        history.delivered("a", 1, 1, "refused");
        history.delivered("a", 1, 2, "refused-call");
        history.delivered("b", 1, 1, "refused");
        history.delivered("b", 1, 2, "refused-call");
        let report = history.check(&log(&["c0", "refused", "refused-call"]), &committed_b(None));
        let failed_for_good: Vec<&String> =
            report.i5.iter().filter(|violation| violation.contains("failed for good")).collect();
        // Each change: once for the log, once per device that received it.
        assert_eq!(failed_for_good.len(), 6, "{report}");
        assert!(report.i1.is_empty() && report.i2.is_empty() && report.i4.is_empty(), "{report}");
    }

    #[test]
    fn a_retryable_failure_that_was_written_after_all_is_no_i5_violation() {
        let history = two_devices();
        history.push("a", "c0", PushOutcome::CallFailed { code: Code::DeadlineExceeded, retryable: true }, false);
        history.push("a", "c0", PushOutcome::Written { offset: 0, duplicate: true }, false);
        deliver_all(&history, "a", 1, &["c0"]);
        deliver_all(&history, "b", 1, &["c0"]);
        let report = history.check(&log(&["c0"]), &committed_b(None));
        assert!(report.ok(), "{report}");
    }

    #[test]
    fn committed_offsets_that_could_not_be_read_or_vanished_fail_i4() {
        let history = two_devices();
        history.push("a", "c0", written(0), false);
        deliver_all(&history, "a", 1, &["c0"]);
        deliver_all(&history, "b", 1, &["c0"]);
        history.acked("b", 0, Ok(1));
        let unreadable =
            BTreeMap::from([("a".to_string(), Ok(None)), ("b".to_string(), Err("coordinator not available".into()))]);
        let report = history.check(&log(&["c0"]), &unreadable);
        assert!(report.i4.iter().any(|violation| violation.contains("coordinator not available")), "{report}");
        let never_read = BTreeMap::from([("b".to_string(), Ok(Some(1)))]);
        let report = history.check(&log(&["c0"]), &never_read);
        assert!(report.i4.iter().any(|violation| violation.contains("a: its committed offset")), "{report}");
        // b's ack answered 1, and Kafka holds no offset for it at the end.
        let report = history.check(&log(&["c0"]), &committed_b(None));
        assert!(report.i4.iter().any(|violation| violation.contains("holds no committed offset")), "{report}");
        assert!(history.check(&log(&["c0"]), &committed_b(Some(1))).ok());
    }

    #[test]
    fn received_of_log_counts_distinct_log_changes_per_device() {
        let history = two_devices();
        deliver_all(&history, "a", 1, &["c0", "c1"]);
        history.subscribed("a", 2);
        history.delivered("a", 2, 1, "c1"); // again, after a reconnect
        history.delivered("a", 2, 2, "stranger");
        assert_eq!(
            history.received_of_log(&log(&["c0", "c1"])),
            BTreeMap::from([("a".to_string(), 2), ("b".to_string(), 0)])
        );
    }

    #[test]
    fn recovery_times_come_from_first_writes_progress_and_acks_after_a_mark() {
        let history = two_devices();
        history.push("a", "c0", written(0), false);
        deliver_all(&history, "a", 1, &["c0"]);
        deliver_all(&history, "b", 1, &["c0"]);
        let mark = Instant::now();
        assert_eq!(history.first_written_after(mark), None);
        history.push("a", "c0", PushOutcome::Written { offset: 0, duplicate: true }, true);
        assert_eq!(history.first_written_after(mark), None, "a duplicate is no new write");
        history.push("a", "c1", written(1), false);
        let (written_at, offset) = history.first_written_after(mark).expect("c1 was written after the mark");
        assert_eq!(offset, 1);
        assert!(written_at >= mark);
        assert_eq!(history.all_applied_at(2), None, "nobody holds offset 1 yet");
        history.delivered("a", 1, 1, "c1");
        assert_eq!(history.all_applied_at(2), None, "b does not hold offset 1 yet");
        history.delivered("b", 1, 1, "c1");
        assert!(history.all_applied_at(2).is_some_and(|at| at >= written_at));
        history.acked("a", 1, Err(Code::Unavailable));
        assert_eq!(history.first_ack_after(mark, &[]), None, "a failed ack does not count");
        history.acked("a", 1, Ok(2));
        assert!(history.first_ack_after(mark, &[]).is_some());
        assert_eq!(history.first_ack_after(mark, &["b".to_string()]), None);
    }
}
