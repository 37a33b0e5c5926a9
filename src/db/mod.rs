//! One watched SQLite database: its connections, the pinned read transaction,
//! the position shipped so far, and the checkpoints walsync runs for it.
//!
//! walsync owns checkpointing (DESIGN.md invariant 2). Its own connection holds
//! a read transaction at all times ("the pin"): while a reader is inside the
//! WAL, no other connection can restart the WAL past frames we have not read,
//! so an app's auto-checkpoint or an explicit `wal_checkpoint(TRUNCATE)` cannot
//! throw away unshipped frames. The pin is only let go inside [`Database::checkpoint`],
//! while a second connection holds the write lock (`BEGIN IMMEDIATE`), so that
//! the last frames are read, shipped and checkpointed with no writer in between.
//! After such a complete checkpoint the WAL is *sealed*: the next generation
//! (salt-1 one higher) continues the chain without a snapshot.
//!
//! SQLite keeps those locks as POSIX advisory locks on the database file and
//! its `-shm`, and closing *any* descriptor of either file drops every lock the
//! process holds on it (DESIGN.md invariant 2a). So nothing here opens the
//! database file, and the one descriptor of the `-shm` we read the WAL-index
//! through (one per file in the process, shared: `shm`) is held with the
//! connections and let go after them.
//!
//! Anything else that changes the WAL under us (a checkpoint made while
//! walsync was down, a deleted WAL, a replaced database file) is reported as
//! [`Changes::Lost`], and the caller takes a fresh snapshot.
//!
//! Everything here is blocking and runs in `spawn_blocking`. It knows nothing of S3,
//! keys or object bodies: what it reads goes to an [`Encode`] (`object::New`).
//!
//! Why this file is long: opening, the pin and reading new frames share the
//! connections' invariants spelled out above (DESIGN.md 2, 2a); checkpoints,
//! the state record, continuity and whole-database reads are in the files
//! beside it, and a third of this one is tests.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};

use crate::segment::{self, Kind, WalRange};
use crate::state::{self, Record, page_hash};
use crate::wal::{self, IndexHeader, Position, WalHeader};

mod checkpoint;
mod continuity;
mod record;
mod shm;
mod snapshot;
pub use checkpoint::{CheckpointMode, CheckpointOutcome};
pub use continuity::Detached;
use continuity::{Identity, identity_of};
use shm::Shm;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("database {path} does not exist")]
    Missing { path: PathBuf },
    #[error("database {path} is {what}, not a file")]
    NotAFile { path: PathBuf, what: &'static str },
    #[error("SQLite error on {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("reading WAL of {path}: {source}")]
    Wal {
        path: PathBuf,
        #[source]
        source: wal::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done, e.g. "reading a page from the WAL of".
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("encoding a segment of {path}: {source}")]
    Segment {
        path: PathBuf,
        #[source]
        source: segment::Error,
    },
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    /// Another walsync process holds the database's claim: two would fight
    /// over its checkpoints and, on one prefix, over its chain.
    #[error(
        "database {path} is replicated by another walsync process already (it holds the \
         claim on the database's -shm); stop that one first, or ask it to ship now with \
         `walsync sync`"
    )]
    Claimed { path: PathBuf },
    /// SQLite refuses the file's header: retrying cannot help.
    #[error(
        "database {path} is not a SQLite database (SQLite says: file is not a database); \
         fix the file, or the pattern that matched it, and restart walsync"
    )]
    NotSqlite { path: PathBuf },
}

impl Error {
    /// True when the file itself is the problem and retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Error::NotSqlite { .. } | Error::NotAFile { .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where walsync stands in the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalState {
    /// There was no WAL content when the chain was (re)started: whatever
    /// generation appears next continues the chain.
    Empty,
    /// Everything up to this position is shipped.
    At(Position),
}

impl WalState {
    /// The WAL range recorded in a segment for this state.
    pub fn to_range(self, first_frame: u32) -> WalRange {
        match self {
            WalState::Empty => WalRange::default(),
            WalState::At(p) => WalRange {
                salt1: p.salt1,
                salt2: p.salt2,
                first_frame,
                end_frame: p.frame,
                checksum: p.checksum,
            },
        }
    }

    pub fn from_range(range: &WalRange) -> Self {
        if range.salt1 == 0 && range.salt2 == 0 && range.end_frame == 0 && range.checksum == (0, 0)
        {
            WalState::Empty
        } else {
            WalState::At(Position {
                salt1: range.salt1,
                salt2: range.salt2,
                frame: range.end_frame,
                checksum: range.checksum,
            })
        }
    }

    fn frames(self) -> u32 {
        match self {
            WalState::Empty => 0,
            WalState::At(p) => p.frame,
        }
    }
}

/// What an object read from the database holds, as far as this side knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub kind: Kind,
    pub page_size: u32,
    /// Pages in the database after this object.
    pub db_pages: u32,
    /// Pages in the object.
    pub page_count: u32,
    pub wal: WalRange,
}

/// Makes an object of the pages read, once there is something to read (see
/// `object::New`): what it is sealed with, linked to and written into is no
/// concern of the SQLite side.
pub trait Encode {
    type Object;
    type Pages: Pages<Object = Self::Object>;
    fn begin(self, shape: Shape) -> segment::Result<Self::Pages>;
}

/// An object taking pages, in ascending page order.
pub trait Pages {
    type Object;
    fn add(&mut self, pgno: u32, page: &[u8]) -> segment::Result<()>;
    /// Ends it with `state`, the digest of the database after it (`None`:
    /// not known).
    fn finish(self, state: Option<state::Digest>) -> segment::Result<Self::Object>;
}

/// An object made of the pages read, with the state it ships up to.
#[derive(Debug)]
pub struct Encoded<O> {
    pub object: O,
    /// The WAL state once this object is durable.
    pub state: WalState,
    /// SQLite's commit counter when the WAL-index published exactly `state`.
    pub commits: Option<u32>,
    /// Whole transactions included (0 for a snapshot).
    pub transactions: u32,
    /// How the state record changes once this object is durable.
    pub change: StateChange,
}

/// How an object changes the record of the shipped state (see `state`).
#[derive(Debug)]
pub enum StateChange {
    /// The state before was not known: the object carries no digest, and
    /// there is no record until the next snapshot.
    Unknown,
    /// These pages changed (sorted, with their hashes), giving this sum.
    Pages(Box<(state::Sum, Vec<(u32, u128)>)>),
    /// A whole new record, built while every page was read.
    Replace(Box<state::Builder>),
}

/// What [`Database::delta`] found, after continuity was lost.
#[derive(Debug)]
pub enum Delta<O> {
    /// Ship these pages; the chain goes on from the new position.
    Ship(Box<Encoded<O>>),
    /// The database is exactly the state shipped: nothing to upload, the
    /// chain goes on from `state`.
    Same {
        state: WalState,
        commits: Option<u32>,
    },
    /// A delta cannot be made (no checked record): take a snapshot, for this reason.
    Snapshot(String),
}

/// What [`Database::read_changes`] found.
#[derive(Debug)]
pub enum Changes<O> {
    Nothing,
    Segment(Box<Encoded<O>>),
    /// Continuity with what was shipped is broken; take a snapshot.
    Lost(String),
}

/// Whether a WAL generation other than the shipped one continues the chain.
#[derive(Debug)]
enum Generation {
    Follows,
    /// SQLite has not published the new generation's first commit yet.
    NotPublished,
    Lost(String),
}

/// One watched database.
#[derive(Debug)]
pub struct Database {
    path: PathBuf,
    wal_path: PathBuf,
    /// Holds the pin (a read transaction), runs PASSIVE checkpoints and snapshots.
    conn: Connection,
    /// Takes the write lock for the sealing handshake; never writes. Open
    /// only while in use, to keep an attached database at three descriptors.
    lock: Option<Connection>,
    lock_held: bool,
    identity: Identity,
    page_size: u32,
    state: WalState,
    /// Every frame of the current generation was shipped and checkpointed
    /// while we held the write lock: the next generation may follow.
    sealed: bool,
    /// The last read saw whole transactions SQLite had not published yet.
    unpublished_commits: bool,
    /// SQLite's commit counter (the WAL-index `iChange`) when the WAL-index
    /// published exactly `state`: proves, whatever happened to the WAL since,
    /// how many transactions were committed after the shipped position.
    commits_at_state: Option<u32>,
    /// An operation failed part-way: SQLite may have ended the pin or left a
    /// transaction open. The next operation reopens the connections first.
    broken: bool,
    /// The record of the state shipped, checked against the chain head.
    record: Option<Record>,
    /// Why there is no usable record, when one was looked for.
    no_record: Option<String>,
    /// Where this database's record for its destination is kept; none is
    /// kept until the caller says where.
    record_path: Option<PathBuf>,
    /// The WAL-index, read through the process's one descriptor of the
    /// `-shm`, held exactly as long as the connections (declared last:
    /// fields drop in order, so it goes after them). Closing a descriptor of
    /// the `-shm` while any connection to it is open, this one's or another
    /// `Database`'s in this process, would silently drop their pins and
    /// write locks.
    shm: Option<Shm>,
}

/// What a path that is not a regular file is instead ("a directory", "a
/// FIFO" ...), for errors that say so instead of "does not exist".
pub fn not_a_file(meta: &std::fs::Metadata) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let kind = meta.file_type();
    if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_socket() {
        Some("a socket")
    } else if kind.is_block_device() || kind.is_char_device() {
        Some("a device")
    } else {
        Some("not a regular file")
    }
}

impl Database {
    /// Opens `path` (which must exist), switches it to WAL mode if needed, and pins it.
    ///
    /// The state starts as unknown-to-storage; call [`Database::resume`] or
    /// [`Database::snapshot`] before reading changes.
    pub fn open(path: &Path) -> Result<Self> {
        // SQLite would open a directory or a FIFO and fail (or hang) later
        // with an unhelpful message; say what the path is instead.
        if let Some(what) = std::fs::metadata(path).ok().and_then(|m| not_a_file(&m)) {
            return Err(Error::NotAFile {
                path: path.to_path_buf(),
                what,
            });
        }
        let identity = identity_of(path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Error::Missing {
                    path: path.to_path_buf(),
                }
            } else {
                Error::Io {
                    what: "reading the metadata of",
                    path: path.to_path_buf(),
                    source: e,
                }
            }
        })?;
        let sql = |source: rusqlite::Error| {
            if source.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase) {
                Error::NotSqlite {
                    path: path.to_path_buf(),
                }
            } else {
                Error::Sqlite {
                    path: path.to_path_buf(),
                    source,
                }
            }
        };
        let conn = open_connection(path).map_err(sql)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                reason: format!("could not switch to WAL mode (journal_mode is {mode})"),
            });
        }
        let page_size: u32 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(sql)?;
        let mut db = Self {
            wal_path: wal_path_of(path),
            path: path.to_path_buf(),
            conn,
            lock: None,
            lock_held: false,
            identity,
            page_size,
            state: WalState::Empty,
            sealed: false,
            unpublished_commits: false,
            commits_at_state: None,
            broken: false,
            record: None,
            no_record: None,
            record_path: None,
            shm: None,
        };
        db.pin()?;
        // The pinned connection has created the `-shm` (unless the VFS keeps
        // the WAL-index in heap memory, when no other process can share it).
        db.shm = Shm::open(&shm_path_of(path)).map_err(|source| Error::Io {
            what: "opening the WAL-index",
            path: shm_path_of(path),
            source,
        })?;
        if let Some(shm) = db.shm.as_ref().and_then(Shm::file)
            && !claim(shm)
        {
            return Err(Error::Claimed {
                path: path.to_path_buf(),
            });
        }
        Ok(db)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    pub fn state(&self) -> WalState {
        self.state
    }

    /// True if the last read found commits written to the WAL but not yet
    /// published in the WAL-index: a read a moment later will ship them.
    pub fn has_unpublished_commits(&self) -> bool {
        self.unpublished_commits
    }

    /// Frames of the current WAL generation shipped but not yet sealed by a checkpoint.
    pub fn unsealed_frames(&self) -> u32 {
        if self.sealed { 0 } else { self.state.frames() }
    }

    fn sql_err(&self) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
        move |source| Error::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn io_err(&self, what: &'static str) -> impl FnOnce(io::Error) -> Error + '_ {
        move |source| Error::Io {
            what,
            path: self.path.clone(),
            source,
        }
    }

    fn wal_err(&self) -> impl FnOnce(wal::Error) -> Error + '_ {
        move |source| Error::Wal {
            path: self.path.clone(),
            source,
        }
    }

    /// Starts the read transaction that keeps other connections from restarting the WAL.
    fn pin(&mut self) -> Result<()> {
        let pinned = self
            .conn
            .execute_batch("BEGIN; SELECT count(*) FROM sqlite_master;");
        if let Err(e) = pinned {
            // A BEGIN whose SELECT failed holds no read lock: never keep it.
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            return Err(self.sql_err()(e));
        }
        Ok(())
    }

    /// Takes the pin again if an error left it released.
    fn ensure_pinned(&mut self) -> Result<()> {
        if self.conn.is_autocommit() {
            self.pin()?;
        }
        Ok(())
    }

    fn unpin(&mut self) -> Result<()> {
        // SQLite ends a transaction by itself on some errors (I/O, full disk).
        if self.conn.is_autocommit() {
            return Ok(());
        }
        self.conn.execute_batch("ROLLBACK").map_err(self.sql_err())
    }

    fn open_wal(&self) -> Result<Option<(File, WalHeader)>> {
        let file = match File::open(&self.wal_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io_err("opening the WAL of")(e)),
        };
        match WalHeader::read_from(&file).map_err(self.wal_err())? {
            Some(h) => Ok(Some((file, h))),
            None => Ok(None),
        }
    }

    /// The WAL-index header, if readable.
    fn index(&self) -> Option<IndexHeader> {
        self.shm
            .as_ref()
            .and_then(Shm::file)
            .and_then(wal::read_index_header)
    }

    /// True if the frame before `pos` is present and carries `pos`'s checksum.
    fn checksum_matches(&self, file: &File, header: &WalHeader, pos: Position) -> Result<bool> {
        use std::os::unix::fs::FileExt;
        if pos.frame == 0 {
            return Ok(pos.checksum == header.checksum);
        }
        let mut fh = [0u8; wal::FRAME_HEADER_SIZE as usize];
        match file.read_exact_at(&mut fh, header.frame_offset(u64::from(pos.frame - 1))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(self.io_err("reading a frame header from the WAL of")(e)),
        }
        let ck = (
            u32::from_be_bytes([fh[16], fh[17], fh[18], fh[19]]),
            u32::from_be_bytes([fh[20], fh[21], fh[22], fh[23]]),
        );
        let salts_ok = u32::from_be_bytes([fh[8], fh[9], fh[10], fh[11]]) == header.salt1
            && u32::from_be_bytes([fh[12], fh[13], fh[14], fh[15]]) == header.salt2;
        Ok(salts_ok && ck == pos.checksum)
    }

    /// Reads whole transactions committed after the shipped position and
    /// encodes them with `encode`. The state advances only when the
    /// caller calls [`Database::shipped`] after the upload is durable.
    pub fn read_changes<E: Encode>(&mut self, encode: E) -> Result<Changes<E::Object>> {
        self.guarded(|db| db.read_changes_pinned(encode))
    }

    /// Runs `op`, first reopening the connections if an earlier operation
    /// failed part-way. After an error SQLite may have ended the pin or a
    /// transaction on its own; carrying on with those connections would
    /// fail forever ("cannot rollback - no transaction is active") or read
    /// through a pin that no longer holds.
    fn guarded<T>(&mut self, op: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.broken {
            self.recover()?;
        }
        let out = op(self);
        if out.is_err() {
            self.broken = true;
        }
        out
    }

    /// Closes every connection, then opens and pins new ones. The shipped
    /// position is kept, but not the seal: the pin may have lapsed, so the
    /// next read must prove continuity again (same generation with the
    /// shipped frames in place, or SQLite's commit counter).
    fn recover(&mut self) -> Result<()> {
        self.close_connections()?;
        let mut fresh = Database::open(&self.path)?;
        // The identity and page size the chain was built from stay, so a
        // replaced file or a new page size is reported, not adopted.
        fresh.identity = self.identity;
        fresh.page_size = self.page_size;
        fresh.state = self.state;
        fresh.commits_at_state = self.commits_at_state;
        fresh.sealed = false;
        fresh.record = self.record.take();
        fresh.record_path = self.record_path.take();
        fresh.no_record = self.no_record.take();
        *self = fresh;
        tracing::info!(db = %self.path.display(), "reopened the database after a failure");
        Ok(())
    }

    /// Closes the connections and the `-shm` descriptor, in that order: a
    /// new connection must never exist beside a descriptor about to close.
    fn close_connections(&mut self) -> Result<()> {
        self.broken = true;
        self.lock = None;
        self.lock_held = false;
        let closed = Connection::open_in_memory().map_err(self.sql_err())?;
        drop(std::mem::replace(&mut self.conn, closed));
        self.shm = None;
        Ok(())
    }

    fn read_changes_pinned<E: Encode>(&mut self, encode: E) -> Result<Changes<E::Object>> {
        self.ensure_pinned()?;
        match identity_of(&self.path) {
            Ok(id) if id == self.identity => {}
            Ok(_) => return Ok(Changes::Lost("the database file was replaced".into())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::Missing {
                    path: self.path.clone(),
                });
            }
            Err(e) => return Err(self.io_err("reading the metadata of")(e)),
        }
        let Some((file, header)) = self.open_wal()? else {
            // Truncated with nothing committed since the shipped position
            // (SQLite's commit counter unchanged) loses nothing either.
            let nothing_since = || {
                self.commits_at_state
                    .is_some_and(|c| self.index().is_some_and(|i| i.commits == c))
            };
            return Ok(match self.state {
                WalState::At(p) if p.frame > 0 && !self.sealed && !nothing_since() => {
                    Changes::Lost(
                        "the WAL was truncated or deleted before its last frames were shipped"
                            .into(),
                    )
                }
                _ => Changes::Nothing,
            });
        };
        if header.page_size != self.page_size {
            return Ok(Changes::Lost(format!(
                "the WAL page size is {}, the database's was {}",
                header.page_size, self.page_size
            )));
        }
        let index = self.index();
        let published = index.and_then(|i| i.published(&header));
        let from = match self.state {
            WalState::At(pos) if pos.same_generation(&header) => {
                let len = file
                    .metadata()
                    .map_err(self.io_err("reading the size of the WAL of"))?
                    .len();
                if len < header.frame_offset(u64::from(pos.frame)) {
                    return Ok(Changes::Lost(
                        "the WAL is shorter than the position already shipped".into(),
                    ));
                }
                if !self.checksum_matches(&file, &header, pos)? {
                    return Ok(Changes::Lost(
                        "the WAL was rewritten under the same salts".into(),
                    ));
                }
                pos
            }
            _ => match self.next_generation(&file, &header, index)? {
                Generation::Follows => header.start(),
                Generation::NotPublished => {
                    self.unpublished_commits = true;
                    return Ok(Changes::Nothing);
                }
                Generation::Lost(reason) => return Ok(Changes::Lost(reason)),
            },
        };
        if let Some(published) = published
            && published < from.frame
        {
            return Ok(Changes::Lost(
                "frames already shipped were never published as committed by SQLite".into(),
            ));
        }
        let limit = published.unwrap_or(u32::MAX);
        let scan = wal::scan_until(&file, &header, from, limit).map_err(self.wal_err())?;
        // SQLite publishes a commit in the WAL-index (memory-mapped, so no file
        // event) just after its last WAL write, which is what woke us. Whole
        // transactions past the published count are usually a commit caught in
        // that gap: tell the caller to look again shortly.
        self.unpublished_commits = limit != u32::MAX
            && scan.end.frame == limit
            && wal::scan(&file, &header, scan.end)
                .map_err(self.wal_err())?
                .transactions
                > 0;
        // A new generation with no whole transaction yet ships nothing, and
        // the seal stands until one appears.
        let Some(db_pages) = scan.db_pages else {
            return Ok(Changes::Nothing);
        };
        let pages: Vec<(u32, u32)> = scan
            .pages
            .iter()
            .filter(|(pgno, _)| **pgno <= db_pages)
            .map(|(p, i)| (*p, *i))
            .collect();
        let state = WalState::At(scan.end);
        let commits = index.and_then(|i| i.commits_at(scan.end));
        let mut out = self.begin(
            encode,
            Kind::Wal,
            db_pages,
            pages.len() as u32,
            state.to_range(from.frame),
        )?;
        let mut buf = vec![0u8; self.page_size as usize];
        // Page hashes only serve the record: without one, none are taken.
        let tracked = self.record.is_some();
        let mut hashes = Vec::with_capacity(if tracked { pages.len() } else { 0 });
        for (pgno, index) in pages {
            wal::read_page(&file, &header, index, &mut buf)
                .map_err(self.io_err("reading a page from the WAL of"))?;
            out.add(pgno, &buf)?;
            if tracked {
                hashes.push((pgno, page_hash(pgno, &buf)));
            }
        }
        let change = match self.record.as_ref().map(|r| r.advance(db_pages, &hashes)) {
            Some(Ok(sum)) => StateChange::Pages(Box::new((sum, hashes))),
            Some(Err(e)) => {
                self.drop_record(&e.to_string());
                StateChange::Unknown
            }
            None => StateChange::Unknown,
        };
        let digest = match &change {
            StateChange::Pages(change) => Some(change.0.digest()),
            _ => None,
        };
        let object = out.finish(digest)?;
        Ok(Changes::Segment(Box::new(Encoded {
            object,
            state,
            commits,
            transactions: scan.transactions,
            change,
        })))
    }

    /// Decides whether the WAL generation in `header`, which is not the one
    /// shipped from, continues the chain from its first frame.
    ///
    /// After a seal, and pinned ever since, it does if it is the generation
    /// that must come next: every restart adds one to salt-1 (SQLite's
    /// `walRestartHdr`, for a writer's restart and for RESTART and TRUNCATE
    /// checkpoints alike), and no checkpoint could copy a frame committed
    /// after the seal past our pin, so the restart discarded only frames
    /// already shipped. Otherwise (two restarts, or a pin that may have lapsed)
    /// SQLite's commit counter must show that every transaction committed
    /// since the shipped position is in this generation.
    fn next_generation(
        &self,
        file: &File,
        header: &WalHeader,
        index: Option<IndexHeader>,
    ) -> Result<Generation> {
        let next_after_seal = match self.state {
            WalState::Empty => true,
            WalState::At(pos) => header.salt1 == pos.salt1.wrapping_add(1),
        };
        if self.sealed && next_after_seal {
            return Ok(Generation::Follows);
        }
        let Some(before) = self.commits_at_state else {
            return Ok(Generation::Lost(if self.sealed {
                "the WAL was restarted more than once since walsync's checkpoint".into()
            } else {
                "the WAL was restarted by a checkpoint walsync did not make".into()
            }));
        };
        // The writer puts the new salts in the WAL-index before it writes
        // the WAL header, and publishes the frames only at commit.
        let Some(index) = index.filter(|i| i.describes(header)) else {
            return Ok(Generation::NotPublished);
        };
        let scan =
            wal::scan_until(file, header, header.start(), index.frames).map_err(self.wal_err())?;
        let committed = index.commits.wrapping_sub(before);
        if scan.end.frame == index.frames && scan.transactions == committed {
            Ok(Generation::Follows)
        } else {
            Ok(Generation::Lost(format!(
                "the WAL was restarted by a checkpoint walsync did not make and \
                 {committed} transactions were committed since the last one shipped, \
                 {} of them in the WAL",
                scan.transactions
            )))
        }
    }

    /// Records that everything up to `state` is durable in storage, and
    /// SQLite's commit counter there if known.
    pub fn shipped(&mut self, state: WalState, commits: Option<u32>) {
        if state != self.state {
            self.sealed = false;
        }
        self.state = state;
        self.commits_at_state = commits;
    }

    fn identity_changed(&self) -> Result<bool> {
        match identity_of(&self.path) {
            Ok(id) => Ok(id != self.identity),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::Missing {
                path: self.path.clone(),
            }),
            Err(e) => Err(self.io_err("reading the metadata of")(e)),
        }
    }

    /// Opens fresh connections after the database file was replaced, closing
    /// the old ones first (the new file's `-shm` may be the old one's).
    fn reopen(&mut self) -> Result<()> {
        self.close_connections()?;
        // The record describes what was shipped, not the file: it is what a
        // delta of the new file is made against.
        let (record, record_path) = (self.record.take(), self.record_path.take());
        *self = Database::open(&self.path)?;
        self.record = record;
        self.record_path = record_path;
        Ok(())
    }

    /// Begins an object of `kind` with `encode`.
    fn begin<E: Encode>(
        &self,
        encode: E,
        kind: Kind,
        db_pages: u32,
        page_count: u32,
        wal: WalRange,
    ) -> Result<Making<E::Pages>> {
        let shape = Shape {
            kind,
            page_size: self.page_size,
            db_pages,
            page_count,
            wal,
        };
        let path = self.path.clone();
        match encode.begin(shape) {
            Ok(pages) => Ok(Making { pages, path }),
            Err(source) => Err(Error::Segment { path, source }),
        }
    }
}

/// An object being made of this database's pages, its errors named by
/// the database (it holds its own path: pages are added while the
/// database is borrowed to read them).
pub(super) struct Making<P> {
    pages: P,
    path: PathBuf,
}

impl<P: Pages> Making<P> {
    pub(super) fn add(&mut self, pgno: u32, page: &[u8]) -> Result<()> {
        self.pages.add(pgno, page).map_err(|source| Error::Segment {
            path: self.path.clone(),
            source,
        })
    }

    pub(super) fn finish(self, state: Option<state::Digest>) -> Result<P::Object> {
        let Making { pages, path } = self;
        pages
            .finish(state)
            .map_err(|source| Error::Segment { path, source })
    }
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // walsync only streams pages and reads a header: a per-connection
    // lookaside allocator (up to ~120 KiB) and page cache would be most of
    // what an idle database costs in a large fleet. Lookaside can only be
    // turned off before the connection has used it, so this comes first.
    // SAFETY: the handle is a valid open connection owned by `conn`; a null
    // buffer with zero slots disables lookaside.
    unsafe {
        rusqlite::ffi::sqlite3_db_config(
            conn.handle(),
            rusqlite::ffi::SQLITE_DBCONFIG_LOOKASIDE,
            std::ptr::null_mut::<std::ffi::c_void>(),
            0 as std::ffi::c_int,
            0 as std::ffi::c_int,
        );
    }
    conn.pragma_update(None, "cache_size", -64)?;
    // Our connections must never checkpoint on their own: not automatically
    // after a commit, and not when the last connection closes (that would
    // checkpoint and delete the WAL, breaking continuity at our next start).
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// The WAL file SQLite keeps beside `db`.
pub fn wal_path_of(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
}

/// The WAL-index (shared memory) file SQLite keeps beside `db`.
/// The byte of the `-shm` a walsync process locks to claim the database, far
/// past what SQLite locks there (bytes 120 to 128).
const CLAIM_BYTE: libc::off_t = 1 << 40;

/// Claims the database for this process with a POSIX lock on [`CLAIM_BYTE`]
/// of its `-shm`: like SQLite's own locks there it belongs to the process and
/// lasts while no descriptor of the `-shm` is closed, which DESIGN.md 2a
/// already guarantees while the connections are open; it goes when they
/// close, or when the process dies. `false` only when another process holds
/// it; where the lock cannot be taken at all (a read-only `-shm`, a
/// filesystem without locks) the database is not claimed, and nothing is
/// refused.
fn claim(shm: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain C struct, all of whose fields may be zero.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = CLAIM_BYTE;
    lock.l_len = 1;
    // SAFETY: a live descriptor, and a pointer to a live `flock` for the call.
    let rc = unsafe { libc::fcntl(shm.as_raw_fd(), libc::F_SETLK, &lock) };
    if rc == 0 {
        return true;
    }
    let e = io::Error::last_os_error();
    if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
        return false;
    }
    tracing::debug!(error = %e, "cannot claim the database through its -shm; not claimed");
    true
}

fn shm_path_of(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-shm");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::object::{Link, New};

    /// The object after a link to no chain in particular: the tests here
    /// check what is read, not the chain.
    fn link(seq: u64) -> New {
        New(Link {
            seq,
            prev_hash: [0; 32],
            key: None,
        })
    }

    fn app(path: &Path) -> Connection {
        let conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch("CREATE TABLE IF NOT EXISTS t(v)")
            .unwrap();
        conn
    }

    /// The claim is the process's: opening and reopening here never meets
    /// it (another process does: `a_snapshot_beside_a_running_watch_…`).
    #[test]
    fn the_claim_is_this_processs_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let _app = app(&path);
        let mut first = Database::open(&path).unwrap();
        first.reopen().unwrap();
        drop(first);
        Database::open(&path).unwrap();
    }

    fn data_version(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA data_version", [], |r| r.get(0))
            .unwrap()
    }

    fn truncate(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .unwrap()
    }

    /// The TRUNCATE brake relies on this SQLite behaviour: a connection's own
    /// TRUNCATE checkpoint leaves its data_version alone, and a commit by any
    /// other connection between our write lock and the checkpoint changes it.
    #[test]
    fn data_version_reveals_a_commit_slipped_in_before_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let app = app(&path);
        let lock = open_connection(&path).unwrap();
        app.execute("INSERT INTO t VALUES (1)", []).unwrap();

        lock.execute_batch("BEGIN IMMEDIATE").unwrap();
        let before = data_version(&lock);
        lock.execute_batch("ROLLBACK").unwrap();
        assert_eq!(truncate(&lock), 0);
        assert_eq!(
            data_version(&lock),
            before,
            "own checkpoint is not a change"
        );

        app.execute("INSERT INTO t VALUES (2)", []).unwrap();
        lock.execute_batch("BEGIN IMMEDIATE").unwrap();
        let before = data_version(&lock);
        lock.execute_batch("ROLLBACK").unwrap();
        app.execute("INSERT INTO t VALUES (3)", []).unwrap();
        assert_eq!(truncate(&lock), 0);
        assert_ne!(data_version(&lock), before, "the slipped-in commit is seen");
    }

    #[test]
    fn truncate_brake_seals_and_the_next_generation_follows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let app = app(&path);
        let mut db = Database::open(&path).unwrap();
        let (state, commits) = db.snapshot_position().unwrap();
        db.shipped(state, commits);
        for i in 0..20 {
            app.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
        }
        let link = link(2);
        let Some(Changes::Segment(tail)) = db.lock_and_read_tail(link.clone()).unwrap() else {
            panic!("expected frames");
        };
        db.shipped(tail.state, tail.commits);
        let outcome = db.checkpoint(CheckpointMode::Truncate).unwrap();
        assert_eq!(
            outcome,
            CheckpointOutcome::Done {
                complete: true,
                frames: 0
            }
        );
        assert_eq!(db.state(), tail.state, "the sealed position stays");
        assert_eq!(std::fs::metadata(wal_path_of(&path)).unwrap().len(), 0);
        app.execute("INSERT INTO t VALUES (99)", []).unwrap();
        match db.read_changes(link).unwrap() {
            Changes::Segment(seg) => assert_eq!(seg.object.header.wal.first_frame, 0),
            other => panic!("expected the new generation to follow, got {other:?}"),
        }
    }

    /// Ships everything and seals it, as the replicator does before detaching.
    fn seal(db: &mut Database) {
        let link = link(1);
        if let Some(Changes::Segment(seg)) = db.lock_and_read_tail(link).unwrap() {
            db.shipped(seg.state, seg.commits);
        }
        let outcome = db.checkpoint(CheckpointMode::Passive).unwrap();
        assert!(matches!(
            outcome,
            CheckpointOutcome::Done { complete: true, .. }
        ));
    }

    fn snapshot_state(db: &mut Database) {
        let (state, commits) = db.snapshot_position().unwrap();
        db.shipped(state, commits);
    }

    /// Opens the database, ships a snapshot of it, seals and closes it.
    fn closed_after_snapshot(path: &Path) -> Detached {
        let mut db = Database::open(path).unwrap();
        snapshot_state(&mut db);
        seal(&mut db);
        std::thread::sleep(continuity::DETACH_QUIET);
        db.detach().unwrap()
    }

    fn assert_ships_a_segment(db: &mut Database) {
        let link = link(9);
        assert!(matches!(
            db.read_changes(link).unwrap(),
            Changes::Segment(_)
        ));
    }

    /// Runs `script` in a Python process against `path` (bound to `db`, an
    /// open `sqlite3` connection with no busy wait) and returns what it
    /// prints. The app must be another process: SQLite's locks are POSIX
    /// locks, which never conflict within one process.
    fn other_process(path: &Path, script: &str) -> String {
        let program = format!(
            "import sqlite3, sys\n\
             db = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)\n\
             {script}\n"
        );
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(program)
            .arg(path)
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn truncate_elsewhere(path: &Path) -> String {
        other_process(
            path,
            "print(db.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()[0])",
        )
    }

    /// The pin survives every read: before walsync kept one descriptor of the
    /// `-shm`, each read closed one and silently dropped the pin, so another
    /// process could truncate away frames walsync had not sealed.
    #[test]
    fn the_pin_and_the_write_lock_hold_against_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let app = app(&path);
        let mut db = Database::open(&path).unwrap();
        snapshot_state(&mut db);
        let link = link(2);
        for round in 0..3 {
            app.execute("INSERT INTO t VALUES (?1)", [round]).unwrap();
            let Changes::Segment(seg) = db.read_changes(link.clone()).unwrap() else {
                panic!("expected a segment");
            };
            db.shipped(seg.state, seg.commits);
            assert_eq!(truncate_elsewhere(&path), "1", "round {round}: busy");
        }
        // While walsync holds the write lock, another process cannot write.
        app.execute("INSERT INTO t VALUES (9)", []).unwrap();
        let Some(Changes::Segment(tail)) = db.lock_and_read_tail(link.clone()).unwrap() else {
            panic!("expected the tail");
        };
        let write = other_process(
            &path,
            "try:\n    db.execute('INSERT INTO t VALUES (10)')\n    print('wrote')\n\
             except sqlite3.OperationalError as e:\n    print(e)",
        );
        assert_eq!(write, "database is locked");
        db.shipped(tail.state, tail.commits);
        assert!(matches!(
            db.checkpoint(CheckpointMode::Passive).unwrap(),
            CheckpointOutcome::Done { complete: true, .. }
        ));
        // Sealed: now the app may truncate, and the next generation follows.
        assert_eq!(truncate_elsewhere(&path), "0");
        app.execute("INSERT INTO t VALUES (11)", []).unwrap();
        assert!(matches!(
            db.read_changes(link).unwrap(),
            Changes::Segment(_)
        ));
    }

    /// After a seal, a generation two restarts on follows only if SQLite's
    /// commit counter shows that nothing was committed in between.
    #[test]
    fn a_generation_two_restarts_on_follows_only_with_every_commit_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let app = app(&path);
        app.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let mut db = Database::open(&path).unwrap();
        snapshot_state(&mut db);
        seal(&mut db);
        let link = link(3);
        // Two empty truncations, then a commit: salt-1 moved on by two.
        assert_eq!(truncate_elsewhere(&path), "0");
        assert_eq!(truncate_elsewhere(&path), "0");
        other_process(&path, "db.execute('INSERT INTO t VALUES (2)')");
        let Changes::Segment(seg) = db.read_changes(link.clone()).unwrap() else {
            panic!("empty generations in between lose nothing");
        };
        db.shipped(seg.state, seg.commits);
        seal(&mut db);

        // A commit checkpointed and truncated away before walsync read it:
        // only possible without the pin, so drop it as a broken pin would.
        db.unpin().unwrap();
        other_process(&path, "db.execute('INSERT INTO t VALUES (3)')");
        assert_eq!(truncate_elsewhere(&path), "0");
        other_process(&path, "db.execute('INSERT INTO t VALUES (4)')");
        db.pin().unwrap();
        match db.read_changes(link).unwrap() {
            Changes::Lost(reason) => assert!(reason.contains("2 transactions"), "{reason}"),
            other => panic!("a lost commit must be noticed, got {other:?}"),
        }
    }

    /// After an error inside SQLite the next operation starts from fresh
    /// connections instead of failing forever.
    #[test]
    fn an_error_reopens_the_connections_on_the_next_operation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let app = app(&path);
        let mut db = Database::open(&path).unwrap();
        snapshot_state(&mut db);
        // As after an I/O error: SQLite ended the pin by itself.
        db.conn.execute_batch("ROLLBACK").unwrap();
        db.broken = true;
        app.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let link = link(2);
        assert!(matches!(
            db.read_changes(link).unwrap(),
            Changes::Segment(_)
        ));
        assert!(!db.broken);
        assert!(!db.conn.is_autocommit(), "pinned again");
    }

    #[test]
    fn a_closed_database_reads_as_unchanged_until_something_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let app_conn = app(&path);
        app_conn.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let mut token = closed_after_snapshot(&path);
        assert!(token.unchanged_on_disk(&path));

        let reader = Connection::open(&path).unwrap();
        let _: i64 = reader
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        drop(reader);
        assert!(token.unchanged_on_disk(&path), "a reader changes nothing");

        // The last connection deletes the WAL, leaving the database as it was.
        drop(app_conn);
        assert!(!wal_path_of(&path).exists());
        assert!(token.unchanged_on_disk(&path), "no WAL, same database");
        let app_conn = app(&path);
        app_conn.execute("INSERT INTO t VALUES (2)", []).unwrap();
        assert!(!token.unchanged_on_disk(&path), "a commit is a change");
        let (mut db, verdict) = Database::reattach(&path, token).unwrap();
        assert_eq!(verdict, Ok(()), "the new WAL is read from its start");
        assert_ships_a_segment(&mut db);
    }

    /// Closed by walsync with no other connection open, the WAL-index is
    /// recovered by the next opener, which forgets what was checkpointed:
    /// the app appends to the sealed generation instead of restarting it.
    /// Checkpointed, then restarted once, the WAL looks like a single
    /// restart after the seal, but the frames appended are gone from it.
    #[test]
    fn frames_appended_to_the_sealed_generation_then_checkpointed_are_a_loss() {
        for mode in ["PASSIVE", "TRUNCATE"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("a.db");
            let (token, app_conn) = closed_alone_then_appended(&path, mode);
            app_conn.execute("INSERT INTO t VALUES (3)", []).unwrap();
            let (_db, verdict) = Database::reattach(&path, token).unwrap();
            assert!(verdict.is_err(), "{mode}: the commit of 2 went unseen");
        }
    }

    /// walsync ships and seals `path` and closes it with no other connection
    /// open; then the app opens it (rebuilding the WAL-index), commits 2 into
    /// the sealed generation and checkpoints it all in `mode`.
    fn closed_alone_then_appended(path: &Path, mode: &str) -> (Detached, Connection) {
        let app_conn = app(path);
        app_conn.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let mut db = Database::open(path).unwrap();
        drop(app_conn);
        snapshot_state(&mut db);
        seal(&mut db);
        std::thread::sleep(continuity::DETACH_QUIET);
        let token = db.detach().unwrap();
        let app_conn = app(path);
        app_conn.execute("INSERT INTO t VALUES (2)", []).unwrap();
        let (busy, _, _): (i64, i64, i64) = app_conn
            .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!(busy, 0, "{mode}");
        (token, app_conn)
    }

    /// The same, with the restart after walsync reopened: the sealed
    /// generation holds a commit past the shipped position, all checkpointed,
    /// so the pin taken at reopen does not hold off the restart that the
    /// app's next commit makes. Following the new generation would skip the
    /// commit in the old one.
    #[test]
    fn a_restart_after_reopen_past_unshipped_frames_is_a_loss() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let (token, app_conn) = closed_alone_then_appended(&path, "PASSIVE");
        let (mut db, verdict) = Database::reattach(&path, token).unwrap();
        assert_eq!(
            verdict,
            Ok(()),
            "the generation is the same, its frames still there"
        );
        app_conn.execute("INSERT INTO t VALUES (3)", []).unwrap();
        match db.read_changes(link(2)).unwrap() {
            Changes::Lost(_) => {}
            Changes::Segment(seg) => assert_ne!(
                seg.object.header.wal.first_frame, 0,
                "followed the restart past the commit of 2"
            ),
            Changes::Nothing => panic!("the commits of 2 and 3 went unseen"),
        }
    }

    #[test]
    fn reattach_continues_only_where_nothing_can_have_been_missed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let app_conn = app(&path);
        app_conn.execute("INSERT INTO t VALUES (1)", []).unwrap();

        // Untouched while closed: same generation, continue.
        let token = closed_after_snapshot(&path);
        let (_db, verdict) = Database::reattach(&path, token).unwrap();
        assert_eq!(verdict, Ok(()));
        drop(_db);

        // One restart by the app while closed: the new generation is whole.
        let token = closed_after_snapshot(&path);
        app_conn.execute("INSERT INTO t VALUES (2)", []).unwrap();
        let (mut db, verdict) = Database::reattach(&path, token).unwrap();
        assert_eq!(verdict, Ok(()));
        assert_ships_a_segment(&mut db);
        drop(db);

        // Written, checkpointed and restarted again while closed: refused.
        let token = closed_after_snapshot(&path);
        app_conn.execute("INSERT INTO t VALUES (3)", []).unwrap();
        let (_, _, _): (i64, i64, i64) = app_conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        app_conn.execute("INSERT INTO t VALUES (4)", []).unwrap();
        let (_db, verdict) = Database::reattach(&path, token).unwrap();
        assert!(verdict.is_err(), "two restarts must not be accepted");
        drop(_db);

        // The app's last connection closes (checkpoint + WAL deleted) after writing: refused.
        let token = closed_after_snapshot(&path);
        app_conn.execute("INSERT INTO t VALUES (5)", []).unwrap();
        drop(app_conn);
        assert!(!wal_path_of(&path).exists());
        let (_db, verdict) = Database::reattach(&path, token).unwrap();
        assert!(
            verdict.is_err(),
            "frames checkpointed away must not be accepted"
        );
        drop(_db);

        // ... and without writing: the database file is untouched, continue.
        let app_conn = app(&path);
        let token = closed_after_snapshot(&path);
        drop(app_conn);
        let (_db, verdict) = Database::reattach(&path, token).unwrap();
        assert_eq!(verdict, Ok(()));
    }
}
