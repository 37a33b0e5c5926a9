//! `walsync verify`: checks a database's whole chain in storage, restores its
//! newest state to a scratch file, and optionally compares that with the live
//! database, page by page.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use rusqlite::{Connection, OpenFlags};
use sha2::{Digest, Sha256};

use crate::chain::{self, ObjectRef};
use crate::encryption::Keys;
use crate::restore::{self, RestoreOptions, Target};
use crate::segment::{self, Kind};
use crate::storage::{Storage, to_hex};

/// What a verification found. `problems` empty means everything checked out.
#[derive(Debug, Default)]
pub struct Report {
    pub objects: usize,
    pub bytes: u64,
    pub snapshots: usize,
    /// Runs checked (objects that stand for stretches of the chain).
    pub runs: usize,
    pub head: Option<u64>,
    /// The newest state restored and passed `PRAGMA integrity_check`.
    pub restored: bool,
    /// Pages compared with the live database, if one was given.
    pub compared_pages: Option<u64>,
    pub problems: Vec<String>,
}

/// How much of each object a check reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Every byte: each object's hash is computed, and the newest state is
    /// restored and checked.
    Full,
    /// Each object's header and trailer only: links are checked against the
    /// hashes the trailers claim; nothing is restored and no key is needed.
    ChainOnly,
}

/// Verifies `prefix`; with `live`, compares the newest state with that file.
/// Errors are for what stopped the check itself (storage unreachable);
/// everything wrong with the data is a problem in the report.
pub async fn verify(
    storage: &dyn Storage,
    prefix: &str,
    live: Option<&Path>,
    scratch_dir: &Path,
    keys: Option<Arc<Keys>>,
    depth: Depth,
) -> Result<Report, chain::Error> {
    let mut listings = 0;
    // Problems every attempt found: a chain a running watch keeps changing
    // may never hold still for a whole check, but what is really wrong
    // with it is wrong in every attempt, each time in the same words.
    let mut every_time: Option<Vec<String>> = None;
    let report = loop {
        listings += 1;
        let (mut report, gone) = check_chain(storage, prefix, depth).await?;
        if gone == 0 {
            break report;
        }
        let seen = every_time.get_or_insert_with(|| report.problems.clone());
        seen.retain(|p| report.problems.contains(p));
        if listings == LISTINGS {
            report.problems = seen.clone();
            break report;
        }
        tracing::info!(
            prefix,
            gone,
            "objects went while the chain was read; checking it again from a fresh listing"
        );
        // A deletion under way (retention after a snapshot deletes a whole
        // stretch) is let finish: a little longer each time.
        tokio::time::sleep(std::time::Duration::from_millis(100 * u64::from(listings))).await;
    };
    let mut report = report;
    if report.head.is_none() || depth == Depth::ChainOnly {
        return Ok(report);
    }

    let scratch = tempfile::Builder::new()
        .prefix(".walsync-verify-")
        .tempdir_in(scratch_dir)
        .map_err(|source| crate::storage::Error::Io {
            key: scratch_dir.display().to_string(),
            source,
        })?;
    let restored = scratch.path().join("restored.db");
    let opts = RestoreOptions {
        prefix: prefix.to_string(),
        output: restored.clone(),
        target: Target::Latest,
        force: false,
        keys,
        parallelism: restore::FETCH_PARALLELISM,
    };
    match restore::restore(storage, &opts).await {
        Ok(restored) => {
            report.restored = true;
            if let Some(branch) = restored.fork {
                report.problems.push(branch.describe());
            }
        }
        Err(e) => report
            .problems
            .push(format!("restoring the newest state: {e}")),
    }
    if let (true, Some(live)) = (report.restored, live) {
        match compare(&restored, live) {
            Ok((pages, differing)) => {
                report.compared_pages = Some(pages);
                if !differing.is_empty() {
                    report.problems.push(format!(
                        "the live database {} differs from the newest state in storage \
                         (pages {}); if walsync is running, run `walsync sync --wait` first",
                        live.display(),
                        summarize(&differing)
                    ));
                }
            }
            Err(e) => report
                .problems
                .push(format!("comparing with {}: {e}", live.display())),
        }
    }
    Ok(report)
}

/// How many listings one check may take. A running `watch` deletes objects
/// once the exact window has passed them and a run stands for them, and
/// retention deletes whole stretches after a snapshot: an object listed and
/// gone when read is the store moving on, not a broken chain, so the check
/// starts again from a fresh listing, after a pause growing from 0.1 s
/// (2.8 s in all). Where every attempt met some, only a problem found by
/// every attempt is reported.
/// (Four listings were not enough beside a `watch` taking a snapshot every
/// second with retention on and deleting past the exact window at rest.)
const LISTINGS: u32 = 8;

/// Lists the chain and checks every object and run in it; also returns how
/// many listed objects were gone when read.
async fn check_chain(
    storage: &dyn Storage,
    prefix: &str,
    depth: Depth,
) -> Result<(Report, usize), chain::Error> {
    let (objects, runs) = chain::list_with_runs(storage, prefix).await?;
    let mut report = Report {
        runs: runs.len(),
        objects: objects.len(),
        bytes: objects.iter().map(|o| o.size).sum(),
        snapshots: objects.iter().filter(|o| o.kind == Kind::Snapshot).count(),
        head: objects.last().map(|o| o.seq),
        ..Report::default()
    };
    if objects.is_empty() {
        report.problems.push(format!("no objects under {prefix:?}"));
        return Ok((report, 0));
    }
    let mut gone = 0;
    let read = Reader { storage, depth };
    let headers = read_runs(read, &runs, &mut report, &mut gone).await;
    let mut hashes = walk(read, &objects, (&runs, &headers), &mut report, &mut gone).await;
    if depth == Depth::ChainOnly {
        // No object after the newest checks what its trailer claims: it is
        // read whole (it is usually small).
        let head = objects.last().map(|o| o.seq);
        for object in objects.iter().filter(|o| Some(o.seq) == head) {
            if let Err(e) = chain::read_verified(storage, object).await {
                gone += usize::from(e.is_not_found());
                report.problems.push(e.to_string());
            }
        }
    }
    check_runs(&objects, &runs, &headers, &mut hashes, &mut report);
    Ok((report, gone))
}

/// Reads objects to the depth a check asks for.
#[derive(Clone, Copy)]
struct Reader<'a> {
    storage: &'a dyn Storage,
    depth: Depth,
}

impl Reader<'_> {
    /// An object's header, checked against its key, and its content hash:
    /// computed from every byte, or as its trailer claims.
    async fn read(self, object: &ObjectRef) -> Result<(segment::Header, [u8; 32]), chain::Error> {
        let read = match self.depth {
            Depth::Full => chain::read_verified(self.storage, object)
                .await
                .map(|(header, hash, _)| (header, hash)),
            Depth::ChainOnly => chain::read_link(self.storage, object)
                .await
                .map(|link| (link.header, link.hash)),
        };
        if read.is_ok() {
            let bytes = match self.depth {
                Depth::Full => object.size,
                Depth::ChainOnly => 0,
            };
            crate::progress::current().fetched(bytes);
        }
        read
    }
}

/// The headers of the runs that verified (trailer hash, header against key),
/// by key; each that did not is a problem.
async fn read_runs(
    read: Reader<'_>,
    runs: &[(u64, ObjectRef)],
    report: &mut Report,
    gone: &mut usize,
) -> HashMap<String, segment::Header> {
    let fetched = futures_util::stream::iter(runs.iter())
        .map(|(_, run)| read.read(run))
        .buffered(restore::FETCH_PARALLELISM);
    let mut fetched = std::pin::pin!(fetched);
    let mut headers = HashMap::new();
    for (_, run) in runs {
        match fetched.next().await {
            Some(Ok((header, _))) => {
                headers.insert(run.key.clone(), header);
            }
            Some(Err(e)) => {
                *gone += usize::from(e.is_not_found());
                report.problems.push(e.to_string());
            }
            None => break,
        }
    }
    headers
}

/// Checks every object: trailer hash, header against key, links between
/// neighbours, and that sequences have no holes but those runs stand for
/// (objects deleted after the exact window), linked through those runs.
/// Where two objects claim one sequence (a fork), each must link to one of
/// the objects before it. Returns the hashes found at each sequence, with
/// the ends of the runs that carried the chain across a hole.
async fn walk(
    read: Reader<'_>,
    objects: &[ObjectRef],
    (runs, headers): (&[(u64, ObjectRef)], &HashMap<String, segment::Header>),
    report: &mut Report,
    gone: &mut usize,
) -> HashMap<u64, Vec<[u8; 32]>> {
    let mut hashes: HashMap<u64, Vec<[u8; 32]>> = HashMap::new();
    if objects
        .first()
        .is_some_and(|o| o.kind != Kind::Snapshot && o.is_legacy())
    {
        report.problems.push(format!(
            "the chain starts with {}, not a snapshot: nothing before the first snapshot can be restored",
            objects[0].key
        ));
    }
    // The sequence before and its objects that verified, with their hashes;
    // none verified means its own problem is reported and links are not.
    let mut prev: (Option<u64>, Vec<(&ObjectRef, [u8; 32])>) = (None, Vec::new());
    let mut current: (Option<u64>, Vec<(&ObjectRef, [u8; 32])>) = (None, Vec::new());
    // Read and hashed several at a time; the links are checked in order.
    let fetched = futures_util::stream::iter(objects.iter())
        .map(|object| read.read(object))
        .buffered(restore::FETCH_PARALLELISM);
    let mut fetched = std::pin::pin!(fetched);
    for object in objects {
        let Some(result) = fetched.next().await else {
            break;
        };
        if current.0 != Some(object.seq) {
            prev = std::mem::replace(&mut current, (Some(object.seq), Vec::new()));
        }
        let (header, hash) = match result {
            Ok(found) => found,
            Err(e) => {
                *gone += usize::from(e.is_not_found());
                report.problems.push(e.to_string());
                continue;
            }
        };
        current.1.push((object, hash));
        hashes.entry(object.seq).or_default().push(hash);
        let Some(prev_seq) = prev.0 else { continue };
        if object.seq != prev_seq + 1 {
            let across = chain::cover(&[], runs, prev_seq + 1, object.seq - 1);
            let before: Vec<[u8; 32]> = prev.1.iter().map(|(_, h)| *h).collect();
            // Or a run ending at this very object spans the hole with it
            // (builds before 2026-12-07 deleted the objects of the run ending
            // at the head, before the head): the object is then the one that
            // run names as its last.
            let through = || {
                chain::cover(&[], runs, prev_seq + 1, object.seq)
                    .ok()
                    .filter(|path| path.last().is_some_and(|r| r.seq == object.seq))
            };
            match across {
                Ok(path) => {
                    let after = After::Names(header.prev_hash);
                    check_across(&path, headers, before, after, object, report, &mut hashes);
                }
                Err(_) => match through() {
                    Some(path) => {
                        let after = After::Is(hash);
                        check_across(&path, headers, before, after, object, report, &mut hashes);
                    }
                    None => report.problems.push(format!(
                        "objects {} to {} are missing (before {}) and no run stands for them",
                        prev_seq + 1,
                        object.seq - 1,
                        object.key
                    )),
                },
            }
        } else if !prev.1.is_empty() && !prev.1.iter().any(|(_, h)| *h == header.prev_hash) {
            let names: Vec<&str> = prev.1.iter().map(|(o, _)| o.key.as_str()).collect();
            let theirs: Vec<String> = prev.1.iter().map(|(_, h)| to_hex(h)).collect();
            report.problems.push(format!(
                "{} does not link to {}: it names {}, which is not {}",
                object.key,
                names.join(" or "),
                to_hex(&header.prev_hash),
                theirs.join(" or ")
            ));
        }
    }
    hashes
}

/// How the object after a hole meets the runs that span it.
enum After {
    /// It links to the last run's end: it names this hash.
    Names([u8; 32]),
    /// The last run ends at it: this is its content hash.
    Is([u8; 32]),
}

/// Checks the runs that carry the chain across a hole, from the hashes
/// `before` it to `object` after it: each links to the one before, and the
/// object to the last (or is the one the last ends at). Records the hash
/// each run carries at its end.
fn check_across(
    path: &[ObjectRef],
    headers: &HashMap<String, segment::Header>,
    before: Vec<[u8; 32]>,
    after: After,
    object: &ObjectRef,
    report: &mut Report,
    hashes: &mut HashMap<u64, Vec<[u8; 32]>>,
) {
    let mut link = before;
    let mut prev_key = "the object before it".to_string();
    for run in path {
        // A run that did not verify is reported already.
        let Some(found) = headers.get(&run.key) else {
            return;
        };
        if !link.is_empty() && !link.contains(&found.prev_hash) {
            report.problems.push(format!(
                "run {} does not link to {prev_key}: it names {}",
                run.key,
                to_hex(&found.prev_hash)
            ));
            return;
        }
        let Some(end) = found.run.map(|r| r.last_hash) else {
            return;
        };
        hashes.entry(run.seq).or_default().push(end);
        link = vec![end];
        prev_key.clone_from(&run.key);
    }
    match after {
        After::Names(prev_hash) if !link.contains(&prev_hash) => report.problems.push(format!(
            "{} does not link to {prev_key}, which stands for the deleted objects before it: \
             it names {}",
            object.key,
            to_hex(&prev_hash)
        )),
        After::Is(hash) if !link.contains(&hash) => report.problems.push(format!(
            "{} is not the object {prev_key} ends at: its hash is {}",
            object.key,
            to_hex(&hash)
        )),
        _ => {}
    }
}

/// Checks every run that verified: that it links to a hash found at the
/// sequence before its first, and that the hash it carries for its last
/// sequence is one found there. Where the objects at its last sequence were
/// deleted, the run's own word is what later runs link to: runs go in order
/// of their first sequence, so a run's predecessor is checked before it.
fn check_runs(
    objects: &[ObjectRef],
    runs: &[(u64, ObjectRef)],
    headers: &HashMap<String, segment::Header>,
    hashes: &mut HashMap<u64, Vec<[u8; 32]>>,
    report: &mut Report,
) {
    let stored: HashSet<u64> = objects.iter().map(|o| o.seq).collect();
    for (first, run) in runs {
        let Some(header) = headers.get(&run.key) else {
            continue;
        };
        let holds = |hashes: &HashMap<u64, Vec<[u8; 32]>>, seq: u64, hash: &[u8; 32]| {
            hashes.get(&seq).is_some_and(|h| h.contains(hash))
        };
        if !holds(hashes, first - 1, &header.prev_hash) {
            report.problems.push(format!(
                "run {} does not link to an object at sequence {}: it names {}",
                run.key,
                first - 1,
                to_hex(&header.prev_hash)
            ));
            continue;
        }
        let Some(r) = header.run else { continue };
        let at = hashes.entry(run.seq).or_default();
        if !stored.contains(&run.seq) && at.is_empty() {
            at.push(r.last_hash);
        } else if !at.contains(&r.last_hash) {
            report.problems.push(format!(
                "run {} says sequence {} has hash {}, which no object or run there has",
                run.key,
                run.seq,
                to_hex(&r.last_hash)
            ));
        }
    }
}

/// Compares two database files page by page; returns the page count and the
/// pages that differ. The live file is read through SQLite in one read
/// transaction (so its WAL counts), the restored one as it is.
fn compare(restored: &Path, live: &Path) -> rusqlite::Result<(u64, Vec<u64>)> {
    let ours = page_hashes(&immutable(restored)?)?;
    let conn = Connection::open_with_flags(
        live,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch("BEGIN")?;
    let theirs = page_hashes(&conn)?;
    conn.execute_batch("COMMIT")?;
    let pages = ours.len().max(theirs.len()) as u64;
    let differing = (0..pages as usize)
        .filter(|&i| ours.get(i) != theirs.get(i))
        .map(|i| i as u64 + 1)
        .collect();
    Ok((pages, differing))
}

fn immutable(path: &Path) -> rusqlite::Result<Connection> {
    Connection::open_with_flags(
        restore::immutable_uri(path),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
    )
}

fn page_hashes(conn: &Connection) -> rusqlite::Result<Vec<[u8; 32]>> {
    let mut stmt = conn.prepare("SELECT data FROM sqlite_dbpage ORDER BY pgno")?;
    stmt.query_map([], |row| {
        let data: Vec<u8> = row.get(0)?;
        Ok(Sha256::digest(&data).into())
    })?
    .collect()
}

/// `1-3, 7` for [1, 2, 3, 7], capped at a few ranges.
fn summarize(pages: &[u64]) -> String {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == p => *end = p,
            _ => ranges.push((p, p)),
        }
    }
    let shown: Vec<String> = ranges
        .iter()
        .take(8)
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    let more = if ranges.len() > 8 { ", ..." } else { "" };
    format!("{}{more}", shown.join(", "))
}

/// Where the scratch restore goes: beside the live database if given (same
/// filesystem, enough room), else the current directory.
pub fn scratch_dir(live: Option<&Path>) -> PathBuf {
    live.and_then(Path::parent)
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_ranges_are_summarized() {
        assert_eq!(summarize(&[1, 2, 3, 7, 9, 10]), "1-3, 7, 9-10");
    }
}
