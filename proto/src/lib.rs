//! The gRPC contract between devices and the Lockstep server (`lockstep.v1`).
//!
//! Data flow step: *device ↔ gateway/broker*. The `.proto` files under `proto/`
//! are the source of truth; this crate only compiles them (with protox, so no
//! system `protoc` is needed) and re-exports the generated client and server.

#![allow(clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("lockstep.v1");
}

pub mod codec {
    //! The generated clients and servers use [`LeanCodec`]: prost encoding with
    //! a 128-byte starting buffer per call instead of tonic's 8 KiB. Every open
    //! Subscribe stream holds its encode buffer for as long as it lives, and a
    //! server holds thousands of idle streams, which send only heartbeats (about
    //! 30 bytes each); the buffer grows on demand for anything larger.

    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstDecoder, ProstEncoder, prost::Message};

    /// Starting size of the per-call encode buffer.
    pub const ENCODE_BUFFER_BYTES: usize = 128;
    /// tonic's default: a stream yields encoded messages at least this often.
    const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

    #[derive(Debug)]
    pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for LeanCodec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> Codec for LeanCodec<T, U>
    where
        T: Message + Send + 'static,
        U: Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstEncoder::new(BufferSettings::new(ENCODE_BUFFER_BYTES, YIELD_THRESHOLD_BYTES))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstDecoder::new(BufferSettings::default())
        }
    }
}

/// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/lockstep_descriptor.bin"));

pub mod retry {
    //! The retry contract between server and devices, in one place: the
    //! server says whether a failed call may succeed unchanged later in the
    //! [`RETRYABLE_METADATA`] trailer; clients read it with [`is_retryable`].

    use tonic::{Code, Status, metadata::MetadataValue};

    /// `true` or `false` on every error status the Lockstep server sends.
    pub const RETRYABLE_METADATA: &str = "x-lockstep-retryable";

    /// Marks `status` as retryable or not (the server's side).
    pub fn mark(status: &mut Status, retryable: bool) {
        status
            .metadata_mut()
            .insert(RETRYABLE_METADATA, MetadataValue::from_static(if retryable { "true" } else { "false" }));
    }

    /// Milliseconds the client should wait before retrying a call the server shed
    /// (RESOURCE_EXHAUSTED because it is busy).
    pub const RETRY_AFTER_METADATA: &str = "x-lockstep-retry-after-ms";

    /// Asks the client to wait `after` before retrying (the server's side).
    pub fn set_retry_after(status: &mut Status, after: std::time::Duration) {
        let millis = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        status.metadata_mut().insert(RETRY_AFTER_METADATA, MetadataValue::from(millis));
    }

    /// How long the server asked the client to wait before retrying, if it did
    /// (the client's side); at most a minute, whatever the server says.
    pub fn retry_after(status: &Status) -> Option<std::time::Duration> {
        let millis: u64 = status.metadata().get(RETRY_AFTER_METADATA)?.to_str().ok()?.parse().ok()?;
        Some(std::time::Duration::from_millis(millis.min(60_000)))
    }

    /// Whether the same call may succeed later unchanged (the client's side).
    /// The server's verdict wins; without one the call failed before reaching
    /// a Lockstep handler (transport, proxy, deadline) and only transient codes
    /// are retried.
    pub fn is_retryable(status: &Status) -> bool {
        if let Some(value) = status.metadata().get(RETRYABLE_METADATA) {
            return value == "true";
        }
        matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Unknown)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn retry_after_round_trips_and_is_capped() {
            let mut status = Status::resource_exhausted("busy");
            assert_eq!(retry_after(&status), None);
            set_retry_after(&mut status, std::time::Duration::from_millis(1500));
            assert_eq!(retry_after(&status), Some(std::time::Duration::from_millis(1500)));
            set_retry_after(&mut status, std::time::Duration::from_secs(3600));
            assert_eq!(retry_after(&status), Some(std::time::Duration::from_secs(60)));
        }

        #[test]
        fn the_servers_verdict_wins_and_bare_transport_errors_are_transient() {
            for (code, retryable) in [(Code::Unavailable, false), (Code::Internal, true), (Code::DataLoss, false)] {
                let mut status = Status::new(code, "x");
                mark(&mut status, retryable);
                assert_eq!(is_retryable(&status), retryable, "{code:?}");
            }
            assert!(is_retryable(&Status::unavailable("connection refused")));
            assert!(is_retryable(&Status::deadline_exceeded("slow")));
            assert!(!is_retryable(&Status::invalid_argument("bad")));
            assert!(!is_retryable(&Status::data_loss("lost")));
        }
    }
}
