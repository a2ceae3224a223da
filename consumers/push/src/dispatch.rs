//! Which wake-up attempt runs next: fairness between push-service origins, so
//! that accounts whose endpoints answer slowly (or never) cannot delay the
//! wake-ups of everybody else.
//!
//! An attempt holds a slot only while its HTTP request is in flight; a wake-up
//! waiting to retry (backoff, a 429's `Retry-After`) holds none. The slots:
//! - `wake.max_concurrent` requests in flight in all;
//! - `wake.max_per_origin` to one origin (scheme, host, port);
//! - an origin is *fast* (its last attempt answered within `wake.slow_after`),
//!   *slow* (it did not) or *new* (not heard from yet). Slow origins share
//!   `wake.max_concurrent_slow` slots; new origins share as many, one request
//!   each until they answer; fast origins keep the rest, so however many
//!   origins are slow, those that answer keep at least `max_concurrent` −
//!   2 × `max_concurrent_slow` slots. A first request to a new origin waits at
//!   most `slow_after` for its answer, so new origins take turns quickly.
//!
//! Origins take turns (round robin), so one origin's long queue does not delay
//! another's; among new origins, the one with the most wake-ups waiting is
//! probed first. [`OriginQueues`] is the pure rule (clock passed in); [`Dispatcher`]
//! runs attempts with it.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    sync::Arc,
};

use tokio::{task::JoinSet, time::Instant};

use crate::{
    settings::WakeSettings,
    wake::{AttemptEnd, AttemptReport, AttemptState, WakeOrder, WakeResult, Waker},
};

/// How an origin has answered lately; decides which slots its requests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Fast,
    New,
    Slow,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_concurrent: usize,
    pub max_per_origin: usize,
    pub max_concurrent_slow: usize,
}

impl From<&WakeSettings> for Limits {
    fn from(wake: &WakeSettings) -> Self {
        Self {
            max_concurrent: wake.max_concurrent,
            max_per_origin: wake.max_per_origin,
            max_concurrent_slow: wake.max_concurrent_slow,
        }
    }
}

struct Origin<J> {
    waiting: VecDeque<J>,
    in_flight: usize,
    lane: Lane,
    /// No request before this (a 429).
    paused_until: Option<Instant>,
}

impl<J> Origin<J> {
    fn new() -> Self {
        Self { waiting: VecDeque::new(), in_flight: 0, lane: Lane::New, paused_until: None }
    }
}

/// Jobs per origin, the slots they hold, and retries waiting for their time.
pub struct OriginQueues<J> {
    limits: Limits,
    origins: HashMap<String, Origin<J>>,
    /// Origins with waiting jobs, in turn order (each at most once).
    turns: VecDeque<String>,
    in_flight: usize,
    in_flight_slow: usize,
    in_flight_new: usize,
    /// Retries: (due, sequence) → the job in `delayed_jobs`.
    delayed: BinaryHeap<Reverse<(Instant, u64)>>,
    delayed_jobs: HashMap<u64, (String, J)>,
    next_sequence: u64,
}

impl<J> OriginQueues<J> {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            origins: HashMap::new(),
            turns: VecDeque::new(),
            in_flight: 0,
            in_flight_slow: 0,
            in_flight_new: 0,
            delayed: BinaryHeap::new(),
            delayed_jobs: HashMap::new(),
            next_sequence: 0,
        }
    }

    /// Queues a job to run as soon as its origin's turn and a slot allow.
    pub fn push(&mut self, origin: String, job: J) {
        let entry = self.origins.entry(origin.clone()).or_insert_with(Origin::new);
        if entry.waiting.is_empty() {
            self.turns.push_back(origin);
        }
        entry.waiting.push_back(job);
    }

    /// Queues a retry that may not run before `at` (it holds no slot meanwhile).
    pub fn push_at(&mut self, origin: String, job: J, at: Instant) {
        self.next_sequence += 1;
        self.delayed.push(Reverse((at, self.next_sequence)));
        self.delayed_jobs.insert(self.next_sequence, (origin, job));
    }

    /// No request to `origin` before `until`.
    pub fn pause(&mut self, origin: &str, until: Instant) {
        let entry = self.origins.entry(origin.to_string()).or_insert_with(Origin::new);
        entry.paused_until = entry.paused_until.max(Some(until));
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Jobs not in flight: queued or waiting to retry.
    pub fn waiting(&self) -> usize {
        self.origins.values().map(|origin| origin.waiting.len()).sum::<usize>() + self.delayed_jobs.len()
    }

    /// The next job to run now and the lane whose slot it takes, if any may run.
    pub fn next(&mut self, now: Instant) -> Option<(String, Lane, J)> {
        while let Some(Reverse((due, sequence))) = self.delayed.peek().copied() {
            if due > now {
                break;
            }
            self.delayed.pop();
            if let Some((origin, job)) = self.delayed_jobs.remove(&sequence) {
                self.push(origin, job);
            }
        }
        if self.in_flight >= self.limits.max_concurrent {
            return None;
        }
        // First contacts, while their lane has room: the new origin with the most
        // wake-ups waiting first, so a push service that many devices use is probed
        // before origins that few use (an account's own endpoints).
        if self.in_flight_new < self.limits.max_concurrent_slow {
            let probe = self
                .turns
                .iter()
                .enumerate()
                .filter_map(|(index, name)| Some((index, self.origins.get(name)?)))
                .filter(|(_, origin)| origin.lane == Lane::New && origin.in_flight == 0)
                .filter(|(_, origin)| origin.paused_until.is_none_or(|until| until <= now))
                .max_by_key(|(index, origin)| (origin.waiting.len(), Reverse(*index)))
                .map(|(index, _)| index);
            if let Some(index) = probe {
                return self.start(index);
            }
        }
        for index in 0..self.turns.len() {
            let Some(origin) = self.origins.get(&self.turns[index]) else { continue };
            let lane_free = match origin.lane {
                Lane::Fast => true,
                Lane::Slow => self.in_flight_slow < self.limits.max_concurrent_slow,
                Lane::New => false,
            };
            let ready = lane_free
                && origin.in_flight < self.limits.max_per_origin
                && origin.paused_until.is_none_or(|until| until <= now);
            if ready {
                return self.start(index);
            }
        }
        None
    }

    /// Starts the next job of the origin at `index` in `turns`, which then goes last.
    fn start(&mut self, index: usize) -> Option<(String, Lane, J)> {
        let name = self.turns.remove(index)?;
        let origin = self.origins.get_mut(&name)?;
        let job = origin.waiting.pop_front()?;
        origin.in_flight += 1;
        let lane = origin.lane;
        self.in_flight += 1;
        match lane {
            Lane::Fast => {}
            Lane::Slow => self.in_flight_slow += 1,
            Lane::New => self.in_flight_new += 1,
        }
        if !origin.waiting.is_empty() {
            self.turns.push_back(name.clone());
        }
        Some((name, lane, job))
    }

    /// A job of `origin` started in `lane` is no longer in flight; `slow`: its
    /// request got no answer or a late one.
    pub fn finished(&mut self, origin: &str, lane: Lane, slow: bool) {
        self.in_flight -= 1;
        match lane {
            Lane::Fast => {}
            Lane::Slow => self.in_flight_slow -= 1,
            Lane::New => self.in_flight_new -= 1,
        }
        if let Some(entry) = self.origins.get_mut(origin) {
            entry.in_flight -= 1;
            entry.lane = if slow { Lane::Slow } else { Lane::Fast };
        }
    }

    /// When a waiting job may become ready (a retry's time, a pause's end).
    pub fn next_due(&self) -> Option<Instant> {
        let retry = self.delayed.peek().map(|Reverse((due, _))| *due);
        let paused = self.turns.iter().filter_map(|name| self.origins.get(name)?.paused_until).min();
        retry.into_iter().chain(paused).min()
    }

    /// Drops the jobs not in flight for which `keep` is false.
    pub fn retain(&mut self, keep: impl Fn(&J) -> bool) {
        for origin in self.origins.values_mut() {
            origin.waiting.retain(&keep);
        }
        self.delayed_jobs.retain(|_, (_, job)| keep(job));
        let origins = &self.origins;
        self.turns.retain(|name| origins.get(name).is_some_and(|origin| !origin.waiting.is_empty()));
    }
}

/// A wake-up on its way, with the caller's `tag` (what it releases when done).
pub struct Job<T> {
    pub tag: T,
    pub order: WakeOrder,
    pub state: AttemptState,
}

/// Runs attempts as [`OriginQueues`] allows.
pub struct Dispatcher<T> {
    waker: Arc<Waker>,
    queues: OriginQueues<Job<T>>,
    /// Attempts talking to their push service (each holds a slot of its origin).
    attempts: JoinSet<(String, Lane, Job<T>, AttemptReport)>,
    /// Attempts that got their answer, publishing their events (no slot held).
    publishing: JoinSet<(String, Job<T>, AttemptReport)>,
}

impl<T: Send + 'static> Dispatcher<T> {
    pub fn new(waker: Arc<Waker>, wake: &WakeSettings) -> Self {
        Self {
            waker,
            queues: OriginQueues::new(Limits::from(wake)),
            attempts: JoinSet::new(),
            publishing: JoinSet::new(),
        }
    }

    pub fn submit(&mut self, tag: T, order: WakeOrder) {
        let origin = order.origin();
        self.queues.push(origin, Job { tag, order, state: AttemptState::FIRST });
    }

    /// Starts every attempt that may run now.
    pub fn start_ready(&mut self) {
        while let Some((origin, lane, job)) = self.queues.next(Instant::now()) {
            let waker = self.waker.clone();
            // A first contact gives up at `slow_after`, so that slow new origins turn
            // their shared slots over quickly; it is tried again as a slow origin.
            let probe = lane == Lane::New;
            self.attempts.spawn(async move {
                let report = waker.attempt(&job.order, job.state, probe).await;
                (origin, lane, job, report)
            });
        }
        metrics::gauge!("lockstep_push_wakeups_in_flight").set(self.queues.in_flight() as f64);
    }

    /// Nothing in flight or waiting.
    pub fn is_idle(&self) -> bool {
        self.attempts.is_empty() && self.publishing.is_empty() && self.queues.waiting() == 0
    }

    pub fn in_flight(&self) -> usize {
        self.attempts.len() + self.publishing.len()
    }

    /// The next wake-up that ended (after its retries). Pending forever when idle.
    /// Cancel-safe: a finished attempt is acted on before the next await.
    pub async fn next_done(&mut self) -> (T, WakeOrder, WakeResult) {
        loop {
            self.start_ready();
            let due = self.queues.next_due();
            tokio::select! {
                Some(joined) = self.attempts.join_next(), if !self.attempts.is_empty() => {
                    let (origin, lane, job, report) = match joined {
                        Ok(done) => done,
                        Err(error) => {
                            // Only a panic gets here; its slot is lost with it.
                            tracing::error!(%error, "wake-up attempt failed");
                            continue;
                        }
                    };
                    // The push service answered: its slot is free for the next request
                    // while this attempt's events go to Kafka.
                    self.queues.finished(&origin, lane, report.slow);
                    if let Some(pause) = report.origin_pause {
                        self.queues.pause(&origin, Instant::now() + pause);
                    }
                    let waker = self.waker.clone();
                    self.publishing.spawn(async move {
                        waker.publish(&report.events).await;
                        (origin, job, report)
                    });
                }
                Some(joined) = self.publishing.join_next(), if !self.publishing.is_empty() => {
                    let (origin, mut job, report) = match joined {
                        Ok(done) => done,
                        Err(error) => {
                            tracing::error!(%error, "publishing a wake-up's events failed");
                            continue;
                        }
                    };
                    match report.end {
                        AttemptEnd::Done(result) => {
                            metrics::gauge!("lockstep_push_wakeups_in_flight").set(self.queues.in_flight() as f64);
                            return (job.tag, job.order, result);
                        }
                        AttemptEnd::Retry { delay, next } => {
                            job.state = next;
                            self.queues.push_at(origin, job, Instant::now() + delay);
                        }
                    }
                }
                () = sleep_until(due), if due.is_some() => {}
                else => std::future::pending::<()>().await,
            }
        }
    }

    /// Drops wake-ups not in flight (queued or waiting to retry) for which `keep` is false.
    pub fn retain(&mut self, keep: impl Fn(&T, AttemptState) -> bool) {
        self.queues.retain(|job| keep(&job.tag, job.state));
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const LIMITS: Limits = Limits { max_concurrent: 8, max_per_origin: 3, max_concurrent_slow: 2 };

    fn drain(queues: &mut OriginQueues<u32>, now: Instant) -> Vec<(String, Lane, u32)> {
        std::iter::from_fn(|| queues.next(now)).collect()
    }

    #[test]
    fn origins_take_turns_within_their_bound() {
        let now = Instant::now();
        let mut queues = OriginQueues::new(LIMITS);
        for job in 0..10 {
            queues.push("https://a".into(), job);
        }
        queues.push("https://b".into(), 100);
        let started = drain(&mut queues, now);
        // New origins: one probe each until they answer.
        assert_eq!(started.iter().map(|(_, _, job)| *job).collect::<Vec<_>>(), [0, 100]);
        queues.finished("https://a", Lane::New, false);
        let started = drain(&mut queues, now);
        assert_eq!(started.len(), 3, "a is fast now: up to max_per_origin: {started:?}");
        assert!(started.iter().all(|(origin, lane, _)| origin == "https://a" && *lane == Lane::Fast));
        assert_eq!(queues.in_flight(), 4);
        assert_eq!(queues.waiting(), 6);
    }

    #[test]
    fn slow_origins_share_a_few_slots_and_the_rest_stay_for_the_others() {
        let now = Instant::now();
        let mut queues = OriginQueues::new(LIMITS);
        // A push service that answered before.
        queues.push("https://fast".into(), 0);
        let (origin, lane, _) = queues.next(now).unwrap();
        queues.finished(&origin, lane, false);
        // Ten slow origins, each with a backlog, queued first.
        for origin in 0..10 {
            for job in 0..5 {
                queues.push(format!("https://slow-{origin}"), job);
            }
        }
        let probes = drain(&mut queues, now);
        assert_eq!(probes.len(), 2, "first contact: max_concurrent_slow new origins at once");
        for (origin, lane, _) in &probes {
            queues.finished(origin, *lane, true);
        }
        let started = drain(&mut queues, now);
        let new = started.iter().filter(|(_, lane, _)| *lane == Lane::New).count();
        let slow = started.iter().filter(|(_, lane, _)| *lane == Lane::Slow).count();
        assert_eq!((new, slow), (2, 2), "{started:?}");
        assert_eq!(queues.in_flight(), 4, "half of max_concurrent stays free");
        // The fast origin's wake-ups queued after them are not stuck behind them.
        for job in 0..10 {
            queues.push("https://fast".into(), job);
        }
        let fast = drain(&mut queues, now);
        assert_eq!(fast.len(), 3, "its own bound, not the slow ones', limits it: {fast:?}");
        assert!(fast.iter().all(|(origin, lane, _)| origin == "https://fast" && *lane == Lane::Fast));
    }

    #[test]
    fn the_new_origin_most_devices_wait_for_is_probed_first() {
        let now = Instant::now();
        let mut queues = OriginQueues::new(LIMITS);
        for origin in 0..10 {
            queues.push(format!("https://account-{origin}"), 0);
        }
        for job in 0..100 {
            queues.push("https://push-service".into(), job);
        }
        let (origin, lane, _) = queues.next(now).unwrap();
        assert_eq!((origin.as_str(), lane), ("https://push-service", Lane::New));
    }

    #[test]
    fn retries_and_paused_origins_wait_without_a_slot() {
        let now = Instant::now();
        let mut queues = OriginQueues::new(LIMITS);
        queues.push("https://a".into(), 1);
        let (origin, lane, job) = queues.next(now).unwrap();
        queues.finished(&origin, lane, false);
        queues.push_at(origin, job, now + Duration::from_secs(2));
        assert_eq!(queues.in_flight(), 0);
        assert!(queues.next(now).is_none());
        assert_eq!(queues.next_due(), Some(now + Duration::from_secs(2)));
        queues.pause("https://a", now + Duration::from_secs(5));
        assert!(queues.next(now + Duration::from_secs(3)).is_none(), "paused by a 429");
        assert_eq!(queues.next_due(), Some(now + Duration::from_secs(5)));
        assert!(queues.next(now + Duration::from_secs(5)).is_some());
        queues.push("https://b".into(), 2);
        queues.push_at("https://b".into(), 3, now);
        queues.retain(|job| *job != 2 && *job != 3);
        assert_eq!(queues.waiting(), 0);
        assert!(queues.next(now + Duration::from_secs(9)).is_none());
    }
}
