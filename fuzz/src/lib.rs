//! Fuzz targets for the parsers and validation that read untrusted input:
//! checkpoint headers, run-spec YAML, architecture specs (preset strings and
//! JSON), and the `SubmitRun` request as the coordinator validates it.
//!
//! Each target takes raw bytes and returns an [`Outcome`]; it panics only
//! when the code under test panics or returns an unclear error (empty, or
//! longer than [`MAX_ERROR_BYTES`], which means it echoes its input). The
//! corpus under `fuzz/corpus/<target>/` is replayed by `cargo test -p
//! nt-fuzz`; `fuzz-drive` mutates it for as long as it is told.

pub mod corpus;
pub mod guard;
pub mod mutate;
pub mod targets;

pub use targets::{Outcome, Target, MAX_ERROR_BYTES};
