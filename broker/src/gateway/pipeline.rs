//! The phases of a push, each on its own so that each can be tested alone.
//!
//! A user's pushes are pipelined ([`UserPush`]): a push *plans* its batch and
//! enqueues the records to write under the user's enqueue lock (which fixes
//! their order in the partition) and takes a [`Ticket`]; it waits for Kafka's
//! acks holding nothing; then it *settles* (dedup record, live publish)
//! strictly in ticket order, which is offset order.
//!
//! 1. [`plan_batch`]: each change is answered from the dedup index (a retry, or
//!    a reused id), refused as a repeat within the batch, or to be written.
//! 2. enqueue (in `Gateway::push_to_the_end`): one produce per change to write.
//! 3. [`settle`]: Kafka's outcomes become results, dedup entries, the changes
//!    for live subscribers, and whether the offsets continued the index.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lockstep_proto::v1::{Change, DeliveredChange, PushError, PushResult, push_result};

use super::dedup::{Digest, IndexEntry, digest_of_change};
use lockstep_kafka::locks::lock;

use crate::{accounts::AuthedDevice, error::ApiError, idle::LastUsed, kafka::KafkaError, shutdown::Shutdown};

/// Per-user push state.
#[derive(Default)]
pub(super) struct UserPush {
    pub enqueue: tokio::sync::Mutex<EnqueueState>,
    index: Mutex<IndexState>,
    /// How many tickets have finished; ticket `n` finishes when this is `n`.
    finished: tokio::sync::watch::Sender<u64>,
    /// Told when a push's changes leave `in_flight` (their dedup record committed).
    released: tokio::sync::Notify,
    pub used: LastUsed,
}

#[derive(Default)]
pub(super) struct EnqueueState {
    pub next_ticket: u64,
}

/// Doubts kept before the expired ones are swept.
const MAX_DOUBTS: usize = 1024;

/// (device, change id) of a change.
pub(super) type ChangeKey = (Arc<str>, String);

#[derive(Default)]
pub(super) struct IndexState {
    /// The dedup index is known to cover the topic up to `indexed_through`,
    /// in the user's log generation `generation` (see `log_guard`).
    pub ready: bool,
    pub indexed_through: i64,
    pub generation: i64,
    /// Changes enqueued but not yet recorded.
    pub in_flight: HashSet<ChangeKey>,
    /// Changes whose produce failed but may still land (a request Kafka had
    /// not answered), until when. A retry before then could append them twice.
    pub in_doubt: HashMap<ChangeKey, Instant>,
}

impl IndexState {
    /// Forgets doubts about `changes` that are over; if there were any, the
    /// index must be re-read (a late copy may have landed meanwhile).
    pub fn settle_doubts(&mut self, device_id: &Arc<str>, changes: &[Change], now: Instant) {
        // Doubts of changes never retried: forgotten in bulk (any later retry
        // of them then finds the index re-read).
        if self.in_doubt.len() > MAX_DOUBTS {
            self.in_doubt.retain(|_, until| *until > now);
            self.ready = false;
        }
        for change in changes {
            let key = (device_id.clone(), change.change_id.clone());
            if self.in_doubt.get(&key).is_some_and(|until| *until <= now) {
                self.in_doubt.remove(&key);
                self.ready = false;
            }
        }
    }
}

impl UserPush {
    pub fn index(&self) -> std::sync::MutexGuard<'_, IndexState> {
        lock(&self.index)
    }

    /// Whether forgetting this state loses nothing: no change is being
    /// written or in doubt (a doubt must outlive its window, or a retry could
    /// append a change twice). What stays is only where the dedup index was
    /// read up to, which the next push reads again.
    pub fn is_settled(&self, now: Instant) -> bool {
        let index = self.index();
        index.in_flight.is_empty() && index.in_doubt.values().all(|until| *until <= now)
    }

    /// Waits until `count` tickets have finished.
    pub async fn wait_finished(&self, count: u64) {
        let mut finished = self.finished.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = finished.wait_for(|finished| *finished >= count).await;
    }

    /// Takes the next ticket; the caller holds the enqueue lock. `running`
    /// keeps shutdown waiting until the ticket finished, also when abandoned.
    pub fn ticket(self: &Arc<Self>, enqueue: &mut EnqueueState, running: Shutdown) -> Ticket {
        let ticket = Ticket { user: self.clone(), number: enqueue.next_ticket, done: false, running: Some(running) };
        enqueue.next_ticket += 1;
        ticket
    }

    /// Tells retries waiting in [`Self::wait_released`] that changes left `in_flight`.
    pub fn released(&self) {
        self.released.notify_waiters();
    }

    /// Waits, at most `limit`, until no change of the batch is in flight.
    pub async fn wait_released(&self, device_id: &Arc<str>, changes: &[Change], limit: Duration) {
        let waiting = crate::wake::wait_until(&self.released, || !self.retries_in_flight(device_id, changes));
        // Past the limit the plan answers UNAVAILABLE for what is still in flight.
        let _ = tokio::time::timeout(limit, waiting).await;
    }

    /// Whether a change of the batch is still being written by an earlier push
    /// (a device retrying a push it gave up on).
    pub fn retries_in_flight(&self, device_id: &Arc<str>, changes: &[Change]) -> bool {
        let index = self.index();
        changes.iter().any(|change| index.in_flight.contains(&(device_id.clone(), change.change_id.clone())))
    }
}

/// A push's place in its user's order. Finishes even if the push fails or
/// panics half-way, so that the user's later pushes are never stuck behind it
/// (the index is then marked for re-reading: the push may have written).
pub(super) struct Ticket {
    user: Arc<UserPush>,
    pub number: u64,
    done: bool,
    running: Option<Shutdown>,
}

impl Ticket {
    /// Lets the user's next push settle; returns what keeps shutdown waiting,
    /// to be dropped once the push's dedup record is committed.
    pub fn finish(mut self) -> Option<Shutdown> {
        self.done = true;
        self.user.finished.send_modify(|finished| *finished = self.number + 1);
        self.running.take()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (user, number, running) = (self.user.clone(), self.number, self.running.take());
        tokio::spawn(async move {
            user.wait_finished(number).await;
            user.index().ready = false;
            user.finished.send_modify(|finished| *finished = number + 1);
            drop(running);
        });
    }
}

/// Where one push's time goes (`lockstep_push_stage_seconds`): each lap adds
/// the time since the previous lap to a stage; a stage may get several laps
/// (the dedup index is read before the produce and written after the acks).
pub(super) struct PushStages {
    last: Instant,
    spent: [Duration; PushStage::ALL.len()],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PushStage {
    /// Waiting for the user's earlier pushes to enqueue (the enqueue lock).
    Enqueue,
    /// The dedup index: looking the batch up, re-reading it when behind, recording the offsets.
    Dedup,
    /// Encoding the envelopes and handing them to the producer.
    Produce,
    /// Waiting for Kafka's acks.
    Ack,
    /// Waiting for earlier pushes to settle, settling, publishing to live devices.
    Finish,
}

impl PushStage {
    const ALL: [PushStage; 5] =
        [PushStage::Enqueue, PushStage::Dedup, PushStage::Produce, PushStage::Ack, PushStage::Finish];

    fn label(self) -> &'static str {
        match self {
            PushStage::Enqueue => "enqueue",
            PushStage::Dedup => "dedup",
            PushStage::Produce => "produce",
            PushStage::Ack => "ack",
            PushStage::Finish => "finish",
        }
    }
}

impl PushStages {
    pub fn start() -> Self {
        Self { last: Instant::now(), spent: Default::default() }
    }

    pub fn lap(&mut self, stage: PushStage) {
        let now = Instant::now();
        self.spent[stage as usize] += now - self.last;
        self.last = now;
    }

    /// One observation per stage for this push.
    pub fn record(self) {
        for stage in PushStage::ALL {
            metrics::histogram!(crate::admin::PUSH_STAGE_SECONDS, "stage" => stage.label())
                .record(self.spent[stage as usize].as_secs_f64());
        }
    }
}

/// How long a push holds its user's enqueue lock, part by part: every push of
/// the user behind it waits that long. A hold past [`LockHold::SLOW`] is logged
/// with its parts, since a mean over thousands of pushes cannot show one.
pub(super) struct LockHold {
    since: Instant,
    last: Instant,
    parts: Vec<(&'static str, Duration)>,
}

impl LockHold {
    pub const SLOW: Duration = Duration::from_millis(100);

    pub fn start() -> Self {
        let now = Instant::now();
        Self { since: now, last: now, parts: Vec::with_capacity(6) }
    }

    /// The time since the previous part went to `part`.
    pub fn part(&mut self, part: &'static str) {
        let now = Instant::now();
        self.parts.push((part, now - self.last));
        self.last = now;
    }

    /// Called as the lock is released.
    pub fn released(self, topic: &str, changes: usize) {
        let held = self.since.elapsed();
        if held < Self::SLOW {
            return;
        }
        let parts: Vec<String> =
            self.parts.iter().map(|(part, spent)| format!("{part} {:.1} ms", spent.as_secs_f64() * 1e3)).collect();
        tracing::warn!(
            topic,
            changes,
            held_ms = held.as_secs_f64() * 1e3,
            parts = %parts.join(", "),
            "a push held its user's enqueue lock long: that user's other pushes waited"
        );
    }
}

/// What becomes of one change of a batch.
#[derive(Debug)]
pub(super) enum Plan {
    /// Answered without writing.
    Answer(PushResult),
    /// To be written.
    Write { digest: Digest, change: Change },
}

/// Phase 1. `known` holds the dedup index's (offset, digest) of the batch's
/// change ids; `index.in_flight` gets the changes to write (their keys are
/// removed again after the dedup record, or by the caller for changes it could
/// not enqueue); a change still in doubt is not written again yet.
pub(super) fn plan_batch(
    device_id: &Arc<str>,
    changes: Vec<Change>,
    known: &HashMap<String, (i64, Digest)>,
    index: &mut IndexState,
) -> Vec<Plan> {
    changes
        .into_iter()
        .map(|change| {
            let digest = digest_of_change(&change);
            if let Some((offset, stored)) = known.get(&change.change_id) {
                return Plan::Answer(answer_from_index(&change.change_id, digest, *offset, *stored));
            }
            if index.in_doubt.contains_key(&(device_id.clone(), change.change_id.clone())) {
                return Plan::Answer(failed(&ApiError::Unavailable(format!(
                    "an earlier attempt of change_id {} may still land in the log; retry in a few seconds",
                    change.change_id
                ))));
            }
            if !index.in_flight.insert((device_id.clone(), change.change_id.clone())) {
                return Plan::Answer(failed(&ApiError::Unavailable(format!(
                    "change_id {} is being written (by an earlier attempt, or earlier in this batch); retry for its offset",
                    change.change_id
                ))));
            }
            Plan::Write { digest, change }
        })
        .collect()
}

/// A change handed to Kafka, waiting for its outcome.
#[derive(Debug)]
pub(super) struct Written {
    pub index_in_batch: usize,
    pub digest: Digest,
    pub change: Change,
}

/// What a push's Kafka outcomes come to.
#[derive(Debug, Default)]
pub(super) struct Settled {
    pub results: Vec<(usize, PushResult)>,
    pub entries: Vec<IndexEntry>,
    pub published: Vec<Arc<DeliveredChange>>,
    /// Every write succeeded, at the offsets right after the index's mark.
    pub contiguous: bool,
    /// The offset after the last write.
    pub next_expected: i64,
    /// The written changes' ids: in flight until the dedup index recorded them
    /// (the caller releases them then; earlier, a retry would write them again).
    pub change_ids: Vec<String>,
    /// Ids of changes whose produce failed: they may still land.
    pub failed_ids: Vec<String>,
}

/// Phase 3: `outcomes[i]` is Kafka's answer for `written[i]`; the index
/// covered the log up to `indexed_through` before this push.
pub(super) fn settle(
    device: &AuthedDevice,
    received_at_ms: i64,
    indexed_through: i64,
    written: Vec<Written>,
    outcomes: Vec<Result<i64, KafkaError>>,
    traceparent: &Option<String>,
) -> Settled {
    debug_assert_eq!(written.len(), outcomes.len(), "one outcome per written change");
    let mut settled = Settled { contiguous: true, next_expected: indexed_through, ..Settled::default() };
    for (Written { index_in_batch, digest, change }, outcome) in written.into_iter().zip(outcomes) {
        settled.change_ids.push(change.change_id.clone());
        match outcome {
            Ok(offset) => {
                settled.contiguous &= offset == settled.next_expected;
                settled.next_expected = offset + 1;
                settled.entries.push(IndexEntry {
                    device_id: device.device_id.to_string(),
                    change_id: change.change_id.clone(),
                    offset,
                    digest,
                });
                settled.published.push(Arc::new(DeliveredChange {
                    offset,
                    change: Some(change),
                    origin_device_id: device.device_id.to_string(),
                    received_at_ms,
                    undecodable: String::new(),
                    traceparent: traceparent.clone().unwrap_or_default(),
                }));
                settled.results.push((index_in_batch, written_at(offset, false)));
            }
            Err(error) => {
                // A failed produce may still have landed (librdkafka cannot always
                // tell): the index must be re-read before it is trusted again.
                settled.contiguous = false;
                settled.failed_ids.push(change.change_id.clone());
                tracing::warn!(user_id = %device.user_id, %error, "produce failed");
                settled.results.push((index_in_batch, failed(&ApiError::from(error))));
            }
        }
    }
    settled
}

/// A change the index holds at `offset` with digest `stored`: a retry gets that offset, a
/// different change under the same id is refused.
pub(super) fn answer_from_index(change_id: &str, digest: Digest, offset: i64, stored: Digest) -> PushResult {
    if stored == digest {
        written_at(offset, true)
    } else {
        failed(&ApiError::ChangeIdReused(format!(
            "change_id {change_id} was already used for a different change (at offset {offset})"
        )))
    }
}

fn written_at(offset: i64, duplicate: bool) -> PushResult {
    PushResult { result: Some(push_result::Result::Offset(offset)), duplicate }
}

/// A per-change error, with the code and retry verdict `error.rs` gives it.
pub(super) fn failed(error: &ApiError) -> PushResult {
    PushResult {
        result: Some(push_result::Result::Error(PushError {
            code: error.code() as i32,
            // Per change: the server's log has the produce failure (see `settle`).
            message: error.client_message(),
            retryable: error.is_retryable(),
        })),
        duplicate: false,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;

    fn change(id: &str) -> Change {
        Change {
            change_id: id.into(),
            record_id: "r".into(),
            collection: "c".into(),
            op: 1,
            hlc: 1,
            key_epoch: 1,
            nonce: Bytes::from_static(&[1; 24]),
            ciphertext: Bytes::from(id.as_bytes().to_vec()),
        }
    }

    fn device() -> AuthedDevice {
        AuthedDevice { user_id: "u".into(), device_id: "d".into() }
    }

    fn offset_of(result: &PushResult) -> Option<(i64, bool)> {
        match result.result {
            Some(push_result::Result::Offset(offset)) => Some((offset, result.duplicate)),
            _ => None,
        }
    }

    fn error_of(result: &PushResult) -> (i32, bool) {
        match &result.result {
            Some(push_result::Result::Error(error)) => (error.code, error.retryable),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn a_retry_is_answered_with_its_first_offset_and_a_reused_id_is_refused() {
        let device_id: Arc<str> = "d".into();
        let retried = change("a");
        let mut reused = change("b");
        let known = HashMap::from([
            ("a".to_string(), (7, digest_of_change(&retried))),
            ("b".to_string(), (8, digest_of_change(&reused))),
        ]);
        reused.ciphertext = Bytes::from_static(b"other content");
        let mut index = IndexState::default();
        let plans = plan_batch(&device_id, vec![retried, reused, change("c")], &known, &mut index);
        assert!(matches!(&plans[0], Plan::Answer(result) if offset_of(result) == Some((7, true))));
        assert!(
            matches!(&plans[1], Plan::Answer(result) if error_of(result) == (tonic::Code::AlreadyExists as i32, false))
        );
        assert!(matches!(&plans[2], Plan::Write { change, .. } if change.change_id == "c"));
        assert_eq!(index.in_flight, HashSet::from([(device_id, "c".to_string())]), "only what is written is in flight");
    }

    #[test]
    fn a_change_in_flight_is_not_written_twice() {
        let device_id: Arc<str> = "d".into();
        let mut index = IndexState::default();
        index.in_flight.insert((device_id.clone(), "a".to_string()));
        let plans = plan_batch(&device_id, vec![change("a"), change("b"), change("b")], &HashMap::new(), &mut index);
        assert!(
            matches!(&plans[0], Plan::Answer(result) if error_of(result) == (tonic::Code::Unavailable as i32, true)),
            "a change another push is writing: retry later"
        );
        assert!(matches!(&plans[1], Plan::Write { .. }));
        assert!(matches!(&plans[2], Plan::Answer(result) if error_of(result).1), "a repeat within the batch");
    }

    #[test]
    fn the_user_sees_a_retry_of_a_change_in_flight() {
        let user = UserPush::default();
        let device_id: Arc<str> = "d".into();
        user.index().in_flight.insert((device_id.clone(), "a".into()));
        assert!(user.retries_in_flight(&device_id, &[change("x"), change("a")]));
        assert!(!user.retries_in_flight(&device_id, &[change("x")]));
        assert!(!user.retries_in_flight(&"other".into(), &[change("a")]), "another device's id is another change");
    }

    #[tokio::test]
    async fn a_retry_waits_until_its_change_left_flight_and_no_longer_than_its_limit() {
        let user = Arc::new(UserPush::default());
        let device_id: Arc<str> = "d".into();
        user.index().in_flight.insert((device_id.clone(), "a".into()));
        let waiting = {
            let (user, device_id) = (user.clone(), device_id.clone());
            tokio::spawn(async move { user.wait_released(&device_id, &[change("a")], Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        user.released();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "told, but the change is still in flight");
        user.index().in_flight.clear();
        user.released();
        tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
        // A change left in flight by a push that died: the wait ends at its limit.
        user.index().in_flight.insert((device_id.clone(), "b".into()));
        let started = Instant::now();
        user.wait_released(&device_id, &[change("b")], Duration::from_millis(50)).await;
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    fn written(ids: &[&str]) -> Vec<Written> {
        ids.iter()
            .enumerate()
            .map(|(index_in_batch, id)| Written {
                index_in_batch,
                digest: digest_of_change(&change(id)),
                change: change(id),
            })
            .collect()
    }

    #[test]
    fn settling_contiguous_offsets_moves_the_mark() {
        let settled = settle(&device(), 5, 10, written(&["a", "b"]), vec![Ok(10), Ok(11)], &None);
        assert!(settled.contiguous);
        assert_eq!(settled.next_expected, 12);
        assert_eq!(settled.entries.iter().map(|entry| entry.offset).collect::<Vec<_>>(), vec![10, 11]);
        assert_eq!(settled.published.iter().map(|change| change.offset).collect::<Vec<_>>(), vec![10, 11]);
        assert_eq!(
            settled.results.iter().map(|(_, result)| offset_of(result)).collect::<Vec<_>>(),
            vec![Some((10, false)), Some((11, false))]
        );
        assert_eq!(settled.change_ids, vec!["a", "b"]);
    }

    #[test]
    fn a_gap_or_a_failure_leaves_the_mark_for_re_reading() {
        // Someone else wrote offset 10: our change landed at 11.
        let gap = settle(&device(), 5, 10, written(&["a"]), vec![Ok(11)], &None);
        assert!(!gap.contiguous);
        let failure =
            settle(&device(), 5, 10, written(&["a", "b"]), vec![Ok(10), Err(KafkaError::Timeout("produce"))], &None);
        assert!(!failure.contiguous);
        assert_eq!(failure.entries.len(), 1, "what Kafka took is recorded");
        assert_eq!(error_of(&failure.results[1].1), (tonic::Code::Unavailable as i32, true));
    }

    #[tokio::test]
    async fn pushes_finish_in_ticket_order_even_when_one_is_abandoned() {
        let user = Arc::new(UserPush::default());
        let shutdown = crate::shutdown::ShutdownController::default();
        let (first, second, third) = {
            let mut enqueue = user.enqueue.lock().await;
            (
                user.ticket(&mut enqueue, shutdown.handle()),
                user.ticket(&mut enqueue, shutdown.handle()),
                user.ticket(&mut enqueue, shutdown.handle()),
            )
        };
        user.index().ready = true;
        let waiting = {
            let user = user.clone();
            tokio::spawn(async move {
                user.wait_finished(third.number).await;
                third.finish();
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "the third waits for the first two");
        // The second push died half-way: its ticket still finishes, but only
        // after the first, and marks the index for re-reading.
        drop(second);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "an abandoned ticket does not overtake the first");
        first.finish();
        tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
        assert!(!user.index().ready, "an abandoned push may have written: re-read the topic");
        tokio::time::timeout(Duration::from_secs(5), user.wait_finished(3)).await.unwrap();
        assert!(shutdown.drained(Duration::from_secs(5)).await, "no ticket keeps shutdown waiting after it finished");
    }

    #[test]
    fn a_change_whose_produce_failed_is_not_written_again_while_it_may_still_land() {
        let device_id: Arc<str> = "d".into();
        let now = Instant::now();
        let mut index = IndexState { ready: true, ..IndexState::default() };
        index.in_doubt.insert((device_id.clone(), "a".into()), now + Duration::from_secs(3));
        index.settle_doubts(&device_id, &[change("a")], now);
        assert!(index.ready, "the doubt is not over");
        let plans = plan_batch(&device_id, vec![change("a")], &HashMap::new(), &mut index);
        assert!(
            matches!(&plans[0], Plan::Answer(result) if error_of(result) == (tonic::Code::Unavailable as i32, true))
        );
        // Once it is over, the index is re-read before the change may be written.
        index.settle_doubts(&device_id, &[change("a")], now + Duration::from_secs(4));
        assert!(!index.ready && index.in_doubt.is_empty());
        let plans = plan_batch(&device_id, vec![change("a")], &HashMap::new(), &mut index);
        assert!(matches!(&plans[0], Plan::Write { .. }));
    }
}
