//! Rebuilds a database file from its chain in storage.
//!
//! Restore never writes to the target first. It picks the newest snapshot at
//! or before the target sequence, downloads every object of the plan into a
//! scratch directory beside the output, and verifies each one (trailer hash,
//! header against key, link to the previous object, page size) before a
//! single page is written. Only then does it apply the pages into a temp
//! file of its own beside `FILE` (`.FILE.walsync-tmp-XXXXXX`, created
//! exclusively), fsync it, run `PRAGMA integrity_check`, and rename it over
//! `FILE`. A failed restore leaves any existing `FILE` untouched; a second
//! restore to the same `FILE` meanwhile is refused.

pub mod follow;
mod page_hashes;
pub(crate) mod sidefile;
pub mod verify;

use std::fs::File;
use std::io::{self, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;

use std::sync::Arc;

use crate::chain::{self, ObjectRef};
use crate::encryption::{KeyId, Keys};
use crate::fork::{self, Branch};
use crate::link;
use crate::segment::{self, Kind, PageReader};
use crate::state::{self, Record};
use crate::storage::{self, Storage, to_hex};
use page_hashes::{Batch, Hasher};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path} already exists; pass --force to replace it")]
    OutputExists { path: PathBuf },
    #[error(
        "{path} is in use (its WAL could not be checkpointed); stop the app using it, then restore again"
    )]
    InUse { path: PathBuf },
    #[error(
        "{path} has a WAL beside it that cannot be checkpointed into it ({reason}); \
         nothing was changed: move both away, or fix that, then restore again"
    )]
    WalNotCheckpointable { path: PathBuf, reason: String },
    #[error(
        "object {key} declares a database of {declared} bytes, more than the {free} bytes free \
         beside the output: refusing it"
    )]
    TooLarge {
        key: String,
        declared: u64,
        free: u64,
    },
    #[error(
        "object {key} declares {declared} pages but its page 1 says the database has {says}: \
         refusing it"
    )]
    SizeMismatch {
        key: String,
        declared: u32,
        says: u32,
    },
    #[error("another restore to {path} is running; wait for it to finish")]
    Busy { path: PathBuf },
    #[error("no replica found under prefix {prefix:?} in {storage}")]
    NoReplica { prefix: String, storage: String },
    #[error("sequence {target} is past the newest object of {prefix:?} (sequence {head})")]
    BeyondHead {
        prefix: String,
        target: u64,
        head: u64,
    },
    #[error("no snapshot of {prefix:?} at or before sequence {target}")]
    NoSnapshot { prefix: String, target: u64 },
    #[error("{prefix:?} has no restore point at or before {at}; the earliest is {earliest}")]
    BeforeEarliest {
        prefix: String,
        at: String,
        earliest: String,
        /// The earliest is the chain's very first object: the database was
        /// not replicated yet at that time (rather than pruned by retention).
        not_yet_replicated: bool,
    },
    #[error(
        "sequence {target} of {prefix:?} can no longer be restored exactly: the objects around \
         it were older than the exact window and were replaced by runs; the nearest sequences \
         that can be restored are {before} and {after}"
    )]
    NotExact {
        prefix: String,
        target: u64,
        before: String,
        after: String,
    },
    #[error("object {key} is missing from the chain (the chain jumps from {before} to {after})")]
    Missing {
        key: String,
        before: String,
        after: String,
    },
    #[error(transparent)]
    Link(#[from] link::Error),
    #[error(
        "object {key}: the database restored up to it is not the state its writer recorded \
         (its state digest differs); refusing it"
    )]
    StateMismatch { key: String },
    #[error("object {key}: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: segment::Error,
    },
    #[error(transparent)]
    Chain(#[from] chain::Error),
    #[error(transparent)]
    Storage(#[from] storage::Error),
    #[error("restored file failed PRAGMA integrity_check: {0}")]
    Integrity(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("downloading object {key} into {path}: {source}")]
    Spool {
        key: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("checking the restored file: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub prefix: String,
    pub output: PathBuf,
    pub target: Target,
    pub force: bool,
    /// Opens encrypted objects (chosen by the key id in each header).
    pub keys: Option<Arc<Keys>>,
    /// Objects fetched at once.
    pub parallelism: usize,
}

/// Objects one restore fetches at once unless told otherwise: enough to hide
/// a store's first-byte latency, few enough to stay polite.
pub const FETCH_PARALLELISM: usize = 8;

/// Which state of the database to rebuild.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// The newest state in storage.
    #[default]
    Latest,
    /// The state as of this sequence number.
    Seq(u64),
    /// The newest state walsync had read from the WAL at or before this
    /// instant (milliseconds since the Unix epoch), by the time recorded in
    /// each object's header, not the storage's upload time.
    Time(u64),
}

/// What a restore will download: `objects` applied in order reach `seq`.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub objects: Vec<ObjectRef>,
    /// The object before the first one, if storage still holds it: the
    /// first must link to it.
    pub before: Option<ObjectRef>,
    pub seq: u64,
    pub bytes: u64,
    /// Where the chain forks, the branch followed and the objects left off.
    pub fork: Option<Branch>,
}

/// Lists the chain and picks the objects that reach `target` (a time target
/// reads a few object headers; a fork, the ends of the objects around it).
/// Nothing is downloaded whole or written.
pub async fn resolve(storage: &dyn Storage, prefix: &str, target: Target) -> Result<Resolved> {
    let (mut listed, runs) = chain::list_with_runs(storage, prefix).await?;
    chain::find_unmarked_start(storage, &mut listed).await?;
    let forked = !chain::forks(&listed).is_empty();
    let branch = fork::follow(storage, listed).await?;
    let objects = branch.objects.clone();
    let fork = forked.then_some(branch);
    if objects.is_empty() {
        return Err(Error::NoReplica {
            prefix: prefix.to_string(),
            storage: storage.describe(),
        });
    }
    // Through a fork the branch is chosen object by object: no runs there.
    let runs = if fork.is_none() { runs } else { Vec::new() };
    let seq = match target {
        Target::Latest => None,
        Target::Seq(seq) => Some(seq),
        Target::Time(ms) => Some(seq_at(storage, prefix, &objects, &runs, ms).await?),
    };
    let planned = plan(prefix, &objects, &runs, seq)?;
    let Some(last) = planned.last() else {
        return Err(Error::NoReplica {
            prefix: prefix.to_string(),
            storage: storage.describe(),
        });
    };
    let before = objects
        .iter()
        .find(|o| o.seq + 1 == planned[0].seq)
        .cloned();
    Ok(Resolved {
        before,
        seq: last.seq,
        bytes: planned.iter().map(|o| o.size).sum(),
        objects: planned,
        fork,
    })
}

/// The newest sequence recorded at or before `ms`. Object times rise along
/// the chain, so a binary search over headers finds it in a few reads; only
/// the ends of objects and runs from the first snapshot on can be restored
/// at all (where objects older than the exact window are gone, the ends of
/// the runs that stood for them are the points left).
async fn seq_at(
    storage: &dyn Storage,
    prefix: &str,
    objects: &[ObjectRef],
    runs: &[(u64, ObjectRef)],
    ms: u64,
) -> Result<u64> {
    let first = objects
        .iter()
        .find(|o| o.kind == Kind::Snapshot)
        .ok_or_else(|| Error::NoSnapshot {
            prefix: prefix.to_string(),
            target: objects.last().map_or(0, |o| o.seq),
        })?
        .seq;
    let usable = chain::restore_points(objects, runs, first);
    let earliest = chain::read_header(storage, usable[0]).await?.timestamp_ms;
    if earliest > ms {
        return Err(Error::BeforeEarliest {
            prefix: prefix.to_string(),
            at: format_ms(ms),
            earliest: format!("{} (sequence {})", format_ms(earliest), usable[0].seq),
            not_yet_replicated: usable[0].seq == 1,
        });
    }
    // Invariant: usable[lo] is at or before `ms`; everything from `hi` on is after it.
    let (mut lo, mut hi) = (0, usable.len());
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if chain::read_header(storage, usable[mid]).await?.timestamp_ms <= ms {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(usable[lo].seq)
}

/// An RFC 3339 time in UTC with milliseconds, as printed everywhere.
pub fn format_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub seq: u64,
    pub objects: usize,
    pub bytes: u64,
    pub db_pages: u32,
    pub page_size: u32,
    pub timestamp_ms: u64,
    /// The content hash of the newest object applied: the next one links to it.
    pub hash: [u8; 32],
    /// The key the newest object was sealed with, if encrypted.
    pub key_id: Option<KeyId>,
    /// Set when the chain forks: the branch restored and the objects left off.
    pub fork: Option<Branch>,
}

/// The objects a restore to `target` needs, snapshot first, then the way
/// from it through `runs` and `objects` (see [`chain::cover`]): a few runs
/// for a long chain. Checks only keys.
pub fn plan(
    prefix: &str,
    objects: &[ObjectRef],
    runs: &[(u64, ObjectRef)],
    target: Option<u64>,
) -> Result<Vec<ObjectRef>> {
    let Some(head) = objects.last() else {
        return Err(Error::NoReplica {
            prefix: prefix.to_string(),
            storage: String::new(),
        });
    };
    // The newest object is never deleted (a writer links to it), so no run
    // ends past it.
    let target = target.unwrap_or(head.seq);
    if target > head.seq {
        return Err(Error::BeyondHead {
            prefix: prefix.to_string(),
            target,
            head: head.seq,
        });
    }
    let start = objects
        .iter()
        .rposition(|o| o.kind == Kind::Snapshot && o.seq <= target)
        .ok_or_else(|| Error::NoSnapshot {
            prefix: prefix.to_string(),
            target,
        })?;
    let snapshot = &objects[start];
    let ends: Vec<u64> = chain::restore_points(objects, runs, snapshot.seq)
        .iter()
        .map(|o| o.seq)
        .collect();
    let compacted = runs.iter().any(|(f, r)| (*f..=r.seq).contains(&target));
    if let (Err(at), true) = (ends.binary_search(&target), compacted) {
        let name = |seq: Option<&u64>| seq.map_or_else(|| "none".to_string(), u64::to_string);
        return Err(Error::NotExact {
            prefix: prefix.to_string(),
            target,
            before: name(at.checked_sub(1).and_then(|i| ends.get(i))),
            after: name(ends.get(at)),
        });
    }
    match chain::cover(&objects[start + 1..], runs, snapshot.seq + 1, target) {
        Ok(rest) => Ok(std::iter::once(snapshot.clone()).chain(rest).collect()),
        Err(missing) => {
            let before = objects
                .iter()
                .rev()
                .find(|o| o.seq < missing)
                .map_or_else(|| snapshot.key.clone(), |o| o.key.clone());
            let after = objects
                .iter()
                .find(|o| o.seq > missing && o.seq <= target)
                .map_or_else(|| "the requested sequence".to_string(), |o| o.key.clone());
            Err(Error::Missing {
                key: key_like(prefix, snapshot, missing),
                before,
                after,
            })
        }
    }
}

/// The key object `seq` would have in the layout of `neighbour`.
fn key_like(prefix: &str, neighbour: &ObjectRef, seq: u64) -> String {
    if neighbour.is_legacy() {
        segment::legacy_object_key(prefix, seq, Kind::Wal)
    } else {
        segment::object_key(prefix, seq)
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How a restore's scratch directory for `output` starts: named for the
/// output, so that the restore holding the output's lock (one at a time)
/// knows that any other directory of that name was left by a restore that
/// was killed, and removes it (it may hold links that keep deleted objects'
/// space in use, or a copy of a whole snapshot).
pub fn scratch_prefix(output: &Path) -> String {
    use sha2::Digest;
    let name = output
        .file_name()
        .map(|n| n.as_encoded_bytes())
        .unwrap_or_default();
    let digest = sha2::Sha256::digest(name);
    format!(".walsync-restore-{}-", to_hex(&digest[..6]))
}

/// The random part of a scratch directory's name, after [`scratch_prefix`].
pub const SCRATCH_RANDOM: usize = 6;

/// Removes the scratch directories an earlier restore to this output left
/// (killed before it could). Only names of exactly this shape, only
/// directories (never through a link); what cannot be removed is logged and
/// left: the restore itself does not depend on it.
fn remove_stale_scratch(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(prefix) || name.len() != prefix.len() + SCRATCH_RANDOM {
            continue;
        }
        // The entry's own type: a link to a directory is not followed.
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::info!(
                path = %path.display(),
                "removed the scratch directory of an earlier restore to this file that did not finish"
            ),
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "cannot remove the scratch directory of an earlier restore to this file"
            ),
        }
    }
}

/// [`remove_stale_scratch`] for `output`, off the async workers: a stale copy
/// of a large snapshot takes a while to remove, and restore-all's other
/// restores share them. Only for a holder of the output's `TargetLock`.
pub async fn remove_stale_scratch_of(output: &Path) {
    let (dir, prefix) = (sidefile::dir_of(output), scratch_prefix(output));
    let _ = tokio::task::spawn_blocking(move || remove_stale_scratch(&dir, &prefix)).await;
}

/// A new scratch directory beside `output`, after removing those a killed
/// restore (or follower) left. Only for a holder of the output's `TargetLock`.
pub async fn scratch_dir(output: &Path) -> io::Result<tempfile::TempDir> {
    remove_stale_scratch_of(output).await;
    tempfile::Builder::new()
        .prefix(&scratch_prefix(output))
        .rand_bytes(SCRATCH_RANDOM)
        .tempdir_in(sidefile::dir_of(output))
}

/// Restores `opts.prefix` from `storage` into `opts.output`.
pub async fn restore(storage: &dyn Storage, opts: &RestoreOptions) -> Result<RestoreReport> {
    restore_then(storage, opts, |_, _| Ok(())).await
}

/// [`restore`], calling `before_place` with the report and the finished,
/// checked temp file just before it is moved into place (the same file, so
/// the same inode, once there): a live copy records where it stands before
/// its file can be seen, so no crash leaves a file it cannot go on from.
pub async fn restore_then(
    storage: &dyn Storage,
    opts: &RestoreOptions,
    before_place: impl FnOnce(&RestoreReport, &Path) -> io::Result<()> + Send + 'static,
) -> Result<RestoreReport> {
    let output = &opts.output;
    if !opts.force && output.exists() {
        return Err(Error::OutputExists {
            path: output.clone(),
        });
    }
    let mut resolved = resolve(storage, &opts.prefix, opts.target).await?;
    let dir = sidefile::dir_of(output);
    std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
    // One restore to a file at a time: a second is told at once, instead of
    // racing the first to the rename.
    let lock = sidefile::TargetLock::try_acquire(output)
        .map_err(io_at(output))?
        .ok_or_else(|| Error::Busy {
            path: output.clone(),
        })?;
    let scratch = scratch_dir(output).await.map_err(io_at(&dir))?;

    // 1. Download and verify everything before writing a page. An object
    // deleted since the listing (the exact window moved past it) sends the
    // restore back to the listing once: runs stand for what went.
    let (verified, link, bytes) = match fetch_all(storage, opts, &resolved, scratch.path()).await {
        Err(e) if is_gone(&e) => {
            tracing::info!(prefix = %opts.prefix, error = %e, "an object went during the restore; planning it again");
            resolved = resolve(storage, &opts.prefix, opts.target).await?;
            fetch_all(storage, opts, &resolved, scratch.path()).await?
        }
        other => other?,
    };

    // 2. Apply into a temp file beside the output, check it, rename it into place.
    let Some(last) = verified.last() else {
        return Err(Error::NoReplica {
            prefix: opts.prefix.clone(),
            storage: storage.describe(),
        });
    };
    let report = RestoreReport {
        seq: last.header.seq,
        objects: verified.len(),
        bytes,
        db_pages: last.header.db_pages,
        page_size: last.header.page_size,
        timestamp_ms: last.header.timestamp_ms,
        hash: link.unwrap_or([0; 32]),
        key_id: last.header.sealed.map(|s| s.key_id),
        fork: resolved.fork.clone(),
    };
    if let Some(branch) = &report.fork {
        tracing::warn!(prefix = %opts.prefix, "{}", branch.describe());
    }
    let output = output.clone();
    let force = opts.force;
    let keys = opts.keys.clone();
    let items: Vec<Item> = verified
        .into_iter()
        .map(|v| Item {
            key: v.object.key,
            spool: v.spool,
            hash: v.hash,
            state: v.header.state,
        })
        .collect();
    let destination = state::destination(&storage.describe(), &opts.prefix);
    let reported = report.clone();
    let before_place = move |tmp: &Path| before_place(&reported, tmp);
    tokio::task::spawn_blocking(move || {
        apply(
            &items,
            &output,
            force,
            keys.as_deref(),
            &destination,
            before_place,
        )
    })
    .await
    .map_err(|e| Error::Io {
        path: opts.output.clone(),
        source: io::Error::other(e),
    })??;
    drop(scratch);
    drop(lock);
    Ok(report)
}

/// Downloads every object of `resolved` into `scratch` and verifies each
/// (trailer, key, link to the one before, encryption, page size) before
/// anything is written. Returns them with the hash the newest hands on and
/// the bytes read.
async fn fetch_all(
    storage: &dyn Storage,
    opts: &RestoreOptions,
    resolved: &Resolved,
    scratch: &Path,
) -> Result<(Vec<Verified>, Option<[u8; 32]>, u64)> {
    // A snapshot starts the chain, but where the object before it still
    // exists the snapshot must link to it too: a snapshot of another database renamed
    // into this prefix is refused.
    let mut successor = link::Successor::default();
    if let Some(before) = &resolved.before {
        let (_, hash, _) = chain::read_verified(storage, before).await?;
        successor = link::Successor::after(before.key.clone(), hash, None);
    }
    let mut verified: Vec<Verified> = Vec::with_capacity(resolved.objects.len());
    let mut bytes = 0u64;
    let spool_dir = scratch.to_path_buf();
    // Objects are fetched and decoded several at a time, in chain order;
    // the links between them are checked below, one after another.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let fetched = futures_util::stream::iter(resolved.objects.clone().into_iter().map(|object| {
        let (stop, spool_dir) = (&stop, &spool_dir);
        async move {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(Error::Io {
                    path: spool_dir.clone(),
                    source: io::Error::other("not fetched: the restore failed"),
                });
            }
            fetch_checked(storage, spool_dir, object).await
        }
    }))
    .buffered(opts.parallelism.max(1));
    let mut fetched = std::pin::pin!(fetched);
    let checked: Result<()> = async {
        while let Some(next) = fetched.next().await {
            let (object, header, hash, spool) = next?;
            // A missing or wrong key is found before anything is written.
            header
                .key(opts.keys.as_deref())
                .map_err(|source| Error::Corrupt {
                    key: object.key.clone(),
                    source,
                })?;
            let hash = successor.accept(&object.key, &header, hash)?;
            bytes += object.size;
            verified.push(Verified {
                object,
                header,
                hash,
                spool,
            });
        }
        Ok(())
    }
    .await;
    if let Err(e) = checked {
        // Downloads already under way write their spool files from tokio's
        // blocking threads even once dropped: let them end before the
        // scratch directory goes, or one lands in it after its removal.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        while fetched.next().await.is_some() {}
        return Err(e);
    }

    Ok((verified, successor.hash(), bytes))
}

/// Whether `e` says an object was not there: one deleted between the
/// listing and the download (compacted after the exact window meanwhile).
fn is_gone(e: &Error) -> bool {
    match e {
        Error::Storage(storage::Error::NotFound { .. }) => true,
        Error::Chain(e) => e.is_not_found(),
        _ => false,
    }
}

/// An object downloaded and checked, waiting to be applied.
struct Verified {
    object: ObjectRef,
    header: segment::Header,
    hash: [u8; 32],
    spool: PathBuf,
}

/// What applying one object needs.
struct Item {
    key: String,
    spool: PathBuf,
    hash: [u8; 32],
    /// The state digest the object says the database has after it.
    state: Option<state::Digest>,
}

/// Downloads one object into `scratch` and checks it on its own: its
/// checksums, and that its header matches its key.
async fn fetch_checked(
    storage: &dyn Storage,
    scratch: &Path,
    object: ObjectRef,
) -> Result<(ObjectRef, segment::Header, [u8; 32], PathBuf)> {
    let spool = scratch.join(format!("{:016x}", object.seq));
    // A plan made again after an object went (see `is_gone`) fetches into
    // the same directory: an earlier attempt's file may be a link to the
    // store's own object, which must never be written to.
    match std::fs::remove_file(&spool) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at(&spool)(e)),
    }
    let spooling = |e| match e {
        chain::Error::Local { key, source } => Error::Spool {
            key,
            path: spool.clone(),
            source,
        },
        e => Error::Chain(e),
    };
    let (header, hash) = match link_local(storage, &object.key, &spool)? {
        true => verify_file(&object.key, &spool).await?,
        false => {
            // Read too: a download in parts is hashed back from the file.
            let mut out = tokio::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&spool)
                .await
                .map_err(io_at(&spool))?;
            if object.size >= chain::PARTS_FROM && storage.local_path(&object.key).is_none() {
                let out = out.into_std().await;
                let split = chain::Split::for_size(object.size);
                chain::download(storage, &object.key, object.size, out, split)
                    .await
                    .map_err(spooling)?
            } else {
                chain::copy_object(storage, &object.key, &mut out)
                    .await
                    .map_err(spooling)?
            }
        }
    };
    chain::check_key(&object, &header)?;
    Ok((object, header, hash, spool))
}

/// Links an object of a store on this machine into the scratch directory:
/// no copy to write, and the link keeps it readable if retention deletes
/// it meanwhile. `false` where the store is remote or the link cannot be
/// made (another filesystem, say): the object is downloaded instead.
fn link_local(storage: &dyn Storage, key: &str, spool: &Path) -> Result<bool> {
    let Some(path) = storage.local_path(key) else {
        return Ok(false);
    };
    match std::fs::hard_link(&path, spool) {
        Ok(()) => Ok(true),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound && spool.parent().is_some_and(Path::exists) =>
        {
            Err(Error::Storage(storage::Error::NotFound {
                key: key.to_string(),
            }))
        }
        Err(e) => {
            tracing::debug!(key, error = %e, "cannot link the object; copying it");
            Ok(false)
        }
    }
}

/// Reads a whole object file once, checking it as [`chain::copy_object`]
/// checks a download.
async fn verify_file(key: &str, path: &Path) -> Result<(segment::Header, [u8; 32])> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<_> {
        let file = File::open(&owned).map_err(io_at(&owned))?;
        let len = file.metadata().map_err(io_at(&owned))?.len();
        Ok(segment::verify(file, len))
    })
    .await
    .map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: io::Error::other(e),
    })??
    .map_err(|source| Error::Corrupt {
        key: key.to_string(),
        source,
    })
}

fn apply(
    items: &[Item],
    output: &Path,
    force: bool,
    keys: Option<&Keys>,
    destination: &str,
    before_place: impl FnOnce(&Path) -> io::Result<()>,
) -> Result<()> {
    // A new file of our own, never one someone put at a name we chose.
    let tmp_file = sidefile::temp_beside(output, "tmp").map_err(io_at(output))?;
    let tmp = tmp_file.path().to_path_buf();
    let tmp_record = state::record_path(&tmp, destination);
    let result = apply_into(items, tmp_file.as_file(), &tmp, &tmp_record, keys)
        .and_then(|record| check_integrity(&tmp).map(|()| record))
        .and_then(|record| {
            before_place(&tmp).map_err(io_at(&tmp))?;
            place(&tmp, output, force).map(|()| record)
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp_record);
    }
    // Gone already if placed; removed here if not.
    drop(tmp_file);
    // The record of what was written lets the first `watch` continue the
    // chain without shipping anything; a record of what the file held before
    // would only be a stale one.
    let record_path = state::record_path(output, destination);
    match result? {
        Some(mut record) => record.rename(&record_path).map_err(io_at(&record_path))?,
        None => state::forget(&record_path).map_err(io_at(&record_path))?,
    }
    let dir = sidefile::dir_of(output);
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(&dir))?;
    Ok(())
}

/// Moves the checked file into place. Without `force` it must not replace
/// anything, not even a file created while the restore ran.
fn place(tmp: &Path, output: &Path, force: bool) -> Result<()> {
    if !force {
        return match std::fs::hard_link(tmp, output) {
            Ok(()) => std::fs::remove_file(tmp).map_err(io_at(tmp)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(Error::OutputExists {
                path: output.to_path_buf(),
            }),
            Err(e) => Err(io_at(output)(e)),
        };
    }
    retire_wal_of(output)?;
    std::fs::rename(tmp, output).map_err(io_at(output))
}

/// A `-wal` left beside the file being replaced would be replayed onto the
/// restored one. Fold it into the old file first (so a crash before the
/// rename loses nothing), refusing if a live app still has the file open:
/// one in a transaction keeps the checkpoint from finishing, and any other
/// connection keeps SQLite from deleting the WAL as the last one closes. An
/// app left connected to the replaced file would read (and write) a file
/// that no longer has a name.
fn retire_wal_of(output: &Path) -> Result<()> {
    let side = |suffix: &str| {
        let mut s = output.as_os_str().to_owned();
        s.push(suffix);
        PathBuf::from(s)
    };
    let (wal, shm) = (side("-wal"), side("-shm"));
    if wal.exists() {
        let in_use = || Error::InUse {
            path: output.to_path_buf(),
        };
        // Busy or locked: an app has it. Anything else (not a database, a
        // directory walsync cannot write) says what it is.
        let refused = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                in_use()
            }
            Some(rusqlite::ErrorCode::NotADatabase) => Error::WalNotCheckpointable {
                path: output.to_path_buf(),
                reason: "it is not a SQLite database".into(),
            },
            _ => Error::WalNotCheckpointable {
                path: output.to_path_buf(),
                reason: e.to_string(),
            },
        };
        let conn = rusqlite::Connection::open(output).map_err(refused)?;
        conn.busy_timeout(std::time::Duration::from_secs(1))?;
        // SQLite deletes the WAL of a file it cannot read as a database when
        // the last connection to it closes: a WAL that may hold someone's last
        // commits is left alone until the file has read as a database.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )?;
        conn.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0))
            .map_err(refused)?;
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            false,
        )?;
        let busy: i64 = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .map_err(refused)?;
        if busy != 0 {
            return Err(in_use());
        }
        drop(conn);
        if wal.exists() {
            return Err(in_use());
        }
    }
    for path in [wal, shm] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(&path)(e)),
        }
    }
    Ok(())
}

/// Writes every object's pages into `tmp`, keeping the state record beside
/// it and checking, after each object that records one, that the state
/// digest of what was written is the one the writer had. Returns the record
/// if the last object's digest is known (it describes the file written).
/// Pages are hashed on a second thread while this one decodes and writes.
fn apply_into(
    items: &[Item],
    out: &File,
    tmp: &Path,
    record_path: &Path,
    keys: Option<&Keys>,
) -> Result<Option<Record>> {
    // A chain whose objects record no state digest (the first format) has
    // nothing to check and no record worth leaving: no page is hashed.
    let tracked = items.iter().any(|i| i.state.is_some());
    let record = std::thread::scope(|scope| -> Result<Option<Record>> {
        let mut hasher = tracked.then(|| Hasher::spawn(scope));
        let mut record: Option<Record> = None;
        for item in items {
            let done = apply_object(
                item,
                out,
                tmp,
                record_path,
                keys,
                hasher.as_mut(),
                record.take(),
            )?;
            record = done;
        }
        Ok(record)
    })?;
    out.sync_all().map_err(io_at(tmp))?;
    Ok(record.filter(|_| items.last().is_some_and(|i| i.state.is_some())))
}

/// The most one write puts into the restored file. Per 4 KiB page, the
/// system calls cost; 1 MiB at a time, ext4 copied into the page cache at a
/// quarter of the speed (measured on Linux 6.18, a 1 GiB restore: 4 KiB
/// 3.5-3.8 s, 64 KiB 2.9-3.2 s, 256 KiB 3.3-3.5 s, 1 MiB 4.6-5.1 s). A
/// multiple of every page size, so a chunk never splits a page.
const WRITE_BYTES: usize = 64 << 10;

/// Where the hashes of an object's pages go, in the order read: a
/// snapshot's build its record, any other object's change the one before.
enum Hashes {
    Building(state::Builder),
    Changing(Vec<(u32, u128)>),
}

impl Hashes {
    fn take(&mut self, batch: &Batch, record_path: &Path) -> Result<()> {
        match self {
            Hashes::Building(b) => {
                for (_, hash) in batch.hashed() {
                    b.push(hash).map_err(io_at(record_path))?;
                }
            }
            Hashes::Changing(changed) => changed.extend(batch.hashed()),
        }
        Ok(())
    }
}

/// [`apply_into`] for one object: `record` is the state before it (if
/// tracked), the result the state after it.
fn apply_object(
    item: &Item,
    out: &File,
    tmp: &Path,
    record_path: &Path,
    keys: Option<&Keys>,
    mut hasher: Option<&mut Hasher>,
    record: Option<Record>,
) -> Result<Option<Record>> {
    let corrupt = |source| Error::Corrupt {
        key: item.key.clone(),
        source,
    };
    let stopped = |e: page_hashes::Stopped| Error::Io {
        path: tmp.to_path_buf(),
        source: io::Error::other(e),
    };
    let file = File::open(&item.spool).map_err(io_at(&item.spool))?;
    let len = file.metadata().map_err(io_at(&item.spool))?.len();
    let mut reader =
        PageReader::new(BufReader::with_capacity(1 << 20, file), len, keys).map_err(corrupt)?;
    let header = *reader.header();
    let head = state::Head {
        seq: header.seq,
        hash: item.hash,
    };
    let page_size = header.page_size as usize;
    // A snapshot holds every page in order: its record is built as it
    // streams. Anything else changes some pages of the record before it.
    let mut hashes = match header.kind {
        Kind::Snapshot if hasher.is_some() => Hashes::Building(
            state::Builder::new(record_path, header.page_size).map_err(io_at(record_path))?,
        ),
        _ => Hashes::Changing(Vec::new()),
    };
    // A small object can declare a huge database: what it declares must
    // fit on the disk, and agree with what its page 1 says.
    let declared = u64::from(header.db_pages) * u64::from(header.page_size);
    let written = out.metadata().map_err(io_at(tmp))?.len();
    if declared > written {
        let free = free_space(tmp).map_err(io_at(tmp))?;
        if declared - written > free {
            return Err(Error::TooLarge {
                key: item.key.clone(),
                declared,
                free,
            });
        }
    }
    let mut batch = match hasher.as_deref_mut() {
        Some(h) => h.batch(page_size),
        None => Batch::new(page_size),
    };
    loop {
        let read = reader.next_page(batch.slot()).map_err(corrupt)?;
        if let Some(pgno) = read {
            if pgno == 1
                && let Some(says) = header_page_count(batch.slot())
                && says != header.db_pages
            {
                return Err(Error::SizeMismatch {
                    key: item.key.clone(),
                    declared: header.db_pages,
                    says,
                });
            }
            batch.keep(pgno);
            if !batch.is_full() {
                continue;
            }
        }
        for (first, bytes) in batch.stretches() {
            let at = u64::from(first - 1) * u64::from(header.page_size);
            for (i, chunk) in bytes.chunks(WRITE_BYTES).enumerate() {
                out.write_all_at(chunk, at + (i * WRITE_BYTES) as u64)
                    .map_err(io_at(tmp))?;
            }
        }
        match hasher.as_deref_mut() {
            Some(h) => {
                let next = h.batch(page_size);
                let full = std::mem::replace(&mut batch, next);
                if !full.is_empty()
                    && let Some(hashed) = h.send(full).map_err(stopped)?
                {
                    hashes.take(&hashed, record_path)?;
                    h.recycle(hashed);
                }
            }
            None => batch.clear(),
        }
        if read.is_none() {
            break;
        }
    }
    // Pages past the new end are gone, also if a later object grows the file again.
    out.set_len(u64::from(header.db_pages) * u64::from(header.page_size))
        .map_err(io_at(tmp))?;
    let Some(h) = hasher else {
        return Ok(None);
    };
    h.recycle(batch);
    while let Some(hashed) = h.next_hashed().map_err(stopped)? {
        hashes.take(&hashed, record_path)?;
        h.recycle(hashed);
    }
    let record = match (hashes, record) {
        (Hashes::Building(b), _) => b.place(record_path, head).map_err(io_at(record_path))?,
        (Hashes::Changing(changed), Some(mut r)) => {
            let sum = r
                .advance(header.db_pages, &changed)
                .map_err(io_at(record_path))?;
            r.apply(sum, &changed, head).map_err(io_at(record_path))?;
            r
        }
        (Hashes::Changing(_), None) => {
            // Plans start at a snapshot (its header is checked against
            // its listing); this is not reached.
            return Err(Error::NoSnapshot {
                prefix: item.key.clone(),
                target: header.seq,
            });
        }
    };
    if let Some(expected) = item.state
        && record.sum.digest() != expected
    {
        return Err(Error::StateMismatch {
            key: item.key.clone(),
        });
    }
    Ok(Some(record))
}

/// The database size page 1's header gives, where SQLite would trust it
/// (non-zero, and written by the commit that last changed the file: the
/// version-valid-for number equals the change counter).
pub(crate) fn header_page_count(page1: &[u8]) -> Option<u32> {
    if page1.len() < 100 || !page1.starts_with(b"SQLite format 3\0") {
        return None;
    }
    let be =
        |at: usize| u32::from_be_bytes([page1[at], page1[at + 1], page1[at + 2], page1[at + 3]]);
    let (counter, size, valid_for) = (be(24), be(28), be(92));
    (size != 0 && valid_for == counter).then_some(size)
}

/// Bytes an unprivileged writer may still use on the filesystem of `path`.
fn free_space(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: statvfs(3) on a NUL-terminated path into a zeroed struct we own.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// A read-only SQLite URI for `path` that SQLite opens as immutable: every
/// byte its URI parser would read as syntax (`?`, `#`, `%`) or that is not
/// plain ASCII is percent-encoded, so any file name opens the file it names
/// (`restore -o 'a#b.db'` once checked the file `a`).
pub(crate) fn immutable_uri(path: &Path) -> String {
    use std::fmt::Write as _;
    use std::os::unix::ffi::OsStrExt;
    let mut uri = String::from("file:");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/._-~+,=@".contains(&b) {
            uri.push(char::from(b));
        } else {
            let _ = write!(uri, "%{b:02x}");
        }
    }
    uri.push_str("?immutable=1");
    uri
}

fn check_integrity(path: &Path) -> Result<()> {
    let conn = rusqlite::Connection::open_with_flags(
        immutable_uri(path),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
    )?;
    let mut stmt = conn.prepare("PRAGMA integrity_check")?;
    let problems: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<_>>()?;
    if problems.len() == 1 && problems[0] == "ok" {
        Ok(())
    } else {
        Err(Error::Integrity(problems.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding: a second fetch into the same scratch directory (a
    /// restore that planned again) found the first one's link to the
    /// store's object, failed to link, and copied over it, emptying the
    /// object in the store. The object here is not even valid: a fetch that
    /// failed its check left its link behind just the same.
    #[tokio::test]
    async fn fetching_again_into_the_same_scratch_never_writes_to_the_store() {
        use crate::storage::{Payload, fs::FsStorage};
        let dir = tempfile::tempdir().unwrap();
        let store = FsStorage::new(dir.path().join("store"));
        let object = obj(1, Kind::Wal);
        let key = object.key.clone();
        let bytes = vec![7u8; 300];
        store
            .put_new(&key, Payload::Bytes(bytes.clone()), [0; 32])
            .await
            .unwrap();
        let scratch = dir.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        for _ in 0..2 {
            let fetched = fetch_checked(&store, &scratch, object.clone()).await;
            assert!(
                matches!(fetched, Err(Error::Corrupt { .. })),
                "{:?}",
                fetched.map(|f| f.0)
            );
        }
        let path = store.local_path(&key).unwrap();
        assert_eq!(std::fs::read(path).unwrap(), bytes);
    }

    fn obj(seq: u64, kind: Kind) -> ObjectRef {
        ObjectRef {
            key: segment::legacy_object_key("db", seq, kind),
            seq,
            kind,
            size: 1,
            mark: None,
        }
    }

    fn run(first: u64, last: u64) -> (u64, ObjectRef) {
        (
            first,
            ObjectRef {
                key: segment::run_key("db", first, last),
                seq: last,
                kind: Kind::Run,
                size: 1,
                mark: None,
            },
        )
    }

    #[test]
    fn runs_replace_the_stretches_they_stand_for_longest_first() {
        let mut objects = vec![obj(1, Kind::Snapshot)];
        objects.extend((2..=40).map(|s| obj(s, Kind::Wal)));
        let runs = [run(2, 17), run(2, 9), run(18, 33), run(34, 49), run(3, 40)];
        let seqs = |plan: Vec<ObjectRef>| -> Vec<(u64, Kind)> {
            plan.into_iter().map(|o| (o.seq, o.kind)).collect()
        };
        let head = plan("db", &objects, &runs, None).unwrap();
        let mut expected = vec![(1, Kind::Snapshot), (17, Kind::Run), (33, Kind::Run)];
        expected.extend((34..=40).map(|s| (s, Kind::Wal)));
        // 34..=49 ends past the head: not used; 3..=40 does not start where
        // the plan needs one.
        assert_eq!(seqs(head), expected);
        let at_12 = plan("db", &objects, &runs, Some(12)).unwrap();
        let mut expected = vec![(1, Kind::Snapshot), (9, Kind::Run)];
        expected.extend((10..=12).map(|s| (s, Kind::Wal)));
        assert_eq!(seqs(at_12), expected);
        assert_eq!(
            seqs(plan("db", &objects, &runs, Some(1)).unwrap()),
            vec![(1, Kind::Snapshot)]
        );
    }

    #[test]
    fn any_file_name_makes_a_uri_sqlite_opens_as_that_file() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "a#b.db",
            "a?b.db",
            "50%.db",
            "sp ace.db",
            "ünï.db",
            "plain.db",
        ] {
            let path = dir.path().join(name);
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (7);")
                .unwrap();
            drop(conn);
            let opened = rusqlite::Connection::open_with_flags(
                immutable_uri(&path),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
            )
            .unwrap();
            let x: i64 = opened
                .query_row("SELECT x FROM t", [], |r| r.get(0))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(x, 7, "{name}");
            check_integrity(&path).unwrap();
        }
    }

    #[test]
    fn runs_carry_a_restore_across_objects_deleted_after_the_window() {
        // Objects 2..=33 are gone; the runs that stood for them remain.
        let mut objects = vec![obj(1, Kind::Snapshot)];
        objects.extend((34..=40).map(|s| obj(s, Kind::Wal)));
        let runs = [run(2, 33), run(2, 17), run(18, 33)];
        let seqs = |plan: Vec<ObjectRef>| -> Vec<u64> { plan.into_iter().map(|o| o.seq).collect() };
        assert_eq!(
            seqs(plan("db", &objects, &runs, None).unwrap()),
            vec![1, 33, 34, 35, 36, 37, 38, 39, 40]
        );
        assert_eq!(
            seqs(plan("db", &objects, &runs, Some(17)).unwrap()),
            vec![1, 17]
        );
        assert_eq!(
            seqs(plan("db", &objects, &runs, Some(34)).unwrap()),
            vec![1, 33, 34]
        );
        // Inside a deleted stretch: refused, naming the points either side.
        match plan("db", &objects, &runs, Some(20)) {
            Err(Error::NotExact { before, after, .. }) => {
                assert_eq!((before.as_str(), after.as_str()), ("17", "33"));
            }
            other => panic!("{other:?}"),
        }
        // A hole no run stands for is a missing object, by name.
        let holed = [run(2, 17)];
        match plan("db", &objects, &holed, None) {
            Err(Error::Missing { key, after, .. }) => {
                assert_eq!(key, format!("db/{:016x}.wal", 18));
                assert_eq!(after, objects[1].key);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn run_keys_parse_back_and_nothing_else_does() {
        let key = segment::run_key("a/b", 3, 0x1f);
        assert_eq!(key, "a/b/0000000000000003-000000000000001f.run");
        let name = key.rsplit('/').next().unwrap();
        assert_eq!(segment::parse_run_name(name), Some((3, 0x1f)));
        for bad in [
            "0000000000000003-000000000000001f.seg",
            "000000000000001f-0000000000000003.run",
            "0000000000000000-0000000000000003.run",
            "0000000000000003-000000000000001F.run",
            "0000000000000003.run",
            "3-31.run",
        ] {
            assert_eq!(segment::parse_run_name(bad), None, "{bad}");
        }
        assert_eq!(segment::parse_object_name(name), None);
    }

    #[test]
    fn plan_starts_at_the_newest_snapshot_before_the_target() {
        let objects = vec![
            obj(1, Kind::Snapshot),
            obj(2, Kind::Wal),
            obj(3, Kind::Snapshot),
            obj(4, Kind::Wal),
        ];
        let seqs = |p: Vec<ObjectRef>| p.iter().map(|o| o.seq).collect::<Vec<_>>();
        assert_eq!(seqs(plan("db", &objects, &[], None).unwrap()), vec![3, 4]);
        assert_eq!(
            seqs(plan("db", &objects, &[], Some(2)).unwrap()),
            vec![1, 2]
        );
        assert!(matches!(
            plan("db", &objects, &[], Some(9)),
            Err(Error::BeyondHead { .. })
        ));
        let gap = vec![obj(1, Kind::Snapshot), obj(3, Kind::Wal)];
        match plan("db", &gap, &[], None) {
            Err(Error::Missing { key, .. }) => assert_eq!(key, "db/0000000000000002.wal"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            plan("db", &[obj(2, Kind::Wal)], &[], None),
            Err(Error::NoSnapshot { .. })
        ));
    }
}

/// How one database of a [`restore_all`] went.
#[derive(Debug)]
pub struct Outcome {
    pub prefix: String,
    pub output: PathBuf,
    pub result: Result<RestoreReport>,
}

/// Where a database restored into a directory goes: `dir/PREFIX.db`.
pub fn file_in_dir(dir: &Path, prefix: &str) -> PathBuf {
    dir.join(format!("{prefix}.db"))
}

/// One restore per prefix into `dir/PREFIX.db`, of the newest state.
pub fn into_dir(prefixes: Vec<String>, dir: &Path, force: bool) -> Vec<RestoreOptions> {
    prefixes
        .into_iter()
        .map(|prefix| RestoreOptions {
            output: file_in_dir(dir, &prefix),
            prefix,
            target: Target::Latest,
            force,
            keys: None,
            parallelism: FETCH_PARALLELISM,
        })
        .collect()
}

/// Runs the restores `parallelism` at a time. One failure does not stop the others.
pub async fn restore_all(
    storage: std::sync::Arc<dyn Storage>,
    jobs: Vec<RestoreOptions>,
    parallelism: usize,
) -> Vec<Outcome> {
    let mut pending = jobs.into_iter();
    let mut running = tokio::task::JoinSet::new();
    let mut done = Vec::new();
    loop {
        while running.len() < parallelism.max(1) {
            let Some(opts) = pending.next() else { break };
            let storage = storage.clone();
            running.spawn(async move {
                let prefix = opts.prefix.clone();
                let output = opts.output.clone();
                if let Some(parent) = output.parent()
                    && let Err(source) = std::fs::create_dir_all(parent)
                {
                    let result = Err(Error::Io {
                        path: parent.to_path_buf(),
                        source,
                    });
                    return Outcome {
                        prefix,
                        output,
                        result,
                    };
                }
                let result = restore(storage.as_ref(), &opts).await;
                Outcome {
                    prefix,
                    output,
                    result,
                }
            });
        }
        match running.join_next().await {
            Some(Ok(outcome)) => done.push(outcome),
            Some(Err(e)) => done.push(Outcome {
                prefix: "?".into(),
                output: PathBuf::from("?"),
                result: Err(Error::Io {
                    path: PathBuf::from("?"),
                    source: io::Error::other(e),
                }),
            }),
            None => break,
        }
    }
    done.sort_by(|a, b| a.prefix.cmp(&b.prefix));
    done
}
