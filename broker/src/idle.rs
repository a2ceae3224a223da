//! Forgetting what nobody uses. Each node keeps some state per device and per
//! user to spare Kafka and the database a read: committed offsets, the order
//! of a user's pushes, log marks, recent revocations. None of it is the truth
//! (Kafka and the database are), so state unused for `limits.idle_state_after`
//! is dropped by a periodic sweep ([`crate::server`]) and read again when the
//! device comes back. Without this, every device ever seen since start would
//! stay in memory.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// When an entry was last used: a relaxed atomic, so touching it on every
/// request costs no lock.
#[derive(Debug)]
pub struct LastUsed(AtomicU64);

/// Milliseconds since the first call (a monotonic clock of this process).
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Default for LastUsed {
    fn default() -> Self {
        Self(AtomicU64::new(now_ms()))
    }
}

impl LastUsed {
    pub fn touch(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    /// Whether it was not used for `idle_after`.
    pub fn idle(&self, idle_after: Duration) -> bool {
        now_ms().saturating_sub(self.0.load(Ordering::Relaxed)) >= idle_after.as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_after_the_time_and_not_before_touched_again() {
        let used = LastUsed::default();
        assert!(!used.idle(Duration::from_secs(60)));
        assert!(used.idle(Duration::ZERO));
        std::thread::sleep(Duration::from_millis(30));
        assert!(used.idle(Duration::from_millis(20)));
        used.touch();
        assert!(!used.idle(Duration::from_millis(20)));
    }
}
