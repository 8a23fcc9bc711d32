//! The agent <-> control plane protocol: the gRPC `Sync` service and its
//! messages, generated from `signpost/v1/sync.proto` (the agent's and the
//! control plane's on-disk snapshots use the same messages), and the
//! control plane's checks of what an agent reports ([`reported`]) before
//! it is taken in.
//!
//! A crate of its own so that the data-plane crates (`dns`, `proxy`),
//! which depend on `signpost-core` only, never compile tonic or prost.

#[allow(unreachable_pub, clippy::all, clippy::unwrap_used, clippy::expect_used)]
mod generated {
    tonic::include_proto!("signpost.v1");
}
pub use generated::*;

pub mod reported;
