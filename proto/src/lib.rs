//! nt's gRPC API, version 1. Re-exports `tonic` and `prost` so the versions
//! the generated code needs cannot drift from the ones its users link.
//! Every message also has the proto3 JSON mapping as its serde impls
//! ([`json`]).

pub mod enum_names;
pub mod json;
pub mod legacy;

pub use prost;
pub use tonic;

/// The `nt.v1` package.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("nt.v1");
    include!(concat!(env!("OUT_DIR"), "/nt.v1.serde.rs"));

    /// The encoded file descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("nt_v1_descriptor");
}

/// The coordinator's stored documents (`nt.store.v1`): not part of the API,
/// but messages, so the documents are proto3 JSON that any protobuf library
/// reads.
pub mod store {
    /// The `nt.store.v1` package.
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("nt.store.v1");
        include!(concat!(env!("OUT_DIR"), "/nt.store.v1.serde.rs"));

        /// The encoded file descriptor set of this package and the `nt.v1`
        /// files it imports.
        pub const FILE_DESCRIPTOR_SET: &[u8] =
            tonic::include_file_descriptor_set!("nt_store_v1_descriptor");
    }
}
