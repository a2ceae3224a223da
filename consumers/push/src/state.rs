//! What the worker knows about each user and device, rebuilt from the events
//! topic alone, and the one rule that decides whether a device is woken now.
//!
//! Pure and synchronous: no I/O, no clock (callers pass `now_ms`), so that the
//! coalescing rules are unit-tested here. Events state absolute values, so a
//! duplicate or a replay leaves the state as it was.

use std::collections::HashMap;

use lockstep_schemas::{Event, EventBody, PushTarget, WakeUpOutcome, target_policy::TargetPolicy};

/// What to do about one device now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Wake it, announcing `log_end`.
    Wake { target: PushTarget, log_end: i64 },
    /// Its committed offset is unknown (no `DeviceAcked` seen): read it from Kafka first.
    LookUpOffset,
    /// Nothing now; ask again at this time (Unix ms): a lease or `min_interval` runs out then.
    Later(i64),
    /// Nothing until another event about it arrives.
    Idle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastWake {
    pub log_end: i64,
    pub at_ms: i64,
    pub outcome: WakeUpOutcome,
}

#[derive(Debug, Default)]
pub struct DeviceState {
    /// (log generation, committed offset) from `DeviceAcked` or a Kafka look-up.
    pub committed: Option<(i64, i64)>,
    /// The log end this device itself pushed up to while it was caught up: it has
    /// those changes, so they are no reason to wake it.
    pub pushed_end: Option<(i64, i64)>,
    /// node id → lease end (Unix ms) of a live stream there.
    pub leases: HashMap<String, i64>,
    pub target: Option<PushTarget>,
    pub last_wake: Option<LastWake>,
    pub wake_in_flight: bool,
    pub lookup_in_flight: bool,
    pub revoked: bool,
    /// The time (Unix ms) the worker scheduled a re-check for, if any.
    pub scheduled_at: Option<i64>,
}

#[derive(Debug, Default)]
pub struct UserState {
    pub partition: i32,
    pub log_generation: i64,
    pub log_end: Option<i64>,
    /// Offset of the latest event about this user (in `partition`).
    pub last_event_offset: i64,
    pub devices: HashMap<String, DeviceState>,
}

#[derive(Debug)]
pub struct State {
    pub users: HashMap<String, UserState>,
    device_count: usize,
    max_devices: usize,
    min_interval_ms: i64,
    /// Targets read back from the events topic are checked again: a refused one is no target.
    policy: TargetPolicy,
}

impl State {
    pub fn new(min_interval_ms: i64, max_devices: usize, policy: TargetPolicy) -> Self {
        Self { users: HashMap::new(), device_count: 0, max_devices, min_interval_ms, policy }
    }

    pub fn device_count(&self) -> usize {
        self.device_count
    }

    pub fn device(&self, user_id: &str, device_id: &str) -> Option<&DeviceState> {
        self.users.get(user_id)?.devices.get(device_id)
    }

    pub fn device_mut(&mut self, user_id: &str, device_id: &str) -> Option<&mut DeviceState> {
        self.users.get_mut(user_id)?.devices.get_mut(device_id)
    }

    /// Applies one event read at (`partition`, `offset`). Returns the devices whose
    /// decision may have changed (all of the user's for `LogAppended`), or `None`
    /// when the event was dropped (device limit reached).
    pub fn apply(&mut self, partition: i32, offset: i64, event: &Event) -> Option<Vec<String>> {
        let user = self.users.entry(event.user_id.clone()).or_default();
        user.partition = partition;
        user.last_event_offset = user.last_event_offset.max(offset);
        if let EventBody::LogAppended { log_generation, first_offset, log_end, origin_device_id, .. } = &event.body {
            if *log_generation > user.log_generation || user.log_end.is_none() {
                user.log_generation = *log_generation;
                user.log_end = Some(*log_end);
            } else if *log_generation == user.log_generation {
                user.log_end = user.log_end.max(Some(*log_end));
            }
            let generation = user.log_generation;
            if let Some(origin) = user.devices.get_mut(origin_device_id.as_str()) {
                let had_start =
                    |end: Option<(i64, i64)>| end.is_some_and(|(g, e)| g == generation && e >= *first_offset);
                if had_start(origin.committed) || had_start(origin.pushed_end) {
                    origin.pushed_end = Some((generation, *log_end));
                }
            }
            return Some(user.devices.keys().cloned().collect());
        }
        let device_id = event.body.device_id().unwrap_or_default().to_string();
        if !user.devices.contains_key(&device_id) {
            if self.device_count >= self.max_devices {
                return None;
            }
            self.device_count += 1;
        }
        let device = user.devices.entry(device_id.clone()).or_default();
        match &event.body {
            EventBody::LogAppended { .. } => {}
            EventBody::DeviceAcked { log_generation, committed_offset, .. } => {
                device.committed = match device.committed {
                    Some((generation, committed)) if generation == *log_generation => {
                        Some((generation, committed.max(*committed_offset)))
                    }
                    Some((generation, _)) if generation > *log_generation => device.committed,
                    _ => Some((*log_generation, *committed_offset)),
                };
            }
            EventBody::DeviceConnected { lease_until_ms, .. } => {
                let lease = device.leases.entry(event.node_id.clone()).or_default();
                *lease = (*lease).max(*lease_until_ms);
                // Leases of nodes that stopped renewing long ago: bound the map.
                device.leases.retain(|_, until| *until > event.at_ms);
            }
            EventBody::DeviceDisconnected { .. } => {
                device.leases.remove(&event.node_id);
            }
            EventBody::DeviceAdded { .. } => device.revoked = false,
            EventBody::DeviceRevoked { .. } => {
                device.revoked = true;
                device.target = None;
            }
            EventBody::PushTargetSet { target, .. } => match self.policy.check_target(target) {
                Ok(_) => device.target = Some(target.clone()),
                Err(error) => {
                    tracing::warn!(user_id = %event.user_id, %device_id, origin = target.origin(), %error, "refused push target ignored");
                    device.target = None;
                }
            },
            EventBody::PushTargetRemoved { .. } => device.target = None,
            EventBody::WakeUp { log_end, outcome, .. } => {
                let wake = LastWake { log_end: *log_end, at_ms: event.at_ms, outcome: *outcome };
                // Our own earlier attempts can be read back after the final outcome.
                if device.last_wake.is_none_or(|last| wake.at_ms >= last.at_ms) {
                    device.last_wake = Some(wake);
                }
            }
        }
        Some(vec![device_id])
    }

    /// The rule: wake a device that has a target, is behind its user's log end, is
    /// connected nowhere, has no wake-up in flight, was not woken for this log end,
    /// and was last woken at least `min_interval` ago.
    pub fn decide(&self, user_id: &str, device_id: &str, now_ms: i64) -> Decision {
        let Some(user) = self.users.get(user_id) else { return Decision::Idle };
        let Some(device) = user.devices.get(device_id) else { return Decision::Idle };
        let (Some(target), Some(log_end)) = (&device.target, user.log_end) else { return Decision::Idle };
        if device.revoked || device.wake_in_flight || device.lookup_in_flight {
            return Decision::Idle;
        }
        let Some((generation, committed)) = device.committed else { return Decision::LookUpOffset };
        let behind = match generation.cmp(&user.log_generation) {
            // A newer log generation: the device must repair, whatever its offset says.
            std::cmp::Ordering::Less => true,
            std::cmp::Ordering::Equal => {
                let pushed = device.pushed_end.filter(|(g, _)| *g == generation).map_or(0, |(_, end)| end);
                committed.max(pushed) < log_end
            }
            // Acks of a generation whose LogAppended we have not seen yet.
            std::cmp::Ordering::Greater => false,
        };
        if !behind {
            return Decision::Idle;
        }
        if let Some(lease_end) = device.leases.values().copied().max().filter(|end| *end > now_ms) {
            return Decision::Later(lease_end);
        }
        if let Some(last) = device.last_wake {
            if last.outcome == WakeUpOutcome::Sent && last.log_end >= log_end {
                return Decision::Idle;
            }
            let next = last.at_ms.saturating_add(self.min_interval_ms);
            if next > now_ms {
                return Decision::Later(next);
            }
        }
        Decision::Wake { target: target.clone(), log_end }
    }

    /// Records a looked-up committed offset (None: the group has none, so the device
    /// starts at 0), unless a `DeviceAcked` arrived meanwhile.
    pub fn set_looked_up_offset(&mut self, user_id: &str, device_id: &str, committed: Option<i64>) {
        let Some(user) = self.users.get_mut(user_id) else { return };
        let generation = user.log_generation;
        if let Some(device) = user.devices.get_mut(device_id) {
            device.lookup_in_flight = false;
            if device.committed.is_none() {
                device.committed = Some((generation, committed.unwrap_or(0)));
            }
        }
    }

    /// Forgets the users of a partition this worker no longer owns.
    pub fn drop_partition(&mut self, partition: i32) {
        let mut dropped = 0;
        self.users.retain(|_, user| {
            let keep = user.partition != partition;
            if !keep {
                dropped += user.devices.len();
            }
            keep
        });
        self.device_count -= dropped;
    }

    /// Every (user, device) of a partition.
    pub fn devices_of_partition(&self, partition: i32) -> Vec<(String, String)> {
        let users = self.users.iter().filter(|(_, user)| user.partition == partition);
        users.flat_map(|(user_id, user)| user.devices.keys().map(|device| (user_id.clone(), device.clone()))).collect()
    }
}

#[cfg(test)]
mod tests;
