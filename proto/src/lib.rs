//! nt's gRPC API, version 1. Re-exports `tonic` and `prost` so the versions
//! the generated code needs cannot drift from the ones its users link.

pub mod enum_names;
pub mod floats;

pub use prost;
pub use tonic;

/// The `nt.v1` package.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("nt.v1");

    /// The encoded file descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("nt_v1_descriptor");
}
