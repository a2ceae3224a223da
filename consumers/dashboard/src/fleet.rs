//! The fleet as the dashboard knows it: facts folded from the events topic
//! and from Kafka's own bookkeeping (watermarks, committed offsets), and the
//! views the page, the JSON API and `/metrics` show.
//!
//! Every fact states an absolute value observed at a moment (an event's `at`,
//! or when a Kafka read was sent): a value replaces another only if it was
//! observed later, so replaying the events topic from the beginning, in any
//! interleaving with Kafka reads, ends in the same state.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use lockstep_schemas::{Event, EventBody};
use serde::Serialize;

use crate::status::{DeviceFacts, Sample, Status, StatusSettings, evaluate};

/// Ack samples kept per device (for LAGGING).
const HISTORY_SAMPLES: usize = 16;
/// Timeline entries kept per user (appends and acks, for the user page).
const TIMELINE_ENTRIES: usize = 40;
/// `received_at` values cached per user.
const RECEIVED_AT_CACHE: usize = 64;
/// Seconds the rates (pushes, acks, wake-ups per second) average over.
const RATE_WINDOW_SECS: i64 = 60;

/// Upper bounds (changes) of the lag distribution's buckets; the last is open.
pub const LAG_BUCKETS: [i64; 5] = [0, 10, 100, 1000, 10_000];

#[derive(Debug, Clone, Copy)]
struct Observed<T> {
    value: T,
    at_ms: i64,
}

#[derive(Debug, Default)]
struct UserState {
    log_generation: i64,
    log_start: Option<Observed<i64>>,
    log_end: Option<Observed<i64>>,
    devices: BTreeSet<String>,
    /// offset -> envelope `received_at` of the change at that offset.
    received_at: BTreeMap<i64, i64>,
    timeline: VecDeque<TimelineEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimelineEntry {
    pub at_ms: i64,
    /// "appended" or "acked".
    pub kind: &'static str,
    /// The appending device, or the acking one.
    pub device_id: String,
    /// Appended: the log end after it; acked: the committed offset.
    pub offset: i64,
    /// Appended: the number of changes; acked: how far the offset moved.
    pub count: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WakeUpView {
    pub at_ms: i64,
    pub log_end: i64,
    pub outcome: &'static str,
    pub http_status: i32,
}

#[derive(Debug, Default)]
struct DeviceState {
    user_id: String,
    added_at_ms: Option<i64>,
    revoked: bool,
    /// `None` value: Kafka holds no offset for the device's group.
    committed: Option<Observed<Option<i64>>>,
    ack_generation: Option<i64>,
    /// The committed offset of its last `DeviceAcked` event (for how far each ack moved).
    last_acked: Option<i64>,
    last_commit_ms: Option<i64>,
    last_move_ms: Option<i64>,
    /// node id -> lease end.
    leases: BTreeMap<String, i64>,
    push_target: bool,
    last_wakeup: Option<WakeUpView>,
    history: VecDeque<Sample>,
}

#[derive(Debug, Default, Clone, Copy)]
struct RateBucket {
    second: i64,
    appended: i64,
    acked: i64,
    wakeups: i64,
}

/// Everything the dashboard knows. Not thread-safe by itself: the service
/// holds it behind one mutex, and no call here waits for anything.
#[derive(Debug, Default)]
pub struct Fleet {
    users: HashMap<String, UserState>,
    devices: HashMap<String, DeviceState>,
    /// node id -> when it last published anything.
    nodes: BTreeMap<String, i64>,
    rates: VecDeque<RateBucket>,
    events_applied: u64,
}

/// One device as the page and the API show it: pseudonymous ids and numbers, nothing else.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceView {
    pub device_id: String,
    pub user_id: String,
    pub status: Status,
    pub lag_changes: i64,
    /// Age of the oldest change the device has not acked (exact, from its envelope), when known.
    pub lag_seconds: Option<f64>,
    pub committed: Option<i64>,
    pub log_start: i64,
    pub log_end: i64,
    pub log_generation: i64,
    pub last_ack_at_ms: Option<i64>,
    pub connected: bool,
    pub nodes: Vec<String>,
    pub last_wakeup: Option<WakeUpView>,
    pub push_target: bool,
    pub revoked: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub node_id: String,
    pub connections: usize,
    pub last_seen_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub now_ms: i64,
    pub users: usize,
    pub devices: usize,
    pub by_status: BTreeMap<Status, usize>,
    /// (upper bound in changes or None for the open bucket, devices), active devices only.
    pub lag_distribution: Vec<(Option<i64>, usize)>,
    pub appended_per_sec: f64,
    pub acked_per_sec: f64,
    pub wakeups_per_sec: f64,
    pub nodes: Vec<NodeView>,
    pub events_applied: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct UserView {
    pub user_id: String,
    pub log_start: i64,
    pub log_end: i64,
    pub log_generation: i64,
    pub devices: Vec<DeviceView>,
    pub timeline: Vec<TimelineEntry>,
}

/// A record whose `received_at` the dashboard would like to know.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WantedRecord {
    pub user_id: String,
    pub offset: i64,
}

fn observe<T: Copy + PartialEq>(slot: &mut Option<Observed<T>>, value: T, at_ms: i64) -> bool {
    match slot {
        Some(current) if current.at_ms > at_ms => false,
        _ => {
            let changed = slot.is_none_or(|current| current.value != value);
            *slot = Some(Observed { value, at_ms });
            changed
        }
    }
}

impl Fleet {
    pub fn events_applied(&self) -> u64 {
        self.events_applied
    }

    fn user(&mut self, user_id: &str) -> &mut UserState {
        self.users.entry(user_id.to_string()).or_default()
    }

    fn device(&mut self, user_id: &str, device_id: &str) -> &mut DeviceState {
        if !self.devices.contains_key(device_id) {
            self.user(user_id).devices.insert(device_id.to_string());
        }
        self.devices
            .entry(device_id.to_string())
            .or_insert_with(|| DeviceState { user_id: user_id.to_string(), ..DeviceState::default() })
    }

    fn rate_bucket(&mut self, at_ms: i64) -> Option<&mut RateBucket> {
        let second = at_ms.div_euclid(1000);
        let newest = self.rates.back().map_or(second, |bucket| bucket.second.max(second));
        if second < newest.saturating_sub(RATE_WINDOW_SECS) {
            return None;
        }
        // Partitions interleave: a second may arrive after a later one.
        let index = match self.rates.binary_search_by_key(&second, |bucket| bucket.second) {
            Ok(index) => index,
            Err(index) => {
                self.rates.insert(index, RateBucket { second, ..RateBucket::default() });
                index
            }
        };
        let dropped = self.rates.iter().take_while(|bucket| bucket.second < newest - RATE_WINDOW_SECS).count();
        self.rates.drain(..dropped);
        self.rates.get_mut(index - dropped)
    }

    /// Folds one event in.
    pub fn apply_event(&mut self, event: &Event) {
        self.events_applied += 1;
        let at_ms = event.at_ms;
        let seen = self.nodes.entry(event.node_id.clone()).or_insert(at_ms);
        *seen = (*seen).max(at_ms);
        let user_id = event.user_id.as_str();
        match &event.body {
            EventBody::LogAppended {
                log_generation,
                first_offset,
                log_end,
                count,
                origin_device_id,
                first_received_at_ms,
            } => {
                let user = self.user(user_id);
                if *log_generation > user.log_generation {
                    user.log_generation = *log_generation;
                    user.received_at.clear();
                }
                observe(&mut user.log_end, *log_end, at_ms);
                if *log_generation == user.log_generation {
                    user.received_at.insert(*first_offset, *first_received_at_ms);
                    while user.received_at.len() > RECEIVED_AT_CACHE {
                        user.received_at.pop_first();
                    }
                }
                push_bounded(
                    &mut user.timeline,
                    TimelineEntry {
                        at_ms,
                        kind: "appended",
                        device_id: origin_device_id.clone(),
                        offset: *log_end,
                        count: *count,
                    },
                    TIMELINE_ENTRIES,
                );
                if let Some(bucket) = self.rate_bucket(at_ms) {
                    bucket.appended += count;
                }
            }
            EventBody::DeviceAcked { device_id, log_generation, committed_offset } => {
                let log_end = self.users.get(user_id).and_then(|u| u.log_end).map_or(*committed_offset, |o| o.value);
                let device = self.device(user_id, device_id);
                let before = device.last_acked.unwrap_or(0);
                device.last_acked = Some(*committed_offset);
                if observe(&mut device.committed, Some(*committed_offset), at_ms) {
                    device.last_move_ms = Some(at_ms);
                }
                device.ack_generation = Some(device.ack_generation.unwrap_or(0).max(*log_generation));
                device.last_commit_ms = Some(device.last_commit_ms.unwrap_or(at_ms).max(at_ms));
                push_bounded(
                    &mut device.history,
                    Sample { at_ms, committed: *committed_offset, log_end: log_end.max(*committed_offset) },
                    HISTORY_SAMPLES,
                );
                let moved = (committed_offset - before).max(0);
                let user = self.user(user_id);
                push_bounded(
                    &mut user.timeline,
                    TimelineEntry {
                        at_ms,
                        kind: "acked",
                        device_id: device_id.clone(),
                        offset: *committed_offset,
                        count: moved,
                    },
                    TIMELINE_ENTRIES,
                );
                if let Some(bucket) = self.rate_bucket(at_ms) {
                    bucket.acked += moved;
                }
            }
            EventBody::DeviceConnected { device_id, lease_until_ms, .. } => {
                let device = self.device(user_id, device_id);
                if !device.revoked {
                    let lease = device.leases.entry(event.node_id.clone()).or_insert(*lease_until_ms);
                    *lease = (*lease).max(*lease_until_ms);
                }
            }
            EventBody::DeviceDisconnected { device_id } => {
                let device = self.device(user_id, device_id);
                device.leases.remove(&event.node_id);
            }
            EventBody::DeviceAdded { device_id } => {
                let device = self.device(user_id, device_id);
                device.added_at_ms = Some(device.added_at_ms.map_or(at_ms, |added| added.min(at_ms)));
                device.last_move_ms.get_or_insert(at_ms);
            }
            EventBody::DeviceRevoked { device_id } => {
                let device = self.device(user_id, device_id);
                device.revoked = true;
                device.leases.clear();
            }
            EventBody::PushTargetSet { device_id, .. } => self.device(user_id, device_id).push_target = true,
            EventBody::PushTargetRemoved { device_id, .. } => self.device(user_id, device_id).push_target = false,
            EventBody::WakeUp { device_id, log_end, outcome, http_status } => {
                self.device(user_id, device_id).last_wakeup =
                    Some(WakeUpView { at_ms, log_end: *log_end, outcome: outcome.as_str(), http_status: *http_status });
                if let Some(bucket) = self.rate_bucket(at_ms) {
                    bucket.wakeups += 1;
                }
            }
        }
    }

    /// A user log's watermarks, read from Kafka at `at_ms`.
    pub fn apply_watermarks(&mut self, user_id: &str, log_start: i64, log_end: i64, at_ms: i64) {
        let user = self.user(user_id);
        let went_back = user.log_end.is_some_and(|end| end.value > log_end && end.at_ms <= at_ms);
        observe(&mut user.log_start, log_start, at_ms);
        observe(&mut user.log_end, log_end, at_ms);
        if went_back {
            // Offsets are being reused: what was cached belongs to the old log.
            user.received_at.clear();
        }
    }

    /// A device's committed offset (None: Kafka holds none), read from Kafka at `at_ms`.
    pub fn apply_committed(&mut self, device_id: &str, committed: Option<i64>, at_ms: i64) {
        if let Some(device) = self.devices.get_mut(device_id)
            && observe(&mut device.committed, committed, at_ms)
        {
            device.last_move_ms = Some(at_ms);
        }
    }

    /// The `received_at` of the change at `offset` in a user's log.
    pub fn apply_received_at(&mut self, user_id: &str, offset: i64, received_at_ms: i64) {
        let user = self.user(user_id);
        user.received_at.insert(offset, received_at_ms);
        while user.received_at.len() > RECEIVED_AT_CACHE {
            user.received_at.pop_first();
        }
    }

    /// Users whose watermarks and devices (not revoked) whose offsets a refresh reads.
    pub fn refresh_targets(&self) -> (Vec<String>, Vec<(String, String)>) {
        let users = self.users.keys().cloned().collect();
        let devices = self
            .devices
            .iter()
            .filter(|(_, device)| !device.revoked)
            .map(|(device_id, device)| (device_id.clone(), device.user_id.clone()))
            .collect();
        (users, devices)
    }

    /// Records at devices' committed offsets whose `received_at` is not known, oldest need first.
    pub fn wanted_records(&self, limit: usize) -> Vec<WantedRecord> {
        let mut wanted = BTreeSet::new();
        for device in self.devices.values().filter(|device| !device.revoked) {
            let Some(user) = self.users.get(&device.user_id) else { continue };
            let (log_start, log_end) = bounds(user);
            let position = device.committed.and_then(|c| c.value).unwrap_or(log_start);
            if position >= log_start && position < log_end && !user.received_at.contains_key(&position) {
                wanted.insert(WantedRecord { user_id: device.user_id.clone(), offset: position });
                if wanted.len() >= limit {
                    break;
                }
            }
        }
        wanted.into_iter().collect()
    }

    fn view(&self, device_id: &str, device: &DeviceState, now_ms: i64, settings: &StatusSettings) -> DeviceView {
        let empty = UserState::default();
        let user = self.users.get(&device.user_id).unwrap_or(&empty);
        let (log_start, log_end) = bounds(user);
        let committed = device.committed.and_then(|c| c.value);
        let position = committed.unwrap_or(log_start);
        let oldest_unacked_ms =
            if position < log_end && position >= log_start { user.received_at.get(&position).copied() } else { None };
        let nodes: Vec<String> =
            device.leases.iter().filter(|(_, until)| **until > now_ms).map(|(node, _)| node.clone()).collect();
        let history: Vec<Sample> = device.history.iter().copied().collect();
        let facts = DeviceFacts {
            now_ms,
            revoked: device.revoked,
            connected: !nodes.is_empty(),
            log_start,
            log_end,
            committed,
            generation_stale: device.ack_generation.is_some_and(|acked| acked < user.log_generation),
            last_commit_ms: device.last_commit_ms.or(device.added_at_ms),
            last_move_ms: device.last_move_ms,
            oldest_unacked_ms,
            history: &history,
        };
        let status = evaluate(&facts, settings);
        let lag_changes = if status == Status::ResyncNeeded { (log_end - log_start).max(0) } else { facts.lag() };
        DeviceView {
            device_id: device_id.to_string(),
            user_id: device.user_id.clone(),
            status,
            lag_changes,
            lag_seconds: oldest_unacked_ms.map(|oldest| (now_ms - oldest).max(0) as f64 / 1000.0),
            committed,
            log_start,
            log_end,
            log_generation: user.log_generation,
            last_ack_at_ms: device.last_commit_ms,
            connected: facts.connected,
            nodes,
            last_wakeup: device.last_wakeup.clone(),
            push_target: device.push_target,
            revoked: device.revoked,
        }
    }

    /// Every device, worst first (status, then the oldest lack, then the most changes behind).
    pub fn devices(&self, now_ms: i64, settings: &StatusSettings) -> Vec<DeviceView> {
        let mut views: Vec<DeviceView> =
            self.devices.iter().map(|(id, device)| self.view(id, device, now_ms, settings)).collect();
        sort_worst_first(&mut views);
        views
    }

    pub fn user_view(&self, user_id: &str, now_ms: i64, settings: &StatusSettings) -> Option<UserView> {
        let user = self.users.get(user_id)?;
        let (log_start, log_end) = bounds(user);
        let devices = user
            .devices
            .iter()
            .filter_map(|id| self.devices.get(id).map(|device| self.view(id, device, now_ms, settings)))
            .collect();
        Some(UserView {
            user_id: user_id.to_string(),
            log_start,
            log_end,
            log_generation: user.log_generation,
            devices,
            timeline: user.timeline.iter().rev().cloned().collect(),
        })
    }

    /// The fleet summary over `views` (all devices, as [`Fleet::devices`] returns them).
    pub fn summary(&self, views: &[DeviceView], now_ms: i64) -> Summary {
        let mut by_status: BTreeMap<Status, usize> = Status::ALL.iter().map(|status| (*status, 0)).collect();
        let mut lag_distribution: Vec<(Option<i64>, usize)> =
            LAG_BUCKETS.iter().map(|bound| (Some(*bound), 0)).chain([(None, 0)]).collect();
        let mut connections: BTreeMap<&str, usize> = self.nodes.keys().map(|node| (node.as_str(), 0)).collect();
        for view in views {
            *by_status.entry(view.status).or_default() += 1;
            if !view.revoked {
                let bucket =
                    LAG_BUCKETS.iter().position(|bound| view.lag_changes <= *bound).unwrap_or(LAG_BUCKETS.len());
                lag_distribution[bucket].1 += 1;
            }
            for node in &view.nodes {
                *connections.entry(node.as_str()).or_default() += 1;
            }
        }
        let since = now_ms.div_euclid(1000) - RATE_WINDOW_SECS;
        let recent = self.rates.iter().filter(|bucket| bucket.second > since);
        let (appended, acked, wakeups) =
            recent.fold((0, 0, 0), |(a, b, c), bucket| (a + bucket.appended, b + bucket.acked, c + bucket.wakeups));
        let per_sec = |total: i64| total as f64 / RATE_WINDOW_SECS as f64;
        Summary {
            now_ms,
            users: self.users.len(),
            devices: views.len(),
            by_status,
            lag_distribution,
            appended_per_sec: per_sec(appended),
            acked_per_sec: per_sec(acked),
            wakeups_per_sec: per_sec(wakeups),
            nodes: connections
                .into_iter()
                .map(|(node, connections)| NodeView {
                    node_id: node.to_string(),
                    connections,
                    last_seen_ms: self.nodes.get(node).copied().unwrap_or_default(),
                })
                .collect(),
            events_applied: self.events_applied,
        }
    }
}

fn bounds(user: &UserState) -> (i64, i64) {
    let log_end = user.log_end.map_or(0, |end| end.value);
    let log_start = user.log_start.map_or(0, |start| start.value).min(log_end);
    (log_start, log_end)
}

fn push_bounded<T>(queue: &mut VecDeque<T>, item: T, bound: usize) {
    queue.push_back(item);
    while queue.len() > bound {
        queue.pop_front();
    }
}

pub fn sort_worst_first(views: &mut [DeviceView]) {
    views.sort_by(|a, b| {
        a.status
            .cmp(&b.status)
            .then(b.lag_seconds.unwrap_or(0.0).total_cmp(&a.lag_seconds.unwrap_or(0.0)))
            .then(b.lag_changes.cmp(&a.lag_changes))
            .then(a.user_id.cmp(&b.user_id))
            .then(a.device_id.cmp(&b.device_id))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_schemas::WakeUpOutcome;

    fn event(user: &str, at_ms: i64, body: EventBody) -> Event {
        Event { user_id: user.into(), node_id: "node-a".into(), at_ms, body }
    }

    fn settings() -> StatusSettings {
        StatusSettings { stall_after: std::time::Duration::from_secs(10), ..StatusSettings::default() }
    }

    fn appended(user: &str, at_ms: i64, first: i64, end: i64) -> Event {
        let body = EventBody::LogAppended {
            log_generation: 0,
            first_offset: first,
            log_end: end,
            count: end - first,
            origin_device_id: "d1".into(),
            first_received_at_ms: at_ms - 5,
        };
        event(user, at_ms, body)
    }

    fn status_of(fleet: &Fleet, device: &str, now_ms: i64) -> Status {
        let views = fleet.devices(now_ms, &settings());
        views.iter().find(|view| view.device_id == device).expect("device shown").status
    }

    #[test]
    fn a_fleet_from_events_and_kafka_reads() {
        let mut fleet = Fleet::default();
        for device in ["d1", "d2", "d3", "d4"] {
            fleet.apply_event(&event("u1", 1_000, EventBody::DeviceAdded { device_id: device.into() }));
        }
        fleet.apply_event(&appended("u1", 2_000, 0, 10));
        fleet.apply_event(&event(
            "u1",
            2_100,
            EventBody::DeviceAcked { device_id: "d1".into(), log_generation: 0, committed_offset: 10 },
        ));
        fleet.apply_event(&event(
            "u1",
            2_200,
            EventBody::DeviceConnected { device_id: "d2".into(), lease_until_ms: 100_000, stream_started_ms: None },
        ));
        fleet.apply_event(&event("u1", 2_300, EventBody::DeviceRevoked { device_id: "d4".into() }));
        fleet.apply_event(&event(
            "u1",
            2_400,
            EventBody::WakeUp { device_id: "d3".into(), log_end: 10, outcome: WakeUpOutcome::Sent, http_status: 201 },
        ));
        let now = 30_000;
        assert_eq!(status_of(&fleet, "d1", now), Status::Ok);
        // d2 holds a stream and never acked the 10 changes of 28 s ago.
        assert_eq!(status_of(&fleet, "d2", now), Status::Stalled);
        assert_eq!(status_of(&fleet, "d3", now), Status::Offline);
        assert_eq!(status_of(&fleet, "d4", now), Status::Revoked);
        let views = fleet.devices(now, &settings());
        let d2 = views.iter().find(|v| v.device_id == "d2").unwrap();
        assert_eq!((d2.lag_changes, d2.committed, d2.nodes.clone()), (10, None, vec!["node-a".to_string()]));
        assert_eq!(d2.lag_seconds, Some(28.005), "exact: from the envelope's received_at at offset 0");
        assert_eq!(views.first().map(|v| v.status), Some(Status::Stalled), "worst first");
        let d3 = views.iter().find(|v| v.device_id == "d3").unwrap();
        assert_eq!(d3.last_wakeup.as_ref().map(|w| w.outcome), Some("SENT"));

        // d2 acks to the end (read from Kafka): OK.
        fleet.apply_committed("d2", Some(10), 31_000);
        assert_eq!(status_of(&fleet, "d2", 31_000), Status::Ok);
        // The lease ran out: d2 is no longer connected.
        assert!(!fleet.devices(200_000, &settings()).iter().any(|v| v.connected));

        // The log lost history: its end is back at 2, below d1's offset.
        fleet.apply_watermarks("u1", 0, 2, 40_000);
        assert_eq!(status_of(&fleet, "d1", 40_000), Status::ResyncNeeded);

        let summary = fleet.summary(&fleet.devices(40_000, &settings()), 40_000);
        assert_eq!(summary.devices, 4);
        assert_eq!(summary.by_status[&Status::Revoked], 1);
        assert_eq!(summary.nodes.len(), 1);
        assert!(summary.appended_per_sec > 0.0);
    }

    #[test]
    fn a_replay_in_any_order_with_kafka_reads_ends_the_same() {
        let events = [
            event("u1", 1_000, EventBody::DeviceAdded { device_id: "d1".into() }),
            appended("u1", 2_000, 0, 5),
            event(
                "u1",
                3_000,
                EventBody::DeviceAcked { device_id: "d1".into(), log_generation: 0, committed_offset: 3 },
            ),
            event(
                "u1",
                4_000,
                EventBody::DeviceAcked { device_id: "d1".into(), log_generation: 0, committed_offset: 5 },
            ),
        ];
        let mut in_order = Fleet::default();
        for e in &events {
            in_order.apply_event(e);
        }
        // A Kafka read taken at 3 500 (offset 3) arrives after the replay: older than the last ack.
        in_order.apply_committed("d1", Some(3), 3_500);
        let mut read_first = Fleet::default();
        read_first.apply_event(&events[0]);
        read_first.apply_committed("d1", Some(3), 3_500);
        for e in &events[1..] {
            read_first.apply_event(e);
        }
        for fleet in [&in_order, &read_first] {
            let view = &fleet.devices(10_000, &settings())[0];
            assert_eq!((view.committed, view.status), (Some(5), Status::Ok));
        }
    }

    #[test]
    fn the_records_to_read_are_those_at_lagging_offsets_not_cached() {
        let mut fleet = Fleet::default();
        fleet.apply_event(&event("u1", 1_000, EventBody::DeviceAdded { device_id: "d1".into() }));
        fleet.apply_event(&appended("u1", 2_000, 0, 5));
        fleet.apply_event(&event(
            "u1",
            3_000,
            EventBody::DeviceAcked { device_id: "d1".into(), log_generation: 0, committed_offset: 3 },
        ));
        assert_eq!(fleet.wanted_records(10), vec![WantedRecord { user_id: "u1".into(), offset: 3 }]);
        fleet.apply_received_at("u1", 3, 1_990);
        assert!(fleet.wanted_records(10).is_empty());
        assert_eq!(fleet.devices(12_000, &settings())[0].lag_seconds, Some(10.01));
    }
}
