//! Waiting on a condition instead of sleeping: [`eventually`] polls what a
//! test can observe (the API, the log, metrics, a committed offset, a
//! process) until it holds, backing off between polls, and fails after a
//! generous deadline with the last state or error it saw.
//!
//! The deadline is a failure deadline, never a measurement: a test that
//! passes does so as soon as the condition holds, so the deadline can be
//! long enough for a loaded CI machine.

use std::{fmt::Display, future::Future, time::Duration};

use tokio::time::Instant;

/// The first pause between polls; each pause is half as long again as the
/// one before, up to [`MAX_INTERVAL`].
pub const FIRST_INTERVAL: Duration = Duration::from_millis(10);
/// The longest pause between polls.
pub const MAX_INTERVAL: Duration = Duration::from_millis(500);

/// The pauses between polls, in order (the last one is cut short at the deadline).
fn pauses() -> impl Iterator<Item = Duration> {
    std::iter::successors(Some(FIRST_INTERVAL), |pause| Some((*pause * 3 / 2).min(MAX_INTERVAL)))
}

/// One poll of a condition: it holds (with what the test wanted to see),
/// not yet (with what it saw instead, shown if the deadline passes), or it
/// never will (a wrong answer, a process that exited): the wait fails at once.
#[derive(Debug)]
pub enum Check<T> {
    Ready(T),
    NotYet(String),
    Failed(anyhow::Error),
}

/// A condition holds, with `value`.
pub fn ready<T>(value: T) -> Check<T> {
    Check::Ready(value)
}

/// A condition does not hold yet; `state` says what was seen instead.
pub fn not_yet<T>(state: impl Display) -> Check<T> {
    Check::NotYet(state.to_string())
}

/// The condition can no longer hold: the wait fails at once with `error`.
pub fn failed<T>(error: impl Into<anyhow::Error>) -> Check<T> {
    Check::Failed(error.into())
}

/// What a condition may return: `bool`, `Option<T>`, [`Check<T>`], or any of
/// them in a `Result` — an error means "not yet" and is shown if the deadline
/// passes (a failed read is no verdict; an assertion inside the condition
/// still fails the test at once).
pub trait IntoCheck {
    type Output;
    fn into_check(self) -> Check<Self::Output>;
}

impl IntoCheck for bool {
    type Output = ();
    fn into_check(self) -> Check<()> {
        if self { Check::Ready(()) } else { Check::NotYet("the condition was false".into()) }
    }
}

impl<T> IntoCheck for Option<T> {
    type Output = T;
    fn into_check(self) -> Check<T> {
        self.map_or_else(|| Check::NotYet("the condition gave nothing".into()), Check::Ready)
    }
}

impl<T> IntoCheck for Check<T> {
    type Output = T;
    fn into_check(self) -> Check<T> {
        self
    }
}

impl<C: IntoCheck, E: Into<anyhow::Error>> IntoCheck for Result<C, E> {
    type Output = C::Output;
    fn into_check(self) -> Check<C::Output> {
        match self {
            Ok(check) => check.into_check(),
            Err(error) => Check::NotYet(format!("error: {:#}", error.into())),
        }
    }
}

/// Polls `condition` until it holds and returns what it gave; fails once
/// `timeout` has passed with `what` and the last state or error seen.
///
/// ```no_run
/// # async fn f(server: &lockstep_testkit::server::Server) -> anyhow::Result<()> {
/// use std::time::Duration;
/// use lockstep_testkit::wait::eventually;
/// let metrics = eventually(Duration::from_secs(30), "the server's /metrics", || async {
///     let admin = server.admin_addr().ok_or_else(|| anyhow::anyhow!("no admin port"))?;
///     let (status, text) = lockstep_testkit::http_get(admin, "/metrics").await?;
///     anyhow::Ok((status == 200).then_some(text))
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub async fn eventually<C, F, Fut>(timeout: Duration, what: impl Display, mut condition: F) -> anyhow::Result<C::Output>
where
    C: IntoCheck,
    F: FnMut() -> Fut,
    Fut: Future<Output = C>,
{
    let started = Instant::now();
    let deadline = started + timeout;
    let mut pauses = pauses();
    let mut polls = 0u32;
    loop {
        polls += 1;
        let last = match condition().await.into_check() {
            Check::Ready(value) => return Ok(value),
            Check::NotYet(state) => state,
            Check::Failed(error) => return Err(error.context(format!("{what}: cannot happen any more"))),
        };
        let now = Instant::now();
        if now >= deadline {
            anyhow::bail!(
                "{what}: did not happen within {timeout:?} ({polls} polls over {:?}); last seen: {last}",
                now - started
            );
        }
        tokio::time::sleep(pauses.next().unwrap_or(MAX_INTERVAL).min(deadline - now)).await;
    }
}

#[cfg(test)]
mod tests {
    // Short deadlines on the real clock (the kit's tokio has no paused clock, `test-util`);
    // no assertion measures time.
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn returns_the_value_once_the_condition_holds() {
        let polls = AtomicU32::new(0);
        let value = eventually(Duration::from_secs(30), "the third poll", || async {
            let n = polls.fetch_add(1, Ordering::SeqCst) + 1;
            anyhow::Ok((n == 3).then_some(n * 10))
        })
        .await
        .unwrap();
        assert_eq!(value, 30);
        assert_eq!(polls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn times_out_with_the_description_and_the_last_state() {
        let polls = AtomicU32::new(0);
        let error = eventually(Duration::from_millis(300), "the offset reaches 9", || async {
            let n = polls.fetch_add(1, Ordering::SeqCst);
            not_yet::<()>(format!("offset {n}"))
        })
        .await
        .unwrap_err()
        .to_string();
        let last = polls.load(Ordering::SeqCst) - 1;
        assert!(error.starts_with("the offset reaches 9: did not happen within 300ms"), "{error}");
        assert!(error.ends_with(&format!("last seen: offset {last}")), "{error}");
    }

    #[tokio::test]
    async fn an_error_is_not_yet_and_the_last_one_is_shown() {
        let polls = AtomicU32::new(0);
        let value = eventually(Duration::from_secs(30), "a read that fails twice", || async {
            match polls.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Err(anyhow::anyhow!("broker not ready")),
                _ => Ok(true),
            }
        })
        .await;
        assert!(value.is_ok());
        assert_eq!(polls.load(Ordering::SeqCst), 3);
        let error = eventually(Duration::from_millis(100), "a read", || async {
            Err::<bool, _>(anyhow::anyhow!("connection refused"))
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(error.ends_with("last seen: error: connection refused"), "{error}");
    }

    #[tokio::test]
    async fn a_failed_check_ends_the_wait_at_once() {
        let polls = AtomicU32::new(0);
        let error = eventually(Duration::from_secs(30), "the server listens", || async {
            polls.fetch_add(1, Ordering::SeqCst);
            failed::<()>(anyhow::anyhow!("it exited with status 1"))
        })
        .await
        .unwrap_err();
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        assert_eq!(format!("{error:#}"), "the server listens: cannot happen any more: it exited with status 1");
    }

    #[test]
    fn the_pause_between_polls_backs_off_and_is_bounded() {
        let pauses: Vec<Duration> = pauses().take(30).collect();
        assert_eq!(pauses[0], FIRST_INTERVAL);
        assert_eq!(pauses[1], FIRST_INTERVAL * 3 / 2);
        assert!(pauses.windows(2).all(|pair| pair[0] <= pair[1]), "{pauses:?}");
        assert!(pauses.iter().all(|pause| *pause <= MAX_INTERVAL), "{pauses:?}");
        assert_eq!(pauses.last(), Some(&MAX_INTERVAL), "{pauses:?}");
    }
}
