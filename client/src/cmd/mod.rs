pub mod arch;
pub mod eval;
pub mod fuse;
pub mod train;
