//! The gRPC contract between devices and the Lockstep server (`lockstep.v1`).
//!
//! Data flow step: *device ↔ gateway/broker*. The `.proto` files under `proto/`
//! are the source of truth; this crate only compiles them (with protox, so no
//! system `protoc` is needed) and re-exports the generated client and server.

#![allow(clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("lockstep.v1");
}

/// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/lockstep_descriptor.bin"));
