//! One shutdown for every task (after mini-redis's `shutdown.rs`): each task
//! that must finish before the process exits holds a [`Shutdown`] handle,
//! which both tells it that shutdown began and, while it lives, keeps
//! [`ShutdownController::drained`] waiting. Long-lived parts (gateway,
//! delivery) hold a [`ShutdownSource`] and take a handle per task; once
//! shutdown has drained, no new handle is given out.

use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};

/// Held by a task: shutdown news, and a "still running" token.
#[derive(Clone)]
pub struct Shutdown {
    begun_rx: watch::Receiver<bool>,
    _running: mpsc::Sender<()>,
}

impl Shutdown {
    pub fn has_begun(&self) -> bool {
        *self.begun_rx.borrow()
    }

    /// Resolves once shutdown has begun (at once if it has).
    pub async fn begun(&mut self) {
        // The controller outlives every handle's wait; if it is gone, so is the process.
        let _ = self.begun_rx.wait_for(|begun| *begun).await;
    }
}

/// Gives out handles without keeping the process from draining.
#[derive(Clone)]
pub struct ShutdownSource {
    begun_rx: watch::Receiver<bool>,
    running: mpsc::WeakSender<()>,
}

impl ShutdownSource {
    /// A handle for a new task; `None` once shutdown has drained.
    pub fn handle(&self) -> Option<Shutdown> {
        Some(Shutdown { begun_rx: self.begun_rx.clone(), _running: self.running.upgrade()? })
    }

    pub fn has_begun(&self) -> bool {
        *self.begun_rx.borrow()
    }
}

/// Starts a shutdown (from a signal handler).
#[derive(Clone)]
pub struct ShutdownTrigger(Arc<watch::Sender<bool>>);

impl ShutdownTrigger {
    /// Tells every handle and source that shutdown began.
    pub fn begin(&self) {
        self.0.send_replace(true);
    }
}

/// Owned by `server::run`.
pub struct ShutdownController {
    begun_tx: Arc<watch::Sender<bool>>,
    running_tx: mpsc::Sender<()>,
    running_rx: mpsc::Receiver<()>,
}

impl Default for ShutdownController {
    fn default() -> Self {
        let (running_tx, running_rx) = mpsc::channel(1);
        Self { begun_tx: Arc::new(watch::Sender::new(false)), running_tx, running_rx }
    }
}

impl ShutdownController {
    pub fn handle(&self) -> Shutdown {
        Shutdown { begun_rx: self.begun_tx.subscribe(), _running: self.running_tx.clone() }
    }

    pub fn source(&self) -> ShutdownSource {
        ShutdownSource { begun_rx: self.begun_tx.subscribe(), running: self.running_tx.downgrade() }
    }

    pub fn trigger(&self) -> ShutdownTrigger {
        ShutdownTrigger(self.begun_tx.clone())
    }

    /// Tells every handle that shutdown began.
    pub fn begin(&self) {
        self.begun_tx.send_replace(true);
    }

    /// Waits until every handle is dropped, at most `deadline`. Returns
    /// whether all tasks finished.
    pub async fn drained(self, deadline: Duration) -> bool {
        let Self { begun_tx, running_tx, mut running_rx } = self;
        begun_tx.send_replace(true);
        drop(running_tx);
        // `recv` returns None once every sender (handle) is gone; nobody sends.
        tokio::time::timeout(deadline, running_rx.recv()).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drained_waits_for_every_handle_and_gives_up_at_the_deadline() {
        let controller = ShutdownController::default();
        let mut worker = controller.handle();
        let task = tokio::spawn(async move {
            worker.begun().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(worker);
        });
        let late = controller.handle();
        assert!(!late.has_begun());
        controller.begin();
        assert!(late.has_begun(), "a handle taken before shutdown hears of it");
        drop(late);
        assert!(controller.drained(Duration::from_secs(5)).await, "the worker finished");
        task.await.unwrap();

        let controller = ShutdownController::default();
        let source = controller.source();
        let stuck = source.handle().expect("not drained yet");
        assert!(!controller.drained(Duration::from_millis(50)).await, "a task that never ends is given up on");
        drop(stuck);
        assert!(source.has_begun());
        assert!(source.handle().is_none(), "no new task after the drain");
    }
}
