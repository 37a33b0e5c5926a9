//! The checkpoint handshake: the write lock taken on a connection of its
//! own, the last frames read and shipped under it, then a checkpoint that
//! seals the WAL (PASSIVE) or cuts it back (TRUNCATE, proven safe by
//! `PRAGMA data_version`). See the module doc of `db` for why walsync owns
//! checkpoints.

use super::*;

/// How a checkpoint went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointOutcome {
    /// Another connection held the write lock; try again later.
    Busy,
    /// Frames were checkpointed; `complete` if every frame was.
    Done { complete: bool, frames: u32 },
    /// The WAL is not what was shipped (or a write raced the TRUNCATE): snapshot.
    Lost(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointMode {
    Passive,
    Truncate,
}

const FRAMES_DIFFER: &str =
    "the WAL-index frame count differs from the frames read and shipped under the write lock";

impl Database {
    /// The lock connection, opened on first use.
    fn lock_conn(&mut self) -> Result<&Connection> {
        if self.lock.is_none() {
            let conn = open_connection(&self.path).map_err(self.sql_err())?;
            // An app that commits in a tight loop frees the write lock only for
            // microseconds between transactions; SQLite's default busy handler
            // sleeps 1-100 ms between tries and would almost never get it.
            conn.busy_handler(Some(retry_lock_briefly))
                .map_err(self.sql_err())?;
            self.lock = Some(conn);
        }
        self.lock.as_ref().ok_or_else(|| Error::Unsupported {
            path: self.path.clone(),
            reason: "lock connection unavailable".into(),
        })
    }

    pub(super) fn acquire_write_lock(&mut self) -> Result<bool> {
        let begun = self.lock_conn()?.execute_batch("BEGIN IMMEDIATE");
        match begun {
            Ok(()) => {
                self.lock_held = true;
                Ok(true)
            }
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy =>
            {
                self.lock = None;
                Ok(false)
            }
            Err(e) => Err(self.sql_err()(e)),
        }
    }

    /// Rolls the write transaction back, keeping the lock connection open.
    fn rollback_write_lock(&mut self) -> Result<()> {
        if self.lock_held {
            self.lock_held = false;
            if let Some(lock) = &self.lock {
                lock.execute_batch("ROLLBACK").map_err(self.sql_err())?;
            }
        }
        Ok(())
    }

    /// Lets go of the write lock taken by [`Database::lock_and_read_tail`]
    /// and closes the lock connection.
    pub fn release_write_lock(&mut self) -> Result<()> {
        let result = self.rollback_write_lock();
        self.lock = None;
        result
    }

    /// First half of a checkpoint: takes the write lock and reads the last
    /// frames, which the caller must ship before calling [`Database::checkpoint`].
    /// `Ok(None)` if the write lock could not be had in time.
    pub fn lock_and_read_tail<E: Encode>(
        &mut self,
        encode: E,
    ) -> Result<Option<Changes<E::Object>>> {
        self.guarded(|db| {
            if !db.acquire_write_lock()? {
                return Ok(None);
            }
            match db.read_changes_pinned(encode) {
                Ok(changes) => Ok(Some(changes)),
                Err(e) => {
                    let _ = db.release_write_lock();
                    Err(e)
                }
            }
        })
    }

    /// Second half: with the write lock still held and the tail shipped,
    /// checkpoints and releases the lock. A complete PASSIVE checkpoint seals
    /// the WAL. TRUNCATE (the brake on runaway growth) cannot run under our own
    /// write transaction, so it runs right after the lock is released, and
    /// `PRAGMA data_version` on the lock connection proves that no other
    /// connection committed in that gap.
    pub fn checkpoint(&mut self, mode: CheckpointMode) -> Result<CheckpointOutcome> {
        if !self.lock_held || self.broken {
            let _ = self.release_write_lock();
            return Ok(CheckpointOutcome::Busy);
        }
        self.guarded(|db| db.checkpoint_locked(mode))
    }

    fn checkpoint_locked(&mut self, mode: CheckpointMode) -> Result<CheckpointOutcome> {
        let shipped_frames = self.state.frames();
        let result = match mode {
            CheckpointMode::Passive => self.checkpoint_passive(shipped_frames),
            CheckpointMode::Truncate => self.checkpoint_truncate(shipped_frames),
        };
        if result.is_err() {
            let _ = self.ensure_pinned();
        }
        let _ = self.release_write_lock();
        result
    }

    fn checkpoint_passive(&mut self, shipped_frames: u32) -> Result<CheckpointOutcome> {
        self.unpin()?;
        let row = self.wal_checkpoint(&self.conn, "PASSIVE");
        self.pin()?;
        self.release_write_lock()?;
        let (busy, log, done) = row?;
        if !self.log_matches(log, shipped_frames) {
            return Ok(CheckpointOutcome::Lost(FRAMES_DIFFER));
        }
        let complete = busy == 0 && log >= 0 && log == done;
        if complete {
            self.sealed = true;
        }
        Ok(CheckpointOutcome::Done {
            complete,
            frames: done.max(0) as u32,
        })
    }

    /// Under our write lock the WAL-index's frame count (`log`) must equal the
    /// frames we read and shipped. If it does not, the file holds frames SQLite
    /// never published (an app that died mid-commit) or frames we could not
    /// read: the chain cannot vouch for this WAL.
    fn log_matches(&self, log: i64, shipped_frames: u32) -> bool {
        log < 0 // the checkpoint did not run at all; nothing to compare
            || log == i64::from(shipped_frames)
            // Restarted in the WAL-index, first frame not written yet.
            || (self.sealed && log == 0)
    }

    fn wal_checkpoint(&self, conn: &Connection, mode: &str) -> Result<(i64, i64, i64)> {
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .map_err(self.sql_err())
    }

    fn checkpoint_truncate(&mut self, shipped_frames: u32) -> Result<CheckpointOutcome> {
        let before = self.data_version()?;
        // First copy every frame while we still hold the write lock, and prove
        // the WAL holds exactly what we shipped.
        self.unpin()?;
        let passive = self.wal_checkpoint(&self.conn, "PASSIVE");
        let (_, log, _) = match passive {
            Ok(row) => row,
            Err(e) => {
                self.pin()?;
                self.rollback_write_lock()?;
                return Err(e);
            }
        };
        if !self.log_matches(log, shipped_frames) {
            self.pin()?;
            self.rollback_write_lock()?;
            return Ok(CheckpointOutcome::Lost(FRAMES_DIFFER));
        }
        // TRUNCATE will not run inside our own write transaction: release it,
        // truncate, and take the pin back at once. Any commit by another
        // connection in that gap changes data_version, which we read after the
        // pin is back, so nothing can slip through unseen.
        self.rollback_write_lock()?;
        let row = match &self.lock {
            Some(lock) => self.wal_checkpoint(lock, "TRUNCATE"),
            None => Ok((1, -1, -1)),
        };
        let pinned = self.pin();
        let after = self.data_version();
        pinned?;
        let (busy, _, done) = row?;
        let after = after?;
        if after != before {
            return Ok(CheckpointOutcome::Lost(
                "another connection committed between shipping and the TRUNCATE checkpoint",
            ));
        }
        if busy != 0 {
            // Readers kept it from finishing: nothing was truncated or restarted.
            return Ok(CheckpointOutcome::Done {
                complete: false,
                frames: done.max(0) as u32,
            });
        }
        // The position stays: SQLite's restart added one to salt-1, so the
        // generation the app writes next is the one that must follow.
        self.sealed = true;
        Ok(CheckpointOutcome::Done {
            complete: true,
            frames: done.max(0) as u32,
        })
    }

    fn data_version(&self) -> Result<i64> {
        match &self.lock {
            Some(lock) => lock
                .query_row("PRAGMA data_version", [], |r| r.get(0))
                .map_err(self.sql_err()),
            None => Err(Error::Unsupported {
                path: self.path.clone(),
                reason: "lock connection unavailable".into(),
            }),
        }
    }
}

/// Busy handler of the lock connection: retry every 250 µs for about 2 s.
fn retry_lock_briefly(attempt: i32) -> bool {
    const ATTEMPTS: i32 = 8000;
    if attempt >= ATTEMPTS {
        return false;
    }
    std::thread::sleep(Duration::from_micros(250));
    true
}
