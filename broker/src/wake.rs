//! Waiting on a [`Notify`] for a condition, without missing a wake-up.

use tokio::sync::Notify;

/// Ends once `done()` holds: checked at once, then after each wake-up of `notify`
/// (`notify_waiters`). The wake-up is registered before each check, so one given
/// between the check and the wait is not missed.
pub async fn wait_until(notify: &Notify, mut done: impl FnMut() -> bool) {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done() {
            return;
        }
        notified.await;
    }
}
