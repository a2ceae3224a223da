//! The cap on open client connections (`limits.max_connections`). Each accepted
//! connection holds a slot until it is closed; a connection accepted while every
//! slot is taken is closed at once (counted in
//! `lockstep_connections_refused_total`), so that excess connections neither pile
//! up in the server nor wait in the kernel's backlog for a slot.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures::{Stream, StreamExt, future};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::transport::server::Connected;

#[derive(Clone)]
pub struct ConnectionLimit {
    slots: Arc<Semaphore>,
}

impl ConnectionLimit {
    pub fn new(max_connections: u32) -> Self {
        Self { slots: Arc::new(Semaphore::new(max_connections as usize)) }
    }

    /// `connection` holding a slot, or `None` when every slot is taken: the
    /// connection is then dropped, which closes it.
    pub fn admit<IO>(&self, connection: IO) -> Option<Counted<IO>> {
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => Some(Counted { inner: connection, slot }),
            Err(_) => {
                tracing::debug!("connection closed: limits.max_connections reached");
                metrics::counter!("lockstep_connections_refused_total").increment(1);
                None
            }
        }
    }
}

/// The accepted connections of `incoming` that got a slot; the others are closed.
pub fn limited<IO, S>(incoming: S, limit: ConnectionLimit) -> impl Stream<Item = io::Result<Counted<IO>>>
where
    S: Stream<Item = io::Result<IO>>,
{
    incoming.filter_map(move |accepted| {
        future::ready(match accepted {
            Ok(connection) => limit.admit(connection).map(Ok),
            Err(error) => Some(Err(error)),
        })
    })
}

/// A connection and the slot it holds until it is dropped.
pub struct Counted<IO> {
    inner: IO,
    slot: OwnedSemaphorePermit,
}

impl<IO> Counted<IO> {
    pub fn get_ref(&self) -> &IO {
        &self.inner
    }

    /// The connection and its slot, e.g. to wrap the connection in TLS and keep the slot.
    pub fn into_parts(self) -> (IO, OwnedSemaphorePermit) {
        (self.inner, self.slot)
    }

    pub fn from_parts(inner: IO, slot: OwnedSemaphorePermit) -> Self {
        Self { inner, slot }
    }
}

impl<IO: Connected> Connected for Counted<IO> {
    // The inner connection's, so that handlers find the peer's address where they look.
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::AsyncReadExt,
        net::{TcpListener, TcpStream},
        sync::mpsc,
    };
    use tonic::transport::server::TcpIncoming;

    use super::*;

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_and_a_freed_slot_is_used_again() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = limited(TcpIncoming::from(listener), ConnectionLimit::new(2));
        // The server side: every admitted connection is handed to the test, which holds it.
        let (admitted_tx, mut admitted_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut incoming = std::pin::pin!(incoming);
            while let Some(Ok(connection)) = incoming.next().await {
                if admitted_tx.send(connection).is_err() {
                    return;
                }
            }
        });
        let _first = TcpStream::connect(addr).await.unwrap();
        let first_admitted = admitted_rx.recv().await.expect("first admitted");
        let _second = TcpStream::connect(addr).await.unwrap();
        let _second_admitted = admitted_rx.recv().await.expect("second admitted");

        let mut third = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        match third.read(&mut buf).await {
            Ok(0) => {}
            Err(error) if error.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("the third connection was not closed: {other:?}"),
        }
        assert!(admitted_rx.try_recv().is_err(), "the third connection was admitted");

        drop(first_admitted);
        let _fourth = TcpStream::connect(addr).await.unwrap();
        admitted_rx.recv().await.expect("a freed slot admits the next connection");
    }
}
