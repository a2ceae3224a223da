//! The one way a Kafka wait is bounded: by a deadline (`kafka.operation_deadline`
//! in the server), past which the caller answers UNAVAILABLE instead of holding a
//! device (and a thread) for minutes; and, where the work is safe to repeat,
//! transient trouble tried again within that same deadline.

use std::{future::Future, time::Duration};

use crate::error::KafkaError;

/// An error that may be a Kafka error: what [`bounded`] times out with and
/// looks into to decide whether to try again.
pub trait KafkaFailure: From<KafkaError> {
    fn as_kafka(&self) -> Option<&KafkaError>;
}

impl KafkaFailure for KafkaError {
    fn as_kafka(&self) -> Option<&KafkaError> {
        Some(self)
    }
}

/// Whether [`bounded`] tries the work again after a retryable Kafka error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// One attempt: the caller decides (or an outer `bounded` retries).
    Never,
    /// Transient trouble (a partition without a leader for the seconds of an
    /// election or a broker restart, a group coordinator still loading) is tried
    /// again, backing off from 100 ms to 1 s, while the deadline allows. Only for
    /// work that is safe to repeat.
    Transient,
}

/// Runs `work` for at most `deadline` in total, retries included; past it, fails with
/// [`KafkaError::Timeout`] naming `operation`.
pub async fn bounded<T, E, F, Fut>(
    deadline: Duration,
    operation: &'static str,
    retry: Retry,
    mut work: F,
) -> Result<T, E>
where
    E: KafkaFailure,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + deadline;
    let mut delay = Duration::from_millis(100);
    loop {
        let error = match tokio::time::timeout_at(deadline, work()).await {
            Err(_) => return Err(E::from(KafkaError::Timeout(operation))),
            Ok(Err(error)) if retry == Retry::Transient => error,
            Ok(result) => return result,
        };
        match error.as_kafka() {
            Some(kafka) if kafka.is_retryable() && tokio::time::Instant::now() + delay < deadline => {
                tracing::debug!(operation, error = %kafka, ?delay, "kafka is not ready; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            _ => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn transient_trouble_is_tried_again_within_the_deadline() {
        let attempts = AtomicU32::new(0);
        let outcome: Result<u32, KafkaError> = bounded(Duration::from_secs(5), "fetch", Retry::Transient, || async {
            match attempts.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Err(KafkaError::WorkerGone("fetch")),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(outcome.unwrap(), 2);
    }

    #[tokio::test]
    async fn one_attempt_unless_asked_and_a_timeout_past_the_deadline() {
        let attempts = AtomicU32::new(0);
        let outcome: Result<(), KafkaError> = bounded(Duration::from_secs(5), "commit", Retry::Never, || async {
            attempts.fetch_add(1, Ordering::SeqCst);
            Err(KafkaError::WorkerGone("commit"))
        })
        .await;
        assert!(matches!(outcome, Err(KafkaError::WorkerGone(_))));
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        let outcome: Result<(), KafkaError> =
            bounded(Duration::from_millis(50), "commit", Retry::Transient, std::future::pending).await;
        assert!(matches!(outcome, Err(KafkaError::Timeout("commit"))));
    }
}
