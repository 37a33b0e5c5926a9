//! Compaction's core: the pages that one object must hold to stand for a run
//! of consecutive objects of a database.
//!
//! Applying the objects one by one writes each object's pages and then cuts
//! or extends the file to the object's database size (see
//! `restore::apply_into`). One object stands for the run when applying it
//! alone leaves the same file: for every page of the final database, the
//! newest version written in the run, unless the file was cut below that
//! page after that write (then the page reads as zeros, as a file cut and
//! grown again does); a page the run never touched is left out.
//!
//! Memory stays small whatever the run: each page's newest version lives in
//! a spool file (one slot per page, rewritten in place), and only a map from
//! page number to slot is kept, a few bytes per page.
//!
//! Why this file is long: the rule for which pages stand for a run and the
//! building of run objects from it are one concept; a third of the file is its
//! tests.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use futures_util::StreamExt;

use crate::chain::{self, ObjectRef};
use crate::encryption::Keys;
use crate::segment::{self, Kind, PageReader};
use crate::storage::{Payload, SpoolWriter, Storage, to_hex};

/// Why a run cannot be merged.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("page size changes within the run ({found} after {expected})")]
    PageSize { found: u32, expected: u32 },
    #[error("page {pgno} is past the database size of its object ({db_pages} pages)")]
    PastEnd { pgno: u32, db_pages: u32 },
    #[error("pages of one object must come in increasing order (page {pgno} after {after})")]
    Order { pgno: u32, after: u32 },
    #[error("page 1 says the database has {says} pages, the run ends with {db_pages}")]
    SizeMismatch { says: u32, db_pages: u32 },
    #[error("nothing to merge")]
    Empty,
    #[error(transparent)]
    Chain(#[from] chain::Error),
    #[error("{key} cannot be part of a run: {why}")]
    NotARun { key: String, why: String },
    #[error(transparent)]
    Segment(#[from] crate::segment::Error),
    #[error("compaction spool file: {0}")]
    Io(#[from] io::Error),
}

impl Error {
    /// An object listed a moment ago is gone: retention deleted it while the
    /// pass ran. The next pass lists again and finds the chain as it is.
    pub fn went_meanwhile(&self) -> bool {
        matches!(self, Error::Chain(e) if e.is_not_found())
    }
}

/// The run merged so far.
pub struct Merge {
    page_size: u32,
    spool: File,
    /// Slots in use; a page's slot is `index * page_size` in the spool.
    slots: u64,
    /// Page number → slot of its newest version, for pages written since
    /// the file was last cut below them.
    newest: BTreeMap<u32, u64>,
    /// Free slots of pages dropped by a cut, reused before the spool grows.
    free: Vec<u64>,
    /// Database size after the last object added.
    db_pages: Option<u32>,
    /// Every page above this was beyond the end of the file at some point of
    /// the run: if not written since, it reads as zeros.
    zero_above: u32,
}

impl Merge {
    /// An empty run whose spool is a temp file in `dir` (removed on drop).
    pub fn new(page_size: u32, dir: &Path) -> io::Result<Self> {
        Ok(Self {
            page_size,
            spool: tempfile::tempfile_in(dir)?,
            slots: 0,
            newest: BTreeMap::new(),
            free: Vec::new(),
            db_pages: None,
            zero_above: u32::MAX,
        })
    }

    /// Adds the next object of the run: its page size, its database size
    /// after it, and its pages in increasing order.
    pub fn add<'p>(
        &mut self,
        page_size: u32,
        db_pages: u32,
        pages: impl IntoIterator<Item = (u32, &'p [u8])>,
    ) -> Result<(), Error> {
        self.check_page_size(page_size)?;
        let mut after = 0;
        for (pgno, data) in pages {
            self.put(pgno, data, db_pages, &mut after)?;
        }
        self.end_object(db_pages);
        Ok(())
    }

    /// Adds the next object of the run as a decoder reads it.
    pub fn add_object<R: std::io::Read>(
        &mut self,
        reader: &mut crate::segment::PageReader<R>,
    ) -> Result<(), Error> {
        let header = *reader.header();
        self.check_page_size(header.page_size)?;
        let mut page = vec![0u8; header.page_size as usize];
        let mut after = 0;
        while let Some(pgno) = reader.next_page(&mut page)? {
            self.put(pgno, &page, header.db_pages, &mut after)?;
        }
        self.end_object(header.db_pages);
        Ok(())
    }

    fn check_page_size(&self, page_size: u32) -> Result<(), Error> {
        if page_size == self.page_size {
            Ok(())
        } else {
            Err(Error::PageSize {
                found: page_size,
                expected: self.page_size,
            })
        }
    }

    /// Writes one page of the object being added into the page's slot.
    fn put(&mut self, pgno: u32, data: &[u8], db_pages: u32, after: &mut u32) -> Result<(), Error> {
        if pgno <= *after {
            return Err(Error::Order {
                pgno,
                after: *after,
            });
        }
        *after = pgno;
        if pgno > db_pages {
            return Err(Error::PastEnd { pgno, db_pages });
        }
        let slot = match self.newest.get(&pgno) {
            Some(&slot) => slot,
            None => {
                let slot = self.free.pop().unwrap_or_else(|| {
                    self.slots += 1;
                    self.slots - 1
                });
                self.newest.insert(pgno, slot);
                slot
            }
        };
        self.spool
            .write_all_at(data, slot * u64::from(self.page_size))?;
        Ok(())
    }

    /// Ends the object being added: the file is cut or grown to `db_pages`.
    fn end_object(&mut self, db_pages: u32) {
        for (_, slot) in self.newest.split_off(&(db_pages.saturating_add(1))) {
            self.free.push(slot);
        }
        self.zero_above = self.zero_above.min(db_pages);
        self.db_pages = Some(db_pages);
    }

    /// The database size after the run.
    pub fn db_pages(&self) -> Option<u32> {
        self.db_pages
    }

    /// Pages the merged object holds.
    pub fn page_count(&self) -> u32 {
        let Some(db_pages) = self.db_pages else {
            return 0;
        };
        let zeros = (self.zero_above.min(db_pages) + 1..=db_pages)
            .filter(|p| !self.newest.contains_key(p))
            .count();
        (self.newest.len() + zeros) as u32
    }

    /// Hands the merged object's pages to `emit` in increasing order: the
    /// newest version of every page still written, and zeros for pages the
    /// run cut away and did not write again. Refuses a run whose newest page 1
    /// disagrees with its final size, as restore would refuse the object.
    pub fn pages(
        &self,
        mut emit: impl FnMut(u32, &[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let db_pages = self.db_pages.ok_or(Error::Empty)?;
        let size = self.page_size as usize;
        let mut page = vec![0u8; size];
        let zeros = vec![0u8; size];
        let mut written = self.newest.iter().peekable();
        let first_zero = self.zero_above.min(db_pages).saturating_add(1);
        let mut zero = first_zero;
        loop {
            // The lower of the next written page and the next zero page.
            while zero <= db_pages && self.newest.contains_key(&zero) {
                zero += 1;
            }
            let zero_left = zero <= db_pages;
            let take_written = match written.peek() {
                None if !zero_left => return Ok(()),
                None => false,
                Some((p, _)) => !zero_left || **p < zero,
            };
            if !take_written {
                emit(zero, &zeros)?;
                zero += 1;
                continue;
            }
            let Some((&p, &slot)) = written.next() else {
                return Ok(());
            };
            self.spool
                .read_exact_at(&mut page, slot * u64::from(self.page_size))?;
            if p == 1
                && let Some(says) = crate::restore::header_page_count(&page)
                && says != db_pages
            {
                return Err(Error::SizeMismatch { says, db_pages });
            }
            emit(p, &page)?;
        }
    }
}

/// Objects downloaded at once while building a run.
const FETCH_PARALLELISM: usize = 8;

/// A run built, ready to be stored under `key`.
pub struct Built {
    pub key: String,
    pub header: segment::Header,
    pub hash: [u8; 32],
    pub payload: Payload,
}

/// Builds the run that stands for `objects`: consecutive objects of one
/// chain (runs among them stand for theirs), none of them a snapshot, the
/// first linking to `before` (the hash of the object before them) if given,
/// else to whatever its header names: `watch` compacts what it wrote itself
/// and spares the read of the object before. Each object is downloaded and
/// verified (its trailer, its key, its link to the one before) before its
/// pages count; the
/// run is sealed with the current key of `keys`, if any, and carries the
/// last object's state digest so a restore through it is checked as one
/// through the objects would be.
pub async fn build_run(
    storage: &dyn Storage,
    prefix: &str,
    objects: &[ObjectRef],
    before: Option<[u8; 32]>,
    keys: Option<std::sync::Arc<Keys>>,
    scratch: &Path,
) -> Result<Built, Error> {
    let (Some(first), Some(last)) = (objects.first(), objects.last()) else {
        return Err(Error::Empty);
    };
    let mut expected_seq = None;
    let mut first_seq = first.seq;
    // Owned references: a stream that borrows them is not `Send` for the
    // compiler when `watch` spawns the pass.
    let fetched = futures_util::stream::iter(objects.to_vec())
        .map(|object| async move { chain::read_verified(storage, &object).await })
        .buffered(FETCH_PARALLELISM);
    let mut fetched = std::pin::pin!(fetched);
    let mut merge: Option<Merge> = None;
    let mut link = before;
    let mut last_header: Option<segment::Header> = None;
    let mut run_prev = [0u8; 32];
    for object in objects {
        let Some(read) = fetched.next().await else {
            return Err(Error::Empty);
        };
        let (header, hash, file) = read?;
        let refuse = |why: String| Error::NotARun {
            key: object.key.clone(),
            why,
        };
        // A run's first sequence, or the object's own.
        let starts = header.run.map_or(header.seq, |r| r.first);
        if expected_seq.is_none() {
            first_seq = starts;
        }
        if expected_seq.is_some_and(|e| e != starts) {
            return Err(refuse(format!(
                "expected sequence {}",
                expected_seq.unwrap_or_default()
            )));
        }
        expected_seq = Some(header.seq + 1);
        if header.kind == Kind::Snapshot {
            return Err(refuse("it is a snapshot, where a chain starts".into()));
        }
        if let Some(link) = link
            && header.prev_hash != link
        {
            return Err(refuse(format!(
                "it links to {}, not to {}",
                to_hex(&header.prev_hash),
                to_hex(&link)
            )));
        }
        if last_header.is_none() {
            run_prev = header.prev_hash;
        }
        link = Some(chain::handed_on(&header, hash));
        let mut run = match merge.take() {
            Some(m) => m,
            None => Merge::new(header.page_size, scratch)?,
        };
        let opened = keys.clone();
        let key = object.key.clone();
        merge = Some(
            tokio::task::spawn_blocking(move || -> Result<Merge, Error> {
                let len = file.metadata()?.len();
                let mut reader = PageReader::new(
                    io::BufReader::with_capacity(1 << 20, file),
                    len,
                    opened.as_deref(),
                )
                .map_err(|source| chain::Error::Segment {
                    key: key.clone(),
                    source,
                })?;
                run.add_object(&mut reader).map_err(|e| match e {
                    Error::Segment(source) => Error::Chain(chain::Error::Segment { key, source }),
                    other => other,
                })?;
                Ok(run)
            })
            .await
            .map_err(|e| Error::Io(io::Error::other(e)))??,
        );
        last_header = Some(header);
    }
    let (Some(merge), Some(last_header)) = (merge, last_header) else {
        return Err(Error::Empty);
    };
    let db_pages = merge.db_pages().ok_or(Error::Empty)?;
    let header = segment::Header {
        version: segment::VERSION,
        kind: Kind::Run,
        page_size: last_header.page_size,
        seq: last.seq,
        db_pages,
        page_count: merge.page_count(),
        timestamp_ms: last_header.timestamp_ms,
        wal: last_header.wal,
        prev_hash: run_prev,
        sealed: None,
        run: Some(segment::Run {
            first: first_seq,
            last_hash: link.unwrap_or_default(),
        }),
        state: None,
    };
    let state = last_header.state;
    // Sealed like the objects it stands for (a key change takes a snapshot,
    // so they share one), so a restore sees no change of key through it.
    let seal = last_header.sealed.map(|s| s.key_id);
    let (header, hash, payload) = tokio::task::spawn_blocking(move || -> Result<_, Error> {
        let key = match (seal, keys.as_deref()) {
            (Some(id), Some(keys)) => keys.find(id),
            _ => None,
        };
        if let (Some(id), None) = (seal, key) {
            return Err(Error::Segment(segment::Error::MissingKey(id)));
        }
        let mut encoder = segment::Encoder::new(header, key, SpoolWriter::new())?;
        merge.pages(|pgno, page| Ok(encoder.add_page(pgno, page)?))?;
        let header = *encoder.header();
        let (hash, spool) = encoder.finish(state)?;
        Ok((header, hash, spool.finish()?))
    })
    .await
    .map_err(|e| Error::Io(io::Error::other(e)))??;
    Ok(Built {
        key: segment::run_key(prefix, first_seq, last.seq),
        header: segment::Header { state, ..header },
        hash,
        payload,
    })
}

/// The run lengths built by default, in objects: at one sync a second, about
/// a quarter of a minute, four minutes and an hour. A restore then reads at
/// most 15 objects of each level and 15 runs of the longest per 4,096
/// objects (86,400 objects since a snapshot: about 70 objects in all).
pub const LEVELS: [u64; 3] = [16, 256, 4096];

/// How long every transaction stays restorable exactly unless told
/// otherwise: objects a run stands for are deleted once this old.
pub const EXACT_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);

/// A run of the smallest level whose objects may still be stored; they go
/// once it is older than the exact window (see [`delete_replaced`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replaced {
    pub first: u64,
    pub last: u64,
    /// The time its last object recorded, once known (a run found by a
    /// listing is read when it is next looked at).
    pub timestamp_ms: Option<u64>,
}

/// What a compaction pass did.
#[derive(Debug, Default)]
pub struct Report {
    /// The runs stored, as `(first, last)`.
    pub built: Vec<(u64, u64)>,
    /// The runs of the smallest level whose objects may still be stored,
    /// oldest first: from a listing pass all of them, from a later pass
    /// those it placed.
    pub replaced: Vec<Replaced>,
    /// The time recorded in each run stored, by its last sequence.
    times: std::collections::HashMap<u64, u64>,
    /// Runs that were stored already (by an earlier pass).
    pub present: usize,
    /// Objects and runs read to build them.
    pub read: usize,
    /// Bytes of the runs stored.
    pub bytes: u64,
}

/// Builds every run of `levels` that the chain of `prefix` lacks. A run of
/// level `L` ends at a multiple of `L` and starts `L` objects before, or just
/// after the newest snapshot before its end if that is later; it is built
/// from the longest runs already stored and the objects between them, and
/// stored create-only (one found there already counts as done). A forked
/// chain is left alone.
pub async fn compact_chain(
    storage: &dyn Storage,
    prefix: &str,
    levels: &[u64],
    keys: Option<std::sync::Arc<Keys>>,
    scratch: &Path,
) -> Result<Report, Error> {
    let (objects, mut runs) = chain::list_with_runs(storage, prefix).await?;
    let mut report = Report::default();
    if !chain::forks(&objects).is_empty() {
        return Ok(report);
    }
    let Some(head) = objects.last().map(|o| o.seq) else {
        return Ok(report);
    };
    let snapshots: Vec<u64> = objects
        .iter()
        .filter(|o| o.kind == Kind::Snapshot)
        .map(|o| o.seq)
        .collect();
    for &level in levels.iter().filter(|l| **l >= 2) {
        for last in (level..=head).step_by(level as usize) {
            let Some(&snapshot) = snapshots.iter().rev().find(|s| **s <= last) else {
                continue;
            };
            let Some(first) = stretch_start(level, last, snapshot) else {
                continue;
            };
            if runs.iter().any(|(f, r)| *f == first && r.seq == last) {
                report.present += 1;
                continue;
            }
            // A stretch with a hole (retention, or an object lost) gets no
            // run; one whose objects were deleted has runs to be built from.
            let Ok(inputs) = chain::cover(&objects, &runs, first, last) else {
                continue;
            };
            let before = objects
                .iter()
                .find(|o| o.seq + 1 == first)
                .or_else(|| runs.iter().map(|(_, r)| r).find(|r| r.seq + 1 == first));
            let Some(before) = before else {
                continue;
            };
            let before = chain::read_link(storage, before).await?;
            let before_hash = chain::handed_on(&before.header, before.hash);
            report.read += inputs.len() + 1;
            let built = match build_run(
                storage,
                prefix,
                &inputs,
                Some(before_hash),
                keys.clone(),
                scratch,
            )
            .await
            {
                Ok(built) => built,
                // An unmarked snapshot inside, say: this stretch gets no run.
                Err(Error::NotARun { key, why }) => {
                    tracing::debug!(prefix, first, last, key, why, "no run for this stretch");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let key = store(storage, built, (first, last), &mut report).await?;
            tracing::debug!(prefix, first, last, objects = inputs.len(), "stored a run");
            // In the order chain::cover looks runs up: by first, longest first.
            let at = runs.partition_point(|(f, r)| {
                (*f, std::cmp::Reverse(r.seq)) < (first, std::cmp::Reverse(last))
            });
            runs.insert(
                at,
                (
                    first,
                    ObjectRef {
                        key,
                        seq: last,
                        kind: Kind::Run,
                        size: 0,
                        mark: None,
                    },
                ),
            );
        }
    }
    if let Some(&smallest) = levels.first() {
        report.replaced = runs
            .iter()
            .filter(|(first, run)| run.seq - first < smallest)
            .filter(|(first, run)| {
                let at = objects.partition_point(|o| o.seq < *first);
                objects.get(at).is_some_and(|o| o.seq <= run.seq)
            })
            .map(|(first, run)| Replaced {
                first: *first,
                last: run.seq,
                timestamp_ms: report.times.get(&run.seq).copied(),
            })
            .collect();
    }
    Ok(report)
}

/// Where the run of level `level` that ends at `last` starts: `level`
/// objects before, or just after `snapshot` (the newest at or before `last`)
/// if that is later. A stretch that ends on its snapshot or holds one object
/// gets no run.
fn stretch_start(level: u64, last: u64, snapshot: u64) -> Option<u64> {
    let first = (last + 1).saturating_sub(level).max(snapshot + 1);
    (first < last).then_some(first)
}

/// Stores `built`, the run of `stretch`, create-only and counts it in
/// `report`: one stored already (by an earlier pass, or `walsync compact`
/// beside `watch`) counts as present. Returns its key.
async fn store(
    storage: &dyn Storage,
    built: Built,
    stretch: (u64, u64),
    report: &mut Report,
) -> Result<String, Error> {
    let bytes = built.payload.len();
    let key = built.key.clone();
    match storage.put_new(&built.key, built.payload, built.hash).await {
        Ok(()) => {
            report.built.push(stretch);
            report.times.insert(stretch.1, built.header.timestamp_ms);
            report.bytes += bytes;
        }
        Err(crate::storage::Error::AlreadyExists { .. }) => report.present += 1,
        Err(e) => return Err(chain::Error::Storage(e).into()),
    }
    Ok(key)
}

/// What is wrong with a list of levels, if anything: each at least 2, each
/// a multiple of the one before, so that a run of one level is made of whole
/// runs of the level below and `watch` can name every input without listing.
pub fn levels_problem(levels: &[u64]) -> Option<String> {
    let mut before = 1;
    for &level in levels {
        if level < 2 {
            return Some(format!("{level} is not a run (at least 2 objects)"));
        }
        if level % before != 0 || level == before {
            return Some(format!(
                "{level} is not a larger multiple of the level before it ({before})"
            ));
        }
        before = level;
    }
    None
}

/// Builds the runs of `levels` (see [`levels_problem`]) that end past `done`
/// and at or before `head`, for a chain whose newest snapshot at or before
/// `head` is `snapshot` (at most `done`): `watch` compacts what it wrote
/// since its last pass, naming every input from the rule [`compact_chain`]
/// follows instead of listing the chain. An input that is not there (a run
/// of an earlier pass that failed, an object retention took) or that cannot
/// be part of a run fails the pass; [`compact_chain`] then repairs from a
/// listing.
pub async fn compact_since(
    storage: &dyn Storage,
    prefix: &str,
    levels: &[u64],
    (done, head, snapshot): (u64, u64, u64),
    keys: Option<std::sync::Arc<Keys>>,
    scratch: &Path,
) -> Result<Report, Error> {
    let mut report = Report::default();
    let object = |seq: u64| ObjectRef {
        key: segment::object_key(prefix, seq),
        seq,
        kind: Kind::Wal,
        size: 0,
        mark: None,
    };
    let stretch = |level: u64, last: u64| stretch_start(level, last, snapshot);
    for (i, &level) in levels.iter().enumerate() {
        let lower = i.checked_sub(1).map(|j| levels[j]);
        let mut last = (done / level + 1) * level;
        while last <= head {
            // After a snapshot, a stretch may be the lower level's very run.
            let Some(first) = stretch(level, last)
                .filter(|first| lower.is_none_or(|l| stretch(l, last) != Some(*first)))
            else {
                last += level;
                continue;
            };
            // The lower level's stretches that make up this one, each its
            // run or, where it is one object, that object.
            let inputs: Vec<ObjectRef> = match lower {
                None => (first..=last).map(object).collect(),
                Some(lower) => (first.div_ceil(lower) * lower..=last)
                    .step_by(lower as usize)
                    .map(|end| match stretch(lower, end) {
                        Some(start) => ObjectRef {
                            key: segment::run_key(prefix, start, end),
                            seq: end,
                            kind: Kind::Run,
                            size: 0,
                            mark: None,
                        },
                        None => object(end),
                    })
                    .collect(),
            };
            report.read += inputs.len();
            let built = build_run(storage, prefix, &inputs, None, keys.clone(), scratch).await?;
            store(storage, built, (first, last), &mut report).await?;
            last += level;
        }
    }
    if let Some(&smallest) = levels.first() {
        let mut last = (done / smallest + 1) * smallest;
        while last <= head {
            if let Some(first) = stretch(smallest, last) {
                report.replaced.push(Replaced {
                    first,
                    last,
                    timestamp_ms: report.times.get(&last).copied(),
                });
            }
            last += smallest;
        }
    }
    Ok(report)
}

/// Deletes the objects of the runs in `replaced` (oldest first) that are
/// older than `window` as of `now_ms`, and drops those runs from it: the
/// runs stand for them, and a restore to a point they held goes to the
/// nearest run end instead. The run ending at `head` keeps all its objects
/// whatever their age (a writer that starts links to the head's object) and
/// stays queued until a pass at a later head. A run found by a listing is downloaded
/// and verified once, for its time, before anything it stands for goes.
/// Returns how many objects were deleted.
pub async fn delete_replaced(
    storage: &dyn Storage,
    prefix: &str,
    replaced: &mut std::collections::VecDeque<Replaced>,
    (window, head, now_ms): (std::time::Duration, u64, u64),
) -> Result<u64, Error> {
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    // The runs old enough, counted from the front; their objects go in one
    // request (or one per 1,000 keys), and the runs leave the queue after.
    let mut due = 0;
    let mut keys = Vec::new();
    while let Some(run) = replaced.get_mut(due) {
        let recorded = match run.timestamp_ms {
            Some(ms) => ms,
            None => {
                let object = ObjectRef {
                    key: segment::run_key(prefix, run.first, run.last),
                    seq: run.last,
                    kind: Kind::Run,
                    size: 0,
                    mark: None,
                };
                match chain::read_verified(storage, &object).await {
                    Ok((header, _, _)) => {
                        run.timestamp_ms = Some(header.timestamp_ms);
                        header.timestamp_ms
                    }
                    // Retention took the run and the objects before it
                    // while it waited here: nothing of it is left to delete.
                    Err(e) if e.is_not_found() => {
                        due += 1;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        if recorded.saturating_add(window_ms) > now_ms {
            break;
        }
        if run.last >= head {
            // The run ends at the head (at rest, or reported late): it and
            // the runs after it wait until the chain has moved past it.
            // Deleting its objects before the head alone would leave a hole
            // just before a stored object, which no run ending before that
            // object spans.
            break;
        }
        keys.extend((run.first..=run.last).map(|seq| segment::object_key(prefix, seq)));
        due += 1;
    }
    storage
        .delete_many(&keys)
        .await
        .map_err(chain::Error::Storage)?;
    replaced.drain(..due);
    Ok(keys.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 16;

    /// One object: its database size after it and its pages.
    type Object = (u32, Vec<(u32, Vec<u8>)>);

    /// Restore's way: write each object's pages, then cut or grow the file.
    fn apply(file: &mut Vec<u8>, object: &Object) {
        let (db_pages, pages) = object;
        for (pgno, data) in pages {
            let at = (*pgno as usize - 1) * PAGE;
            if file.len() < at + PAGE {
                file.resize(at + PAGE, 0);
            }
            file[at..at + PAGE].copy_from_slice(data);
        }
        file.resize(*db_pages as usize * PAGE, 0);
    }

    fn merged(objects: &[Object]) -> Object {
        let dir = tempfile::tempdir().unwrap();
        let mut merge = Merge::new(PAGE as u32, dir.path()).unwrap();
        for (db_pages, pages) in objects {
            merge
                .add(
                    PAGE as u32,
                    *db_pages,
                    pages.iter().map(|(p, d)| (*p, d.as_slice())),
                )
                .unwrap();
        }
        let mut pages = Vec::new();
        merge
            .pages(|p, d| {
                pages.push((p, d.to_vec()));
                Ok(())
            })
            .unwrap();
        assert_eq!(pages.len() as u32, merge.page_count());
        (merge.db_pages().unwrap(), pages)
    }

    /// A small deterministic generator: runs are replayable from the seed.
    struct Dice(u64);

    impl Dice {
        fn below(&mut self, n: u32) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % u64::from(n)) as u32
        }
    }

    fn random_run(dice: &mut Dice, start_pages: u32) -> Vec<Object> {
        let mut db_pages = start_pages;
        (0..1 + dice.below(12))
            .map(|_| {
                // Mostly small changes; now and then a cut or a jump.
                db_pages = match dice.below(6) {
                    0 => dice.below(db_pages + 1),
                    1 => db_pages + dice.below(8),
                    _ => db_pages,
                };
                let mut pages: Vec<u32> = (1..=db_pages).filter(|_| dice.below(3) == 0).collect();
                pages.dedup();
                let pages = pages
                    .into_iter()
                    .map(|p| (p, vec![(dice.below(250) + 1) as u8; PAGE]))
                    .collect();
                (db_pages, pages)
            })
            .collect()
    }

    #[test]
    fn one_merged_object_leaves_the_file_the_run_leaves() {
        for seed in 1..2000u64 {
            let mut dice = Dice(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let start = dice.below(10);
            let base: Vec<u8> = (0..start as usize * PAGE)
                .map(|i| (i % 200) as u8)
                .collect();
            let run = random_run(&mut dice, start);
            let mut one_by_one = base.clone();
            for object in &run {
                apply(&mut one_by_one, object);
            }
            let merged = merged(&run);
            let mut at_once = base.clone();
            apply(&mut at_once, &merged);
            assert_eq!(
                at_once, one_by_one,
                "seed {seed}: {run:?} merged to {merged:?}"
            );
            // Each page once, in order, none past the end.
            assert!(merged.1.windows(2).all(|w| w[0].0 < w[1].0), "seed {seed}");
            assert!(merged.1.iter().all(|(p, _)| *p >= 1 && *p <= merged.0));
        }
    }

    #[test]
    fn a_page_cut_away_and_not_written_again_is_zeros_and_untouched_pages_are_left_out() {
        let a = |n: u8| vec![n; PAGE];
        let run = vec![
            (6, vec![(2, a(1)), (5, a(2))]),
            (3, vec![(1, a(3))]),
            (6, vec![(4, a(4))]),
        ];
        let (db_pages, pages) = merged(&run);
        assert_eq!(db_pages, 6);
        let got: Vec<(u32, u8)> = pages.iter().map(|(p, d)| (*p, d[0])).collect();
        // Page 3 was never written and never cut: left as it was. Page 5 was
        // cut away by the second object: zeros, not its old version.
        assert_eq!(got, vec![(1, 3), (2, 1), (4, 4), (5, 0), (6, 0)]);
    }

    #[test]
    fn the_newest_version_wins_and_the_spool_holds_one_slot_per_page() {
        let dir = tempfile::tempdir().unwrap();
        let mut merge = Merge::new(PAGE as u32, dir.path()).unwrap();
        for n in 1..=100u8 {
            let data = vec![n; PAGE];
            merge.add(PAGE as u32, 2, [(2, data.as_slice())]).unwrap();
        }
        assert_eq!(merge.slots, 1);
        let mut seen = Vec::new();
        merge
            .pages(|p, d| {
                seen.push((p, d[0]));
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, vec![(2, 100)]);
    }

    #[test]
    fn a_run_that_cannot_stand_as_one_object_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let page = vec![0u8; PAGE];
        let mut merge = Merge::new(PAGE as u32, dir.path()).unwrap();
        assert!(matches!(
            merge.add(32, 1, [(1, page.as_slice())]),
            Err(Error::PageSize { .. })
        ));
        assert!(matches!(
            merge.add(PAGE as u32, 1, [(2, page.as_slice())]),
            Err(Error::PastEnd { .. })
        ));
        assert!(matches!(
            merge.add(PAGE as u32, 3, [(2, page.as_slice()), (2, page.as_slice())]),
            Err(Error::Order { .. })
        ));
        let empty = Merge::new(PAGE as u32, dir.path()).unwrap();
        assert!(matches!(empty.pages(|_, _| Ok(())), Err(Error::Empty)));
    }

    #[test]
    fn page_one_must_agree_with_the_final_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut page1 = vec![0u8; 4096];
        page1[..16].copy_from_slice(b"SQLite format 3\0");
        page1[28..32].copy_from_slice(&5u32.to_be_bytes());
        let mut merge = Merge::new(4096, dir.path()).unwrap();
        merge.add(4096, 5, [(1, page1.as_slice())]).unwrap();
        assert!(merge.pages(|_, _| Ok(())).is_ok());
        merge.add(4096, 7, std::iter::empty()).unwrap();
        assert!(matches!(
            merge.pages(|_, _| Ok(())),
            Err(Error::SizeMismatch {
                says: 5,
                db_pages: 7
            })
        ));
    }

    /// Retention may delete a run (and its objects) while it waits in the
    /// queue for the exact window: the queue must go on past it, or no
    /// later run's objects would ever be deleted.
    #[tokio::test]
    async fn a_run_retention_deleted_does_not_hold_the_window_back() {
        use crate::storage::{Storage, fs::FsStorage};
        let dir = tempfile::tempdir().unwrap();
        let store = FsStorage::new(dir.path());
        for seq in 5..=8 {
            let key = segment::object_key("db", seq);
            store
                .put_new(&key, Payload::Bytes(vec![1]), [0; 32])
                .await
                .unwrap();
        }
        let mut replaced: std::collections::VecDeque<Replaced> = [
            // Gone with its objects: retention took them.
            Replaced {
                first: 1,
                last: 4,
                timestamp_ms: None,
            },
            Replaced {
                first: 5,
                last: 8,
                timestamp_ms: Some(1_000),
            },
        ]
        .into();
        let window = std::time::Duration::from_secs(1);
        let deleted = delete_replaced(&store, "db", &mut replaced, (window, 100, 1_000_000))
            .await
            .unwrap();
        assert_eq!(deleted, 4);
        assert!(replaced.is_empty(), "{replaced:?}");
        assert!(store.list("db/").await.unwrap().is_empty());
    }

    /// A run that ends at the head (a database at rest, passed over once
    /// its objects aged) keeps all its objects until the chain has moved
    /// past it; then they all go.
    #[tokio::test]
    async fn the_run_ending_at_the_head_keeps_its_objects_until_the_chain_moves_on() {
        use crate::storage::{Storage, fs::FsStorage};
        let dir = tempfile::tempdir().unwrap();
        let store = FsStorage::new(dir.path());
        for seq in 1..=9 {
            let key = segment::object_key("db", seq);
            store
                .put_new(&key, Payload::Bytes(vec![1]), [0; 32])
                .await
                .unwrap();
        }
        let run = |first, last| Replaced {
            first,
            last,
            timestamp_ms: Some(1_000),
        };
        let mut replaced: std::collections::VecDeque<Replaced> = [run(1, 4), run(5, 8)].into();
        let window = std::time::Duration::from_secs(1);
        let at_rest = (window, 8, 1_000_000);
        let deleted = delete_replaced(&store, "db", &mut replaced, at_rest)
            .await
            .unwrap();
        assert_eq!(deleted, 4);
        let left = |keys: Vec<crate::storage::ObjectMeta>| -> Vec<String> {
            keys.into_iter().map(|m| m.key).collect()
        };
        assert_eq!(
            left(store.list("db/").await.unwrap()),
            (5..=9)
                .map(|seq| segment::object_key("db", seq))
                .collect::<Vec<_>>()
        );
        assert_eq!(replaced.len(), 1, "the head's run waits");
        let moved_on = (window, 9, 1_000_000);
        let deleted = delete_replaced(&store, "db", &mut replaced, moved_on)
            .await
            .unwrap();
        assert_eq!(deleted, 4);
        assert!(replaced.is_empty(), "{replaced:?}");
        assert_eq!(
            left(store.list("db/").await.unwrap()),
            [segment::object_key("db", 9)]
        );
    }
}
