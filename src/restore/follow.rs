//! `restore --follow`: keeps a replica file up to date with its chain in
//! storage, for readers (a read-only copy, a standby, reporting).
//!
//! Each new object is verified as restore verifies it (trailer, key, link to
//! the object before it, encryption key), then applied through SQLite itself:
//! its pages go into the file through `sqlite_dbpage` inside one write
//! transaction, so a reader of the file sees the state before the object or
//! after it, never a mix. The position reached (sequence and content hash) is
//! kept beside the file and rewritten after each commit. Applying an object a
//! second time gives the same file, so a crash between the commit and the
//! position update costs only a repeat.
//!
//! Why this file is long: a live copy is one loop over its ways to go on
//! (resume from its position, apply the next objects, restore afresh in place
//! when it cannot), which share the copy's position and the reader-safe way of
//! writing pages.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior, params};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::chain::{self, ObjectRef};
use crate::encryption::{KeyId, Keys};
use crate::link;
use crate::restore::{self, RestoreOptions, Target};
use crate::segment::{self, Header, Kind, PageReader};
use crate::state::{self, Record, page_hash};
use crate::storage::{Storage, from_hex, to_hex};

/// Appended to the replica file's name for the position file.
pub const POSITION_SUFFIX: &str = ".walsync-follow";
/// Idle polls between two listings, which find objects deleted by retention
/// before this replica got them, or a chain replaced under the prefix.
const LIST_EVERY: u32 = 30;
/// Longest wait between two attempts while storage fails.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// SQLite never stores data in the page holding the lock bytes at 1 GiB;
/// snapshots carry it as zeros and `sqlite_dbpage` refuses to write it.
const PENDING_BYTE: u64 = 0x4000_0000;

/// The number of that page at `page_size`.
fn lock_page(page_size: u32) -> u64 {
    PENDING_BYTE / u64::from(page_size) + 1
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(
        "{path} exists but is not followed (no {}); pass --force to replace it",
        position.display()
    )]
    NotFollowed { path: PathBuf, position: PathBuf },
    #[error("{path}: {message}")]
    Position { path: PathBuf, message: String },
    #[error("{path} follows {found:?}, not {expected:?}")]
    OtherPrefix {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{0} (if the chain in storage was replaced, restore afresh with --force)")]
    Link(#[from] link::Error),
    #[error(
        "storage no longer holds sequence {next} of {prefix:?} (deleted by retention, or \
         compacted after the exact window while this replica was stopped) and has no run or \
         later snapshot to continue from; restore afresh with --force"
    )]
    Gap { prefix: String, next: u64 },
    #[error(
        "the chain of {prefix:?} in storage ends at sequence {head}, behind this replica \
         (at {seq}): it was replaced; restore afresh with --force"
    )]
    Behind { prefix: String, head: u64, seq: u64 },
    #[error(
        "the newest state of {prefix:?} (sequence {seq}) has page size {found}, the replica \
         {expected}: restore afresh with --force"
    )]
    NewPageSize {
        prefix: String,
        seq: u64,
        found: u32,
        expected: u32,
    },
    #[error("object {key}: page size {found}, the replica has {expected}")]
    PageSize {
        key: String,
        found: u32,
        expected: u32,
    },
    #[error("applying object {key} to {path}: {source}")]
    Apply {
        key: String,
        path: PathBuf,
        #[source]
        source: ApplyError,
    },
    #[error(transparent)]
    Restore(#[from] restore::Error),
    #[error(transparent)]
    Chain(#[from] chain::Error),
    #[error("{path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

/// Why an object could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Segment(#[from] segment::Error),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(
        "the replica with it applied is not the state its writer recorded (its state digest \
         differs); nothing of it was applied"
    )]
    StateMismatch,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone)]
pub struct FollowOptions {
    pub prefix: String,
    pub output: PathBuf,
    pub keys: Option<Arc<Keys>>,
    /// Time between two looks at storage once caught up.
    pub interval: Duration,
    /// Replace an existing file that is not followed (restore afresh).
    pub force: bool,
}

/// Where a followed replica stands: the newest object applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub seq: u64,
    pub hash: [u8; 32],
    /// The key that object was sealed with: a later object sealed otherwise
    /// (or not at all) must be a snapshot, as after a real key change.
    pub key_id: Option<KeyId>,
    /// The file it describes (device and inode), written before that file
    /// is moved into place: a position for another file (a restore that
    /// stopped before its rename) is never applied to this one. `None` in
    /// position files written before it was kept.
    pub file: Option<FileId>,
}

/// A file's device and inode: what stays when it is renamed.
pub type FileId = (u64, u64);

fn file_id(path: &Path) -> io::Result<FileId> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

impl Position {
    /// Where it stands after applying an object to the same file.
    fn after(self, header: &Header, hash: [u8; 32]) -> Self {
        Self {
            seq: header.seq,
            hash,
            key_id: header.sealed.map(|s| s.key_id),
            file: self.file,
        }
    }
}

/// What a follow run did until it was stopped.
#[derive(Debug, Default, Clone)]
pub struct FollowReport {
    /// `None` if stopped before storage had anything.
    pub position: Option<Position>,
    /// The file was restored afresh (it was missing, or --force).
    pub restored: bool,
    /// Objects applied after the first restore (or resume).
    pub applied: u64,
}

pub fn position_path(output: &Path) -> PathBuf {
    let mut s = output.as_os_str().to_owned();
    s.push(POSITION_SUFFIX);
    PathBuf::from(s)
}

/// Follows `opts.prefix` into `opts.output` until `stop` is cancelled.
pub async fn follow(
    storage: &dyn Storage,
    opts: &FollowOptions,
    stop: CancellationToken,
) -> Result<FollowReport> {
    let output = &opts.output;
    let pos_path = position_path(output);
    let mut report = FollowReport::default();
    let saved = read_position(&pos_path, &opts.prefix)?;
    // A position written for a file that never reached this name (a restore
    // stopped between the two) describes nothing here.
    let saved = saved.filter(|pos| {
        pos.file
            .is_none_or(|id| file_id(output).is_ok_and(|found| found == id))
    });
    let mut pos = match saved {
        Some(pos) if output.exists() && !opts.force => {
            info!(prefix = %opts.prefix, file = %output.display(), seq = pos.seq, "resuming");
            remove_stale_scratch(output).await;
            pos
        }
        _ if output.exists() && !opts.force => {
            return Err(Error::NotFollowed {
                path: output.clone(),
                position: pos_path,
            });
        }
        _ => {
            // Replaced in place where it can be, as when a follower cannot go
            // on: its readers may be the ones told to restart it with --force.
            let existing = if opts.force {
                wal_mode_replica(output)
            } else {
                None
            };
            let in_place = match existing {
                Some(conn) => match restore_in_place(storage, opts, conn, true).await {
                    Ok((pos, _)) => Some(pos),
                    // Nothing written: a rename replaces it, or storage is
                    // waited for as below.
                    Err(
                        Error::NewPageSize { .. }
                        | Error::Restore(restore::Error::NoReplica { .. }),
                    ) => None,
                    Err(e) => return Err(e),
                },
                None => None,
            };
            let pos = match in_place {
                Some(pos) => pos,
                // Its position is written already, before the file was placed.
                None => match first_restore(storage, opts, &stop).await? {
                    Some(pos) => pos,
                    None => return Ok(report),
                },
            };
            report.restored = true;
            pos
        }
    };
    report.position = Some(pos);
    // The state record restore left, kept current object by object: each
    // object is checked against the digest its writer recorded, and the file
    // can be promoted (watched) without shipping it again.
    let record_path = state::record_path(
        output,
        &state::destination(&storage.describe(), &opts.prefix),
    );
    let mut record = follow_record(&record_path, pos);
    let mut conn = open_replica(output)?;
    let mut idle_polls = 0u32;
    let mut failures = 0u32;
    let mut legacy_too = true;
    // The way on that a listing found when the next object was gone: runs
    // across objects deleted after the exact window, or a later snapshot.
    let mut queued: VecDeque<ObjectRef> = VecDeque::new();
    // A replica resumed after a long stop may be behind the window: the
    // first miss lists at once.
    let mut listed = false;
    loop {
        let polled = if let Some(object) = queued.pop_front() {
            fetch_queued(storage, object, pos).await
        } else {
            let list_now = !listed || (idle_polls > 0 && idle_polls % LIST_EVERY == 0);
            next_object(storage, &opts.prefix, pos, list_now, legacy_too).await
        };
        let next = match polled {
            Ok(Next::Object(next)) => {
                failures = 0;
                Some(*next)
            }
            Ok(Next::Listed(path)) => {
                failures = 0;
                listed = true;
                queued = path.into();
                if !queued.is_empty() {
                    continue;
                }
                None
            }
            Ok(Next::Nothing) => {
                failures = 0;
                None
            }
            // Storage outages outlast the SDK's retries, and a full scratch
            // disk may be freed: a follower waits both out.
            Err(Error::Chain(e @ (chain::Error::Storage(_) | chain::Error::Local { .. }))) => {
                // What was queued is listed again once storage answers.
                queued.clear();
                failures += 1;
                let wait = opts
                    .interval
                    .saturating_mul(1 << failures.min(6))
                    .min(MAX_BACKOFF);
                warn!(prefix = %opts.prefix, error = %e, retry_in = ?wait, "fetching failed; will retry");
                if stopped_within(&stop, wait).await {
                    return Ok(report);
                }
                continue;
            }
            // Behind what storage still holds (stopped for longer than the
            // exact window, in the middle of a run, or past retention): a
            // replica's job is to go on, so it starts again from the newest
            // state, as `--force` would.
            Err(Error::Gap { next, .. }) => {
                warn!(
                    prefix = %opts.prefix,
                    next,
                    "storage no longer holds the objects this replica needs next (compacted \
                     after the exact window, or deleted by retention); restoring it afresh"
                );
                (pos, conn) = restore_in_place(storage, opts, conn, false).await?;
                report.restored = true;
                report.position = Some(pos);
                record = follow_record(&record_path, pos);
                queued.clear();
                idle_polls = 0;
                continue;
            }
            Err(e) => return Err(e),
        };
        match next {
            Some((object, header, hash, file)) => {
                legacy_too &= object.is_legacy();
                (conn, record) = apply(
                    conn,
                    output,
                    &object,
                    (&header, hash),
                    file,
                    opts.keys.clone(),
                    record,
                )
                .await?;
                pos = pos.after(&header, hash);
                write_position(&pos_path, &opts.prefix, pos)?;
                report.position = Some(pos);
                report.applied += 1;
                idle_polls = 0;
                if stop.is_cancelled() {
                    return Ok(report);
                }
            }
            None => {
                idle_polls += 1;
                if stopped_within(&stop, opts.interval).await {
                    return Ok(report);
                }
            }
        }
    }
}

/// What a poll found.
enum Next {
    /// The object after the position, verified and linked to it.
    Object(Box<Fetched>),
    /// No such object; a listing found the way on from the position (empty
    /// if the chain simply has nothing newer yet).
    Listed(Vec<ObjectRef>),
    Nothing,
}

/// The object after `pos`, verified and linked to it; if there is none and
/// `list_now`, the way on that a listing finds (see [`continue_after_gap`]).
async fn next_object(
    storage: &dyn Storage,
    prefix: &str,
    pos: Position,
    list_now: bool,
    legacy_too: bool,
) -> Result<Next> {
    if let Some(fetched) = fetch(storage, prefix, pos.seq + 1, pos.hash, legacy_too).await? {
        return linked(fetched, pos).map(|f| Next::Object(Box::new(f)));
    }
    if list_now {
        return Ok(Next::Listed(
            continue_after_gap(storage, prefix, pos).await?,
        ));
    }
    Ok(Next::Nothing)
}

/// Refuses an object that does not follow `pos` by the chain's rule (see
/// [`link`]); returns it with the hash it hands on.
fn linked((object, header, hash, file): Fetched, pos: Position) -> Result<Fetched> {
    // A snapshot past a gap starts afresh: there is nothing to link to.
    let past_gap = header.kind == Kind::Snapshot && header.seq > pos.seq + 1;
    let mut successor = if past_gap {
        link::Successor::default()
    } else {
        let at = format!("sequence {} applied here", pos.seq);
        link::Successor::after(at, pos.hash, Some(pos.key_id))
    };
    let hash = successor.accept(&object.key, &header, hash)?;
    Ok((object, header, hash, file))
}

/// A queued object of the way on, verified and linked to `pos`.
async fn fetch_queued(storage: &dyn Storage, object: ObjectRef, pos: Position) -> Result<Next> {
    let (header, hash, file) = chain::read_verified(storage, &object).await?;
    linked((object, header, hash, file), pos).map(|f| Next::Object(Box::new(f)))
}

/// Restores the newest state, waiting for storage to have one.
async fn first_restore(
    storage: &dyn Storage,
    opts: &FollowOptions,
    stop: &CancellationToken,
) -> Result<Option<Position>> {
    let restore_opts = RestoreOptions {
        prefix: opts.prefix.clone(),
        output: opts.output.clone(),
        target: Target::Latest,
        force: opts.force,
        keys: opts.keys.clone(),
        parallelism: restore::FETCH_PARALLELISM,
    };
    let mut waiting = false;
    let pos_path = position_path(&opts.output);
    loop {
        // The position is written before the file appears under its name.
        let (path, prefix) = (pos_path.clone(), opts.prefix.clone());
        let record = move |r: &restore::RestoreReport, file: &Path| {
            let pos = Position {
                seq: r.seq,
                hash: r.hash,
                key_id: r.key_id,
                file: Some(file_id(file)?),
            };
            write_position(&path, &prefix, pos).map_err(io::Error::other)
        };
        match restore::restore_then(storage, &restore_opts, record).await {
            Ok(r) => {
                info!(prefix = %opts.prefix, file = %opts.output.display(), seq = r.seq, "restored; following");
                return Ok(Some(Position {
                    seq: r.seq,
                    hash: r.hash,
                    key_id: r.key_id,
                    file: Some(file_id(&opts.output).map_err(|e| Error::Position {
                        path: opts.output.clone(),
                        message: e.to_string(),
                    })?),
                }));
            }
            Err(restore::Error::NoReplica { .. }) => {
                if !waiting {
                    info!(prefix = %opts.prefix, "nothing in storage yet; waiting for the first object");
                    waiting = true;
                }
            }
            Err(e) => return Err(e.into()),
        }
        if stopped_within(stop, opts.interval).await {
            return Ok(None);
        }
    }
}

/// Brings the replica to the newest state when it cannot go on from where it
/// stands. The state is restored (and checked) into a scratch file beside
/// it, then its pages are copied in through `sqlite_dbpage` in one write
/// transaction: readers see the state before or the state after, and page 1
/// (its schema cookie included) is the restored one byte for byte, as every
/// later object expects. A file renamed over the replica instead would leave
/// a reader that had opened the old file reading it together with the new
/// file's WAL (SQLite finds `-wal` and `-shm` by name): a malformed database,
/// found by the crash torture. The replica keeps its inode, so the position
/// goes on naming it.
async fn restore_in_place(
    storage: &dyn Storage,
    opts: &FollowOptions,
    conn: Connection,
    forced: bool,
) -> Result<(Position, Connection)> {
    let output = &opts.output;
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: io::Error| Error::Position {
            path,
            message: e.to_string(),
        }
    };
    // A restore to the same file is refused while this one runs, as it is
    // beside another restore; the scratch is named as a restore's.
    let lock_path = crate::sidefile::dir_of(output);
    let _lock = crate::sidefile::TargetLock::try_acquire(output)
        .map_err(io_err(&lock_path))?
        .ok_or_else(|| restore::Error::Busy {
            path: output.clone(),
        })?;
    let scratch = restore::scratch_dir(output)
        .await
        .map_err(io_err(&lock_path))?;
    let fresh = scratch.path().join("fresh.db");
    let restore_opts = RestoreOptions {
        prefix: opts.prefix.clone(),
        output: fresh.clone(),
        target: Target::Latest,
        force: false,
        keys: opts.keys.clone(),
        parallelism: restore::FETCH_PARALLELISM,
    };
    let restored = restore::restore(storage, &restore_opts).await?;
    // The record of the state before is void from the first page written.
    let destination = state::destination(&storage.describe(), &opts.prefix);
    let record_path = state::record_path(output, &destination);
    state::forget(&record_path).map_err(io_err(&record_path))?;
    // Under --force, so is the position, which names this same file: a
    // crash after the commit must not leave a position that is still valid
    // in the chain to be resumed from over the new state. Without one, the
    // next start refuses the file until --force restores it again. (Where
    // the follower could not go on, the old position leads back here: the
    // objects after it are gone for good.)
    let pos_path = position_path(output);
    if forced {
        match std::fs::remove_file(&pos_path) {
            Ok(()) => {
                let dir = crate::sidefile::dir_of(output);
                File::open(&dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io_err(&dir))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&pos_path)(e)),
        }
    }
    let (path, from, prefix, seq) = (
        output.clone(),
        fresh.clone(),
        opts.prefix.clone(),
        restored.seq,
    );
    let conn = tokio::task::spawn_blocking(move || copy_into(&from, conn, &path, (&prefix, seq)))
        .await
        .map_err(|e| io_err(output)(io::Error::other(e)))??;
    let pos = Position {
        seq: restored.seq,
        hash: restored.hash,
        key_id: restored.key_id,
        file: Some(file_id(output).map_err(io_err(output))?),
    };
    write_position(&pos_path, &opts.prefix, pos)?;
    // The record of the restored state now describes the replica.
    let from = state::record_path(&fresh, &destination);
    if let Ok(Some(mut record)) = Record::open(&from) {
        record.rename(&record_path).map_err(io_err(&record_path))?;
    }
    info!(prefix = %opts.prefix, file = %output.display(), seq = pos.seq, "restored in place; following");
    Ok((pos, conn))
}

/// The existing file at `output`, opened as a replica, if it is a database in
/// WAL mode: only there do pages written through SQLite reach readers as one
/// commit, whatever the file held before.
fn wal_mode_replica(output: &Path) -> Option<Connection> {
    if !output.exists() {
        return None;
    }
    let conn = open_replica(output).ok()?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .ok()?;
    mode.eq_ignore_ascii_case("wal").then_some(conn)
}

/// Removes what a follower killed in [`restore_in_place`] left beside
/// `output` (a copy of the whole database), unless a restore to it runs.
async fn remove_stale_scratch(output: &Path) {
    let lock = {
        let output = output.to_path_buf();
        tokio::task::spawn_blocking(move || crate::sidefile::TargetLock::try_acquire(&output)).await
    };
    if let Ok(Ok(Some(_lock))) = lock {
        restore::remove_stale_scratch_of(output).await;
    }
}

/// Copies every page of the database at `from` into the replica at `path`
/// in one write transaction, the pages past its end dropped. `(prefix, seq)`
/// name the restored state.
fn copy_into(
    from: &Path,
    mut conn: Connection,
    path: &Path,
    (prefix, seq): (&str, u64),
) -> Result<Connection> {
    let sql = |at: &Path| {
        let at = at.to_path_buf();
        move |source| Error::Sqlite { path: at, source }
    };
    let page_size = |c: &Connection, schema: &str| {
        c.query_row(&format!("PRAGMA {schema}.page_size"), [], |r| {
            r.get::<_, u32>(0)
        })
    };
    conn.execute("ATTACH DATABASE ?1 AS fresh", [from.to_string_lossy()])
        .map_err(sql(from))?;
    let copied = (|| {
        let found = page_size(&conn, "fresh").map_err(sql(from))?;
        let expected = page_size(&conn, "main").map_err(sql(path))?;
        // SQLite cannot change the page size of a database in WAL mode.
        if found != expected {
            return Err(Error::NewPageSize {
                prefix: prefix.to_string(),
                seq,
                found,
                expected,
            });
        }
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path))?;
        tx.execute(
            "INSERT INTO main.sqlite_dbpage(pgno, data) \
             SELECT pgno, data FROM sqlite_dbpage('fresh') WHERE pgno != ?1",
            [lock_page(found)],
        )
        .map_err(sql(path))?;
        let pages = |schema: &str| {
            tx.query_row(&format!("PRAGMA {schema}.page_count"), [], |r| {
                r.get::<_, u32>(0)
            })
        };
        let (now, restored) = (
            pages("main").map_err(sql(path))?,
            pages("fresh").map_err(sql(from))?,
        );
        if now > restored {
            tx.execute(
                "INSERT INTO main.sqlite_dbpage(pgno, data) VALUES (?1, NULL)",
                [restored + 1],
            )
            .map_err(sql(path))?;
        }
        tx.commit().map_err(sql(path))
    })();
    let detached = conn.execute("DETACH DATABASE fresh", []).map_err(sql(from));
    copied?;
    detached?;
    Ok(conn)
}

/// Waits `wait`; true if `stop` came first.
async fn stopped_within(stop: &CancellationToken, wait: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(wait) => false,
    }
}

type Fetched = (ObjectRef, Header, [u8; 32], File);

/// Object `seq`, verified, if storage has it (a WAL segment or a snapshot).
/// Where several objects claim `seq` (a fork), the one that links to
/// `prev_hash`; the first layout's keys are tried only while `legacy_too`
/// (until an object in today's layout has been applied: a chain never goes
/// back to the old keys), so an idle poll costs one request.
async fn fetch(
    storage: &dyn Storage,
    prefix: &str,
    seq: u64,
    prev_hash: [u8; 32],
    legacy_too: bool,
) -> Result<Option<Fetched>> {
    let mut keys = vec![segment::object_key(prefix, seq)];
    if legacy_too {
        keys.push(segment::legacy_object_key(prefix, seq, Kind::Wal));
        keys.push(segment::legacy_object_key(prefix, seq, Kind::Snapshot));
    }
    let mut unlinked = None;
    for key in keys {
        let kind = match segment::parse_object_name(key.rsplit('/').next().unwrap_or_default()) {
            Some(segment::Name::Legacy(_, kind)) => kind,
            _ => Kind::Wal,
        };
        let object = ObjectRef {
            key,
            seq,
            kind,
            size: 0,
            mark: None,
        };
        match chain::read_verified(storage, &object).await {
            Ok((header, hash, file)) if header.prev_hash == prev_hash => {
                return Ok(Some((object, header, hash, file)));
            }
            Ok(fetched) => {
                unlinked.get_or_insert((object, fetched.0, fetched.1, fetched.2));
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(unlinked)
}

/// When the next object is missing but the chain went on, the way on from
/// `pos` to the head: through the runs that stand for objects deleted after
/// the exact window, or (where retention deleted what this replica had not
/// applied yet) from the first later snapshot. Empty if nothing is newer.
async fn continue_after_gap(
    storage: &dyn Storage,
    prefix: &str,
    pos: Position,
) -> Result<Vec<ObjectRef>> {
    // The branch restore would follow: a snapshot on a forked-off branch
    // would not link to anything after it; runs are not used through a fork.
    let (mut listed, runs) = chain::list_with_runs(storage, prefix).await?;
    chain::find_unmarked_start(storage, &mut listed).await?;
    let branch = crate::fork::follow(storage, listed).await?;
    let runs = if branch.left.is_empty() {
        runs
    } else {
        Vec::new()
    };
    let objects = branch.objects;
    let Some(head) = objects.last().map(|o| o.seq) else {
        return Ok(Vec::new());
    };
    if head < pos.seq {
        return Err(Error::Behind {
            prefix: prefix.to_string(),
            head,
            seq: pos.seq,
        });
    }
    if head == pos.seq || objects.iter().any(|o| o.seq == pos.seq + 1) {
        return Ok(Vec::new());
    }
    if let Ok(path) = chain::cover(&objects, &runs, pos.seq + 1, head) {
        info!(
            prefix,
            from = pos.seq + 1,
            to = head,
            objects = path.len(),
            "the next objects were compacted into runs; going on through them"
        );
        return Ok(path);
    }
    let Some(snapshot) = objects
        .iter()
        .find(|o| o.seq > pos.seq && o.kind == Kind::Snapshot)
    else {
        return Err(Error::Gap {
            prefix: prefix.to_string(),
            next: pos.seq + 1,
        });
    };
    warn!(
        prefix,
        from = pos.seq + 1,
        to = snapshot.seq - 1,
        "objects were deleted before this replica applied them; continuing from the next snapshot"
    );
    let rest = chain::cover(&objects, &runs, snapshot.seq + 1, head).unwrap_or_default();
    Ok(std::iter::once(snapshot.clone()).chain(rest).collect())
}

fn open_replica(path: &Path) -> Result<Connection> {
    let sql = |source| Error::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE).map_err(sql)?;
    // Readers hold the file briefly; a write waits for them rather than failing.
    conn.busy_timeout(Duration::from_secs(30)).map_err(sql)?;
    // A copy restored in place puts the whole database through its WAL in
    // one transaction; without a limit that file keeps the database's size
    // for good once checkpointed. With it, SQLite cuts the WAL back when it
    // next starts over.
    conn.pragma_update(None, "journal_size_limit", COPY_WAL_LIMIT)
        .map_err(sql)?;
    Ok(conn)
}

/// What a followed copy's WAL is cut back to when SQLite starts it over.
const COPY_WAL_LIMIT: i64 = 64 << 20;

/// The record beside a followed file, if it describes `pos` and its pages
/// sum to its own digest; otherwise none is kept (and a stale one removed).
fn follow_record(path: &Path, pos: Position) -> Option<Record> {
    let head = state::Head {
        seq: pos.seq,
        hash: pos.hash,
    };
    let mut record = Record::open(path).ok().flatten()?;
    let digest = record.digest();
    match record.check(head, &digest) {
        Ok(()) => Some(record),
        Err(why) => {
            info!(record = %path.display(), why, "not keeping the state record of this replica");
            let _ = state::forget(path);
            None
        }
    }
}

/// Applies one verified object in one transaction, on the blocking pool,
/// checking the state after it against the digest the object records (where
/// the record of the state before it is at hand) before committing.
async fn apply(
    conn: Connection,
    path: &Path,
    object: &ObjectRef,
    (header, hash): (&Header, [u8; 32]),
    file: File,
    keys: Option<Arc<Keys>>,
    record: Option<Record>,
) -> Result<(Connection, Option<Record>)> {
    let page_size = {
        let size: u32 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(|source| Error::Sqlite {
                path: path.to_path_buf(),
                source,
            })?;
        size
    };
    if header.page_size != page_size {
        return Err(Error::PageSize {
            key: object.key.clone(),
            found: header.page_size,
            expected: page_size,
        });
    }
    let mut conn = conn;
    let expected = header.state;
    let head = state::Head {
        seq: header.seq,
        hash,
    };
    let (conn, result) = tokio::task::spawn_blocking(move || {
        let mut record = record;
        let result = apply_pages(
            &mut conn,
            file,
            keys.as_deref(),
            &mut record,
            expected,
            head,
        );
        (conn, result.map(|()| record))
    })
    .await
    .map_err(|e| Error::Apply {
        key: object.key.clone(),
        path: path.to_path_buf(),
        source: ApplyError::Io(io::Error::other(e)),
    })?;
    let record = result.map_err(|source| Error::Apply {
        key: object.key.clone(),
        path: path.to_path_buf(),
        source,
    })?;
    info!(key = %object.key, pages = header.page_count, db_pages = header.db_pages, "applied");
    Ok((conn, record))
}

fn apply_pages(
    conn: &mut Connection,
    file: File,
    keys: Option<&Keys>,
    record: &mut Option<Record>,
    expected: Option<state::Digest>,
    head: state::Head,
) -> Result<(), ApplyError> {
    let len = file.metadata()?.len();
    let mut reader = PageReader::new(BufReader::with_capacity(1 << 20, file), len, keys)?;
    let header = *reader.header();
    let mut hashes = Vec::new();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut insert = tx.prepare("INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, ?2)")?;
        let mut page = vec![0u8; header.page_size as usize];
        let lock_page = lock_page(header.page_size);
        while let Some(pgno) = reader.next_page(&mut page)? {
            if record.is_some() {
                hashes.push((pgno, page_hash(pgno, &page)));
            }
            if u64::from(pgno) != lock_page {
                insert.execute(params![pgno, page])?;
            }
        }
        // Pages past the new end (freed by a VACUUM) go; a NULL insert
        // truncates, and must come after every page write.
        let pages: u32 = tx.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        if pages > header.db_pages {
            insert.execute(params![header.db_pages + 1, rusqlite::types::Null])?;
        }
    }
    let after = match record.as_ref().map(|r| r.advance(header.db_pages, &hashes)) {
        Some(Ok(sum)) => Some(sum),
        Some(Err(e)) => {
            warn!(error = %e, "the state record of this replica cannot be read; not keeping it");
            if let Some(r) = record.take() {
                let _ = state::forget(r.path());
            }
            None
        }
        None => None,
    };
    if let (Some(sum), Some(expected)) = (after, expected)
        && sum.digest() != expected
    {
        // Dropping the transaction rolls every page of it back.
        return Err(ApplyError::StateMismatch);
    }
    tx.commit()?;
    if let (Some(sum), Some(r)) = (after, record.as_mut())
        && let Err(e) = r.apply(sum, &hashes, head)
    {
        warn!(error = %e, "the state record of this replica cannot be written; not keeping it");
        let _ = state::forget(r.path());
        *record = None;
    }
    Ok(())
}

fn read_position(path: &Path, prefix: &str) -> Result<Option<Position>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::Position {
                path: path.to_path_buf(),
                message: e.to_string(),
            });
        }
    };
    parse_position(&text, path, prefix).map(Some)
}

/// The position file's text (`prefix = `, `seq = `, `hash = `, `key = `
/// lines), as read from `path`, for `prefix`.
pub fn parse_position(text: &str, path: &Path, prefix: &str) -> Result<Position> {
    let bad = |what: &str| Error::Position {
        path: path.to_path_buf(),
        message: format!("{what}; remove it and restore afresh with --force"),
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(" = "))
            .ok_or_else(|| bad(&format!("no {name}")))
    };
    let found = field("prefix")?;
    if found != prefix {
        return Err(Error::OtherPrefix {
            path: path.to_path_buf(),
            found: found.to_string(),
            expected: prefix.to_string(),
        });
    }
    let seq = field("seq")?.parse().map_err(|_| bad("bad seq"))?;
    let hash = from_hex::<32>(field("hash")?).ok_or_else(|| bad("bad hash"))?;
    let key_id = match field("key")? {
        "none" => None,
        id => Some(KeyId(from_hex::<8>(id).ok_or_else(|| bad("bad key"))?)),
    };
    let file = match field("file") {
        Err(_) => None,
        Ok(id) => {
            let (dev, ino) = id.split_once(':').ok_or_else(|| bad("bad file"))?;
            Some((
                dev.parse().map_err(|_| bad("bad file"))?,
                ino.parse().map_err(|_| bad("bad file"))?,
            ))
        }
    };
    Ok(Position {
        seq,
        hash,
        key_id,
        file,
    })
}

/// Replaces the position file atomically and durably (a power cut must not
/// leave an empty one behind).
fn write_position(path: &Path, prefix: &str, pos: Position) -> Result<()> {
    let err = |e: io::Error| Error::Position {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let key = pos.key_id.map_or("none".to_string(), |id| id.to_string());
    let mut text = format!(
        "# where `walsync restore --follow` stands; written after each object\n\
         prefix = {prefix}\nseq = {}\nhash = {}\nkey = {key}\n",
        pos.seq,
        to_hex(&pos.hash)
    );
    if let Some((dev, ino)) = pos.file {
        text.push_str(&format!("file = {dev}:{ino}\n"));
    }
    // Written to a new file of our own, then renamed over the position: a
    // link at a guessable temp name is never written through.
    let mut tmp = crate::sidefile::temp_beside(path, "tmp").map_err(err)?;
    io::Write::write_all(&mut tmp, text.as_bytes()).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::{Encoder, WalRange};

    /// A transaction as large as an in-place restore leaves the copy's WAL
    /// that large; once checkpointed, the next write cuts it back to the
    /// limit instead of keeping the database's size beside it for good.
    #[test]
    fn the_copys_wal_is_cut_back_after_a_large_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy.db");
        let app = Connection::open(&path).unwrap();
        app.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t(x BLOB);")
            .unwrap();
        drop(app);
        let conn = open_replica(&path).unwrap();
        conn.execute(
            "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 25000) \
             INSERT INTO t SELECT randomblob(4000) FROM c",
            [],
        )
        .unwrap();
        let wal = dir.path().join("copy.db-wal");
        let size = || std::fs::metadata(&wal).unwrap().len();
        assert!(size() > COPY_WAL_LIMIT as u64, "{}", size());
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .unwrap();
        conn.execute("INSERT INTO t VALUES (x'00')", []).unwrap();
        assert!(size() <= COPY_WAL_LIMIT as u64, "{}", size());
    }

    /// A database past 1 GiB has a lock-byte page that snapshots carry as
    /// zeros; SQLite refuses to write it, so following must skip it.
    #[test]
    fn the_lock_byte_page_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA page_size = 65536; PRAGMA journal_mode = WAL; CREATE TABLE t(x);",
        )
        .unwrap();
        let page_size = 65536u32;
        let lock_page = (PENDING_BYTE / u64::from(page_size) + 1) as u32;
        let header = Header {
            version: crate::segment::VERSION,
            state: None,
            kind: Kind::Wal,
            page_size,
            seq: 2,
            db_pages: lock_page + 1,
            page_count: 3,
            timestamp_ms: 0,
            wal: WalRange::default(),
            prev_hash: [0; 32],
            sealed: None,
            run: None,
        };
        // Page 1 records the new size, as SQLite's own commits do.
        let mut first: Vec<u8> = conn
            .query_row("SELECT data FROM sqlite_dbpage WHERE pgno = 1", [], |r| {
                r.get(0)
            })
            .unwrap();
        first[28..32].copy_from_slice(&(lock_page + 1).to_be_bytes());
        let mut enc = Encoder::new(header, None, Vec::new()).unwrap();
        enc.add_page(1, &first).unwrap();
        let zeros = vec![0u8; page_size as usize];
        enc.add_page(lock_page, &zeros).unwrap();
        enc.add_page(lock_page + 1, &zeros).unwrap();
        let (_, bytes) = enc.finish(None).unwrap();
        let object = dir.path().join("object");
        std::fs::write(&object, bytes).unwrap();

        let mut conn = conn;
        let head = state::Head {
            seq: 1,
            hash: [0; 32],
        };
        apply_pages(
            &mut conn,
            File::open(&object).unwrap(),
            None,
            &mut None,
            None,
            head,
        )
        .unwrap();
        let pages: u32 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        assert_eq!(pages, lock_page + 1);
    }
}
