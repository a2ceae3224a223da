//! The channel between a device's stream task and tonic, which sends what it
//! holds: bounded by `delivery.stream_buffer` messages, one sender, one receiver.
//!
//! tokio's `mpsc` channel did this with about 800 bytes a stream even idle (its
//! state is cache-padded, and it allocates its slots 32 at a time whatever its
//! bound); a server holds tens of thousands of idle streams. This one holds a
//! queue of at most the bound and two wake-ups.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

use lockstep_kafka::locks::lock;
use lockstep_proto::v1::SubscribeResponse;
use tokio::sync::Notify;

use crate::wake::wait_until;

/// One message of a device's stream.
pub(crate) type StreamMessage = Result<SubscribeResponse, tonic::Status>;

/// Why a message was not sent.
#[derive(Debug)]
pub(crate) enum TrySendError {
    /// No room: the message comes back.
    Full(StreamMessage),
    /// The receiver went away.
    Closed,
}

/// The receiver went away: the device's stream is gone.
#[derive(Debug)]
pub(crate) struct Closed;

struct State {
    queue: VecDeque<StreamMessage>,
    receiver: Option<Waker>,
    receiver_gone: bool,
    sender_gone: bool,
}

struct Shared {
    capacity: usize,
    state: Mutex<State>,
    /// Wakes the sender when room was made or the receiver went away.
    room: Notify,
}

/// A channel of at most `capacity` messages (at least one).
pub(crate) fn channel(capacity: usize) -> (StreamSender, SubscribeStream) {
    let shared = Arc::new(Shared {
        capacity: capacity.max(1),
        state: Mutex::new(State { queue: VecDeque::new(), receiver: None, receiver_gone: false, sender_gone: false }),
        room: Notify::new(),
    });
    (StreamSender { shared: shared.clone() }, SubscribeStream { shared })
}

pub(crate) struct StreamSender {
    shared: Arc<Shared>,
}

impl StreamSender {
    /// Queues `message` if there is room now.
    pub(crate) fn try_send(&self, message: StreamMessage) -> Result<(), TrySendError> {
        let waker = {
            let mut state = lock(&self.shared.state);
            if state.receiver_gone {
                return Err(TrySendError::Closed);
            }
            if state.queue.len() >= self.shared.capacity {
                return Err(TrySendError::Full(message));
            }
            state.queue.push_back(message);
            state.receiver.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Queues `message`, waiting for room. Tries first: a wake-up is registered
    /// only when the channel is full (every live message passes here).
    pub(crate) async fn send(&self, mut message: StreamMessage) -> Result<(), Closed> {
        loop {
            match self.try_send(message) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed) => return Err(Closed),
                Err(TrySendError::Full(back)) => message = back,
            }
            wait_until(&self.shared.room, || {
                let state = lock(&self.shared.state);
                state.receiver_gone || state.queue.len() < self.shared.capacity
            })
            .await;
        }
    }

    /// Ends once the receiver went away.
    pub(crate) async fn closed(&self) {
        wait_until(&self.shared.room, || lock(&self.shared.state).receiver_gone).await;
    }
}

impl Drop for StreamSender {
    fn drop(&mut self) {
        let waker = {
            let mut state = lock(&self.shared.state);
            state.sender_gone = true;
            state.receiver.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// A device's stream, as tonic sends it: the messages queued, then the end once
/// the stream's task is done.
pub struct SubscribeStream {
    shared: Arc<Shared>,
}

impl futures::Stream for SubscribeStream {
    type Item = StreamMessage;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut state = lock(&self.shared.state);
        if let Some(message) = state.queue.pop_front() {
            drop(state);
            self.shared.room.notify_waiters();
            return Poll::Ready(Some(message));
        }
        if state.sender_gone {
            return Poll::Ready(None);
        }
        if !state.receiver.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
            state.receiver = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for SubscribeStream {
    fn drop(&mut self) {
        let mut state = lock(&self.shared.state);
        state.receiver_gone = true;
        // What was queued goes with the stream.
        state.queue.clear();
        drop(state);
        self.shared.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use lockstep_proto::v1::{Heartbeat, subscribe_response::Event};

    use super::*;

    fn message(n: i64) -> StreamMessage {
        Ok(SubscribeResponse {
            event: Some(Event::Heartbeat(Heartbeat { log_end_offset: n, committed_offset: 0, server_time_ms: 0 })),
        })
    }

    fn number(message: StreamMessage) -> i64 {
        match message.unwrap().event {
            Some(Event::Heartbeat(heartbeat)) => heartbeat.log_end_offset,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn holds_at_most_its_capacity_and_keeps_order() {
        let (tx, mut rx) = channel(2);
        tx.try_send(message(1)).unwrap();
        tx.try_send(message(2)).unwrap();
        assert!(matches!(tx.try_send(message(3)), Err(TrySendError::Full(_))));
        assert_eq!(number(rx.next().await.unwrap()), 1);
        tx.try_send(message(3)).unwrap();
        drop(tx);
        let rest: Vec<i64> = rx.map(number).collect().await;
        assert_eq!(rest, [2, 3], "what was queued arrives before the end");
    }

    #[tokio::test]
    async fn a_waiting_send_goes_through_once_the_receiver_makes_room() {
        let (tx, mut rx) = channel(1);
        tx.send(message(1)).await.unwrap();
        let sender = tokio::spawn(async move {
            tx.send(message(2)).await.unwrap();
            tx.send(message(3)).await.unwrap();
        });
        let mut got = Vec::new();
        while let Some(message) = tokio::time::timeout(Duration::from_secs(5), rx.next()).await.unwrap() {
            got.push(number(message));
        }
        sender.await.unwrap();
        assert_eq!(got, [1, 2, 3]);
    }

    #[tokio::test]
    async fn a_receiver_that_goes_away_ends_waiting_sends_and_closed() {
        let (tx, rx) = channel(1);
        tx.send(message(1)).await.unwrap();
        let tx = Arc::new(tx);
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(message(2)).await.is_err() }
        });
        let closed = tokio::spawn({
            let tx = tx.clone();
            async move { tx.closed().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(rx);
        assert!(tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap());
        tokio::time::timeout(Duration::from_secs(5), closed).await.unwrap().unwrap();
        assert!(matches!(tx.try_send(message(3)), Err(TrySendError::Closed)));
        // `closed` ends at once when the receiver is already gone.
        tokio::time::timeout(Duration::from_secs(1), tx.closed()).await.unwrap();
    }

    #[tokio::test]
    async fn a_receiver_waiting_wakes_for_a_message_and_for_the_end() {
        let (tx, mut rx) = channel(4);
        let receiver = tokio::spawn(async move {
            let first = rx.next().await.map(number);
            let end = rx.next().await.is_none();
            (first, end)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.try_send(message(7)).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(tx);
        let (first, end) = tokio::time::timeout(Duration::from_secs(5), receiver).await.unwrap().unwrap();
        assert_eq!(first, Some(7));
        assert!(end);
    }
}
