//! A device's status from what is known about it: a pure function, so that
//! every rule has a unit test.
//!
//! Burrow's evaluation, per device instead of per group: Burrow looks at a
//! window of a group's commits and calls it OK when lag reached zero,
//! STALL when offsets stopped moving while lag stayed, WARN when offsets move
//! but lag grew in every interval, STOP when commits stopped. A device is one
//! single-partition consumer, and Lockstep knows more than Burrow does: whether
//! the device holds a stream (its lease), which generation of the log it acked,
//! and the exact age of the oldest change it has not acked. Rules, in order:
//!
//! 1. REVOKED: the device was revoked (nothing to do).
//! 2. RESYNC_NEEDED: its committed offset is not in the log any more (below the
//!    log start after retention, above the log end after the log lost history),
//!    or it acked an older generation of the log.
//! 3. AT_RISK: no commit for `at_risk_fraction` of the brokers' offset retention:
//!    Kafka forgets a member-less group's offset after that, and the device would
//!    download everything again.
//! 4. OK: lag 0.
//! 5. Connected, lag > 0: STALLED when the offset has not moved for `stall_after`
//!    and the oldest change it lacks is older than that; LAGGING when, within
//!    `window`, the offset moved but the lag grew at every sample; else CATCHING_UP.
//! 6. Not connected, lag > 0: OFFLINE.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the dashboard says about a device. The order is worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    ResyncNeeded,
    AtRisk,
    Stalled,
    Lagging,
    Offline,
    CatchingUp,
    Ok,
    Revoked,
}

impl Status {
    pub const ALL: [Status; 8] = [
        Status::ResyncNeeded,
        Status::AtRisk,
        Status::Stalled,
        Status::Lagging,
        Status::Offline,
        Status::CatchingUp,
        Status::Ok,
        Status::Revoked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::ResyncNeeded => "RESYNC_NEEDED",
            Status::AtRisk => "AT_RISK",
            Status::Stalled => "STALLED",
            Status::Lagging => "LAGGING",
            Status::Offline => "OFFLINE",
            Status::CatchingUp => "CATCHING_UP",
            Status::Ok => "OK",
            Status::Revoked => "REVOKED",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|status| status.as_str().eq_ignore_ascii_case(text.trim()))
    }
}

/// Thresholds of [`evaluate`] (`[status]` in the dashboard's settings).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StatusSettings {
    /// How far back the ack history is read for LAGGING. Default 2m.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// A connected device whose offset has not moved for this long, while the
    /// oldest change it lacks is at least this old, is STALLED. Default 60s.
    #[serde(with = "humantime_serde")]
    pub stall_after: Duration,
    /// The brokers' `offsets.retention.minutes` (Kafka's default is 7 days). Default 7d.
    #[serde(with = "humantime_serde")]
    pub offsets_retention: Duration,
    /// AT_RISK after this fraction of `offsets_retention` without a commit. Default 0.7.
    pub at_risk_fraction: f64,
}

impl Default for StatusSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(120),
            stall_after: Duration::from_secs(60),
            offsets_retention: Duration::from_secs(7 * 24 * 3600),
            at_risk_fraction: 0.7,
        }
    }
}

/// One point of a device's ack history: its committed offset and its log's
/// end at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Sample {
    pub at_ms: i64,
    pub committed: i64,
    pub log_end: i64,
}

impl Sample {
    pub fn lag(&self) -> i64 {
        (self.log_end - self.committed).max(0)
    }
}

/// Everything [`evaluate`] looks at. Times are milliseconds since the epoch.
#[derive(Debug, Clone, Copy)]
pub struct DeviceFacts<'a> {
    pub now_ms: i64,
    pub revoked: bool,
    /// A lease of some node is unexpired.
    pub connected: bool,
    pub log_start: i64,
    pub log_end: i64,
    /// None: the device never committed (the server starts it at the log start).
    pub committed: Option<i64>,
    /// Its last ack was in an older generation of the log than the current one.
    pub generation_stale: bool,
    /// When it last committed (or, never having committed, when it was added).
    pub last_commit_ms: Option<i64>,
    /// When its committed offset last changed (or when it was added).
    pub last_move_ms: Option<i64>,
    /// `received_at` of the oldest change it has not acked, when known.
    pub oldest_unacked_ms: Option<i64>,
    /// Its ack history, oldest first.
    pub history: &'a [Sample],
}

impl DeviceFacts<'_> {
    /// Changes in the log the device has not acked.
    pub fn lag(&self) -> i64 {
        (self.log_end - self.committed.unwrap_or(self.log_start)).max(0)
    }
}

fn elapsed_at_least(now_ms: i64, since_ms: i64, duration: Duration) -> bool {
    now_ms.saturating_sub(since_ms) >= duration.as_millis() as i64
}

/// The status of one device (rules in the module doc).
pub fn evaluate(facts: &DeviceFacts<'_>, settings: &StatusSettings) -> Status {
    if facts.revoked {
        return Status::Revoked;
    }
    if let Some(committed) = facts.committed
        && (committed < facts.log_start || committed > facts.log_end || facts.generation_stale)
    {
        return Status::ResyncNeeded;
    }
    let at_risk_after = settings.offsets_retention.mul_f64(settings.at_risk_fraction.clamp(0.0, 1.0));
    if let Some(last_commit) = facts.last_commit_ms
        && facts.committed.is_some()
        && elapsed_at_least(facts.now_ms, last_commit, at_risk_after)
    {
        return Status::AtRisk;
    }
    if facts.lag() == 0 {
        return Status::Ok;
    }
    if !facts.connected {
        return Status::Offline;
    }
    let not_moving = facts.last_move_ms.is_none_or(|moved| elapsed_at_least(facts.now_ms, moved, settings.stall_after));
    let lack_is_old =
        facts.oldest_unacked_ms.is_none_or(|oldest| elapsed_at_least(facts.now_ms, oldest, settings.stall_after));
    if not_moving && lack_is_old {
        return Status::Stalled;
    }
    if lag_grew_while_moving(facts, settings.window) {
        return Status::Lagging;
    }
    Status::CatchingUp
}

/// Burrow's WARN rule: within the window the offset moved, and the lag grew
/// from every sample to the next (never shrank, and ended higher).
fn lag_grew_while_moving(facts: &DeviceFacts<'_>, window: Duration) -> bool {
    let since = facts.now_ms.saturating_sub(window.as_millis() as i64);
    let recent: Vec<&Sample> = facts.history.iter().filter(|sample| sample.at_ms >= since).collect();
    let (Some(first), Some(last)) = (recent.first(), recent.last()) else {
        return false;
    };
    if recent.len() < 2 || last.committed <= first.committed {
        return false;
    }
    let never_shrank = recent.windows(2).all(|pair| pair[1].lag() >= pair[0].lag());
    never_shrank && last.lag() > first.lag()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000_000_000;
    const SECOND: i64 = 1000;

    fn settings() -> StatusSettings {
        StatusSettings {
            window: Duration::from_secs(60),
            stall_after: Duration::from_secs(10),
            offsets_retention: Duration::from_secs(1000),
            at_risk_fraction: 0.5,
        }
    }

    /// A connected device, in sync at offset 100, that acked a second ago.
    fn in_sync() -> DeviceFacts<'static> {
        DeviceFacts {
            now_ms: NOW,
            revoked: false,
            connected: true,
            log_start: 0,
            log_end: 100,
            committed: Some(100),
            generation_stale: false,
            last_commit_ms: Some(NOW - SECOND),
            last_move_ms: Some(NOW - SECOND),
            oldest_unacked_ms: None,
            history: &[],
        }
    }

    fn status(facts: DeviceFacts<'_>) -> Status {
        evaluate(&facts, &settings())
    }

    #[test]
    fn zero_lag_is_ok_connected_or_not() {
        assert_eq!(status(in_sync()), Status::Ok);
        assert_eq!(status(DeviceFacts { connected: false, ..in_sync() }), Status::Ok);
        // Burrow: a group whose lag reached zero is OK even if it commits no more.
        assert_eq!(status(DeviceFacts { last_move_ms: Some(NOW - 100 * SECOND), ..in_sync() }), Status::Ok);
    }

    #[test]
    fn revoked_wins_over_everything() {
        let facts = DeviceFacts { revoked: true, committed: Some(500), log_start: 600, ..in_sync() };
        assert_eq!(status(facts), Status::Revoked);
    }

    #[test]
    fn an_offset_outside_the_log_needs_a_resync() {
        assert_eq!(status(DeviceFacts { log_start: 150, log_end: 200, ..in_sync() }), Status::ResyncNeeded);
        // The log lost history: its end went back below the device's offset.
        assert_eq!(status(DeviceFacts { log_end: 3, ..in_sync() }), Status::ResyncNeeded);
        assert_eq!(status(DeviceFacts { generation_stale: true, ..in_sync() }), Status::ResyncNeeded);
        // At the log start exactly, it can still read everything.
        let at_start = DeviceFacts { log_start: 100, log_end: 120, committed: Some(100), ..in_sync() };
        assert_ne!(status(at_start), Status::ResyncNeeded);
    }

    #[test]
    fn a_device_that_never_committed_starts_at_the_log_start() {
        let never = DeviceFacts { committed: None, log_start: 40, log_end: 40, connected: false, ..in_sync() };
        assert_eq!(status(never), Status::Ok);
        let behind = DeviceFacts { committed: None, log_start: 40, log_end: 50, connected: false, ..in_sync() };
        assert_eq!(behind.lag(), 10);
        assert_eq!(status(behind), Status::Offline);
    }

    #[test]
    fn no_commit_for_most_of_the_offset_retention_is_at_risk() {
        // 0.5 × 1000 s = 500 s.
        let old = DeviceFacts { last_commit_ms: Some(NOW - 500 * SECOND), connected: false, ..in_sync() };
        assert_eq!(status(old), Status::AtRisk);
        let younger = DeviceFacts { last_commit_ms: Some(NOW - 499 * SECOND), connected: false, ..in_sync() };
        assert_eq!(status(younger), Status::Ok);
        // A device with no offset has nothing to lose.
        let none = DeviceFacts { committed: None, last_commit_ms: Some(NOW - 900 * SECOND), ..in_sync() };
        assert_ne!(status(none), Status::AtRisk);
    }

    #[test]
    fn behind_and_not_connected_is_offline() {
        let facts = DeviceFacts { connected: false, committed: Some(90), ..in_sync() };
        assert_eq!(status(facts), Status::Offline);
    }

    #[test]
    fn connected_offset_still_and_old_lack_is_stalled() {
        let facts = DeviceFacts {
            committed: Some(90),
            last_move_ms: Some(NOW - 30 * SECOND),
            oldest_unacked_ms: Some(NOW - 20 * SECOND),
            ..in_sync()
        };
        assert_eq!(status(facts), Status::Stalled);
        // The change it lacks arrived a moment ago: it has not had time to ack.
        let fresh = DeviceFacts { oldest_unacked_ms: Some(NOW - 2 * SECOND), ..facts };
        assert_eq!(status(fresh), Status::CatchingUp);
        // It acked recently: moving.
        let moving = DeviceFacts { last_move_ms: Some(NOW - 2 * SECOND), ..facts };
        assert_eq!(status(moving), Status::CatchingUp);
        // Unknown ages count as old (a device that never acked anything since it was added).
        let unknown = DeviceFacts { oldest_unacked_ms: None, ..facts };
        assert_eq!(status(unknown), Status::Stalled);
    }

    #[test]
    fn offsets_moving_while_lag_grows_is_lagging() {
        let history = [
            Sample { at_ms: NOW - 40 * SECOND, committed: 10, log_end: 20 },
            Sample { at_ms: NOW - 30 * SECOND, committed: 20, log_end: 35 },
            Sample { at_ms: NOW - 20 * SECOND, committed: 30, log_end: 50 },
            Sample { at_ms: NOW - 5 * SECOND, committed: 40, log_end: 70 },
        ];
        let facts = DeviceFacts {
            committed: Some(40),
            log_end: 70,
            last_move_ms: Some(NOW - 5 * SECOND),
            oldest_unacked_ms: Some(NOW - 15 * SECOND),
            history: &history,
            ..in_sync()
        };
        assert_eq!(status(facts), Status::Lagging);
    }

    #[test]
    fn offsets_moving_while_lag_shrinks_is_catching_up() {
        let history = [
            Sample { at_ms: NOW - 40 * SECOND, committed: 10, log_end: 100 },
            Sample { at_ms: NOW - 30 * SECOND, committed: 40, log_end: 100 },
            Sample { at_ms: NOW - 2 * SECOND, committed: 70, log_end: 100 },
        ];
        let facts = DeviceFacts {
            committed: Some(70),
            last_move_ms: Some(NOW - 2 * SECOND),
            oldest_unacked_ms: Some(NOW - 50 * SECOND),
            history: &history,
            ..in_sync()
        };
        assert_eq!(status(facts), Status::CatchingUp);
    }

    #[test]
    fn lag_that_shrank_once_in_the_window_is_not_lagging() {
        // Burrow requires the lag to grow in every interval.
        let history = [
            Sample { at_ms: NOW - 40 * SECOND, committed: 10, log_end: 20 },
            Sample { at_ms: NOW - 30 * SECOND, committed: 19, log_end: 20 },
            Sample { at_ms: NOW - 5 * SECOND, committed: 30, log_end: 60 },
        ];
        let facts = DeviceFacts {
            committed: Some(30),
            log_end: 60,
            last_move_ms: Some(NOW - 5 * SECOND),
            history: &history,
            ..in_sync()
        };
        assert_eq!(status(facts), Status::CatchingUp);
    }

    #[test]
    fn samples_older_than_the_window_do_not_count() {
        let history = [
            Sample { at_ms: NOW - 600 * SECOND, committed: 10, log_end: 20 },
            Sample { at_ms: NOW - 5 * SECOND, committed: 30, log_end: 60 },
        ];
        let facts = DeviceFacts {
            committed: Some(30),
            log_end: 60,
            last_move_ms: Some(NOW - 5 * SECOND),
            history: &history,
            ..in_sync()
        };
        assert_eq!(status(facts), Status::CatchingUp);
    }

    #[test]
    fn statuses_parse_back_and_sort_worst_first() {
        for status in Status::ALL {
            assert_eq!(Status::parse(status.as_str()), Some(status));
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
        assert_eq!(Status::parse("stalled"), Some(Status::Stalled));
        assert_eq!(Status::parse("nope"), None);
        assert!(Status::ResyncNeeded < Status::Offline && Status::Offline < Status::Ok);
    }
}
