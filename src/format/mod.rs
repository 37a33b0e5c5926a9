//! What walsync reads and writes as bytes, pure over them: SQLite's WAL
//! (`wal`), the one object format (`segment`), its client-side encryption
//! (`encryption`), and the page hashes and state record (`state`). Nothing
//! here touches a file, a database or the network.

pub mod encryption;
pub mod segment;
pub mod state;
pub(crate) mod wal;
