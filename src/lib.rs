pub mod segment;
pub mod storage;
pub mod wal;
