pub mod arch;
pub mod eval;
pub mod experiment;
pub mod fuse;
pub mod progress;
pub mod remote;
pub mod run_local;
pub mod train;
