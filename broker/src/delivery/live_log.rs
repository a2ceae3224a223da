//! The recent tail of one user's topic, in memory, shared by all of that
//! user's subscribed devices.
//!
//! The gateway appends each change the moment Kafka acknowledged it (it knows
//! the offset then), so live delivery does not wait for a Kafka fetch. A device
//! whose cursor is before the tail reads from Kafka through the reader pool
//! until it reaches the tail. Bounded by count and bytes per user, and by one
//! byte budget shared by every user's tail ([`CacheBudget`]); trimming only
//! means slow devices read more from Kafka.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use lockstep_proto::v1::DeliveredChange;
use tokio::sync::watch;

use lockstep_kafka::locks::lock;

/// The bytes every user's tail holds together, and the most they may.
#[derive(Debug)]
pub struct CacheBudget {
    used: AtomicUsize,
    max_bytes: usize,
}

impl CacheBudget {
    pub fn new(max_bytes: usize) -> Arc<Self> {
        Arc::new(Self { used: AtomicUsize::new(0), max_bytes })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn over(&self) -> bool {
        self.used() > self.max_bytes
    }
}

pub struct LiveLog {
    state: Mutex<LogState>,
    /// The offset after the newest cached change; changes when one is appended.
    end_tx: watch::Sender<i64>,
    max_changes: usize,
    max_bytes: usize,
    budget: Arc<CacheBudget>,
}

impl Drop for LiveLog {
    fn drop(&mut self) {
        let bytes = lock(&self.state).bytes;
        self.budget.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct LogState {
    /// Whether `start` is a real position (the log end seen, or a change appended).
    known: bool,
    start: i64,
    changes: VecDeque<Arc<DeliveredChange>>,
    bytes: usize,
}

impl LogState {
    fn end(&self) -> i64 {
        self.start + self.changes.len() as i64
    }

    fn reset(&mut self, start: i64, budget: &CacheBudget) {
        self.known = true;
        self.start = start;
        self.changes.clear();
        budget.used.fetch_sub(std::mem::take(&mut self.bytes), Ordering::Relaxed);
    }

    fn push(&mut self, change: Arc<DeliveredChange>, budget: &CacheBudget) {
        let bytes = change_bytes(&change);
        self.bytes += bytes;
        budget.used.fetch_add(bytes, Ordering::Relaxed);
        self.changes.push_back(change);
    }

    fn pop_front(&mut self, budget: &CacheBudget) -> bool {
        let Some(dropped) = self.changes.pop_front() else { return false };
        let bytes = change_bytes(&dropped);
        self.bytes -= bytes;
        budget.used.fetch_sub(bytes, Ordering::Relaxed);
        self.start += 1;
        true
    }
}

/// Where a cursor stands relative to the cached tail.
#[derive(Debug)]
pub enum LogRead {
    /// Consecutive changes starting at the cursor.
    Changes(Vec<DeliveredChange>),
    /// The cursor is before the tail (or the tail is unknown): read from Kafka,
    /// up to `until` when it is known.
    Behind { until: Option<i64> },
    /// The cursor is at the end: wait for new changes.
    AtEnd,
}

fn change_bytes(change: &DeliveredChange) -> usize {
    change.change.as_ref().map_or(0, |change| change.ciphertext.len() + change.nonce.len()) + 128
}

impl LiveLog {
    pub fn new(max_changes: usize, max_bytes: usize, budget: Arc<CacheBudget>) -> Self {
        Self {
            state: Mutex::new(LogState::default()),
            end_tx: watch::Sender::new(-1),
            max_changes: max_changes.max(1),
            max_bytes,
            budget,
        }
    }

    pub fn watch_end(&self) -> watch::Receiver<i64> {
        self.end_tx.subscribe()
    }

    /// Appends changes Kafka acknowledged, in offset order. A gap (a change
    /// written by someone else that this process did not see) restarts the
    /// tail at the new change; devices before it read the gap from Kafka.
    pub fn append(&self, changes: impl IntoIterator<Item = Arc<DeliveredChange>>) {
        let budget = &*self.budget;
        let mut state = lock(&self.state);
        for change in changes {
            let offset = change.offset;
            if !state.known || offset > state.end() {
                state.reset(offset, budget);
            } else if offset < state.end() {
                continue;
            }
            state.push(change, budget);
            while state.changes.len() > self.max_changes || (state.bytes > self.max_bytes && state.changes.len() > 1) {
                state.pop_front(budget);
            }
        }
        // Over the shared budget, the user who adds gives up its oldest first,
        // down to nothing: every tail is then within the budget whenever its
        // own append ends, and the sum with it.
        while budget.over() && state.pop_front(budget) {}
        let end = state.end();
        drop(state);
        self.end_tx.send_replace(end);
    }

    /// A reader reached the end of the log at `end`. If the tail knows less,
    /// start it there, so that waiting devices have a place to wait at.
    pub fn note_end(&self, end: i64) {
        let mut state = lock(&self.state);
        if !state.known || end > state.end() {
            state.reset(end, &self.budget);
            drop(state);
            self.end_tx.send_replace(end);
        }
    }

    /// The offset the next change will get, when known.
    pub fn end(&self) -> Option<i64> {
        let state = lock(&self.state);
        state.known.then(|| state.end())
    }

    pub fn read(&self, cursor: i64, max_changes: usize) -> LogRead {
        let state = lock(&self.state);
        if !state.known {
            return LogRead::Behind { until: None };
        }
        if cursor < state.start {
            return LogRead::Behind { until: Some(state.start) };
        }
        if cursor == state.end() {
            return LogRead::AtEnd;
        }
        if cursor > state.end() {
            return LogRead::Behind { until: None };
        }
        let skip = (cursor - state.start) as usize;
        LogRead::Changes(state.changes.iter().skip(skip).take(max_changes).map(|change| (**change).clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(offset: i64) -> Arc<DeliveredChange> {
        Arc::new(DeliveredChange { offset, ..Default::default() })
    }

    fn offsets(read: LogRead) -> Vec<i64> {
        match read {
            LogRead::Changes(changes) => changes.iter().map(|change| change.offset).collect(),
            other => panic!("expected changes, got {other:?}"),
        }
    }

    #[test]
    fn unknown_tail_sends_everyone_to_kafka() {
        let log = LiveLog::new(10, 1 << 20, CacheBudget::new(usize::MAX));
        assert!(matches!(log.read(0, 10), LogRead::Behind { until: None }));
        log.note_end(5);
        assert!(matches!(log.read(5, 10), LogRead::AtEnd));
        assert!(matches!(log.read(3, 10), LogRead::Behind { until: Some(5) }));
    }

    #[test]
    fn appends_serve_cursors_inside_the_tail_and_trim_by_count() {
        let log = LiveLog::new(3, 1 << 20, CacheBudget::new(usize::MAX));
        let mut end_rx = log.watch_end();
        log.append((10..15).map(change));
        assert!(end_rx.has_changed().unwrap());
        assert_eq!(*end_rx.borrow_and_update(), 15);
        assert_eq!(offsets(log.read(12, 10)), vec![12, 13, 14]);
        assert_eq!(offsets(log.read(13, 1)), vec![13]);
        assert!(matches!(log.read(11, 10), LogRead::Behind { until: Some(12) }));
        assert!(matches!(log.read(15, 10), LogRead::AtEnd));
        assert!(matches!(log.read(16, 10), LogRead::Behind { until: None }));
        // Duplicates are ignored, gaps restart the tail.
        log.append([change(14)]);
        assert_eq!(log.end(), Some(15));
        log.append([change(20)]);
        assert!(matches!(log.read(15, 10), LogRead::Behind { until: Some(20) }));
        assert_eq!(offsets(log.read(20, 10)), vec![20]);
    }

    #[test]
    fn trims_by_bytes_but_keeps_the_newest() {
        let log = LiveLog::new(100, 300, CacheBudget::new(usize::MAX));
        log.append((0..10).map(change));
        assert!(matches!(log.read(0, 10), LogRead::Behind { until: Some(start) } if start >= 7));
        assert_eq!(offsets(log.read(9, 10)), vec![9]);
    }

    fn change_of(offset: i64, ciphertext_bytes: usize) -> Arc<DeliveredChange> {
        let change = lockstep_proto::v1::Change {
            ciphertext: bytes::Bytes::from(vec![1u8; ciphertext_bytes]),
            ..Default::default()
        };
        Arc::new(DeliveredChange { offset, change: Some(change), ..Default::default() })
    }

    #[test]
    fn every_tail_together_stays_within_the_shared_budget() {
        // Each change counts its ciphertext and 128 bytes.
        let budget = CacheBudget::new(10 * 1128);
        let quiet = LiveLog::new(100, 1 << 20, budget.clone());
        let busy = LiveLog::new(100, 1 << 20, budget.clone());
        quiet.append((0..6).map(|offset| change_of(offset, 1000)));
        assert_eq!(budget.used(), 6 * 1128);
        busy.append((0..8).map(|offset| change_of(offset, 1000)));
        assert!(budget.used() <= 10 * 1128, "{} bytes", budget.used());
        // The one who added gave way: the quiet user's tail is whole, the busy one
        // keeps its newest and reads the rest from Kafka.
        assert_eq!(offsets(quiet.read(0, 10)), (0..6).collect::<Vec<_>>());
        assert!(matches!(busy.read(0, 10), LogRead::Behind { until: Some(4) }));
        assert_eq!(offsets(busy.read(4, 10)), vec![4, 5, 6, 7]);
        // A change larger than what is left empties the adder's tail; the end stays known.
        busy.append([change_of(8, 20_000)]);
        assert!(budget.used() <= 10 * 1128);
        assert_eq!(busy.end(), Some(9));
        assert!(matches!(busy.read(9, 10), LogRead::AtEnd));
        assert!(matches!(busy.read(8, 10), LogRead::Behind { until: Some(9) }));
        // A tail gives its bytes back when its last stream ends.
        drop(quiet);
        drop(busy);
        assert_eq!(budget.used(), 0);
        // Gaps and resets give bytes back too.
        let log = LiveLog::new(100, 1 << 20, budget.clone());
        log.append((0..3).map(|offset| change_of(offset, 100)));
        log.append([change_of(10, 100)]);
        assert_eq!(budget.used(), 228);
        log.note_end(20);
        assert_eq!(budget.used(), 0);
    }
}
