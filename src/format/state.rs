//! The state of a database, page by page: what lets walsync ship only the
//! pages that changed when continuity is lost, and lets restore prove that
//! the file it wrote is the state the writer had.
//!
//! Every page has a 128-bit hash (of its number and content). The *state
//! digest* of a database of `n` pages is a SHA-256 over the page size, `n`
//! and the wrapping sum of its page hashes. A sum, unlike a hash of the whole
//! file, moves in O(pages changed): take the old page's hash out, put the new
//! one in. Pages a database grows by start as zeros, so a page never written
//! counts as a page of zeros, exactly as restore leaves it.
//!
//! Each object records the digest of the state after it (format version 2),
//! and a **record** beside the database (`DB-walsync-state`) keeps every page
//! hash of the state as shipped, plus which object it describes. When the
//! chain cannot be continued, walsync compares the database with the record
//! and ships only the pages that differ. A record is used only after its
//! entries are summed again and found to give the chain head's digest, so a
//! stale, torn, or foreign record is never trusted: it costs a full snapshot.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// The digest of a whole database state.
pub type Digest = [u8; 32];

const RECORD_MAGIC: [u8; 8] = *b"WSSTATE\0";
const RECORD_VERSION: u32 = 1;
/// Magic, version, page size, pages, head sequence, head hash, digest.
const RECORD_HEADER: u64 = 8 + 4 + 4 + 4 + 8 + 32 + 32;
const ENTRY: u64 = 16;

/// The hash of page `pgno` holding `page`.
pub fn page_hash(pgno: u32, page: &[u8]) -> u128 {
    let mut h = Sha256::new();
    h.update(pgno.to_be_bytes());
    h.update(page);
    let out = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&out[..16]);
    u128::from_be_bytes(first)
}

/// The hash of page `pgno` as a page of zeros (a page the file grew by).
pub fn zero_page_hash(pgno: u32, page_size: u32) -> u128 {
    page_hash(pgno, &vec![0u8; page_size as usize])
}

/// The sum of the page hashes of a database of `pages` pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sum {
    pub page_size: u32,
    pub pages: u32,
    pub sum: u128,
}

impl Sum {
    pub fn empty(page_size: u32) -> Self {
        Self {
            page_size,
            pages: 0,
            sum: 0,
        }
    }

    pub fn add(&mut self, hash: u128) {
        self.sum = self.sum.wrapping_add(hash);
    }

    pub fn remove(&mut self, hash: u128) {
        self.sum = self.sum.wrapping_sub(hash);
    }

    pub fn digest(&self) -> Digest {
        let mut h = Sha256::new();
        h.update(b"walsync state\0");
        h.update(self.page_size.to_be_bytes());
        h.update(self.pages.to_be_bytes());
        h.update(self.sum.to_be_bytes());
        h.finalize().into()
    }
}

/// Where the record of the database at `db` as shipped to `destination` is
/// kept: beside it, one per destination (a storage and a prefix), since two
/// chains of one file (two destinations, two config entries) each have theirs.
pub fn record_path(db: &Path, destination: &str) -> PathBuf {
    let id: [u8; 32] = Sha256::digest(destination.as_bytes()).into();
    let mut s = db.as_os_str().to_owned();
    s.push("-walsync-state-");
    for b in &id[..4] {
        s.push(format!("{b:02x}"));
    }
    PathBuf::from(s)
}

/// The destination a record path is made for: a storage and a prefix in it.
pub fn destination(storage: &str, prefix: &str) -> String {
    format!("{storage}\0{prefix}")
}

/// Which object a record describes the state after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: [u8; 32],
}

/// A record on disk: every page hash of one state, and which object it
/// describes. Opened for each use (an attached database keeps no extra
/// descriptor) and read with positioned reads; never held in memory whole.
#[derive(Debug, Clone)]
pub struct Record {
    path: PathBuf,
    pub sum: Sum,
    pub head: Head,
    digest: Digest,
}

fn bad(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

impl Record {
    /// Reads the header of the record at `path`; `None` if there is none.
    /// Its sum is known only after [`Record::check`].
    pub fn open(path: &Path) -> io::Result<Option<Self>> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut head = [0u8; RECORD_HEADER as usize];
        file.read_exact_at(&mut head, 0)
            .map_err(|_| bad("shorter than its header"))?;
        if head[..8] != RECORD_MAGIC {
            return Err(bad("not a walsync state record"));
        }
        let u32_at =
            |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        if u32_at(8) != RECORD_VERSION {
            return Err(bad("an unknown record version"));
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&head[20..28]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&head[28..60]);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&head[60..92]);
        Ok(Some(Self {
            path: path.to_path_buf(),
            sum: Sum {
                page_size: u32_at(12),
                pages: u32_at(16),
                sum: 0,
            },
            head: Head {
                seq: u64::from_be_bytes(seq),
                hash,
            },
            digest,
        }))
    }

    /// An empty record (no pages) at `path`, replacing any, for a state
    /// built object by object (restore).
    pub fn create(path: &Path, page_size: u32) -> io::Result<Self> {
        let record = Self {
            path: path.to_path_buf(),
            sum: Sum::empty(page_size),
            head: Head {
                seq: 0,
                hash: [0; 32],
            },
            digest: Sum::empty(page_size).digest(),
        };
        let file = File::create(path)?;
        file.write_all_at(&header_bytes(record.sum, record.head, &record.digest), 0)?;
        Ok(record)
    }

    /// Checks that the record describes `head`, whose state digest is
    /// `digest`: its own head matches, and its entries, summed again, give
    /// that digest. Reads every entry (16 bytes a page). On success the
    /// record's sum is known and it can be used.
    pub fn check(&mut self, head: Head, digest: &Digest) -> Result<(), String> {
        if self.head != head {
            return Err(format!(
                "the state record describes sequence {}, the chain head is {}",
                self.head.seq, head.seq
            ));
        }
        if self.digest != *digest {
            return Err("the state record's digest is not the chain head's".into());
        }
        let file = File::open(&self.path).map_err(|e| e.to_string())?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        if len != RECORD_HEADER + u64::from(self.sum.pages) * ENTRY {
            return Err("the state record is torn (wrong length)".into());
        }
        let mut sum = Sum { sum: 0, ..self.sum };
        for hash in entries(file, self.sum.pages).map_err(|e| e.to_string())? {
            sum.add(hash.map_err(|e| e.to_string())?);
        }
        if sum.digest() != *digest {
            return Err(
                "the state record's pages do not sum to its digest (altered or torn)".into(),
            );
        }
        self.sum = sum;
        Ok(())
    }

    /// Whether the file is still this record: not rewritten, replaced or
    /// removed by another process (another walsync shipping this database
    /// to the same destination writes its own).
    pub fn is_current(&self) -> bool {
        self.open_checked(false).is_ok()
    }

    /// Opens the file and makes sure it is still the record that was
    /// checked: another writer's record (a restore put in place, a second
    /// process) under this name must never be read as this one.
    fn open_checked(&self, write: bool) -> io::Result<File> {
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(&self.path)?;
        let mut head = [0u8; RECORD_HEADER as usize];
        file.read_exact_at(&mut head, 0)?;
        if head[..] != header_bytes(self.sum, self.head, &self.digest)[..] {
            return Err(bad("the state record was changed by something else"));
        }
        Ok(file)
    }

    /// Every page hash, from page 1, read sequentially.
    pub fn entries(&self) -> io::Result<impl Iterator<Item = io::Result<u128>>> {
        entries(self.open_checked(false)?, self.sum.pages)
    }

    /// The sum after an object of `db_pages` pages that changes `pages`
    /// (sorted, each within `db_pages`) is applied to this state. Writes nothing.
    pub fn advance(&self, db_pages: u32, pages: &[(u32, u128)]) -> io::Result<Sum> {
        let file = self.open_checked(false)?;
        let page = |pgno: u32| read_entry(&file, pgno);
        let mut sum = self.sum;
        let old = sum.pages;
        for pgno in db_pages + 1..=old {
            sum.remove(page(pgno)?);
        }
        sum.pages = db_pages;
        for &(pgno, hash) in pages {
            if pgno <= old.min(db_pages) {
                sum.remove(page(pgno)?);
            }
            sum.add(hash);
        }
        for pgno in grown_unwritten(old, db_pages, pages) {
            sum.add(zero_page_hash(pgno, sum.page_size));
        }
        Ok(sum)
    }

    /// Applies what [`Record::advance`] computed: the new entries, the new
    /// length, then the header naming `head`. Not synced: a record torn by a
    /// crash fails [`Record::check`] and is not used.
    pub fn apply(&mut self, sum: Sum, pages: &[(u32, u128)], head: Head) -> io::Result<()> {
        let file = self.open_checked(true)?;
        for pgno in grown_unwritten(self.sum.pages, sum.pages, pages) {
            write_entry(&file, pgno, zero_page_hash(pgno, sum.page_size))?;
        }
        for &(pgno, hash) in pages {
            write_entry(&file, pgno, hash)?;
        }
        file.set_len(RECORD_HEADER + u64::from(sum.pages) * ENTRY)?;
        self.sum = sum;
        self.head = head;
        self.digest = sum.digest();
        file.write_all_at(&header_bytes(self.sum, self.head, &self.digest), 0)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The digest the record says its state has (proven by [`Record::check`]).
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Moves the record to `to` (restore: from beside the temp file to
    /// beside the restored database).
    pub fn rename(&mut self, to: &Path) -> io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.path = to.to_path_buf();
        Ok(())
    }
}

/// Pages past `old` up to `new` that `pages` does not write: they read as zeros.
fn grown_unwritten(old: u32, new: u32, pages: &[(u32, u128)]) -> impl Iterator<Item = u32> + '_ {
    let mut written = pages
        .iter()
        .map(|(p, _)| *p)
        .filter(move |p| *p > old)
        .peekable();
    (old.saturating_add(1)..=new).filter(move |pgno| {
        while written.next_if(|p| p < pgno).is_some() {}
        written.next_if_eq(pgno).is_none()
    })
}

fn entries(file: File, pages: u32) -> io::Result<impl Iterator<Item = io::Result<u128>>> {
    let mut reader = BufReader::with_capacity(1 << 16, file);
    reader.seek(SeekFrom::Start(RECORD_HEADER))?;
    Ok((0..pages).map(move |_| {
        let mut entry = [0u8; ENTRY as usize];
        reader.read_exact(&mut entry)?;
        Ok(u128::from_be_bytes(entry))
    }))
}

fn read_entry(file: &File, pgno: u32) -> io::Result<u128> {
    let mut entry = [0u8; ENTRY as usize];
    file.read_exact_at(&mut entry, RECORD_HEADER + u64::from(pgno - 1) * ENTRY)?;
    Ok(u128::from_be_bytes(entry))
}

fn write_entry(file: &File, pgno: u32, hash: u128) -> io::Result<()> {
    file.write_all_at(
        &hash.to_be_bytes(),
        RECORD_HEADER + u64::from(pgno - 1) * ENTRY,
    )
}

fn header_bytes(sum: Sum, head: Head, digest: &Digest) -> Vec<u8> {
    let mut b = Vec::with_capacity(RECORD_HEADER as usize);
    b.extend_from_slice(&RECORD_MAGIC);
    b.extend_from_slice(&RECORD_VERSION.to_be_bytes());
    b.extend_from_slice(&sum.page_size.to_be_bytes());
    b.extend_from_slice(&sum.pages.to_be_bytes());
    b.extend_from_slice(&head.seq.to_be_bytes());
    b.extend_from_slice(&head.hash);
    b.extend_from_slice(digest);
    b
}

/// Writes a whole new record, page after page, into a temp file beside its
/// final place; [`Builder::place`] names the head and moves it into place.
#[derive(Debug)]
pub struct Builder {
    out: BufWriter<tempfile::NamedTempFile>,
    sum: Sum,
}

impl Builder {
    pub fn new(record: &Path, page_size: u32) -> io::Result<Self> {
        let dir = match record.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // One name per record, which only the record's owner builds: a
        // build a killed process left is found without listing the
        // directory (a fleet's thousand databases share one), and replaced.
        let build = build_path(record);
        remove_stale_build(record);
        let mut file = tempfile::Builder::new()
            .prefix(build.file_name().unwrap_or_default())
            .rand_bytes(0)
            .tempfile_in(dir)?;
        file.write_all(&vec![0u8; RECORD_HEADER as usize])?;
        Ok(Self {
            out: BufWriter::with_capacity(1 << 16, file),
            sum: Sum::empty(page_size),
        })
    }

    /// The next page, in order from page 1.
    pub fn push(&mut self, hash: u128) -> io::Result<()> {
        self.out.write_all(&hash.to_be_bytes())?;
        self.sum.add(hash);
        self.sum.pages += 1;
        Ok(())
    }

    pub fn sum(&self) -> Sum {
        self.sum
    }

    /// Finishes the record as the state after `head` and puts it at `record`.
    pub fn place(self, record: &Path, head: Head) -> io::Result<Record> {
        let sum = self.sum;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.as_file()
            .write_all_at(&header_bytes(sum, head, &sum.digest()), 0)?;
        file.persist(record).map_err(|e| e.error)?;
        Ok(Record {
            path: record.to_path_buf(),
            sum,
            head,
            digest: sum.digest(),
        })
    }
}

/// `DIR/.NAME.tmp` for the record `DIR/NAME`: where it is built.
fn build_path(record: &Path) -> PathBuf {
    let name = record
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    record.with_file_name(format!(".{name}.tmp"))
}

/// Removes what a process killed while building the record at `record`
/// left beside it. Only for the record's owner (the process that has the
/// database claimed, or holds the restore's output lock): another's build
/// in progress would go too. What cannot be removed is left.
pub fn remove_stale_build(record: &Path) {
    let build = build_path(record);
    if std::fs::remove_file(&build).is_ok() {
        tracing::info!(
            path = %build.display(),
            "removed a state record an earlier walsync was killed while building"
        );
    }
}

/// Removes the record at `path`, if any: one that no longer describes what
/// was shipped is only a liability.
pub fn forget(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A build a killed process left is removed by the record's owner; a
    /// build of another record (another destination's) is not.
    #[test]
    fn a_killed_build_is_removed_and_only_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (mine, theirs) = (
            dir.path().join("a.db-walsync-state-1"),
            dir.path().join("a.db-walsync-state-2"),
        );
        for record in [&mine, &theirs] {
            let mut b = Builder::new(record, 512).unwrap();
            b.push(7).unwrap();
            // Killed: the temp file is never removed.
            std::mem::forget(b);
        }
        let builds = || {
            let mut names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        assert_eq!(builds().len(), 2, "{:?}", builds());
        remove_stale_build(&mine);
        let left = builds();
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(left[0] == ".a.db-walsync-state-2.tmp", "{left:?}");
    }

    fn page(byte: u8) -> Vec<u8> {
        vec![byte; 512]
    }

    fn build(dir: &Path, pages: &[u8], head: Head) -> Record {
        let path = dir.join("db-walsync-state");
        let mut b = Builder::new(&path, 512).unwrap();
        for (i, byte) in pages.iter().enumerate() {
            b.push(page_hash(i as u32 + 1, &page(*byte))).unwrap();
        }
        b.place(&path, head).unwrap();
        Record::open(&path).unwrap().unwrap()
    }

    fn sum_of(pages: &[u8]) -> Sum {
        let mut s = Sum::empty(512);
        for (i, byte) in pages.iter().enumerate() {
            s.add(page_hash(i as u32 + 1, &page(*byte)));
        }
        s.pages = pages.len() as u32;
        s
    }

    const HEAD: Head = Head {
        seq: 7,
        hash: [7; 32],
    };

    #[test]
    fn advancing_by_changed_pages_equals_summing_the_new_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = build(dir.path(), &[1, 2, 3, 4], HEAD);
        record.check(HEAD, &sum_of(&[1, 2, 3, 4]).digest()).unwrap();
        // Page 2 changes, the file shrinks to 3 pages.
        let changed = [(2, page_hash(2, &page(9)))];
        let after = record.advance(3, &changed).unwrap();
        assert_eq!(after.digest(), sum_of(&[1, 9, 3]).digest());
        let next = Head {
            seq: 8,
            hash: [8; 32],
        };
        record.apply(after, &changed, next).unwrap();
        // Grows to 6: page 6 written, page 4 and 5 are zeros.
        let changed = [(6, page_hash(6, &page(5)))];
        let after = record.advance(6, &changed).unwrap();
        assert_eq!(after.digest(), sum_of(&[1, 9, 3, 0, 0, 5]).digest());
        let last = Head {
            seq: 9,
            hash: [9; 32],
        };
        record.apply(after, &changed, last).unwrap();
        let mut reopened = Record::open(record.path()).unwrap().unwrap();
        reopened.check(last, &after.digest()).unwrap();
        let entries: Vec<u128> = reopened.entries().unwrap().map(|e| e.unwrap()).collect();
        assert_eq!(entries[1], page_hash(2, &page(9)));
        assert_eq!(entries[3], zero_page_hash(4, 512));
        assert_eq!(entries.len(), 6);
    }

    #[test]
    fn a_state_built_object_by_object_from_nothing_equals_its_sum() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = Record::create(&dir.path().join("r"), 512).unwrap();
        let snapshot: Vec<(u32, u128)> =
            (1..=3).map(|p| (p, page_hash(p, &page(p as u8)))).collect();
        let after = record.advance(3, &snapshot).unwrap();
        assert_eq!(after.digest(), sum_of(&[1, 2, 3]).digest());
        record.apply(after, &snapshot, HEAD).unwrap();
        let mut reopened = Record::open(record.path()).unwrap().unwrap();
        reopened.check(HEAD, &after.digest()).unwrap();
    }

    #[test]
    fn a_record_replaced_after_its_check_is_not_read_as_the_checked_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = build(dir.path(), &[1, 2, 3], HEAD);
        record.check(HEAD, &sum_of(&[1, 2, 3]).digest()).unwrap();
        // Another record (a restore's, say) put in its place.
        let other = Head {
            seq: 3,
            hash: [3; 32],
        };
        drop(build(dir.path(), &[1, 2, 4], other));
        assert!(record.entries().is_err());
        assert!(record.advance(3, &[]).is_err());
        assert!(record.apply(record.sum, &[], HEAD).is_err());
    }

    #[test]
    fn a_stale_altered_or_foreign_record_fails_its_check() {
        let dir = tempfile::tempdir().unwrap();
        let digest = sum_of(&[1, 2, 3]).digest();
        let mut record = build(dir.path(), &[1, 2, 3], HEAD);
        let newer = Head { seq: 8, ..HEAD };
        assert!(
            record
                .check(newer, &digest)
                .unwrap_err()
                .contains("sequence 7")
        );
        assert!(record.check(HEAD, &[0; 32]).is_err());
        // One entry altered on disk.
        let file = OpenOptions::new().write(true).open(record.path()).unwrap();
        write_entry(&file, 2, 12345).unwrap();
        let mut reopened = Record::open(record.path()).unwrap().unwrap();
        assert!(
            reopened
                .check(HEAD, &digest)
                .unwrap_err()
                .contains("altered")
        );
        // Another database's record under this name.
        let other = build(dir.path(), &[4, 5, 6], HEAD);
        drop(other);
        let mut reopened = Record::open(&dir.path().join("db-walsync-state"))
            .unwrap()
            .unwrap();
        assert!(reopened.check(HEAD, &digest).is_err());
        std::fs::write(dir.path().join("db-walsync-state"), b"junk").unwrap();
        assert!(Record::open(&dir.path().join("db-walsync-state")).is_err());
    }
}
