//! A database's objects in storage, as a chain: listing, parsing keys, and
//! reading the head. Used by replication start-up, `list` and restore.
//!
//! Why this file is long: the key grammar, listing, reading heads and planning
//! the fewest objects to a point all work on the same `ObjectRef`s and runs;
//! restore, verify, follow and the replica share them.

use tokio::io::AsyncReadExt;

use crate::segment::{self, Kind};
use crate::storage::{self, Storage};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Storage(#[from] storage::Error),
    #[error("object {key}: {source}")]
    Segment {
        key: String,
        #[source]
        source: segment::Error,
    },
    #[error(
        "object {key}: its header says it is a {found:?} object, its key or mark says {listed:?}"
    )]
    KindMismatch {
        key: String,
        listed: Kind,
        found: Kind,
    },
    #[error("object {key} cannot be reached from any snapshot: {why}")]
    Unreachable { key: String, why: String },
    #[error("object {key}: header says sequence {found}, the key says {expected}")]
    SeqMismatch {
        key: String,
        expected: u64,
        found: u64,
    },
    /// Writing or reading back the local copy of a download failed (a full
    /// disk, say): not the store's doing, so never retried as if it were.
    #[error("object {key}: its local copy: {source}")]
    Local {
        key: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps a failure of `key`'s local copy.
    fn local(key: &str) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Error::Local {
            key: key.to_string(),
            source,
        }
    }

    /// The object was not in storage (deleted since it was listed, say).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Storage(storage::Error::NotFound { .. }))
    }
}

/// One object of a chain, from its key alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub key: String,
    pub seq: u64,
    /// What the key or its snapshot mark says. An object in today's layout
    /// whose mark is missing (walsync stopped between the two writes) lists
    /// as a segment and may still turn out to be a snapshot when read.
    pub kind: Kind,
    pub size: u64,
    /// The key of its snapshot mark, if it has one.
    pub mark: Option<String>,
}

impl ObjectRef {
    /// Whether the key itself says the kind (the first layout).
    pub fn is_legacy(&self) -> bool {
        !self.key.ends_with(segment::OBJECT_SUFFIX)
    }
}

/// Builds the objects of one database from listed `(name, key, size)`
/// entries: objects of both layouts, with snapshot marks folded into the
/// objects they mark. Sorted by sequence; several objects may share one (a
/// fork, see [`forks`]). A mark whose object is gone is dropped.
fn collect(entries: impl IntoIterator<Item = (segment::Name, String, u64)>) -> Vec<ObjectRef> {
    let mut marks = std::collections::HashMap::new();
    let mut out = Vec::new();
    for (name, key, size) in entries {
        let (seq, kind) = match name {
            segment::Name::SnapshotMark(seq) => {
                marks.insert(seq, key);
                continue;
            }
            segment::Name::Object(seq) => (seq, Kind::Wal),
            segment::Name::Legacy(seq, kind) => (seq, kind),
        };
        out.push(ObjectRef {
            key,
            seq,
            kind,
            size,
            mark: None,
        });
    }
    for object in &mut out {
        if !object.is_legacy()
            && let Some(mark) = marks.remove(&object.seq)
        {
            object.kind = Kind::Snapshot;
            object.mark = Some(mark);
        }
    }
    out.sort_by(|a, b| a.seq.cmp(&b.seq).then(a.key.cmp(&b.key)));
    out
}

/// Lists the objects of the database stored under `prefix`, in apply order.
/// Keys that are not walsync objects (or that lie deeper) are ignored.
pub async fn list(storage: &dyn Storage, prefix: &str) -> Result<Vec<ObjectRef>> {
    Ok(list_with_runs(storage, prefix).await?.0)
}

/// [`list`], and from the same listing the runs that stand for stretches of
/// the chain (kind [`Kind::Run`], `seq` their last sequence), sorted by
/// their first sequence, longest first.
pub async fn list_with_runs(
    storage: &dyn Storage,
    prefix: &str,
) -> Result<(Vec<ObjectRef>, Vec<(u64, ObjectRef)>)> {
    let listed = storage.list(&format!("{prefix}/")).await?;
    let mut runs = Vec::new();
    let objects = collect(listed.into_iter().filter_map(|meta| {
        let name = meta.key.strip_prefix(prefix)?.strip_prefix('/')?;
        if let Some((first, last)) = segment::parse_run_name(name) {
            runs.push((
                first,
                ObjectRef {
                    key: meta.key,
                    seq: last,
                    kind: Kind::Run,
                    size: meta.size,
                    mark: None,
                },
            ));
            return None;
        }
        let name = segment::parse_object_name(name)?;
        Some((name, meta.key, meta.size))
    }));
    runs.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.seq.cmp(&a.1.seq)));
    Ok((objects, runs))
}

/// The way through the chain from `first` to `last` (both included): at each
/// step the longest run in `runs` that starts there and ends at or before
/// `last`, else the object of that sequence. `objects` is sorted by sequence
/// with one object per sequence (a branch), `runs` by first sequence. `Err` names the first sequence that neither holds: a hole.
///
/// Once objects older than the exact window are deleted, runs are the only
/// way across those stretches; where both remain, the run saves reads.
pub fn cover(
    objects: &[ObjectRef],
    runs: &[(u64, ObjectRef)],
    first: u64,
    last: u64,
) -> Result<Vec<ObjectRef>, u64> {
    let mut out = Vec::new();
    let mut cursor = first;
    while cursor <= last {
        let from = runs.partition_point(|(f, _)| *f < cursor);
        let run = runs[from..]
            .iter()
            .take_while(|(f, _)| *f == cursor)
            .filter(|(_, run)| run.seq <= last && run.seq >= cursor)
            .map(|(_, run)| run)
            .max_by_key(|run| run.seq);
        let step = match run {
            Some(run) => run,
            None => match objects.binary_search_by(|o| o.seq.cmp(&cursor)) {
                Ok(i) => &objects[i],
                Err(_) => return Err(cursor),
            },
        };
        out.push(step.clone());
        cursor = step.seq + 1;
    }
    Ok(out)
}

/// The hash the object after this one names as its previous object: the
/// object's own content hash, or for a run that of the last object it
/// stands for, which it replaces there. The one rule restore, verify,
/// follow and compaction link by, across runs and the holes they fill.
pub fn handed_on(header: &segment::Header, hash: [u8; 32]) -> [u8; 32] {
    header.run.map_or(hash, |r| r.last_hash)
}

/// Every point a restore can stop at from sequence `from` on: one object
/// or run ending at each sequence (the object where both do), sorted.
/// Where objects older than the exact window are gone, the ends of the runs
/// that stood for them are the points left.
pub fn restore_points<'a>(
    objects: &'a [ObjectRef],
    runs: &'a [(u64, ObjectRef)],
    from: u64,
) -> Vec<&'a ObjectRef> {
    let mut points: Vec<&ObjectRef> = objects.iter().filter(|o| o.seq >= from).collect();
    let mut seen: std::collections::HashSet<u64> = points.iter().map(|o| o.seq).collect();
    points.extend(
        runs.iter()
            .map(|(_, run)| run)
            .filter(|run| run.seq >= from && seen.insert(run.seq)),
    );
    points.sort_by_key(|o| o.seq);
    points
}

/// What is wrong with a database name (a prefix), if anything: the one rule
/// for names in walsync.toml and for names found in storage, which reach
/// file names (restore-all) and terminals (list) only after passing it.
pub fn name_problem(prefix: &str) -> Option<&'static str> {
    if prefix.is_empty() {
        return Some("is empty");
    }
    if prefix.starts_with('/') {
        return Some("must not start with '/'");
    }
    if prefix.ends_with('/') {
        return Some("must not end with '/'");
    }
    if prefix.split('/').any(|s| s.is_empty()) {
        return Some("has an empty path segment ('//')");
    }
    if prefix.split('/').any(|s| s == ".." || s == ".") {
        return Some("must not contain '.' or '..' segments");
    }
    if prefix.chars().any(|c| c.is_control() || c == '\\') {
        return Some("must not contain control characters or '\\'");
    }
    None
}

/// The names of the databases under a storage root, without their objects.
#[derive(Debug, Default)]
pub struct DatabaseNames {
    /// Each valid name, sorted.
    pub found: Vec<String>,
    /// Names that fail [`name_problem`], with why (print them with `{:?}`).
    pub refused: Vec<(String, &'static str)>,
}

/// Every database prefix under the storage root, from one listing read a
/// page at a time: a fleet's objects are never held at once (1,000
/// databases with a day's chain each are 9.5 million objects; held as one
/// listing they took 1 GiB).
pub async fn database_names(storage: &dyn Storage) -> Result<DatabaseNames> {
    let mut names = std::collections::BTreeSet::new();
    storage
        .list_each("", &mut |page| {
            for meta in page {
                let Some((prefix, name)) = meta.key.rsplit_once('/') else {
                    continue;
                };
                // A prefix holding only marks (their objects gone) is no database.
                let object = matches!(
                    segment::parse_object_name(name),
                    Some(segment::Name::Object(_) | segment::Name::Legacy(..))
                );
                if object && !names.contains(prefix) {
                    names.insert(prefix.to_string());
                }
            }
        })
        .await?;
    let mut out = DatabaseNames::default();
    for prefix in names {
        match name_problem(&prefix) {
            Some(why) => out.refused.push((prefix, why)),
            None => out.found.push(prefix),
        }
    }
    Ok(out)
}

/// A chain whose snapshots all lack their marks (walsync stopped between a
/// snapshot and its mark, and retention has since removed the older ones)
/// still starts with a snapshot: its first object, which the header tells.
/// Marks it so. One header read, and only for such a chain.
pub async fn find_unmarked_start(storage: &dyn Storage, objects: &mut [ObjectRef]) -> Result<()> {
    if objects.iter().any(|o| o.kind == Kind::Snapshot) {
        return Ok(());
    }
    if let Some(first) = objects.first_mut()
        && !first.is_legacy()
        && read_header(storage, first).await?.kind == Kind::Snapshot
    {
        first.kind = Kind::Snapshot;
    }
    Ok(())
}

/// The sequence numbers that more than one object claims, with those objects:
/// two writers on one prefix (an old walsync whose keys named the kind, a
/// store that ignored a conditional write). Restore follows one branch.
pub fn forks(objects: &[ObjectRef]) -> Vec<(u64, Vec<&ObjectRef>)> {
    let mut out: Vec<(u64, Vec<&ObjectRef>)> = Vec::new();
    for pair in objects.windows(2) {
        if pair[0].seq != pair[1].seq {
            continue;
        }
        match out.last_mut() {
            Some((seq, claims)) if *seq == pair[0].seq => claims.push(&pair[1]),
            _ => out.push((pair[0].seq, vec![&pair[0], &pair[1]])),
        }
    }
    out
}

/// One line naming each fork, for `list`, `verify` and the status page.
pub fn describe_forks(objects: &[ObjectRef]) -> Option<String> {
    let forks = forks(objects);
    if forks.is_empty() {
        return None;
    }
    let parts: Vec<String> = forks
        .iter()
        .map(|(seq, claims)| {
            let keys: Vec<&str> = claims.iter().map(|o| o.key.as_str()).collect();
            format!("sequence {seq} is claimed by {}", keys.join(" and "))
        })
        .collect();
    Some(format!(
        "the chain forks (two writers on one prefix): {}",
        parts.join("; ")
    ))
}

/// What an object says about its place in the chain, read from its first and
/// last bytes only: enough to see which object a fork's branches continue, or
/// what the chain head a writer links to says. The claim is checked when the
/// object is downloaded whole (by restore and verify).
#[derive(Debug, Clone, Copy)]
pub struct Link {
    pub header: segment::Header,
    /// The content hash its trailer claims.
    pub hash: [u8; 32],
}

/// Reads an object's header and trailer with two ranged reads.
pub async fn read_link(storage: &dyn Storage, object: &ObjectRef) -> Result<Link> {
    let corrupt = |source| Error::Segment {
        key: object.key.clone(),
        source,
    };
    let min = (segment::HEADER_SIZE + segment::TRAILER_SIZE) as u64;
    if object.size < min {
        return Err(corrupt(segment::Error::TooShort(object.size)));
    }
    let head_len =
        (segment::MAX_HEADER_SIZE as u64).min(object.size - segment::TRAILER_SIZE as u64);
    let head = storage.get_range(&object.key, 0, head_len).await?;
    let mut header = segment::Header::decode(&head).map_err(corrupt)?;
    check_key(object, &header)?;
    let trailer = header.trailer_len() as u64;
    if object.size < header.encoded_len() as u64 + trailer {
        return Err(corrupt(segment::Error::TooShort(object.size)));
    }
    let tail = storage
        .get_range(&object.key, object.size - trailer, trailer)
        .await?;
    if tail.len() as u64 != trailer {
        return Err(corrupt(segment::Error::TooShort(object.size)));
    }
    let (state, hash) = tail.split_at(tail.len() - segment::TRAILER_SIZE);
    if !state.is_empty() && state.iter().any(|b| *b != 0) {
        header.state = state.try_into().ok();
    }
    let hash: [u8; 32] = hash
        .try_into()
        .map_err(|_| corrupt(segment::Error::TooShort(object.size)))?;
    Ok(Link { header, hash })
}

/// Reads and checks the whole object, returning its header and content hash.
/// Objects are spooled through a temp file so a large snapshot is never held in memory.
pub async fn read_verified(
    storage: &dyn Storage,
    object: &ObjectRef,
) -> Result<(segment::Header, [u8; 32], std::fs::File)> {
    let (file, (header, hash)) = spool_object(storage, &object.key, None).await?;
    check_key(object, &header)?;
    Ok((header, hash, file))
}

/// Checks that a header agrees with the key it was stored under (and with
/// its snapshot mark). An unmarked object in today's layout may be either kind.
pub fn check_key(object: &ObjectRef, header: &segment::Header) -> Result<()> {
    if header.seq != object.seq {
        return Err(Error::SeqMismatch {
            key: object.key.clone(),
            expected: object.seq,
            found: header.seq,
        });
    }
    if object.kind == Kind::Run {
        let named = object
            .key
            .rsplit('/')
            .next()
            .and_then(segment::parse_run_name)
            .map(|(first, _)| first);
        let found = header.run.map(|r| r.first);
        if named.is_none() || named != found {
            return Err(Error::SeqMismatch {
                key: object.key.clone(),
                expected: named.unwrap_or(0),
                found: found.unwrap_or(0),
            });
        }
    }
    let unmarked = !object.is_legacy() && object.mark.is_none();
    // An unmarked object may be a snapshot or a segment, never a run: a run
    // under a sequence's own key would stand in for objects it does not name.
    if header.kind != object.kind && (!unmarked || header.kind == Kind::Run) {
        return Err(Error::KindMismatch {
            key: object.key.clone(),
            listed: object.kind,
            found: header.kind,
        });
    }
    Ok(())
}

/// Reads only the header of an object (the first bytes of the stream).
pub async fn read_header(storage: &dyn Storage, object: &ObjectRef) -> Result<segment::Header> {
    let mut reader = storage.get(&object.key).await?;
    // Enough for an encrypted object's header; any object is longer.
    let mut head = [0u8; segment::MAX_HEADER_SIZE];
    reader
        .read_exact(&mut head)
        .await
        .map_err(|source| storage::Error::Io {
            key: object.key.clone(),
            source,
        })?;
    let header = segment::Header::decode(&head).map_err(|source| Error::Segment {
        key: object.key.clone(),
        source,
    })?;
    check_key(object, &header)?;
    Ok(header)
}

/// What a download moves at a time. `tokio::fs::File` hands each write to
/// a blocking thread: in 8 KiB steps (`tokio::io::copy`'s) a 1 GiB snapshot
/// took 130,000 hand-offs, a quarter of a restore's time.
const COPY_BUFFER: usize = 1 << 20;

/// Copies an object into an anonymous temp file, in `dir` if given (keep
/// large objects off a RAM-backed /tmp by spooling beside their
/// destination), checked as it goes; the file is at its start.
pub async fn spool_object(
    storage: &dyn Storage,
    key: &str,
    dir: Option<&std::path::Path>,
) -> Result<(std::fs::File, (segment::Header, [u8; 32]))> {
    let file = match dir {
        Some(dir) => tempfile::tempfile_in(dir),
        None => tempfile::tempfile(),
    }
    .map_err(Error::local(key))?;
    let mut out = tokio::fs::File::from_std(file);
    let checked = copy_object(storage, key, &mut out).await?;
    tokio::io::AsyncSeekExt::rewind(&mut out)
        .await
        .map_err(Error::local(key))?;
    Ok((out.into_std().await, checked))
}

/// Copies object `key` into `out`, [`COPY_BUFFER`] at a time, flushes it,
/// and checks it on the way ([`segment::Check`]): its header and content
/// hash, from one read of the download.
pub async fn copy_object(
    storage: &dyn Storage,
    key: &str,
    out: &mut tokio::fs::File,
) -> Result<(segment::Header, [u8; 32])> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let io = |source| storage::Error::Io {
        key: key.to_string(),
        source,
    };
    let mut reader = tokio::io::BufReader::with_capacity(COPY_BUFFER, storage.get(key).await?);
    let mut check = segment::Check::default();
    loop {
        let chunk = reader.fill_buf().await.map_err(io)?;
        if chunk.is_empty() {
            break;
        }
        // tokio's file takes the chunk into its own buffer and writes it on
        // a blocking thread: the hash below overlaps that write.
        out.write_all(chunk).await.map_err(Error::local(key))?;
        check.update(chunk);
        let n = chunk.len();
        reader.consume(n);
    }
    out.flush().await.map_err(Error::local(key))?;
    check.finish().map_err(|source| Error::Segment {
        key: key.to_string(),
        source,
    })
}

/// Objects at least this large may come down in ranged parts, several at
/// once: one stream from S3 carries a few tens of MB/s, a restore wants the
/// disk's speed.
pub const PARTS_FROM: u64 = 32 << 20;

/// How a large object is fetched.
#[derive(Debug, Clone, Copy)]
pub struct Split {
    /// Bytes of one part (the last may be shorter).
    pub part: u64,
    /// Parts in flight at once. Each holds one [`PART_CHUNK`] in memory,
    /// whatever the part size.
    pub at_once: usize,
    /// The object starts as one stream; after this many bytes...
    pub probe: u64,
    /// ...a stream that carried at least this many bytes a second while
    /// waited on (after its first chunk) keeps the object to itself: more
    /// streams would not help, and some stores (moto) read the whole object
    /// again to answer each range (66 ranges of a 530 MB snapshot took it
    /// 28 s, against 0.8 s for one GET). A slower one stops there and the
    /// rest comes in ranged parts.
    pub enough: f64,
}

impl Split {
    /// For an object of `size` bytes: parts of 8 MiB, or an eighth of it
    /// if larger (no store answers more than 8 ranges for one object), four
    /// at once; a stream of 200 MB/s is enough.
    pub fn for_size(size: u64) -> Self {
        Self {
            part: (8u64 << 20).max(size.div_ceil(8)),
            at_once: 4,
            probe: 8 << 20,
            enough: 200e6,
        }
    }
}

/// What a part moves from the network to the file at a time.
const PART_CHUNK: usize = 1 << 20;

/// Downloads `key` (`size` bytes, as listed) into `file` (open for reading
/// and writing): one stream, joined by ranged parts where that stream is
/// slow (see [`Split`]), each written where it belongs as it arrives. The
/// object is checked in order ([`segment::Check`]): the stream as it comes,
/// each part on a blocking task that reads it back from the page cache once
/// the one before it is checked, so no byte is trusted before all are
/// hashed. A part cut short is fetched again; an object shorter than listed
/// is refused as too short.
pub async fn download(
    storage: &dyn Storage,
    key: &str,
    size: u64,
    file: std::fs::File,
    split: Split,
) -> Result<(segment::Header, [u8; 32])> {
    use tokio::io::AsyncBufReadExt;
    let io = |source| storage::Error::Io {
        key: key.to_string(),
        source,
    };
    let file = std::sync::Arc::new(file);
    let mut reader = tokio::io::BufReader::with_capacity(PART_CHUNK, storage.get(key).await?);
    let mut check = segment::Check::default();
    let mut buf = Vec::with_capacity(PART_CHUNK);
    let (mut at, mut end) = (0u64, size);
    // The stream's rate is what arrives while waiting on it, after its
    // first chunk: neither the time to the first byte nor the local hashing
    // and writing count.
    let (mut waited, mut timed_bytes) = (std::time::Duration::ZERO, 0u64);
    let mut decided = false;
    while at < end {
        let asked = std::time::Instant::now();
        let chunk = reader.fill_buf().await.map_err(io)?;
        if at > 0 {
            waited += asked.elapsed();
        }
        if chunk.is_empty() {
            return Err(Error::Segment {
                key: key.to_string(),
                source: segment::Error::TooShort(at),
            });
        }
        let n = (end - at).min(chunk.len() as u64) as usize;
        if at > 0 {
            timed_bytes += n as u64;
        }
        buf.clear();
        buf.extend_from_slice(&chunk[..n]);
        reader.consume(n);
        check.update(&buf);
        buf = write_at(&file, buf, n, at)
            .await
            .map_err(Error::local(key))?;
        at += n as u64;
        if !decided && at >= split.probe {
            decided = true;
            let rate = timed_bytes as f64 / waited.as_secs_f64().max(1e-9);
            if rate < split.enough && at < size {
                tracing::debug!(
                    key,
                    rate,
                    parts_from = at,
                    "a slow stream: the rest in parts"
                );
                end = at;
            }
        }
    }
    drop(reader);
    if end < size {
        check = parts(storage, key, &file, end, size, split, check).await?;
    }
    check.finish().map_err(|source| Error::Segment {
        key: key.to_string(),
        source,
    })
}

/// Bytes `from..size` of `key` in parts of `split.part`, `split.at_once` at a
/// time, checked in order after what `check` has seen.
async fn parts(
    storage: &dyn Storage,
    key: &str,
    file: &std::sync::Arc<std::fs::File>,
    from: u64,
    size: u64,
    split: Split,
    mut check: segment::Check,
) -> Result<segment::Check> {
    use futures_util::StreamExt;
    let part = split.part.max(1);
    let parts = (0..(size - from).div_ceil(part))
        .map(|i| from + i * part)
        .map(|offset| (offset, part.min(size - offset)));
    let mut fetched = futures_util::stream::iter(parts)
        .map(|(offset, len)| {
            let file = file.clone();
            async move {
                fetch_part(storage, key, &file, offset, len)
                    .await
                    .map(|()| (offset, len))
            }
        })
        .buffered(split.at_once.max(1));
    // Each part is hashed on a short blocking task once the one before it
    // is hashed: the hashing overlaps the later parts' downloads, and no
    // thread waits idle for a slow store.
    let mut hashing: Option<tokio::task::JoinHandle<std::io::Result<segment::Check>>> = None;
    while let Some(next) = fetched.next().await {
        let (offset, len) = next?;
        let mut so_far = match hashing.take() {
            Some(task) => joined(key, task).await?,
            None => std::mem::take(&mut check),
        };
        let reading = file.clone();
        hashing = Some(tokio::task::spawn_blocking(move || {
            hash_part(&reading, offset, len, &mut so_far).map(|()| so_far)
        }));
    }
    if let Some(task) = hashing {
        check = joined(key, task).await?;
    }
    Ok(check)
}

/// Writes the first `len` bytes of `buf` at `at` in `file` on a blocking
/// thread; hands `buf` back for the next chunk.
async fn write_at(
    file: &std::sync::Arc<std::fs::File>,
    buf: Vec<u8>,
    len: usize,
    at: u64,
) -> std::io::Result<Vec<u8>> {
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        file.write_all_at(&buf[..len], at).map(|()| buf)
    })
    .await
    .map_err(std::io::Error::other)?
}

async fn joined(
    key: &str,
    task: tokio::task::JoinHandle<std::io::Result<segment::Check>>,
) -> Result<segment::Check> {
    task.await
        .map_err(|e| Error::local(key)(std::io::Error::other(e)))?
        .map_err(Error::local(key))
}

/// Feeds bytes `offset..offset + len` of `file` to `check`.
fn hash_part(
    file: &std::fs::File,
    offset: u64,
    len: u64,
    check: &mut segment::Check,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len.min(PART_CHUNK as u64) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        check.update(&buf[..n]);
        at += n as u64;
    }
    Ok(())
}

/// One part into its place in `file`, fetched again (up to the process's
/// attempts per request) if its stream breaks or ends short.
async fn fetch_part(
    storage: &dyn Storage,
    key: &str,
    file: &std::sync::Arc<std::fs::File>,
    offset: u64,
    len: u64,
) -> Result<()> {
    let mut tries = 1;
    loop {
        match write_part(storage, key, file, offset, len).await {
            Err(Error::Storage(storage::Error::Io { source, .. }))
                if tries < storage::retry::attempts() =>
            {
                tracing::debug!(key, offset, attempt = tries, error = %source, "fetching the part again");
                tokio::time::sleep(storage::retry::backoff(tries)).await;
                tries += 1;
            }
            other => return other,
        }
    }
}

async fn write_part(
    storage: &dyn Storage,
    key: &str,
    file: &std::sync::Arc<std::fs::File>,
    offset: u64,
    len: u64,
) -> Result<()> {
    let io = |source| storage::Error::Io {
        key: key.to_string(),
        source,
    };
    let mut reader = storage.get_part(key, offset, len).await?;
    let mut buf = vec![0u8; PART_CHUNK];
    let mut at = offset;
    while at < offset + len {
        // Never past the part's end, whatever a store sends.
        let want = (offset + len - at).min(buf.len() as u64) as usize;
        let mut filled = 0;
        while filled < want {
            let n = reader.read(&mut buf[filled..want]).await.map_err(io)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            // The body ended cleanly (a cut connection is an error, not an
            // end) before the part did: the object is shorter than listed,
            // which no second try changes.
            return Err(Error::Segment {
                key: key.to_string(),
                source: segment::Error::TooShort(at),
            });
        }
        buf = write_at(file, buf, filled, at)
            .await
            .map_err(Error::local(key))?;
        at += filled as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn database_names_are_the_prefixes_holding_objects() {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::storage::fs::FsStorage::new(dir.path());
        let put = |key: String| {
            let storage = &storage;
            async move {
                let body = crate::storage::Payload::Bytes(b"x".to_vec());
                storage.put_new(&key, body, [0; 32]).await.unwrap();
            }
        };
        put(segment::object_key("app", 1)).await;
        put(segment::snapshot_mark_key("app", 1)).await;
        put(segment::object_key("tenants/a", 7)).await;
        // Marks whose objects are gone, and files that are no objects.
        put(segment::snapshot_mark_key("gone", 3)).await;
        put("notes/readme.txt".to_string()).await;
        put(segment::object_key("bad\\name", 1)).await;
        let names = database_names(&storage).await.unwrap();
        assert_eq!(names.found, ["app", "tenants/a"]);
        assert_eq!(names.refused.len(), 1, "{:?}", names.refused);
        assert_eq!(names.refused[0].0, "bad\\name");
    }

    #[test]
    fn a_run_under_a_sequence_key_is_refused_marked_or_not() {
        let header = segment::Header {
            version: segment::VERSION,
            kind: Kind::Run,
            page_size: 4096,
            seq: 7,
            db_pages: 1,
            page_count: 0,
            timestamp_ms: 0,
            wal: segment::WalRange::default(),
            prev_hash: [0; 32],
            sealed: None,
            run: Some(segment::Run {
                first: 3,
                last_hash: [0; 32],
            }),
            state: None,
        };
        for mark in [None, Some("p/0000000000000007.is-snapshot".to_string())] {
            let object = ObjectRef {
                key: segment::object_key("p", 7),
                seq: 7,
                kind: if mark.is_some() {
                    Kind::Snapshot
                } else {
                    Kind::Wal
                },
                size: 200,
                mark,
            };
            assert!(matches!(
                check_key(&object, &header),
                Err(Error::KindMismatch { .. })
            ));
            let segment = segment::Header {
                kind: object.kind,
                run: None,
                ..header
            };
            assert!(check_key(&object, &segment).is_ok());
        }
    }
}
