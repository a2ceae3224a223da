//! A push's reservations with several nodes (see `reservation`), and where it takes them.
//!
//! A user's pushes on one node enqueue their produce one at a time (the user's push lock: the
//! order of the produce is the order of the offsets). A reservation needs no such order, and
//! each costs database round trips: taken under the lock, they made a user's pushes wait for
//! each other's round trips (W7 fell behind 200 single-change pushes a second). So a push
//! reserves what nobody holds before it takes the lock ([`Gateway::claim_early`]); under the
//! lock, [`Gateway::reserve_writes`] deals with the rest (held, indexed, expired) as before.
//!
//! On one node, attempts of one change are told apart in memory (`in_flight`), and across nodes
//! by the reservation. A reservation held by this process reads as its own finished attempt
//! (taken over), so a change must be in flight here before this process reserves it: the early
//! claim puts the push's changes in flight first, and a retry of a change in flight here waits
//! for it outside the lock (the push it waits for needs the lock to finish).

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use lockstep_proto::v1::{Change, PushResult};

use super::{
    Gateway,
    dedup::{Digest, digest_of_change},
    pipeline::{Plan, UserPush, answer_from_index, failed},
    reservation::Claim,
};
use crate::{accounts::AuthedDevice, error::ApiError};

/// An early reservation older than this when its produce starts is renewed first (the lease
/// counts from the claim; a long wait for the lock must not eat into it).
const EARLY_CLAIM_FRESH: Duration = Duration::from_secs(1);

/// What a push reserved before its user's lock.
pub(super) struct EarlyClaims {
    /// The push's change ids, in flight here since before the claim.
    registered: Vec<String>,
    /// Reserved for this push: produce them without claiming again.
    pub won: HashSet<String>,
    /// Found in the index: answered from it (offset, digest).
    pub known: HashMap<String, (i64, Digest)>,
    at: Instant,
}

impl EarlyClaims {
    /// Gives the push's changes back to the plan (taken under the user's lock, with the index's
    /// lock held across both): `plan_batch` puts those it writes in flight again.
    pub fn hand_over(&self, index: &mut super::pipeline::IndexState, device: &AuthedDevice) {
        for change_id in &self.registered {
            index.in_flight.remove(&(device.device_id.clone(), change_id.clone()));
        }
    }

    /// The push ended before planning (an error): its changes are no longer in flight.
    pub fn abandon(&self, user: &UserPush, device: &AuthedDevice) {
        self.hand_over(&mut user.index(), device);
        user.released();
    }
}

impl Gateway {
    /// Several nodes: puts the push's changes in flight here and reserves those nobody holds,
    /// before the user's lock. `None` (the push takes the way under the lock, which handles
    /// every case) with one node, when a change of the push is still in flight here or in doubt,
    /// when the batch repeats an id, or when the database failed.
    pub(super) async fn claim_early(
        &self,
        user: &UserPush,
        device: &AuthedDevice,
        changes: &[Change],
    ) -> Option<EarlyClaims> {
        let reservations = self.dedup.reservations()?;
        let registered: Vec<String> = changes.iter().map(|change| change.change_id.clone()).collect();
        if registered.iter().collect::<HashSet<_>>().len() != registered.len() {
            return None;
        }
        let deadline = Instant::now() + self.kafka.produce_timeout;
        loop {
            {
                let mut index = user.index();
                let key = |change_id: &String| (device.device_id.clone(), change_id.clone());
                if registered.iter().any(|change_id| index.in_doubt.contains_key(&key(change_id))) {
                    return None;
                }
                if !registered.iter().any(|change_id| index.in_flight.contains(&key(change_id))) {
                    for change_id in &registered {
                        index.in_flight.insert(key(change_id));
                    }
                    break;
                }
            }
            // A retry of a push still being written here: let it finish (it needs the lock,
            // which this push does not hold yet), then answer from the index.
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            user.wait_released(&device.device_id, changes, deadline - now).await;
        }
        let at = Instant::now();
        let digests = changes.iter().map(|change| (change.change_id.clone(), digest_of_change(change))).collect();
        let claims = match reservations.claim_unheld(&device.user_id, &device.device_id, digests).await {
            Ok(claims) => claims,
            Err(error) => {
                tracing::warn!(user = %device.user_id, %error, "cannot reserve a push's changes before its turn");
                let early = EarlyClaims { registered, won: HashSet::new(), known: HashMap::new(), at };
                early.abandon(user, device);
                return None;
            }
        };
        let (mut won, mut known) = (HashSet::new(), HashMap::new());
        for (change_id, claim) in claims {
            match claim {
                Claim::Won => {
                    won.insert(change_id);
                }
                Claim::Indexed { offset, digest } => {
                    known.insert(change_id, (offset, digest));
                }
                Claim::TakenOver { .. } | Claim::Held => {}
            }
        }
        Some(EarlyClaims { registered, won, known, at })
    }

    /// With several nodes (reservations): reserves each change to write before it is produced
    /// (see `reservation`). A change another attempt holds waits, at most `produce_timeout`, for
    /// its offset; one whose reservation this attempt took over from an expired holder is written
    /// only if the topic, re-read from the index's mark, does not hold it. What cannot be decided
    /// is answered UNAVAILABLE (retryable) and leaves `in_flight`.
    pub(super) async fn reserve_writes(
        &self,
        user: &UserPush,
        tickets_before: u64,
        device: &AuthedDevice,
        topic: &str,
        plans: &mut [Plan],
        early: Option<&EarlyClaims>,
    ) {
        let Some(reservations) = self.dedup.reservations() else { return };
        let reserved_early = |change: &Change| early.is_some_and(|early| early.won.contains(change.change_id.as_str()));
        // The writes still to claim: not those reserved before the lock.
        let writes = |plans: &[Plan]| -> Vec<usize> {
            (0..plans.len())
                .filter(|index| matches!(&plans[*index], Plan::Write { change, .. } if !reserved_early(change)))
                .collect()
        };
        let all_writes = |plans: &[Plan]| -> Vec<usize> {
            (0..plans.len()).filter(|index| matches!(plans[*index], Plan::Write { .. })).collect()
        };
        let claimed = |plans: &[Plan], indexes: &[usize]| -> Vec<(String, Digest)> {
            indexes
                .iter()
                .filter_map(|index| match &plans[*index] {
                    Plan::Write { digest, change } => Some((change.change_id.clone(), *digest)),
                    Plan::Answer(_) => None,
                })
                .collect()
        };
        let answer = |plans: &mut [Plan], index: usize, result: PushResult| {
            if let Plan::Write { change, .. } = &plans[index] {
                user.index().in_flight.remove(&(device.device_id.clone(), change.change_id.clone()));
            }
            plans[index] = Plan::Answer(result);
        };
        let indexed = |plans: &mut [Plan], index: usize, offset: i64, stored: Digest| {
            if let Plan::Write { digest, change } = &plans[index] {
                let result = answer_from_index(&change.change_id, *digest, offset, stored);
                answer(plans, index, result);
            }
        };
        let unavailable = |plans: &mut [Plan], index: usize, why: &str| {
            if let Plan::Write { change, .. } = &plans[index] {
                let error = ApiError::Unavailable(format!("change_id {}: {why}; retry", change.change_id));
                answer(plans, index, failed(&error));
            }
        };
        let mut pending = writes(plans);
        // Changes this attempt took over and re-read the log for: its next claim only renews them.
        let mut reread: Vec<usize> = Vec::new();
        // Time went by since the first claim (a wait, a re-read): the leases are renewed at the end.
        let mut renew = false;
        let deadline = Instant::now() + self.kafka.produce_timeout;
        let mut pause = Duration::from_millis(20);
        while !pending.is_empty() {
            let batch = claimed(plans, &pending);
            let claims = match reservations.claim(&device.user_id, &device.device_id, batch).await {
                Ok(claims) => claims,
                Err(error) => {
                    tracing::warn!(topic, %error, "cannot reserve a push's changes");
                    for index in pending {
                        unavailable(plans, index, "cannot reserve it for writing");
                    }
                    return;
                }
            };
            let (mut held, mut taken) = (Vec::new(), Vec::new());
            for (index, claim) in pending.iter().copied().zip(claims) {
                match claim {
                    Claim::Won => {}
                    Claim::TakenOver { from_self: true } if reread.contains(&index) => {}
                    Claim::TakenOver { .. } => taken.push(index),
                    Claim::Held => held.push(index),
                    Claim::Indexed { offset, digest } => indexed(plans, index, offset, digest),
                }
            }
            if !taken.is_empty() {
                // The old holder may have appended them: read the log up to its end first. The
                // claim that follows renews the reservations, or finds the changes indexed.
                renew = true;
                user.wait_finished(tickets_before).await;
                if let Err(error) = self.reindex(user, &device.user_id, topic).await {
                    tracing::warn!(topic, %error, "cannot re-read the log for a taken-over reservation");
                    for index in taken {
                        unavailable(plans, index, "cannot re-read the log to check it");
                    }
                } else {
                    reread.extend(&taken);
                    held.extend(taken);
                    pending = held;
                    continue;
                }
            }
            let now = Instant::now();
            if held.is_empty() {
                break;
            }
            if now >= deadline {
                for index in held {
                    unavailable(plans, index, "it is being written through another node");
                }
                break;
            }
            renew = true;
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(500));
            pending = held;
        }
        // A lease covers one produce from its start: renewed right before it when the claim is older
        // (also one taken before a long wait for the lock).
        renew |= early.is_some_and(|early| early.at.elapsed() > EARLY_CLAIM_FRESH);
        let pending = all_writes(plans);
        if !renew || pending.is_empty() {
            return;
        }
        let batch = claimed(plans, &pending);
        match reservations.claim(&device.user_id, &device.device_id, batch).await {
            Ok(claims) => {
                for (index, claim) in pending.into_iter().zip(claims) {
                    match claim {
                        Claim::Won | Claim::TakenOver { from_self: true } => {}
                        Claim::Indexed { offset, digest } => indexed(plans, index, offset, digest),
                        Claim::TakenOver { from_self: false } | Claim::Held => {
                            unavailable(plans, index, "its reservation was lost")
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(topic, %error, "cannot renew a push's reservations");
                for index in pending {
                    unavailable(plans, index, "cannot reserve it for writing");
                }
            }
        }
    }
}
