pub mod arch;
pub mod fuse;
