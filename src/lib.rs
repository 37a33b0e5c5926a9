//! walsync ships the WAL of many SQLite databases to object storage from one
//! process, and rebuilds any of them from it. This is the map; each module's
//! own doc says why it works the way it does (and `docs/design.md` why the
//! whole does).
//!
//! # From a commit to a PUT
//!
//! 1. [`replicator`] runs `watch`: one file watcher for every database and a
//!    schedule of which database syncs next. A write to a database or its
//!    `-wal` marks it due; no task waits per database at rest.
//! 2. [`replica`] is one database's replication: where its chain in storage
//!    stands, what is waiting to go up, when it checkpoints and when it must
//!    start again with a snapshot ([`reason`] says why).
//! 3. [`db`] is the SQLite side, blocking (run in `spawn_blocking`): the
//!    pinned read transaction that keeps frames from being overwritten
//!    before they ship, the checkpoints walsync owns, and reading new frames
//!    with `wal`. [`state`] keeps a hash of every page so that a lost
//!    continuity ships only the pages that changed.
//! 4. [`object`] turns the pages `db` read into the next object of the chain
//!    (`db` sees only its `Encode` trait): [`segment`] is the one object
//!    format (zstd, optionally sealed by [`encryption`], content-hashed,
//!    linked to the object before it).
//! 5. [`storage`] puts it: one trait, a local directory or S3, create-only
//!    writes, retries per request.
//!
//! Beside the chain: [`compactor`] (built on [`compact`]) stores runs that
//! stand for many objects so a restore reads few; [`retention`] deletes what
//! no kept restore point needs; [`status`] and `http` show every
//! database's state; `control` takes requests from `walsync sync`.
//!
//! # From a GET to a restored file
//!
//! [`chain`] lists a database's objects and runs and plans the fewest that
//! reach the point asked for; [`restore`] downloads them several at a time,
//! checks each with the same [`segment`] decoder and the one link rule in
//! `link`, and writes pages into a file beside the output, which replaces
//! it only when whole (`sidefile`). [`follow`] keeps a live copy going the
//! same way; [`verify`] walks a whole chain and reports every problem;
//! `fork` decides which branch a forked chain follows.
//!
//! # The commands
//!
//! [`cli`] is the command line as typed, [`config`] turns it (or
//! `walsync.toml`) into validated settings, and [`cmd`] wires each command (one file per command)
//! to the modules above.

pub mod chain;
pub mod cli;
pub mod cmd;
pub mod compact;
pub mod compactor;
pub mod config;
pub mod db;
mod explain;
mod fork;
pub mod format;
mod link;
pub mod litestream;
pub mod mirror;
pub mod object;
mod out;
pub mod progress;
pub mod reason;
pub mod redact;
pub mod replica;
pub mod replicator;
pub mod restore;
pub mod retention;
pub mod serve;
pub mod storage;
pub mod tips;

// The modules grouped in format/, serve/ and restore/ keep their short paths.
use format::wal;
pub use format::{encryption, segment, state};
use restore::sidefile;
pub use restore::{follow, verify};
use serve::{control, http, listen};
pub use serve::{sidecar, status};
