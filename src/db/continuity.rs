//! Continuity proofs: what lets walsync go on with a database's chain
//! instead of starting it again. A database closed to save descriptors keeps
//! a [`Detached`] token (its position and the files' stamps) that proves, when
//! it is opened again, that nothing was written unseen in between; a process
//! that starts finds the chain's head in storage and [`Database::resume`]s
//! from it only where the local WAL (or an unwritten database file) proves
//! the same.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Identity {
    dev: u64,
    ino: u64,
}

/// What walsync keeps of a database it closed to save file descriptors: enough
/// to prove, when it opens it again, that nothing was missed in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detached {
    /// Where the shipped WAL stood (sealed there).
    state: WalState,
    page_size: u32,
    identity: Identity,
    db: FileStamp,
    /// `None` when there was no WAL file.
    wal: Option<FileStamp>,
}

impl Detached {
    /// True if neither the database file nor its WAL was written since the
    /// database was closed: an event about them (our own reopen, an `fchown`
    /// by a process running as root, a reader) is then no reason to open it.
    /// Sound because both files had been quiet for longer than a file-time
    /// tick when closed, so any later write shows as a new modification time.
    /// A WAL deleted (or emptied) by the app's last connection while the
    /// database file stayed untouched held nothing new either; the token then
    /// records that there is no WAL, so the next generation is read from its start.
    pub fn unchanged_on_disk(&mut self, path: &Path) -> bool {
        let Ok(db) = FileStamp::of(path) else {
            return false;
        };
        if db != self.db {
            return false;
        }
        // An empty WAL holds no frames: the same as none (a reader that is
        // the last connection creates one and deletes it again on close).
        let no_wal = || {
            let mut forgotten = *self;
            forgotten.wal = None;
            forgotten.state = WalState::Empty;
            forgotten
        };
        match FileStamp::of(&wal_path_of(path)) {
            Ok(wal) if Some(wal) == self.wal => true,
            Ok(wal) if wal.len == 0 => {
                *self = no_wal();
                true
            }
            Ok(_) => false,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                *self = no_wal();
                true
            }
            Err(_) => false,
        }
    }
}

/// How long a database file must have gone unwritten before it is let go.
pub(super) const DETACH_QUIET: Duration = Duration::from_millis(200);

/// Length and modification time of a file: how walsync tells, without opening
/// a closed database, whether anything wrote to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileStamp {
    len: u64,
    mtime: (i64, i64),
    /// A file replaced by another (restore, copy into place) is a change even
    /// with the same length and time.
    ino: u64,
}

impl FileStamp {
    fn of(path: &Path) -> io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(FileStamp {
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ino: meta.ino(),
        })
    }

    /// Unwritten for longer than a file-time tick can hide a write: at least
    /// [`DETACH_QUIET`], or two seconds where times have whole seconds only
    /// (some network and FUSE filesystems).
    fn quiet(&self) -> bool {
        let needed = if self.mtime.1 == 0 {
            Duration::from_secs(2)
        } else {
            DETACH_QUIET
        };
        let modified = std::time::UNIX_EPOCH
            + Duration::new(
                self.mtime.0.max(0) as u64,
                self.mtime.1.clamp(0, 999_999_999) as u32,
            );
        SystemTime::now()
            .duration_since(modified)
            .is_ok_and(|age| age >= needed)
    }
}

pub(super) fn identity_of(path: &Path) -> io::Result<Identity> {
    let meta = std::fs::metadata(path)?;
    Ok(Identity {
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

impl Database {
    /// Closes the database if its WAL is sealed at a known position, keeping
    /// what [`Database::reattach`] needs. Otherwise gives it back.
    pub fn detach(self) -> std::result::Result<Detached, Box<Self>> {
        // A WAL position is only safe to leave once sealed; with no WAL at
        // all, the proof on reattach is the untouched database file alone.
        let at_position = matches!(self.state, WalState::At(_));
        if (at_position && !self.sealed) || self.lock_held || self.broken {
            return Err(Box::new(self));
        }
        // File times are coarse (a few ms): a write landing in the same tick
        // as the last one would go unnoticed, so only quiet files are let go.
        let Ok(db) = FileStamp::of(&self.path) else {
            return Err(Box::new(self));
        };
        let wal = match FileStamp::of(&self.wal_path) {
            Ok(wal) => Some(wal),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(_) => return Err(Box::new(self)),
        };
        if !db.quiet() || wal.is_some_and(|w| !w.quiet()) {
            return Err(Box::new(self));
        }
        Ok(Detached {
            state: self.state,
            page_size: self.page_size,
            identity: self.identity,
            db,
            wal,
        })
    }

    /// Opens a detached database again. The chain continues only where it is
    /// provable that no committed frame was checkpointed away unseen: the WAL
    /// is the same generation and still holds the shipped frames, or it was
    /// restarted exactly once (after our seal) with the database file
    /// untouched, so that it holds the whole new generation, or it is gone
    /// while the database file is untouched.
    /// Otherwise the reason is returned and a snapshot must follow.
    pub fn reattach(
        path: &Path,
        token: Detached,
    ) -> Result<(Self, std::result::Result<(), String>)> {
        let mut db = Database::open(path)?;
        let verdict = db.adopt(token)?;
        Ok((db, verdict))
    }

    fn adopt(&mut self, token: Detached) -> Result<std::result::Result<(), String>> {
        if self.identity != token.identity {
            return Ok(Err(
                "the database file was replaced while walsync had it closed".into(),
            ));
        }
        if self.page_size != token.page_size {
            return Ok(Err(
                "the page size changed while walsync had the database closed".into(),
            ));
        }
        // A restart that could hide frames needs a checkpoint that writes
        // them into the database file first; an untouched file rules that out.
        let untouched = FileStamp::of(&self.path)
            .map_err(self.io_err("reading the size and time of"))?
            == token.db;
        match (self.open_wal()?, token.state) {
            (None, _) | (Some(_), WalState::Empty) if untouched => {
                self.state = WalState::Empty;
                self.sealed = true;
            }
            (None, _) | (Some(_), WalState::Empty) => {
                return Ok(Err(
                    "the WAL was checkpointed while walsync had the database closed".into(),
                ));
            }
            (Some((file, header)), WalState::At(pos)) if pos.same_generation(&header) => {
                if !self.checksum_matches(&file, &header, pos)? {
                    return Ok(Err(
                        "the WAL was rewritten while walsync had the database closed".into(),
                    ));
                }
                // Sealed only with nothing committed after the position: the
                // app may have appended to this generation (see below) and
                // checkpointed it all, and then the pin just taken does not
                // hold off a restart, which must not be taken as following.
                let more = wal::scan(&file, &header, pos)
                    .map_err(self.wal_err())?
                    .transactions
                    > 0;
                self.state = WalState::At(pos);
                self.sealed = !more;
            }
            // One restart, and nothing checkpointed: the new generation holds
            // everything since the seal. A checkpoint rules that out: the
            // first opener after walsync closed rebuilt the WAL-index, which
            // forgets what was checkpointed, so the app may have appended to
            // the sealed generation, checkpointed those frames away, and only
            // then restarted, leaving a WAL that looks the same.
            (Some((_, header)), WalState::At(pos))
                if header.salt1 == pos.salt1.wrapping_add(1) && untouched =>
            {
                self.state = WalState::At(header.start());
                self.sealed = false;
            }
            (Some((_, header)), WalState::At(pos)) if header.salt1 == pos.salt1.wrapping_add(1) => {
                return Ok(Err(
                    "the WAL was checkpointed and restarted while walsync had the database closed"
                        .into(),
                ));
            }
            (Some(_), WalState::At(_)) => {
                return Ok(Err(
                    "the WAL was restarted more than once while walsync had the database closed"
                        .into(),
                ));
            }
        }
        Ok(Ok(()))
    }

    /// Checks that `state` (from the chain head in storage) still describes
    /// the local WAL, and adopts it if so. Returns the reason if not.
    /// `head_ms` is the time recorded in the newest object: with no WAL to
    /// compare, only a database file unwritten since then (by more than a
    /// coarse file-time tick) proves that nothing was checkpointed unseen.
    pub fn resume(
        &mut self,
        state: WalState,
        page_size: u32,
        head_ms: u64,
    ) -> Result<Result<(), String>> {
        if page_size != self.page_size {
            return Ok(Err(format!(
                "page size changed from {page_size} to {}",
                self.page_size
            )));
        }
        let wal = self.open_wal()?;
        let verdict = match (state, wal) {
            (WalState::Empty, None) => {
                let written_ms = std::fs::metadata(&self.path)
                    .and_then(|m| m.modified())
                    .map_err(self.io_err("reading the modification time of"))?
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(u64::MAX, |d| d.as_millis() as u64);
                if written_ms.saturating_add(1000) < head_ms {
                    Ok(())
                } else {
                    Err(
                        "the database file was written after the newest object in storage \
                         and has no WAL to show what changed"
                            .to_string(),
                    )
                }
            }
            (WalState::Empty, Some(_)) => {
                Err("the WAL has content written while walsync was not running".to_string())
            }
            (WalState::At(_), None) => {
                Err("the WAL was checkpointed or deleted while walsync was not running".into())
            }
            (WalState::At(pos), Some((file, header))) => {
                if !pos.same_generation(&header) {
                    Err(
                        "the WAL was restarted by a checkpoint while walsync was not running"
                            .into(),
                    )
                } else if !self.checksum_matches(&file, &header, pos)? {
                    Err("the WAL no longer holds the frames last shipped".into())
                } else {
                    Ok(())
                }
            }
        };
        if verdict.is_ok() {
            self.state = state;
            // With no WAL at all, the pin taken at open has held ever since
            // a moment with nothing unshipped: whatever generation comes next
            // follows, as after a seal.
            self.sealed = state == WalState::Empty;
            self.commits_at_state = None;
        }
        Ok(verdict)
    }
}
