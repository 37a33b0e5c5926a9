//! SQLite WAL files read from bytes: header, frames, checksums, commit boundaries.
//!
//! The format (sqlite.org/fileformat2.html#walformat): a 32-byte header, then
//! frames of a 24-byte frame header plus one page. Each frame carries the
//! header's salts and a running checksum over every frame before it, so a
//! frame is valid only if its salts match and the checksum chain reaches it
//! intact. A frame whose "database size" field is non-zero ends a transaction.
//!
//! [`scan`] yields only whole transactions: it stops at the first frame that is
//! torn, stale (salts of an earlier WAL generation) or missing, and reports the
//! position just after the last commit frame before that point. Frames after the
//! last commit (a transaction still being written, or one that rolled back) are
//! never reported. This module decides nothing about checkpoints.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;

pub const HEADER_SIZE: u64 = 32;
pub const FRAME_HEADER_SIZE: u64 = 24;
const MAGIC_LE: u32 = 0x377f_0682;
const MAGIC_BE: u32 = 0x377f_0683;
const FORMAT_VERSION: u32 = 3_007_000;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("WAL header is {0} bytes, need 32")]
    ShortHeader(usize),
    #[error("WAL header has bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("WAL header has unsupported format version {0}")]
    BadVersion(u32),
    #[error("WAL header has invalid page size {0}")]
    BadPageSize(u32),
    #[error("WAL header checksum does not match")]
    BadHeaderChecksum,
    #[error("reading WAL: {0}")]
    Io(#[from] io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The WAL header fields that matter for replication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalHeader {
    /// Checksums are computed over big-endian words (magic 0x377f0683).
    pub big_endian: bool,
    pub page_size: u32,
    pub checkpoint_seq: u32,
    pub salt1: u32,
    pub salt2: u32,
    /// Checksum of the header itself; seeds the frame checksum chain.
    pub checksum: (u32, u32),
}

impl WalHeader {
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < HEADER_SIZE as usize {
            return Err(Error::ShortHeader(bytes.len()));
        }
        let magic = be32(bytes, 0);
        let big_endian = match magic {
            MAGIC_LE => false,
            MAGIC_BE => true,
            other => return Err(Error::BadMagic(other)),
        };
        let version = be32(bytes, 4);
        if version != FORMAT_VERSION {
            return Err(Error::BadVersion(version));
        }
        let page_size = be32(bytes, 8);
        if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
            return Err(Error::BadPageSize(page_size));
        }
        let checksum = (be32(bytes, 24), be32(bytes, 28));
        if checksum_step(big_endian, (0, 0), &bytes[..24]) != checksum {
            return Err(Error::BadHeaderChecksum);
        }
        Ok(Self {
            big_endian,
            page_size,
            checkpoint_seq: be32(bytes, 12),
            salt1: be32(bytes, 16),
            salt2: be32(bytes, 20),
            checksum,
        })
    }

    /// Reads the header of a WAL file; `None` if the file is missing or shorter than a header.
    pub fn read_from(file: &File) -> Result<Option<Self>> {
        let mut buf = [0u8; HEADER_SIZE as usize];
        match file.read_exact_at(&mut buf, 0) {
            Ok(()) => Self::parse(&buf).map(Some),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn frame_size(&self) -> u64 {
        FRAME_HEADER_SIZE + u64::from(self.page_size)
    }

    /// Byte offset of frame `index` (0-based) in the file.
    pub fn frame_offset(&self, index: u64) -> u64 {
        HEADER_SIZE + index * self.frame_size()
    }

    /// The position of an empty WAL of this generation.
    pub fn start(&self) -> Position {
        Position {
            salt1: self.salt1,
            salt2: self.salt2,
            frame: 0,
            checksum: self.checksum,
        }
    }
}

/// A place in one WAL generation: after `frame` frames, with the checksum chain there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub salt1: u32,
    pub salt2: u32,
    /// Number of frames before this position (index of the next frame).
    pub frame: u32,
    pub checksum: (u32, u32),
}

impl Position {
    pub fn same_generation(&self, header: &WalHeader) -> bool {
        self.salt1 == header.salt1 && self.salt2 == header.salt2
    }
}

/// What [`scan`] found after a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// The position after the last whole transaction (equal to `from` if none).
    pub end: Position,
    /// Database size in pages after the last whole transaction, if any was found.
    pub db_pages: Option<u32>,
    /// Number of commit frames (transactions) between `from` and `end`.
    pub transactions: u32,
    /// For every page written between `from` and `end`, the index of its latest frame.
    pub pages: BTreeMap<u32, u32>,
    /// Valid frames after `end` that belong to no committed transaction (yet).
    pub uncommitted_frames: u32,
}

/// Reads frames from `from` on and returns the whole transactions found.
///
/// `from` must belong to the generation of `header`; the caller checks that.
pub fn scan(file: &File, header: &WalHeader, from: Position) -> Result<Scan> {
    scan_until(file, header, from, u32::MAX)
}

/// Like [`scan`], but reads no frame at or past index `limit`.
pub fn scan_until(file: &File, header: &WalHeader, from: Position, limit: u32) -> Result<Scan> {
    let frame_size = header.frame_size() as usize;
    let mut reader = BufReader::with_capacity(
        (frame_size * 16).max(256 * 1024),
        FileAt {
            file,
            offset: header.frame_offset(u64::from(from.frame)),
        },
    );
    let mut frame = vec![0u8; frame_size];
    let mut checksum = from.checksum;
    let mut index = from.frame;
    let mut result = Scan {
        end: from,
        db_pages: None,
        transactions: 0,
        pages: BTreeMap::new(),
        uncommitted_frames: 0,
    };
    let mut pending: Vec<(u32, u32)> = Vec::new();
    while index < limit && read_full(&mut reader, &mut frame)? {
        let pgno = be32(&frame, 0);
        let commit_size = be32(&frame, 4);
        if be32(&frame, 8) != header.salt1 || be32(&frame, 12) != header.salt2 || pgno == 0 {
            break;
        }
        let next = checksum_step(header.big_endian, checksum, &frame[..8]);
        let next = checksum_step(
            header.big_endian,
            next,
            &frame[FRAME_HEADER_SIZE as usize..],
        );
        if next != (be32(&frame, 16), be32(&frame, 20)) {
            break;
        }
        checksum = next;
        pending.push((pgno, index));
        index += 1;
        if commit_size != 0 {
            result.pages.extend(pending.drain(..));
            result.transactions += 1;
            result.db_pages = Some(commit_size);
            result.end = Position {
                salt1: header.salt1,
                salt2: header.salt2,
                frame: index,
                checksum,
            };
        }
    }
    result.uncommitted_frames = pending.len() as u32;
    Ok(result)
}

/// The WAL-index header SQLite keeps at the start of the `-shm` file: what
/// every connection agrees is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexHeader {
    pub salt1: u32,
    pub salt2: u32,
    /// Frames published as committed in the current generation (`mxFrame`).
    pub frames: u32,
    /// SQLite's commit counter (`iChange`): one more for every committed
    /// transaction, carried across WAL restarts and truncations (only a
    /// recovery of the WAL-index resets it). The difference between two
    /// readings is the number of commits in between, wherever they went.
    pub commits: u32,
}

impl IndexHeader {
    /// True if this index describes the WAL generation of `header`.
    pub fn describes(&self, header: &WalHeader) -> bool {
        self.salt1 == header.salt1 && self.salt2 == header.salt2
    }

    /// The number of frames published as committed for the WAL generation
    /// of `header`.
    ///
    /// A commit frame is written and synced to the WAL before SQLite publishes
    /// it in the WAL-index. If the writer dies in between and other
    /// connections keep the WAL-index alive (walsync's do), SQLite treats the
    /// frame as never committed and overwrites it. The WAL file alone cannot
    /// tell, so scans are capped here. `None` when the index describes another
    /// generation; the caller then relies on the frames alone.
    pub fn published(&self, header: &WalHeader) -> Option<u32> {
        self.describes(header).then_some(self.frames)
    }

    /// The commit counter if this index published exactly `end`.
    pub fn commits_at(&self, end: Position) -> Option<u32> {
        let here = self.salt1 == end.salt1 && self.salt2 == end.salt2 && self.frames == end.frame;
        here.then_some(self.commits)
    }
}

/// Reads the WAL-index header from `shm` (which must be a descriptor that
/// lives as long as walsync's connections: see DESIGN.md invariant 2a).
///
/// SQLite writes the header's second copy, then the first; a reader that
/// catches it between the two sees them differ, so a few reads are tried.
/// `None` when the index is missing, uninitialised or keeps changing.
pub fn read_index_header(shm: &File) -> Option<IndexHeader> {
    const TRIES: usize = 16;
    for _ in 0..TRIES {
        let mut buf = [0u8; 96];
        shm.read_exact_at(&mut buf, 0).ok()?;
        let (first, second) = buf.split_at(48);
        if first != second {
            std::thread::yield_now();
            continue;
        }
        let native = |at: usize| {
            let b = [first[at], first[at + 1], first[at + 2], first[at + 3]];
            if cfg!(target_endian = "big") {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        };
        let version = native(0);
        let is_init = first[12];
        if version != FORMAT_VERSION || is_init != 1 {
            return None;
        }
        let expected = (native(40), native(44));
        if checksum_step(cfg!(target_endian = "big"), (0, 0), &first[..40]) != expected {
            std::thread::yield_now();
            continue;
        }
        return Some(IndexHeader {
            // Salts are kept as the WAL header's bytes, big-endian.
            salt1: be32(first, 32),
            salt2: be32(first, 36),
            frames: native(16),
            commits: native(8),
        });
    }
    None
}

/// Reads the page stored in frame `index`.
pub fn read_page(file: &File, header: &WalHeader, index: u32, buf: &mut [u8]) -> io::Result<()> {
    file.read_exact_at(
        buf,
        header.frame_offset(u64::from(index)) + FRAME_HEADER_SIZE,
    )
}

/// SQLite's WAL checksum over 32-bit words, continuing from `(s0, s1)`.
pub fn checksum_step(big_endian: bool, (mut s0, mut s1): (u32, u32), data: &[u8]) -> (u32, u32) {
    debug_assert!(data.len() % 8 == 0);
    for pair in data.chunks_exact(8) {
        let (a, b) = if big_endian {
            (be32(pair, 0), be32(pair, 4))
        } else {
            (le32(pair, 0), le32(pair, 4))
        };
        s0 = s0.wrapping_add(a).wrapping_add(s1);
        s1 = s1.wrapping_add(b).wrapping_add(s0);
    }
    (s0, s1)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Fills `buf` completely; `false` at a clean or partial end of file.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Positional reads, so scanning never moves a shared file cursor.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl Read for FileAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;
    use std::io::Write;

    fn open(path: &std::path::Path) -> Connection {
        let conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        conn.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        conn
    }

    fn wal_of(path: &std::path::Path) -> (File, WalHeader) {
        let wal = File::open(format!("{}-wal", path.display())).unwrap();
        let header = WalHeader::read_from(&wal).unwrap().unwrap();
        (wal, header)
    }

    #[test]
    fn reads_whole_transactions_written_by_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let conn = open(&path);
        for i in 0..10 {
            conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))", [])
                .unwrap();
            let _ = i;
        }
        let (wal, header) = wal_of(&path);
        assert_eq!(header.page_size, 4096);
        let scan = scan(&wal, &header, header.start()).unwrap();
        // The CREATE TABLE plus ten inserts.
        assert_eq!(scan.transactions, 11);
        let frames = (wal.metadata().unwrap().len() - HEADER_SIZE) / header.frame_size();
        assert_eq!(u64::from(scan.end.frame), frames);
        assert_eq!(scan.uncommitted_frames, 0);
        let page_count: u32 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        assert_eq!(scan.db_pages, Some(page_count));

        // Resuming from the end finds nothing new; resuming mid-way finds the rest.
        let again = super::scan(&wal, &header, scan.end).unwrap();
        assert_eq!(again.transactions, 0);
        assert_eq!(again.end, scan.end);
    }

    #[test]
    fn stops_at_stale_frames_of_a_previous_generation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let conn = open(&path);
        for _ in 0..20 {
            conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))", [])
                .unwrap();
        }
        let (_, old) = wal_of(&path);
        // A complete checkpoint lets the next writer restart the WAL from frame 0
        // with new salts; the old generation's frames stay in the file behind it.
        let (busy, _, _): (i64, i64, i64) = conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!(busy, 0);
        conn.execute("INSERT INTO t(v) VALUES (x'01')", []).unwrap();
        let (wal, new) = wal_of(&path);
        assert_eq!(new.salt1, old.salt1.wrapping_add(1));
        assert_ne!(new.salt2, old.salt2);
        let len = wal.metadata().unwrap().len();
        assert!(
            len > new.frame_offset(10),
            "stale frames remain in the file"
        );
        let scan = scan(&wal, &new, new.start()).unwrap();
        assert_eq!(scan.transactions, 1);
        assert!(scan.end.frame < 5);
    }

    #[test]
    fn torn_frame_ends_the_scan_at_the_previous_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let conn = open(&path);
        for _ in 0..3 {
            conn.execute("INSERT INTO t(v) VALUES (randomblob(100))", [])
                .unwrap();
        }
        let (wal, header) = wal_of(&path);
        let full = scan(&wal, &header, header.start()).unwrap();
        let last = full.end.frame - 1;
        drop(wal);
        // Flip one byte inside the last frame's page.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("{}-wal", path.display()))
            .unwrap();
        let at = header.frame_offset(u64::from(last)) + FRAME_HEADER_SIZE + 100;
        let mut byte = [0u8; 1];
        std::fs::File::open(format!("{}-wal", path.display()))
            .unwrap()
            .read_exact_at(&mut byte, at)
            .unwrap();
        f.write_all_at(&[byte[0] ^ 0xff], at).unwrap();
        f.flush().unwrap();
        let (wal, header) = wal_of(&path);
        let torn = scan(&wal, &header, header.start()).unwrap();
        assert_eq!(torn.transactions, full.transactions - 1);
        assert!(torn.end.frame <= last);
    }

    #[test]
    fn uncommitted_frames_of_a_spilled_transaction_are_not_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let conn = open(&path);
        conn.execute("INSERT INTO t(v) VALUES (x'01')", []).unwrap();
        // A tiny cache makes a big transaction spill frames into the WAL before commit.
        conn.pragma_update(None, "cache_size", 10).unwrap();
        conn.execute_batch("BEGIN").unwrap();
        for _ in 0..200 {
            conn.execute("INSERT INTO t(v) VALUES (randomblob(2000))", [])
                .unwrap();
        }
        let (wal, header) = wal_of(&path);
        let mid = scan(&wal, &header, header.start()).unwrap();
        assert_eq!(mid.transactions, 2);
        assert!(mid.uncommitted_frames > 0, "the transaction spilled");
        conn.execute_batch("ROLLBACK").unwrap();
        let after = scan(&wal, &header, header.start()).unwrap();
        assert_eq!(after.end, mid.end);
    }

    #[test]
    fn frames_written_but_never_published_are_not_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let conn = open(&path);
        conn.execute("INSERT INTO t(v) VALUES (x'01')", []).unwrap();
        let shm_path = format!("{}-shm", path.display());
        let (wal, header) = wal_of(&path);
        let shm = File::open(&shm_path).unwrap();
        let published = read_index_header(&shm)
            .and_then(|i| i.published(&header))
            .unwrap();
        let full = scan(&wal, &header, header.start()).unwrap();
        assert_eq!(published, full.end.frame);

        // A second commit reaches the WAL file, but the WAL-index is put back
        // as it was: as if the writer died before publishing it.
        let mut index = [0u8; 136];
        shm.read_exact_at(&mut index, 0).unwrap();
        conn.execute("INSERT INTO t(v) VALUES (x'02')", []).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&shm_path)
            .unwrap()
            .write_all_at(&index, 0)
            .unwrap();
        let unpublished = scan(&wal, &header, header.start()).unwrap();
        assert!(
            unpublished.end.frame > published,
            "the orphan frames are valid on disk"
        );
        let cap = read_index_header(&shm)
            .and_then(|i| i.published(&header))
            .unwrap();
        assert_eq!(cap, published);
        let capped = scan_until(&wal, &header, header.start(), cap).unwrap();
        assert_eq!(capped.end, full.end);
    }

    /// Builds a WAL file image: `frames` of (page number, commit size).
    fn synthetic_wal(big_endian: bool, frames: &[(u32, u32)]) -> Vec<u8> {
        let page_size = 512u32;
        let mut out = Vec::new();
        let magic = if big_endian { MAGIC_BE } else { MAGIC_LE };
        for word in [
            magic,
            FORMAT_VERSION,
            page_size,
            7,
            0x1111_2222,
            0x3333_4444,
        ] {
            out.extend_from_slice(&word.to_be_bytes());
        }
        let mut ck = checksum_step(big_endian, (0, 0), &out);
        out.extend_from_slice(&ck.0.to_be_bytes());
        out.extend_from_slice(&ck.1.to_be_bytes());
        for (i, (pgno, commit)) in frames.iter().enumerate() {
            let mut head = Vec::new();
            head.extend_from_slice(&pgno.to_be_bytes());
            head.extend_from_slice(&commit.to_be_bytes());
            let page = vec![i as u8; page_size as usize];
            ck = checksum_step(big_endian, ck, &head);
            ck = checksum_step(big_endian, ck, &page);
            head.extend_from_slice(&0x1111_2222u32.to_be_bytes());
            head.extend_from_slice(&0x3333_4444u32.to_be_bytes());
            head.extend_from_slice(&ck.0.to_be_bytes());
            head.extend_from_slice(&ck.1.to_be_bytes());
            out.extend_from_slice(&head);
            out.extend_from_slice(&page);
        }
        out
    }

    #[test]
    fn both_checksum_byte_orders_are_read() {
        for big_endian in [false, true] {
            let image = synthetic_wal(big_endian, &[(1, 0), (2, 2), (2, 0), (3, 3), (1, 0)]);
            let mut file = tempfile::tempfile().unwrap();
            file.write_all(&image).unwrap();
            let header = WalHeader::read_from(&file).unwrap().unwrap();
            assert_eq!(header.big_endian, big_endian);
            assert_eq!((header.page_size, header.checkpoint_seq), (512, 7));
            let found = scan(&file, &header, header.start()).unwrap();
            assert_eq!(found.transactions, 2);
            assert_eq!(found.end.frame, 4);
            assert_eq!(found.db_pages, Some(3));
            assert_eq!(found.uncommitted_frames, 1);
            // The newest version of page 2 is frame 2, not frame 1.
            assert_eq!(found.pages.get(&2), Some(&2));
            // Read with the other byte order, the chain is broken at once.
            let mut wrong = header;
            wrong.big_endian = !big_endian;
            assert_eq!(scan(&file, &wrong, wrong.start()).unwrap().transactions, 0);
        }
    }

    #[test]
    fn rejects_garbage_headers() {
        assert!(matches!(
            WalHeader::parse(&[0u8; 10]),
            Err(Error::ShortHeader(10))
        ));
        assert!(matches!(
            WalHeader::parse(&[0u8; 32]),
            Err(Error::BadMagic(0))
        ));
        let mut h = [0u8; 32];
        h[..4].copy_from_slice(&MAGIC_LE.to_be_bytes());
        h[4..8].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
        h[8..12].copy_from_slice(&4096u32.to_be_bytes());
        assert!(matches!(
            WalHeader::parse(&h),
            Err(Error::BadHeaderChecksum)
        ));
        let ck = checksum_step(false, (0, 0), &h[..24]);
        h[24..28].copy_from_slice(&ck.0.to_be_bytes());
        h[28..32].copy_from_slice(&ck.1.to_be_bytes());
        assert_eq!(WalHeader::parse(&h).unwrap().page_size, 4096);
        h[8..12].copy_from_slice(&1000u32.to_be_bytes());
        assert!(matches!(
            WalHeader::parse(&h),
            Err(Error::BadPageSize(1000))
        ));
    }
}
