//! One LTX file as Litestream 0.5.4 and later write it, read front to back
//! and checked as it streams: every field of its header, every page header,
//! each page decoded to exactly one page, the page index against the pages
//! read, and the file checksum over all of it. docs/litestream.md describes
//! the format; the pages go to the caller as they are decoded, so a
//! snapshot of any size costs one page of memory.

use std::io::{self, Read};

use crc_fast::{CrcAlgorithm, Digest};

pub const HEADER_SIZE: usize = 100;
const MAGIC: &[u8; 4] = b"LTX1";
/// The file carries no database checksums (Litestream 0.5 always sets it).
const FLAG_NO_CHECKSUM: u32 = 0x2;
/// The page's compressed size follows its header (0.5.4 on). Without it a
/// page is an LZ4 frame (0.5.0 to 0.5.3), which is not read here.
const PAGE_FLAG_SIZE: u16 = 0x1;
/// Set in every stored checksum, so that zero can mean "none".
const CHECKSUM_FLAG: u64 = 1 << 63;
/// The uvarint index of pages is small; a larger claim is a corrupt file.
const MAX_INDEX_ENTRY: u64 = 1 << 48;

/// What an LTX file's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub flags: u32,
    pub page_size: u32,
    /// The database's size in pages once this file is applied.
    pub commit: u32,
    pub min_txid: u64,
    pub max_txid: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// The database checksum before this file (0 where none is kept).
    pub pre_apply: u64,
}

impl Header {
    /// A file that starts at the first transaction holds the whole database.
    pub fn is_snapshot(&self) -> bool {
        self.min_txid == 1
    }
}

/// What the end of the file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// The database checksum after this file (0 where none is kept).
    pub post_apply: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not an LTX file: it starts {0:02x?}, not \"LTX1\"")]
    Magic([u8; 4]),
    #[error("header flags {0:#x}: not a Litestream 0.5 file (or a newer format)")]
    Flags(u32),
    #[error("page size {0} is not a power of two from 512 to 65536")]
    PageSize(u32),
    #[error("its header says transactions {min}-{max}")]
    Txids { min: u64, max: u64 },
    #[error("header field {0} is not valid")]
    Field(&'static str),
    #[error("page {pgno}: {why}")]
    Page { pgno: u32, why: String },
    #[error(
        "it holds LZ4 frames per page (written by Litestream 0.5.0 to 0.5.3), which walsync \
         does not read: restore it with that Litestream, or let Litestream 0.5.4 or later \
         write a new snapshot first"
    )]
    LegacyFrames,
    #[error("its page index does not match its pages")]
    Index,
    #[error("file checksum {stored:016x} does not match its content ({computed:016x})")]
    Checksum { stored: u64, computed: u64 },
    #[error("bytes follow its trailer")]
    Trailing,
}

impl Error {
    fn page(pgno: u32, why: impl Into<String>) -> Self {
        Error::Page {
            pgno,
            why: why.into(),
        }
    }
}

/// The page SQLite never writes (the one holding the byte at 1 GiB).
pub fn lock_page(page_size: u32) -> u32 {
    (0x4000_0000 / page_size) + 1
}

/// Where decoded pages go: the file's header, the page's number, its bytes.
pub type PageSink<'a> = dyn FnMut(&Header, u32, &[u8]) -> io::Result<()> + 'a;

/// Reads one LTX file from `input` to its end, handing each decoded page to
/// `page` in order, and returns its header and trailer once everything,
/// the file checksum last, has checked out. A caller must not use the pages
/// of a file that fails: they are handed over before the checksum is known.
pub fn read(input: impl Read, page: &mut PageSink<'_>) -> Result<(Header, Trailer), Error> {
    let mut input = Summed {
        inner: input,
        crc: Digest::new(CrcAlgorithm::Crc64GoIso),
        at: 0,
    };
    let mut raw = [0u8; HEADER_SIZE];
    input.read_exact(&mut raw)?;
    let header = parse_header(&raw)?;
    let size = header.page_size as usize;
    let lock = lock_page(header.page_size);
    let mut compressed = Vec::with_capacity(size + size / 64 + 32);
    let mut decoded = vec![0u8; size];
    // The index must list exactly the pages read: compared as a digest of
    // (page, offset, length) rather than a list, so memory stays one page.
    let mut frames = Frames::default();
    let mut last = 0u32;
    loop {
        let at = input.at;
        let mut page_header = [0u8; 6];
        input.read_exact(&mut page_header)?;
        let pgno = u32::from_be_bytes([
            page_header[0],
            page_header[1],
            page_header[2],
            page_header[3],
        ]);
        let flags = u16::from_be_bytes([page_header[4], page_header[5]]);
        if pgno == 0 && flags == 0 {
            break;
        }
        if flags == 0 {
            return Err(Error::LegacyFrames);
        }
        if flags != PAGE_FLAG_SIZE {
            return Err(Error::page(pgno, format!("unknown page flags {flags:#x}")));
        }
        if pgno <= last {
            return Err(Error::page(pgno, format!("comes after page {last}")));
        }
        if pgno > header.commit {
            return Err(Error::page(
                pgno,
                format!("is past the database's {} pages", header.commit),
            ));
        }
        if pgno == lock {
            return Err(Error::page(
                pgno,
                "is the lock page, which SQLite never writes",
            ));
        }
        if header.is_snapshot() {
            let expected = if last + 1 == lock { last + 2 } else { last + 1 };
            if pgno != expected {
                return Err(Error::page(expected, "missing from a snapshot"));
            }
        }
        let mut len = [0u8; 4];
        input.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > size + size / 64 + 64 {
            return Err(Error::page(
                pgno,
                format!("{len} compressed bytes for a {size}-byte page"),
            ));
        }
        compressed.resize(len, 0);
        input.inner.read_exact(&mut compressed)?;
        input.at += len as u64;
        match lz4_flex::block::decompress_into(&compressed, &mut decoded) {
            Ok(n) if n == size => {}
            Ok(n) => {
                return Err(Error::page(
                    pgno,
                    format!("decodes to {n} bytes, not {size}"),
                ));
            }
            Err(e) => return Err(Error::page(pgno, format!("does not decode: {e}"))),
        }
        // The checksum covers the decoded page, not its compressed form.
        input.crc.update(&decoded);
        page(&header, pgno, &decoded)?;
        frames.add(u64::from(pgno), at, input.at - at);
        last = pgno;
    }
    if header.is_snapshot() {
        let end = if header.commit == lock {
            lock - 1
        } else {
            header.commit
        };
        if last < end {
            return Err(Error::page(last + 1, "missing from a snapshot"));
        }
    }
    let index_start = input.at;
    let mut listed = Frames::default();
    loop {
        let pgno = read_uvarint(&mut input)?;
        if pgno == 0 {
            break;
        }
        listed.add(pgno, read_uvarint(&mut input)?, read_uvarint(&mut input)?);
        if listed.count > frames.count {
            return Err(Error::Index);
        }
    }
    if listed.count != frames.count || listed.crc.finalize() != frames.crc.finalize() {
        return Err(Error::Index);
    }
    let index_len = input.at - index_start;
    if read_u64(&mut input)? != index_len {
        return Err(Error::Index);
    }
    let post_apply = read_u64(&mut input)?;
    let computed = CHECKSUM_FLAG | input.crc.finalize();
    let mut stored = [0u8; 8];
    input.inner.read_exact(&mut stored)?;
    let stored = u64::from_be_bytes(stored);
    if stored != computed {
        return Err(Error::Checksum { stored, computed });
    }
    if input.inner.read(&mut [0u8; 1])? != 0 {
        return Err(Error::Trailing);
    }
    Ok((header, Trailer { post_apply }))
}

/// The header at the start of `raw` (a file's first bytes), checked.
pub fn read_header(raw: &[u8]) -> Result<Header, Error> {
    let raw: &[u8; HEADER_SIZE] = raw
        .get(..HEADER_SIZE)
        .and_then(|r| r.try_into().ok())
        .ok_or_else(|| Error::Io(io::ErrorKind::UnexpectedEof.into()))?;
    parse_header(raw)
}

fn parse_header(raw: &[u8; HEADER_SIZE]) -> Result<Header, Error> {
    let u32_at = |at: usize| u32::from_be_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&raw[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let magic = [raw[0], raw[1], raw[2], raw[3]];
    if &magic != MAGIC {
        return Err(Error::Magic(magic));
    }
    let flags = u32_at(4);
    if flags & !FLAG_NO_CHECKSUM != 0 {
        return Err(Error::Flags(flags));
    }
    let page_size = u32_at(8);
    if !page_size.is_power_of_two() || !(512..=65536).contains(&page_size) {
        return Err(Error::PageSize(page_size));
    }
    let (min_txid, max_txid) = (u64_at(16), u64_at(24));
    if min_txid == 0 || max_txid < min_txid {
        return Err(Error::Txids {
            min: min_txid,
            max: max_txid,
        });
    }
    let timestamp_ms = u64_at(32) as i64;
    let (wal_offset, wal_size) = (u64_at(48) as i64, u64_at(56) as i64);
    if wal_offset < 0 || wal_size < 0 {
        return Err(Error::Field("WAL offset"));
    }
    if raw[80..].iter().any(|b| *b != 0) {
        return Err(Error::Field("reserved"));
    }
    Ok(Header {
        flags,
        page_size,
        commit: u32_at(12),
        min_txid,
        max_txid,
        timestamp_ms,
        pre_apply: u64_at(40),
    })
}

fn read_u64(input: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    input.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// An unsigned LEB128 number, as Go's `binary.PutUvarint` writes it.
fn read_uvarint(input: &mut impl Read) -> Result<u64, Error> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let mut b = [0u8; 1];
        input.read_exact(&mut b)?;
        value |= u64::from(b[0] & 0x7f) << shift;
        if b[0] & 0x80 == 0 {
            return if value > MAX_INDEX_ENTRY {
                Err(Error::Index)
            } else {
                Ok(value)
            };
        }
    }
    Err(Error::Index)
}

/// Page entries (number, offset, length), summed in order.
struct Frames {
    crc: Digest,
    count: u64,
}

impl Default for Frames {
    fn default() -> Self {
        Self {
            crc: Digest::new(CrcAlgorithm::Crc64Nvme),
            count: 0,
        }
    }
}

impl Frames {
    fn add(&mut self, pgno: u64, offset: u64, len: u64) {
        for n in [pgno, offset, len] {
            self.crc.update(&n.to_be_bytes());
        }
        self.count += 1;
    }
}

/// A reader that sums what passes through it and counts where it is.
struct Summed<R> {
    inner: R,
    crc: Digest,
    at: u64,
}

impl<R: Read> Read for Summed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc.update(&buf[..n]);
        self.at += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uvarint(mut n: u64, out: &mut Vec<u8>) {
        loop {
            let low = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(low);
                return;
            }
            out.push(low | 0x80);
        }
    }

    /// An LTX file as Litestream 0.5.4 and later write one; `flags` is each
    /// page's (1: its compressed size follows).
    fn ltx(commit: u32, txids: (u64, u64), pages: &[(u32, Vec<u8>)], flags: u16) -> Vec<u8> {
        let mut out = b"LTX1".to_vec();
        out.extend(FLAG_NO_CHECKSUM.to_be_bytes());
        out.extend(512u32.to_be_bytes());
        out.extend(commit.to_be_bytes());
        out.extend(txids.0.to_be_bytes());
        out.extend(txids.1.to_be_bytes());
        out.extend(1_700_000_000_000u64.to_be_bytes());
        out.resize(HEADER_SIZE, 0);
        let mut crc = Digest::new(CrcAlgorithm::Crc64GoIso);
        crc.update(&out);
        let mut index = Vec::new();
        for (pgno, data) in pages {
            let at = out.len() as u64;
            let compressed = lz4_flex::block::compress(data);
            let mut head = pgno.to_be_bytes().to_vec();
            head.extend(flags.to_be_bytes());
            head.extend((compressed.len() as u32).to_be_bytes());
            crc.update(&head);
            crc.update(data);
            out.extend(head);
            out.extend(compressed);
            for n in [u64::from(*pgno), at, out.len() as u64 - at] {
                uvarint(n, &mut index);
            }
        }
        uvarint(0, &mut index);
        let mut tail = vec![0u8; 6];
        tail.extend(&index);
        tail.extend((index.len() as u64).to_be_bytes());
        tail.extend(0u64.to_be_bytes());
        crc.update(&tail);
        out.extend(tail);
        out.extend((CHECKSUM_FLAG | crc.finalize()).to_be_bytes());
        out
    }

    fn page(fill: u8) -> Vec<u8> {
        (0..512).map(|i| fill ^ (i % 7) as u8).collect()
    }

    fn pages_of(file: &[u8]) -> Result<Vec<(u32, Vec<u8>)>, Error> {
        let mut got = Vec::new();
        read(file, &mut |_, pgno, data| {
            got.push((pgno, data.to_vec()));
            Ok(())
        })?;
        Ok(got)
    }

    #[test]
    fn a_file_reads_back_page_for_page() {
        let pages = vec![(1, page(1)), (2, page(2)), (3, page(3))];
        let file = ltx(3, (1, 4), &pages, 1);
        assert_eq!(pages_of(&file).unwrap(), pages);
        let (header, _) = read(&file[..], &mut |_, _, _| Ok(())).unwrap();
        assert_eq!((header.min_txid, header.max_txid, header.commit), (1, 4, 3));
        // An incremental file holds only the pages it changed.
        let some = vec![(2, page(9))];
        assert_eq!(pages_of(&ltx(3, (5, 5), &some, 1)).unwrap(), some);
    }

    #[test]
    fn every_byte_changed_is_refused() {
        let file = ltx(2, (1, 1), &[(1, page(1)), (2, page(2))], 1);
        // Bytes that decode the same when changed (inside an LZ4 literal
        // run's length, say) are caught by the checksum over the pages.
        for at in 0..file.len() {
            let mut bad = file.clone();
            bad[at] ^= 0x01;
            if let Ok(got) = pages_of(&bad) {
                assert_eq!(got, pages_of(&file).unwrap(), "byte {at} changed the pages");
                let compressed = HEADER_SIZE + 10..file.len() - 40;
                assert!(
                    compressed.contains(&at),
                    "byte {at}, outside the pages, accepted"
                );
            }
        }
        let mut longer = file.clone();
        longer.push(0);
        assert!(matches!(pages_of(&longer), Err(Error::Trailing)));
        assert!(pages_of(&file[..file.len() - 1]).is_err());
    }

    #[test]
    fn what_a_file_must_not_hold_is_refused() {
        let gap = ltx(3, (1, 1), &[(1, page(1)), (3, page(3))], 1);
        assert!(matches!(pages_of(&gap), Err(Error::Page { pgno: 2, .. })));
        let short = ltx(3, (1, 1), &[(1, page(1)), (2, page(2))], 1);
        assert!(matches!(pages_of(&short), Err(Error::Page { pgno: 3, .. })));
        let past = ltx(2, (4, 4), &[(3, page(3))], 1);
        assert!(matches!(pages_of(&past), Err(Error::Page { pgno: 3, .. })));
        let backwards = ltx(9, (4, 4), &[(5, page(5)), (4, page(4))], 1);
        assert!(matches!(
            pages_of(&backwards),
            Err(Error::Page { pgno: 4, .. })
        ));
        let frames = ltx(2, (4, 4), &[(1, page(1))], 0);
        assert!(matches!(pages_of(&frames), Err(Error::LegacyFrames)));
        let lock = lock_page(512);
        let at_lock = ltx(lock + 1, (4, 4), &[(lock, page(1))], 1);
        assert!(matches!(pages_of(&at_lock), Err(Error::Page { .. })));
    }

    #[test]
    fn the_checksum_is_crc64_go_iso() {
        assert_eq!(
            crc_fast::checksum(CrcAlgorithm::Crc64GoIso, b"123456789"),
            0xB909_56C7_75A4_1001
        );
    }
}
