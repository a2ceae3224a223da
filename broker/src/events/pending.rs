//! The coalescing buffer between the server's parts and the events topic.
//!
//! Facts are kept per subject (a user's log; a device's ack, presence,
//! membership, push target). A newer fact about a subject replaces the older
//! one; appends to one log in one generation merge into one (lowest first
//! offset, highest end, summed count). Events state absolute values, so a
//! consumer ends in the same state whether it sees every step or only the
//! last: memory is bounded by the number of subjects, not by traffic, also
//! while the events topic is unreachable.

use std::collections::HashMap;

use lockstep_schemas::{Event, EventBody};

/// What a fact is about; one pending fact per subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Subject {
    Log { user_id: String },
    Ack { device_id: String },
    Presence { device_id: String },
    Membership { device_id: String },
    Target { device_id: String },
    Other { user_id: String, seq: u64 },
}

impl Subject {
    fn of(event: &Event, seq: u64) -> Subject {
        let device = |device_id: &String| device_id.clone();
        match &event.body {
            EventBody::LogAppended { .. } => Subject::Log { user_id: event.user_id.clone() },
            EventBody::DeviceAcked { device_id, .. } => Subject::Ack { device_id: device(device_id) },
            EventBody::DeviceConnected { device_id, .. } | EventBody::DeviceDisconnected { device_id } => {
                Subject::Presence { device_id: device(device_id) }
            }
            EventBody::DeviceAdded { device_id } | EventBody::DeviceRevoked { device_id } => {
                Subject::Membership { device_id: device(device_id) }
            }
            EventBody::PushTargetSet { device_id, .. } | EventBody::PushTargetRemoved { device_id, .. } => {
                Subject::Target { device_id: device(device_id) }
            }
            // Not published by the server; never coalesced.
            EventBody::WakeUp { .. } => Subject::Other { user_id: event.user_id.clone(), seq },
        }
    }
}

/// Capacity (facts) a drained buffer keeps; past it, it shrinks once a quarter full.
const SHRINK_ABOVE: usize = 1024;

/// A pending fact and the sequence number of its latest update (the order
/// facts are published in).
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub(crate) seq: u64,
    pub(crate) event: Event,
}

/// `newer` folded into `older`: the merged fact.
fn merge(older: Event, newer: Event) -> Event {
    match (older.body, newer.body) {
        (
            EventBody::LogAppended {
                log_generation: old_generation,
                first_offset: old_first,
                log_end: old_end,
                count: old_count,
                first_received_at_ms: old_received,
                ..
            },
            EventBody::LogAppended {
                log_generation,
                first_offset,
                log_end,
                count,
                origin_device_id,
                first_received_at_ms,
            },
        ) if old_generation == log_generation => {
            let (first_offset, first_received_at_ms) = if old_first <= first_offset {
                (old_first, old_received)
            } else {
                (first_offset, first_received_at_ms)
            };
            Event {
                body: EventBody::LogAppended {
                    log_generation,
                    first_offset,
                    log_end: log_end.max(old_end),
                    count: count + old_count,
                    origin_device_id,
                    first_received_at_ms,
                },
                ..newer
            }
        }
        (_, body) => Event { body, ..newer },
    }
}

/// The buffer. Not thread-safe by itself: the events handle keeps it behind a mutex.
#[derive(Debug, Default)]
pub(crate) struct Buffer {
    facts: HashMap<Subject, Pending>,
    next_seq: u64,
    /// Facts refused because `max_subjects` were pending (consumers then
    /// resync from Kafka offsets).
    pub(crate) dropped: u64,
}

impl Buffer {
    pub(crate) fn len(&self) -> usize {
        self.facts.len()
    }

    /// Adds a fact; `false` if it was dropped because the buffer is full.
    pub(crate) fn insert(&mut self, event: Event, max_subjects: usize) -> bool {
        self.next_seq += 1;
        let seq = self.next_seq;
        let subject = Subject::of(&event, seq);
        match self.facts.remove(&subject) {
            Some(older) => {
                self.facts.insert(subject, Pending { seq, event: merge(older.event, event) });
            }
            None if self.facts.len() >= max_subjects => {
                self.dropped += 1;
                return false;
            }
            None => {
                self.facts.insert(subject, Pending { seq, event });
            }
        }
        true
    }

    /// Removes up to `max` facts, oldest update first.
    pub(crate) fn take(&mut self, max: usize) -> Vec<Pending> {
        let mut all: Vec<(Subject, u64)> = self.facts.iter().map(|(subject, p)| (subject.clone(), p.seq)).collect();
        if all.len() > max {
            all.select_nth_unstable_by_key(max - 1, |(_, seq)| *seq);
            all.truncate(max);
        }
        let mut taken: Vec<Pending> = all.into_iter().filter_map(|(subject, _)| self.facts.remove(&subject)).collect();
        taken.sort_by_key(|p| p.seq);
        // A burst (every stream's lease renewed at once) grows the table to the fleet's size;
        // once it drained, give that memory back instead of holding it for the next burst.
        if self.facts.capacity() > SHRINK_ABOVE && self.facts.len() < self.facts.capacity() / 4 {
            self.facts.shrink_to(self.facts.len() * 2);
        }
        taken
    }

    /// Puts back facts that could not be published; whatever arrived about
    /// the same subjects meanwhile is newer and wins.
    pub(crate) fn restore(&mut self, failed: Vec<Pending>) {
        for old in failed {
            let subject = Subject::of(&old.event, old.seq);
            match self.facts.remove(&subject) {
                Some(newer) => {
                    let seq = newer.seq;
                    self.facts.insert(subject, Pending { seq, event: merge(old.event, newer.event) });
                }
                None => {
                    // Put back even past the bound: it was counted when it came in.
                    self.facts.insert(subject, old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use lockstep_schemas::{PushTarget, TargetRemovedReason};

    use super::*;

    fn event(user: &str, body: EventBody) -> Event {
        Event { user_id: user.into(), node_id: "n".into(), at_ms: 1, body }
    }

    fn appended(generation: i64, first: i64, end: i64, received: i64) -> Event {
        event(
            "u",
            EventBody::LogAppended {
                log_generation: generation,
                first_offset: first,
                log_end: end,
                count: end - first,
                origin_device_id: "d".into(),
                first_received_at_ms: received,
            },
        )
    }

    fn acked(device: &str, offset: i64) -> Event {
        event("u", EventBody::DeviceAcked { device_id: device.into(), log_generation: 0, committed_offset: offset })
    }

    #[test]
    fn a_drained_buffer_gives_its_memory_back() {
        let mut buffer = Buffer::default();
        for i in 0..10_000 {
            assert!(buffer.insert(acked(&format!("d{i}"), i), 20_000));
        }
        assert!(buffer.facts.capacity() >= 10_000);
        let taken = buffer.take(9_990);
        assert_eq!(taken.len(), 9_990);
        assert_eq!(buffer.len(), 10);
        assert!(buffer.facts.capacity() <= SHRINK_ABOVE, "{}", buffer.facts.capacity());
        // What is left is still there, oldest first.
        let rest = buffer.take(100);
        assert_eq!(rest.len(), 10);
        assert!(rest.windows(2).all(|pair| pair[0].seq < pair[1].seq));
    }

    #[test]
    fn appends_to_one_log_merge_into_one_fact() {
        let mut buffer = Buffer::default();
        for i in 0..1000 {
            assert!(buffer.insert(appended(0, i, i + 1, 100 + i), 10));
        }
        let taken = buffer.take(10);
        assert_eq!(taken.len(), 1);
        assert_eq!(
            taken[0].event.body,
            EventBody::LogAppended {
                log_generation: 0,
                first_offset: 0,
                log_end: 1000,
                count: 1000,
                origin_device_id: "d".into(),
                first_received_at_ms: 100
            }
        );
        assert_eq!(buffer.len(), 0);
    }

    #[test]
    fn a_new_generation_replaces_the_old_log_fact() {
        let mut buffer = Buffer::default();
        buffer.insert(appended(0, 10, 20, 1), 10);
        buffer.insert(appended(1, 0, 2, 5), 10);
        assert_eq!(buffer.take(10)[0].event.body, appended(1, 0, 2, 5).body);
    }

    #[test]
    fn the_latest_fact_per_subject_wins_and_order_follows_latest_update() {
        let mut buffer = Buffer::default();
        buffer.insert(acked("a", 5), 10);
        buffer.insert(acked("b", 1), 10);
        buffer.insert(acked("a", 7), 10);
        let target = PushTarget::Webhook {
            url: "https://x/_matrix/push/v1/notify".into(),
            app_id: "a".into(),
            pushkey: "k".into(),
        };
        buffer.insert(event("u", EventBody::PushTargetSet { device_id: "a".into(), target }), 10);
        buffer.insert(
            event(
                "u",
                EventBody::PushTargetRemoved { device_id: "a".into(), reason: TargetRemovedReason::DeviceRevoked },
            ),
            10,
        );
        let taken: Vec<EventBody> = buffer.take(10).into_iter().map(|p| p.event.body).collect();
        assert_eq!(
            taken,
            vec![
                acked("b", 1).body,
                acked("a", 7).body,
                EventBody::PushTargetRemoved { device_id: "a".into(), reason: TargetRemovedReason::DeviceRevoked },
            ]
        );
    }

    #[test]
    fn a_failed_fact_put_back_loses_to_a_newer_one() {
        let mut buffer = Buffer::default();
        buffer.insert(acked("a", 5), 10);
        buffer.insert(appended(0, 0, 5, 1), 10);
        let failed = buffer.take(10);
        buffer.insert(acked("a", 9), 10);
        buffer.insert(appended(0, 5, 8, 2), 10);
        buffer.restore(failed);
        let taken: Vec<EventBody> = buffer.take(10).into_iter().map(|p| p.event.body).collect();
        assert_eq!(taken.len(), 2);
        assert!(taken.contains(&acked("a", 9).body), "{taken:?}");
        assert!(taken.contains(&appended(0, 0, 8, 1).body), "{taken:?}");
    }

    #[test]
    fn the_buffer_is_bounded_by_subjects_not_by_facts() {
        let mut buffer = Buffer::default();
        for i in 0..100 {
            buffer.insert(acked("a", i), 2);
            buffer.insert(acked("b", i), 2);
        }
        assert!(!buffer.insert(acked("c", 1), 2), "a third subject is refused");
        assert_eq!((buffer.len(), buffer.dropped), (2, 1));
        // Taking in pieces, oldest update first.
        assert_eq!(buffer.take(1)[0].event.body, acked("a", 99).body);
        assert_eq!(buffer.take(1)[0].event.body, acked("b", 99).body);
    }
}
