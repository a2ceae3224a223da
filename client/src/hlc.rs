//! Hybrid logical clock: `(physical milliseconds << 16) | counter`, the same
//! encoding as the `hlc` field of a change. Stamps from one clock strictly
//! increase, stay close to wall time, and move past every remote stamp seen,
//! so that "later" means the same thing on every device.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const LOGICAL_BITS: u32 = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClockError {
    #[error(
        "a remote timestamp is {ahead_ms} ms ahead of this device's clock (the bound is {bound_ms} ms): \
         refused; check the clocks of both devices"
    )]
    TooFarAhead { ahead_ms: u64, bound_ms: u64 },
}

/// The wall-clock part of a stamp, in Unix milliseconds.
pub fn physical_ms(stamp: u64) -> u64 {
    stamp >> LOGICAL_BITS
}

pub fn from_physical_ms(ms: u64) -> u64 {
    ms << LOGICAL_BITS
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// This machine's wall clock in Unix milliseconds, for timestamps shown to
/// people (last sync, when a problem was seen); clocks of changes use [`Clock`].
pub fn unix_ms() -> i64 {
    wall_ms() as i64
}

#[derive(Debug, Clone)]
pub struct Clock {
    last: u64,
    max_ahead: Duration,
    now_ms: fn() -> u64,
    /// Added to the wall clock: a device whose clock is off (tests, `--clock-offset`).
    offset_ms: i64,
}

impl Clock {
    /// A clock that has already issued or seen `last`, refusing remote stamps
    /// more than `max_ahead` past its own wall time.
    pub fn new(last: u64, max_ahead: Duration) -> Self {
        Self { last, max_ahead, now_ms: wall_ms, offset_ms: 0 }
    }

    /// A clock reading its wall time from `now_ms` (tests).
    pub fn with_wall_clock(last: u64, max_ahead: Duration, now_ms: fn() -> u64) -> Self {
        Self { last, max_ahead, now_ms, offset_ms: 0 }
    }

    /// The same clock with its wall time shifted by `offset_ms` (may be negative).
    pub fn with_offset(mut self, offset_ms: i64) -> Self {
        self.offset_ms = offset_ms;
        self
    }

    /// Wall time as this clock reads it, in Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        ((self.now_ms)() as i64).saturating_add(self.offset_ms).max(0) as u64
    }

    pub fn last(&self) -> u64 {
        self.last
    }

    /// A new stamp, greater than every stamp issued or observed before.
    pub fn tick(&mut self) -> u64 {
        let physical = from_physical_ms(self.now_ms());
        self.last = physical.max(self.last + 1);
        self.last
    }

    /// Checks a remote stamp against the bound without moving the clock.
    pub fn check(&self, remote: u64) -> Result<(), ClockError> {
        let now = self.now_ms();
        let bound_ms = self.max_ahead.as_millis() as u64;
        let remote_ms = physical_ms(remote);
        if remote_ms > now.saturating_add(bound_ms) {
            return Err(ClockError::TooFarAhead { ahead_ms: remote_ms - now, bound_ms });
        }
        Ok(())
    }

    /// Moves the clock past a remote stamp, unless the stamp is too far ahead.
    pub fn observe(&mut self, remote: u64) -> Result<(), ClockError> {
        self.check(remote)?;
        self.last = self.last.max(remote);
        Ok(())
    }

    /// Moves the clock past a stamp this device already holds, however far
    /// ahead: a local edit must win over every stamp in the record it edits,
    /// or the user's own edit would silently lose.
    pub fn observe_held(&mut self, held: u64) {
        self.last = self.last.max(held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed() -> u64 {
        1_700_000_000_000
    }

    #[test]
    fn stamps_increase_and_follow_wall_time() {
        let mut clock = Clock::with_wall_clock(0, Duration::from_secs(60), fixed);
        let first = clock.tick();
        assert_eq!(physical_ms(first), fixed());
        let second = clock.tick();
        assert!(second > first);
        assert_eq!(physical_ms(second), fixed(), "same millisecond: the counter moves");
    }

    #[test]
    fn observing_moves_past_remote_stamps_within_the_bound() {
        let mut clock = Clock::with_wall_clock(0, Duration::from_secs(60), fixed);
        let remote = from_physical_ms(fixed() + 30_000) + 7;
        clock.observe(remote).unwrap();
        assert!(clock.tick() > remote);
        let too_far = from_physical_ms(fixed() + 61_000);
        assert_eq!(clock.observe(too_far), Err(ClockError::TooFarAhead { ahead_ms: 61_000, bound_ms: 60_000 }));
        assert!(clock.last() < too_far, "a refused stamp does not move the clock");
        clock.observe_held(too_far);
        assert!(clock.tick() > too_far, "a stamp already held always does");
    }

    #[test]
    fn an_offset_shifts_the_wall_clock_both_ways() {
        let behind = Clock::with_wall_clock(0, Duration::from_secs(60), fixed).with_offset(-3_600_000);
        assert_eq!(behind.now_ms(), fixed() - 3_600_000);
        let remote = from_physical_ms(fixed());
        assert!(behind.check(remote).is_err(), "an hour behind, now is too far ahead");
        let ahead = Clock::with_wall_clock(0, Duration::from_secs(60), fixed).with_offset(3_600_000);
        assert!(ahead.check(from_physical_ms(fixed() + 3_600_000)).is_ok());
    }
}
