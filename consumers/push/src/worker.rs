//! The worker's loop: events in, state updated, due devices woken with bounded
//! concurrency, offsets committed behind the wake-ups they caused.
//!
//! Phases, each its own method: [`Worker::on_assigned`] / [`Worker::on_revoked`]
//! (rebalances), [`Worker::on_record`] (one event), [`Worker::evaluate`] (the
//! decision for one device), [`Worker::on_woken`] (a wake-up ended),
//! [`Worker::commit`] (offsets). Which wake-up runs when is the
//! [`Dispatcher`]'s (fairness between origins).

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, HashMap},
    sync::Arc,
    time::Duration,
};

use lockstep_kafka::{GroupOffsets, locks::lock};
use lockstep_schemas::decode_event;
use rdkafka::{
    Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer},
};
use tokio::{sync::mpsc, task::JoinSet};

use crate::{
    dispatch::Dispatcher,
    events::{Assignment, GroupMember, Incoming},
    settings::Settings,
    state::{Decision, State},
    wake::{WakeOrder, WakeResult, Waker, now_ms},
};

/// Progress through one owned partition.
#[derive(Debug)]
struct PartitionProgress {
    /// Bumped per assignment, so a wake-up of an earlier assignment releases nothing.
    epoch: u64,
    /// Replay ends (and acting starts) once offset `high_watermark - 1` was read.
    live: bool,
    high_watermark: i64,
    /// Next offset to read.
    next_offset: i64,
    /// The highest offset committed for the group (never moved backwards).
    committed: i64,
    /// Offsets of events whose wake-ups are still in flight (offset → count).
    holds: BTreeMap<i64, usize>,
}

impl PartitionProgress {
    fn commit_point(&self) -> Option<i64> {
        if !self.live {
            return None;
        }
        let point = self.holds.keys().next().copied().unwrap_or(self.next_offset).min(self.next_offset);
        (point > self.committed).then_some(point)
    }

    fn release(&mut self, offset: i64) {
        if let Some(count) = self.holds.get_mut(&offset) {
            *count -= 1;
            if *count == 0 {
                self.holds.remove(&offset);
            }
        }
    }
}

/// The event offset a wake-up holds back from being committed.
struct Hold {
    partition: i32,
    epoch: u64,
    hold: i64,
}

pub struct Worker {
    settings: Settings,
    state: State,
    member: GroupMember,
    offsets: GroupOffsets,
    partitions: HashMap<i32, PartitionProgress>,
    next_epoch: u64,
    /// Due wake-ups, queued, in flight or waiting to retry (at most one per device).
    wakes: Dispatcher<Hold>,
    lookups: JoinSet<(String, String, Option<i64>)>,
    /// Re-checks at a time (Unix ms): leases and `min_interval` running out.
    timers: BinaryHeap<Reverse<(i64, String, String)>>,
}

impl Worker {
    pub fn new(settings: Settings, member: GroupMember, waker: Arc<Waker>, offsets: GroupOffsets) -> Self {
        let min_interval_ms = settings.wake.min_interval.as_millis() as i64;
        // Validated with the settings; the default refuses every private network.
        let policy = settings.target_policy().unwrap_or_default();
        let state = State::new(min_interval_ms, settings.wake.max_devices, policy);
        let wakes = Dispatcher::new(waker, &settings.wake);
        Self {
            settings,
            state,
            member,
            offsets,
            partitions: HashMap::new(),
            next_epoch: 0,
            wakes,
            lookups: JoinSet::new(),
            timers: BinaryHeap::new(),
        }
    }

    /// Runs until `shutdown`, then finishes the wake-ups in flight (within
    /// `http.request_timeout` × `wake.max_attempts`) and commits what was acted on.
    pub async fn run(
        mut self,
        mut incoming_rx: mpsc::Receiver<Incoming>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), crate::Error> {
        tokio::pin!(shutdown);
        let mut commit_tick = tokio::time::interval(self.settings.events.commit_interval);
        let mut timer_tick = tokio::time::interval(Duration::from_millis(50));
        timer_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                (hold, order, result) = self.wakes.next_done(), if !self.wakes.is_idle() => {
                    self.on_woken(hold, order, result);
                }
                Some(found) = self.lookups.join_next(), if !self.lookups.is_empty() => match found {
                    Ok((user_id, device_id, committed)) => {
                        self.state.set_looked_up_offset(&user_id, &device_id, committed);
                        self.evaluate(&user_id, &device_id);
                    }
                    Err(error) => tracing::error!(%error, "offset look-up task failed"),
                },
                incoming = incoming_rx.recv() => match incoming {
                    Some(Incoming::Assigned(assignments)) => self.on_assigned(assignments),
                    Some(Incoming::Revoked(partitions)) => self.on_revoked(&partitions),
                    Some(Incoming::Record { partition, offset, payload }) => self.on_record(partition, offset, &payload),
                    None => return Err(crate::Error::ConsumerGone),
                },
                _ = timer_tick.tick() => self.on_timers(),
                _ = commit_tick.tick() => self.commit(CommitMode::Async),
            }
            self.wakes.start_ready();
        }
        tracing::info!(in_flight = self.wakes.in_flight(), "shutting down: finishing wake-ups in flight");
        drop(incoming_rx);
        // Wake-ups never tried stay for the next owner (their events stay uncommitted).
        self.wakes.retain(|_, state| state.number > 1);
        let deadline = self.settings.http.request_timeout * self.settings.wake.max_attempts + Duration::from_secs(1);
        let finish = async {
            while !self.wakes.is_idle() {
                let (hold, order, result) = self.wakes.next_done().await;
                self.on_woken(hold, order, result);
            }
        };
        if tokio::time::timeout(deadline, finish).await.is_err() {
            tracing::warn!("wake-ups still in flight at the shutdown deadline; their events stay uncommitted");
        }
        let offsets = self.commit_offsets();
        if offsets.count() > 0 {
            // Cloned only here: the last reference must go in `close`, off the runtime
            // (dropping the consumer leaves the group, whose callback blocks).
            let consumer = self.member.consumer.clone();
            let committed = tokio::task::spawn_blocking(move || consumer.commit(&offsets, CommitMode::Sync)).await;
            if !matches!(committed, Ok(Ok(()))) {
                tracing::warn!(?committed, "cannot commit offsets at shutdown");
            }
        }
        self.member.close().await;
        Ok(())
    }

    fn on_assigned(&mut self, assignments: Vec<Assignment>) {
        for assignment in assignments {
            self.next_epoch += 1;
            let partition = assignment.partition;
            // A previous assignment's state would be replayed twice: start clean.
            self.state.drop_partition(partition);
            let live = assignment.high_watermark <= assignment.low_watermark;
            self.partitions.insert(
                partition,
                PartitionProgress {
                    epoch: self.next_epoch,
                    live,
                    high_watermark: assignment.high_watermark,
                    next_offset: assignment.low_watermark,
                    committed: assignment.committed.unwrap_or(-1),
                    holds: BTreeMap::new(),
                },
            );
            tracing::info!(partition, ?assignment, "replaying partition before acting");
        }
    }

    fn on_revoked(&mut self, partitions: &[i32]) {
        for partition in partitions {
            self.partitions.remove(partition);
            self.state.drop_partition(*partition);
            lock(&self.member.commit_points).remove(partition);
        }
        self.wakes.retain(|hold, _| !partitions.contains(&hold.partition));
    }

    fn on_record(&mut self, partition: i32, offset: i64, payload: &[u8]) {
        let Some(progress) = self.partitions.get_mut(&partition) else { return };
        progress.next_offset = progress.next_offset.max(offset + 1);
        let became_live = !progress.live && offset + 1 >= progress.high_watermark;
        progress.live |= became_live;
        let live = progress.live;
        metrics::counter!("lockstep_push_events_consumed_total").increment(1);
        let affected = match decode_event(payload) {
            Ok(event) => match self.state.apply(partition, offset, &event) {
                Some(devices) => Some((event.user_id, devices)),
                None => {
                    tracing::warn!(partition, offset, "device limit reached; event dropped");
                    None
                }
            },
            Err(error) => {
                tracing::warn!(partition, offset, %error, "undecodable event skipped");
                None
            }
        };
        if became_live {
            let devices = self.state.devices_of_partition(partition);
            tracing::info!(partition, offset, devices = devices.len(), "partition replayed; acting from here");
            for (user_id, device_id) in devices {
                self.evaluate(&user_id, &device_id);
            }
        } else if live && let Some((user_id, devices)) = affected {
            for device_id in devices {
                self.evaluate(&user_id, &device_id);
            }
        }
    }

    /// Decides for one device and acts: queue a wake-up, look up its offset, or
    /// schedule a re-check.
    fn evaluate(&mut self, user_id: &str, device_id: &str) {
        let now = now_ms();
        match self.state.decide(user_id, device_id, now) {
            Decision::Idle => {}
            Decision::Later(at_ms) => {
                let Some(device) = self.state.device_mut(user_id, device_id) else { return };
                if device.scheduled_at.is_none_or(|scheduled| scheduled > at_ms || scheduled < now) {
                    device.scheduled_at = Some(at_ms);
                    self.timers.push(Reverse((at_ms, user_id.to_string(), device_id.to_string())));
                }
            }
            Decision::LookUpOffset => {
                let Some(device) = self.state.device_mut(user_id, device_id) else { return };
                device.lookup_in_flight = true;
                let offsets = self.offsets.clone();
                let group = lockstep_kafka::device_group(&self.settings.kafka, device_id);
                let topic = lockstep_kafka::user_topic(&self.settings.kafka, user_id);
                let (user_id, device_id) = (user_id.to_string(), device_id.to_string());
                // Reads the device group's offset without joining it: never a commit there.
                self.lookups.spawn(async move {
                    let committed = match offsets.fetch(&group, &topic, 0).await {
                        Ok(committed) => committed,
                        Err(error) => {
                            tracing::warn!(%user_id, %device_id, %error, "cannot read the device's offset; taking 0");
                            None
                        }
                    };
                    (user_id, device_id, committed)
                });
            }
            Decision::Wake { target, log_end } => {
                let Some(user) = self.state.users.get(user_id) else { return };
                let (partition, hold) = (user.partition, user.last_event_offset);
                let Some(progress) = self.partitions.get_mut(&partition) else { return };
                *progress.holds.entry(hold).or_default() += 1;
                let epoch = progress.epoch;
                if let Some(device) = self.state.device_mut(user_id, device_id) {
                    device.wake_in_flight = true;
                }
                let order =
                    WakeOrder { user_id: user_id.to_string(), device_id: device_id.to_string(), target, log_end };
                self.wakes.submit(Hold { partition, epoch, hold }, order);
            }
        }
    }

    fn on_woken(&mut self, hold: Hold, order: WakeOrder, result: WakeResult) {
        if let Some(progress) = self.partitions.get_mut(&hold.partition)
            && progress.epoch == hold.epoch
        {
            progress.release(hold.hold);
        }
        let WakeOrder { user_id, device_id, log_end, .. } = &order;
        let Some(device) = self.state.device_mut(user_id, device_id) else { return };
        device.wake_in_flight = false;
        let wake = crate::state::LastWake { log_end: *log_end, at_ms: result.at_ms, outcome: result.outcome };
        if device.last_wake.is_none_or(|last| wake.at_ms >= last.at_ms) {
            device.last_wake = Some(wake);
        }
        if result.target_removed {
            device.target = None;
        }
        self.evaluate(user_id, device_id);
    }

    fn on_timers(&mut self) {
        let now = now_ms();
        while let Some(Reverse((at_ms, _, _))) = self.timers.peek() {
            if *at_ms > now {
                break;
            }
            let Some(Reverse((at_ms, user_id, device_id))) = self.timers.pop() else { break };
            let Some(device) = self.state.device_mut(&user_id, &device_id) else { continue };
            if device.scheduled_at == Some(at_ms) {
                device.scheduled_at = None;
                self.evaluate(&user_id, &device_id);
            }
        }
    }

    fn commit_offsets(&mut self) -> TopicPartitionList {
        let mut offsets = TopicPartitionList::new();
        let mut points = lock(&self.member.commit_points);
        for (partition, progress) in &mut self.partitions {
            if let Some(point) = progress.commit_point() {
                let _ = offsets.add_partition_offset(&self.settings.events.topic, *partition, Offset::Offset(point));
                points.insert(*partition, point);
                progress.committed = point;
            }
        }
        offsets
    }

    fn commit(&mut self, mode: CommitMode) {
        let offsets = self.commit_offsets();
        if offsets.count() == 0 {
            return;
        }
        // Async mode only enqueues the commit: it does not block the runtime.
        if let Err(error) = self.member.consumer.commit(&offsets, mode) {
            tracing::warn!(%error, "cannot commit event offsets");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(live: bool, next_offset: i64, committed: i64) -> PartitionProgress {
        PartitionProgress { epoch: 1, live, high_watermark: 0, next_offset, committed, holds: BTreeMap::new() }
    }

    #[test]
    fn offsets_are_committed_behind_wake_ups_in_flight_and_only_forward() {
        let mut replaying = progress(false, 50, 10);
        assert_eq!(replaying.commit_point(), None, "nothing while replaying");
        replaying.live = true;
        assert_eq!(replaying.commit_point(), Some(50));
        let mut acting = progress(true, 50, 10);
        *acting.holds.entry(20).or_default() += 2;
        *acting.holds.entry(30).or_default() += 1;
        assert_eq!(acting.commit_point(), Some(20), "the event of the oldest wake-up in flight");
        acting.release(20);
        assert_eq!(acting.commit_point(), Some(20), "one of its two wake-ups is still in flight");
        acting.release(20);
        assert_eq!(acting.commit_point(), Some(30));
        acting.release(30);
        assert_eq!(acting.commit_point(), Some(50));
        acting.committed = 50;
        assert_eq!(acting.commit_point(), None, "never the same or an older offset again");
        let behind = progress(true, 5, 10);
        assert_eq!(behind.commit_point(), None, "never below what the group had committed");
    }
}
