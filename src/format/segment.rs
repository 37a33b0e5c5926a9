//! The one storage format: every object walsync writes is a segment.
//!
//! A segment is a set of database pages plus what is needed to apply and verify
//! it. A WAL segment holds the pages changed by one or more whole transactions;
//! a snapshot holds every page and starts a chain. Objects of one database form
//! a hash chain: each records the SHA-256 of the object before it, and ends with
//! the SHA-256 of its own bytes, so a missing, reordered, altered or foreign
//! object is found before a single page is written. Pure over bytes.
//!
//! Layout (integers big-endian; see `docs/format.md`):
//!
//! ```text
//! off len field
//!   0   8 magic "WALSYNC\x00"
//!   8   2 format version (2; 1 is read, it has no state digest)
//!  10   1 kind: 1 snapshot (chain start), 2 WAL segment, 3 delta (the
//!         pages that differ from the state before it, after a continuity loss)
//!  11   1 flags: bit 0 = body encrypted (anything else is rejected)
//!  12   4 page size in bytes
//!  16   8 sequence number (equals the number in the object's key)
//!  24   4 database size in pages after this segment is applied
//!  28   4 number of page records in the body
//!  32   8 timestamp, milliseconds since the Unix epoch, when the data was read
//!  40   4 source WAL salt-1
//!  44   4 source WAL salt-2
//!  48   4 source WAL first frame (0-based) covered
//!  52   4 source WAL frame after the last one covered
//!  56   8 source WAL running checksum after the last frame covered
//!  64  32 SHA-256 of the previous object of this database (zero for none)
//!  96  24 only if encrypted: key id (8), nonce (12), chunk size (4)
//!   h   . body: one zstd frame of page records, each a 4-byte page number
//!         then `page size` bytes, sorted by page number, no page twice;
//!         if encrypted, sealed in chunks (see `encryption`)
//! end-64 32 version 2 only: the state digest after this object (`state`;
//!         zero when the writer did not know it)
//! end-32 32 SHA-256 of every byte before it
//! ```
//!
//! Why this file is long: the one object format's layout, encoder,
//! streaming decoder and checker stay in one file, so that a change to the
//! layout is read against every writer and reader of it; a third of the file
//! is its tests.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

use crate::encryption::{self, Key, KeyId, Keys, NONCE_SIZE, Opener, Sealer};

pub const MAGIC: [u8; 8] = *b"WALSYNC\0";
pub const VERSION: u16 = 2;
/// The first format: no state digest in the trailer. Still read.
pub const VERSION_1: u16 = 1;
pub const HEADER_SIZE: usize = 96;
/// The longest header: the fixed part, a seal and a run's extent.
pub const MAX_HEADER_SIZE: usize = HEADER_SIZE + SEAL_SIZE + RUN_SIZE;
const SEAL_SIZE: usize = 24;
/// A run's first sequence number and the hash of the last object it stands for.
const RUN_SIZE: usize = 40;
const FLAG_ENCRYPTED: u8 = 1;
/// The trailer of a version-1 object: its content hash. Every object is at
/// least this plus a header long.
pub const TRAILER_SIZE: usize = 32;
/// The trailer of a version-2 object: state digest, then content hash.
pub const TRAILER_SIZE_V2: usize = 64;
const ZSTD_LEVEL: i32 = 3;
/// Bodies at least this large (snapshots, mostly) compress on several
/// cores: a small one would spend more starting threads than it saves.
const PARALLEL_FROM: u64 = 16 << 20;
/// What each compression thread takes at a time: small enough that the
/// threads' buffers stay a few MiB each.
const PARALLEL_JOB: u32 = 2 << 20;

/// Hands compression to worker threads, one per core (at most four), while
/// the calling thread reads pages and hashes what comes out.
fn compress_in_parallel<W: Write>(body: &mut zstd::stream::write::Encoder<'_, W>) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    body.multithread(cores.min(4) as u32)?;
    body.set_parameter(zstd::zstd_safe::CParameter::JobSize(PARALLEL_JOB))?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("object is {0} bytes, too short to be a segment")]
    TooShort(u64),
    #[error("not a walsync segment (bad magic)")]
    BadMagic,
    #[error("segment format version {0} is not supported by this walsync (knows {VERSION})")]
    UnsupportedVersion(u16),
    #[error("unknown segment kind {0}")]
    UnknownKind(u8),
    #[error("unknown segment flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("invalid page size {0}")]
    BadPageSize(u32),
    #[error("content hash mismatch: the object was altered or truncated")]
    HashMismatch,
    #[error(
        "the object is encrypted (key {0}) and no encryption key is given: set \
         encryption_key (or previous_encryption_keys) in walsync.toml, \
         WALSYNC_ENCRYPTION_KEY, or --encryption-key-file"
    )]
    MissingKey(KeyId),
    #[error(
        "the object is encrypted with key {found}, not with the key(s) given ({given}): wrong key"
    )]
    WrongKey { found: KeyId, given: String },
    #[error("encrypted with chunks of {0} bytes, this walsync knows {CHUNK}", CHUNK = encryption::CHUNK)]
    UnknownChunkSize(u32),
    #[error("page record {index}: {reason}")]
    BadPage { index: u32, reason: String },
    #[error("body holds {found} page records, header says {expected}")]
    PageCountMismatch { expected: u32, found: u32 },
    #[error("body has data after the last page record")]
    TrailingData,
    #[error("a run of objects {first} to {last} is not a run")]
    BadRun { first: u64, last: u64 },
    #[error("{0}")]
    Io(#[from] io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Snapshot,
    Wal,
    /// The pages that differ from the state before it, read from the
    /// database (not the WAL) after continuity was lost. Not a chain start.
    Delta,
    /// Stands for a run of consecutive objects (see [`Run`]): applied onto
    /// the state before the run, it leaves the state after it.
    Run,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Snapshot => 1,
            Kind::Wal => 2,
            Kind::Delta => 3,
            Kind::Run => 4,
        }
    }

    fn from_code(code: u8) -> Result<Self> {
        match code {
            1 => Ok(Kind::Snapshot),
            2 => Ok(Kind::Wal),
            3 => Ok(Kind::Delta),
            4 => Ok(Kind::Run),
            other => Err(Error::UnknownKind(other)),
        }
    }

    /// The key suffix for this kind in the first layout (which had no deltas).
    pub fn suffix(self) -> &'static str {
        match self {
            Kind::Snapshot => "snapshot",
            Kind::Wal => "wal",
            Kind::Delta => "delta",
            Kind::Run => "run",
        }
    }

    pub fn from_suffix(suffix: &str) -> Option<Self> {
        match suffix {
            "snapshot" => Some(Kind::Snapshot),
            "wal" => Some(Kind::Wal),
            _ => None,
        }
    }
}

/// Where in the source WAL a segment's data came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WalRange {
    pub salt1: u32,
    pub salt2: u32,
    pub first_frame: u32,
    pub end_frame: u32,
    pub checksum: (u32, u32),
}

/// The fixed-size head of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The format version the object was written in ([`VERSION`] when encoding).
    pub version: u16,
    pub kind: Kind,
    pub page_size: u32,
    pub seq: u64,
    pub db_pages: u32,
    pub page_count: u32,
    pub timestamp_ms: u64,
    pub wal: WalRange,
    pub prev_hash: [u8; 32],
    /// Set when the body is encrypted; the encoder fills it in.
    pub sealed: Option<Seal>,
    /// For a [`Kind::Run`]: which objects it stands for.
    pub run: Option<Run>,
    /// The state digest after this object, from the trailer of a version-2
    /// object: filled in by [`verify`] and by the encoder's caller, never
    /// by [`Header::decode`] (the trailer comes last). `None` where unknown.
    pub state: Option<crate::state::Digest>,
}

/// The objects a [`Kind::Run`] stands for: sequences `first..=seq`. Its
/// `prev_hash` links to the object before `first`; the object after `seq`
/// links to `last_hash`, the hash of the object it replaces at `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first: u64,
    pub last_hash: [u8; 32],
}

/// How an encrypted object's body was sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    pub key_id: KeyId,
    pub nonce: [u8; NONCE_SIZE],
}

impl Header {
    /// Bytes the header takes at the start of the object.
    pub fn encoded_len(&self) -> usize {
        HEADER_SIZE
            + if self.sealed.is_some() { SEAL_SIZE } else { 0 }
            + if self.kind == Kind::Run { RUN_SIZE } else { 0 }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.encoded_len()];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.to_be_bytes());
        b[10] = self.kind.code();
        b[11] = if self.sealed.is_some() {
            FLAG_ENCRYPTED
        } else {
            0
        };
        b[12..16].copy_from_slice(&self.page_size.to_be_bytes());
        b[16..24].copy_from_slice(&self.seq.to_be_bytes());
        b[24..28].copy_from_slice(&self.db_pages.to_be_bytes());
        b[28..32].copy_from_slice(&self.page_count.to_be_bytes());
        b[32..40].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        b[40..44].copy_from_slice(&self.wal.salt1.to_be_bytes());
        b[44..48].copy_from_slice(&self.wal.salt2.to_be_bytes());
        b[48..52].copy_from_slice(&self.wal.first_frame.to_be_bytes());
        b[52..56].copy_from_slice(&self.wal.end_frame.to_be_bytes());
        b[56..60].copy_from_slice(&self.wal.checksum.0.to_be_bytes());
        b[60..64].copy_from_slice(&self.wal.checksum.1.to_be_bytes());
        b[64..96].copy_from_slice(&self.prev_hash);
        if let Some(seal) = &self.sealed {
            b[96..104].copy_from_slice(&seal.key_id.0);
            b[104..116].copy_from_slice(&seal.nonce);
            b[116..120].copy_from_slice(&(encryption::CHUNK as u32).to_be_bytes());
        }
        if let Some(run) = &self.run {
            let at = b.len() - RUN_SIZE;
            b[at..at + 8].copy_from_slice(&run.first.to_be_bytes());
            b[at + 8..at + RUN_SIZE].copy_from_slice(&run.last_hash);
        }
        b
    }

    /// Decodes a header from the start of an object (`b` may hold more).
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() < HEADER_SIZE {
            return Err(Error::TooShort(b.len() as u64));
        }
        if b[0..8] != MAGIC {
            return Err(Error::BadMagic);
        }
        let version = u16::from_be_bytes([b[8], b[9]]);
        if version != VERSION && version != VERSION_1 {
            return Err(Error::UnsupportedVersion(version));
        }
        let kind = Kind::from_code(b[10])?;
        if matches!(kind, Kind::Delta | Kind::Run) && version == VERSION_1 {
            return Err(Error::UnknownKind(b[10]));
        }
        if b[11] & !FLAG_ENCRYPTED != 0 {
            return Err(Error::UnknownFlags(b[11]));
        }
        let sealed = if b[11] & FLAG_ENCRYPTED != 0 {
            if b.len() < HEADER_SIZE + SEAL_SIZE {
                return Err(Error::TooShort(b.len() as u64));
            }
            let chunk = u32_at(b, 116);
            if chunk as usize != encryption::CHUNK {
                return Err(Error::UnknownChunkSize(chunk));
            }
            let mut key_id = [0u8; 8];
            key_id.copy_from_slice(&b[96..104]);
            let mut nonce = [0u8; NONCE_SIZE];
            nonce.copy_from_slice(&b[104..116]);
            Some(Seal {
                key_id: KeyId(key_id),
                nonce,
            })
        } else {
            None
        };
        let page_size = u32_at(b, 12);
        if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
            return Err(Error::BadPageSize(page_size));
        }
        let mut prev_hash = [0u8; 32];
        prev_hash.copy_from_slice(&b[64..96]);
        let seq = u64_at(b, 16);
        let run = if kind == Kind::Run {
            let at = HEADER_SIZE + if sealed.is_some() { SEAL_SIZE } else { 0 };
            if b.len() < at + RUN_SIZE {
                return Err(Error::TooShort(b.len() as u64));
            }
            let first = u64_at(b, at);
            if first == 0 || first > seq {
                return Err(Error::BadRun { first, last: seq });
            }
            let mut last_hash = [0u8; 32];
            last_hash.copy_from_slice(&b[at + 8..at + RUN_SIZE]);
            Some(Run { first, last_hash })
        } else {
            None
        };
        Ok(Self {
            version,
            kind,
            page_size,
            seq,
            db_pages: u32_at(b, 24),
            page_count: u32_at(b, 28),
            timestamp_ms: u64_at(b, 32),
            wal: WalRange {
                salt1: u32_at(b, 40),
                salt2: u32_at(b, 44),
                first_frame: u32_at(b, 48),
                end_frame: u32_at(b, 52),
                checksum: (u32_at(b, 56), u32_at(b, 60)),
            },
            prev_hash,
            sealed,
            run,
            state: None,
        })
    }

    /// Bytes the trailer takes at the end of the object.
    pub fn trailer_len(&self) -> usize {
        if self.version == VERSION_1 {
            TRAILER_SIZE
        } else {
            TRAILER_SIZE_V2
        }
    }

    /// The key among `keys` that opens this object's body (`None`: not encrypted).
    pub fn key<'k>(&self, keys: Option<&'k Keys>) -> Result<Option<&'k Key>> {
        let Some(seal) = &self.sealed else {
            return Ok(None);
        };
        let keys = keys.ok_or(Error::MissingKey(seal.key_id))?;
        keys.find(seal.key_id)
            .map(Some)
            .ok_or_else(|| Error::WrongKey {
                found: seal.key_id,
                given: keys.ids(),
            })
    }
}

/// Reads a header from the start of an object, returning it with its bytes.
fn read_header(r: &mut impl Read) -> Result<(Header, Vec<u8>)> {
    let mut bytes = vec![0u8; HEADER_SIZE];
    r.read_exact(&mut bytes)?;
    let extra = if bytes[11] & FLAG_ENCRYPTED != 0 {
        SEAL_SIZE
    } else {
        0
    } + if bytes[10] == Kind::Run.code() {
        RUN_SIZE
    } else {
        0
    };
    if extra > 0 {
        bytes.resize(HEADER_SIZE + extra, 0);
        r.read_exact(&mut bytes[HEADER_SIZE..])?;
    }
    Ok((Header::decode(&bytes)?, bytes))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// A writer that hashes everything passing through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Streams one segment into `W`: header first, then pages in increasing
/// order, then [`Encoder::finish`] writes the trailer and returns the hash.
pub struct Encoder<W: Write> {
    body: zstd::stream::write::Encoder<'static, BodyWriter<Hashing<W>>>,
    header: Header,
    written: u32,
    last_pgno: u32,
}

/// The body as stored: compressed, then sealed if a key is given.
enum BodyWriter<W: Write> {
    Plain(W),
    Sealed(Box<Sealer<W>>),
}

impl<W: Write> BodyWriter<W> {
    fn finish(self) -> io::Result<W> {
        match self {
            BodyWriter::Plain(w) => Ok(w),
            BodyWriter::Sealed(s) => s.finish(),
        }
    }
}

impl<W: Write> Write for BodyWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            BodyWriter::Plain(w) => w.write(buf),
            BodyWriter::Sealed(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            BodyWriter::Plain(w) => w.flush(),
            BodyWriter::Sealed(s) => s.flush(),
        }
    }
}

impl<W: Write> Encoder<W> {
    /// Starts an object; with a `key`, its body is encrypted (and the
    /// header's `sealed` is filled in).
    pub fn new(mut header: Header, key: Option<&Key>, out: W) -> Result<Self> {
        if (header.kind == Kind::Run) != header.run.is_some()
            || header
                .run
                .is_some_and(|r| r.first == 0 || r.first > header.seq)
        {
            return Err(Error::BadRun {
                first: header.run.map_or(0, |r| r.first),
                last: header.seq,
            });
        }
        header.version = VERSION;
        header.state = None;
        header.sealed = key.map(|k| Seal {
            key_id: k.id(),
            nonce: encryption::new_nonce(),
        });
        let mut hashing = Hashing {
            inner: out,
            hasher: Sha256::new(),
        };
        let head = header.encode();
        hashing.write_all(&head)?;
        let sink = match (key, &header.sealed) {
            (Some(key), Some(seal)) => {
                BodyWriter::Sealed(Box::new(Sealer::new(hashing, key, seal.nonce, head)))
            }
            _ => BodyWriter::Plain(hashing),
        };
        let mut body = zstd::stream::write::Encoder::new(sink, ZSTD_LEVEL)?;
        if u64::from(header.page_count) * u64::from(header.page_size) >= PARALLEL_FROM {
            compress_in_parallel(&mut body)?;
        }
        Ok(Self {
            body,
            header,
            written: 0,
            last_pgno: 0,
        })
    }

    /// The header as written (with its seal, if encrypted).
    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn add_page(&mut self, pgno: u32, data: &[u8]) -> Result<()> {
        let index = self.written;
        if pgno <= self.last_pgno || pgno > self.header.db_pages {
            return Err(Error::BadPage {
                index,
                reason: format!("page {pgno} out of order or beyond the database size"),
            });
        }
        if data.len() != self.header.page_size as usize {
            return Err(Error::BadPage {
                index,
                reason: format!("page {pgno} is {} bytes", data.len()),
            });
        }
        self.body.write_all(&pgno.to_be_bytes())?;
        self.body.write_all(data)?;
        self.written += 1;
        self.last_pgno = pgno;
        Ok(())
    }

    /// Finishes the object; returns its content hash and the sink.
    /// Ends the object with `state`, the digest of the database state after
    /// it (`None`: not known to the writer; restore then cannot check it).
    pub fn finish(self, state: Option<crate::state::Digest>) -> Result<([u8; 32], W)> {
        if self.written != self.header.page_count {
            return Err(Error::PageCountMismatch {
                expected: self.header.page_count,
                found: self.written,
            });
        }
        let mut hashing = self.body.finish()?.finish()?;
        hashing.write_all(&state.unwrap_or([0; 32]))?;
        let hash: [u8; 32] = hashing.hasher.finalize_reset().into();
        hashing.inner.write_all(&hash)?;
        hashing.inner.flush()?;
        Ok((hash, hashing.inner))
    }
}

/// Checks the trailer of a whole object read from `r` (of `len` bytes) and
/// returns its header and content hash. Reads the object once, streaming.
pub fn verify(r: impl Read, len: u64) -> Result<(Header, [u8; 32])> {
    let mut check = Check::default();
    let mut r = r.take(len);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => check.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    if check.bytes_seen() != len {
        return Err(Error::TooShort(len));
    }
    check.finish()
}

/// Checks an object as its bytes stream past (fed in order to
/// [`Check::update`]), so a download is verified without reading it twice.
/// The content hash covers every byte but the last [`TRAILER_SIZE`], which
/// are that hash; the state digest, where the format has one, is the 32
/// bytes before them.
#[derive(Default)]
pub struct Check {
    hasher: Sha256,
    /// The first bytes, up to the longest header.
    head: Vec<u8>,
    /// The last bytes seen, held back from the hasher until more arrive.
    tail: Vec<u8>,
    len: u64,
}

/// Bytes held back: the state digest and the trailer.
const HELD: usize = TRAILER_SIZE_V2;

impl Check {
    pub fn update(&mut self, bytes: &[u8]) {
        self.len += bytes.len() as u64;
        if self.head.len() < MAX_HEADER_SIZE {
            let take = (MAX_HEADER_SIZE - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..take]);
        }
        if bytes.len() >= HELD {
            self.hasher.update(&self.tail);
            let (now, held) = bytes.split_at(bytes.len() - HELD);
            self.hasher.update(now);
            self.tail.clear();
            self.tail.extend_from_slice(held);
        } else {
            self.tail.extend_from_slice(bytes);
            let over = self.tail.len().saturating_sub(HELD);
            self.hasher.update(&self.tail[..over]);
            self.tail.drain(..over);
        }
    }

    /// Bytes fed so far.
    pub fn bytes_seen(&self) -> u64 {
        self.len
    }

    /// The object's header and content hash, if the bytes fed are a whole,
    /// intact object.
    pub fn finish(self) -> Result<(Header, [u8; 32])> {
        let len = self.len;
        if len < (HEADER_SIZE + TRAILER_SIZE) as u64 || self.tail.len() < HELD {
            return Err(Error::TooShort(len));
        }
        let (mut header, _) = read_header(&mut self.head.as_slice())?;
        body_len(&header, len)?;
        let (state, trailer) = self.tail.split_at(HELD - TRAILER_SIZE);
        let mut hasher = self.hasher;
        // A first-format object's last body bytes, or the state digest.
        hasher.update(state);
        let hash: [u8; 32] = hasher.finalize().into();
        if hash != trailer {
            return Err(Error::HashMismatch);
        }
        if header.version != VERSION_1 {
            let state: [u8; 32] = state.try_into().map_err(|_| Error::TooShort(len))?;
            header.state = (state != [0; 32]).then_some(state);
        }
        Ok((header, hash))
    }
}

/// Reads the pages of a verified object, in order. `r` starts at the object's
/// first byte and `len` is its length; call [`verify`] on the same bytes first.
pub struct PageReader<R: Read> {
    body: zstd::stream::read::Decoder<'static, io::BufReader<BodyReader<io::Take<R>>>>,
    header: Header,
    read: u32,
    last_pgno: u32,
}

impl<R: Read> PageReader<R> {
    /// `keys` open an encrypted object; a plain one needs none.
    pub fn new(mut r: R, len: u64, keys: Option<&Keys>) -> Result<Self> {
        if len < (HEADER_SIZE + TRAILER_SIZE) as u64 {
            return Err(Error::TooShort(len));
        }
        let (header, head) = read_header(&mut r)?;
        let body_len = body_len(&header, len)?;
        let key = header.key(keys)?;
        let body = r.take(body_len);
        let body = match (key, &header.sealed) {
            (Some(key), Some(seal)) => {
                BodyReader::Sealed(Box::new(Opener::new(body, key, seal.nonce, head, body_len)))
            }
            _ => BodyReader::Plain(body),
        };
        Ok(Self {
            body: zstd::stream::read::Decoder::new(body)?,
            header,
            read: 0,
            last_pgno: 0,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The next page into `buf` (page size bytes); `None` after the last one.
    pub fn next_page(&mut self, buf: &mut [u8]) -> Result<Option<u32>> {
        let index = self.read;
        if index == self.header.page_count {
            let mut extra = [0u8; 1];
            return match self.body.read(&mut extra) {
                Ok(0) => Ok(None),
                Ok(_) => Err(Error::TrailingData),
                Err(e) => Err(e.into()),
            };
        }
        let mut pgno = [0u8; 4];
        read_record(&mut self.body, &mut pgno, index, self.header.page_count)?;
        let pgno = u32::from_be_bytes(pgno);
        if pgno <= self.last_pgno || pgno > self.header.db_pages {
            return Err(Error::BadPage {
                index,
                reason: format!(
                    "page number {pgno} out of order or beyond the database size {}",
                    self.header.db_pages
                ),
            });
        }
        read_record(&mut self.body, buf, index, self.header.page_count)?;
        self.read += 1;
        self.last_pgno = pgno;
        Ok(Some(pgno))
    }
}

/// The stored body of an object, opened if it is encrypted.
enum BodyReader<R: Read> {
    Plain(R),
    Sealed(Box<Opener<R>>),
}

impl<R: Read> Read for BodyReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            BodyReader::Plain(r) => r.read(buf),
            BodyReader::Sealed(r) => r.read(buf),
        }
    }
}

/// Bytes between the header and the trailer of an object of `len` bytes.
fn body_len(header: &Header, len: u64) -> Result<u64> {
    len.checked_sub((header.encoded_len() + header.trailer_len()) as u64)
        .ok_or(Error::TooShort(len))
}

fn read_record(r: &mut impl Read, buf: &mut [u8], index: u32, expected: u32) -> Result<()> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::PageCountMismatch {
            expected,
            found: index,
        },
        _ => Error::Io(e),
    })
}

/// Now, as object headers record time: milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Suffix of every object key in today's layout: one key per sequence
/// number, whatever the kind, so that two writers of one sequence collide on
/// the create-only put and the second is refused by the store.
pub const OBJECT_SUFFIX: &str = "seg";
/// Suffix of the empty object that marks a snapshot. Keys cannot say the kind
/// any more, and restore, retention and `list` must find snapshots from a
/// listing alone; the mark is written after its snapshot, so a mark never
/// names an object that is not there or not a snapshot.
pub const SNAPSHOT_MARK_SUFFIX: &str = "is-snapshot";

/// The key of object `seq` under a database prefix; keys sort in apply order.
pub fn object_key(db_prefix: &str, seq: u64) -> String {
    format!("{db_prefix}/{seq:016x}.{OBJECT_SUFFIX}")
}

/// The key that marks object `seq` as a snapshot.
pub fn snapshot_mark_key(db_prefix: &str, seq: u64) -> String {
    format!("{db_prefix}/{seq:016x}.{SNAPSHOT_MARK_SUFFIX}")
}

/// Suffix of a run's key (see [`run_key`]).
pub const RUN_SUFFIX: &str = "run";

/// The key of the run that stands for objects `first..=last` of a database:
/// `<first>-<last>.run`. It names no single sequence, so nothing that reads
/// objects by sequence number mistakes it for one.
pub fn run_key(db_prefix: &str, first: u64, last: u64) -> String {
    format!("{db_prefix}/{first:016x}-{last:016x}.{RUN_SUFFIX}")
}

/// The `(first, last)` of a run's key name, if it is one.
pub fn parse_run_name(name: &str) -> Option<(u64, u64)> {
    let (range, suffix) = name.split_once('.')?;
    let (first, last) = range.split_once('-')?;
    let seq = |s: &str| {
        (s.len() == 16
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
    };
    let (first, last) = (seq(first)?, seq(last)?);
    (suffix == RUN_SUFFIX && first >= 1 && first <= last).then_some((first, last))
}

/// The key of object `seq` in the first layout, which named the kind
/// (`<seq>.snapshot`, `<seq>.wal`). Still read; never written.
pub fn legacy_object_key(db_prefix: &str, seq: u64, kind: Kind) -> String {
    format!("{db_prefix}/{seq:016x}.{}", kind.suffix())
}

/// What the last path component of a key is, if walsync wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name {
    /// An object in today's layout; its kind is in its header (and its mark).
    Object(u64),
    /// An object in the first layout, whose key names its kind.
    Legacy(u64, Kind),
    /// The mark of snapshot `seq`.
    SnapshotMark(u64),
}

impl Name {
    pub fn seq(self) -> u64 {
        match self {
            Name::Object(seq) | Name::Legacy(seq, _) | Name::SnapshotMark(seq) => seq,
        }
    }
}

/// Whether `name` (a key's last path component) is one walsync writes: an
/// object, a snapshot mark or a run, in either layout.
pub fn is_walsync_name(name: &str) -> bool {
    parse_object_name(name).is_some() || parse_run_name(name).is_some()
}

/// Parses the last path component of a key made by [`object_key`],
/// [`snapshot_mark_key`] or [`legacy_object_key`].
pub fn parse_object_name(name: &str) -> Option<Name> {
    let (seq, suffix) = name.split_once('.')?;
    if seq.len() != 16
        || !seq
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    let seq = u64::from_str_radix(seq, 16).ok()?;
    match suffix {
        OBJECT_SUFFIX => Some(Name::Object(seq)),
        SNAPSHOT_MARK_SUFFIX => Some(Name::SnapshotMark(seq)),
        _ => Some(Name::Legacy(seq, Kind::from_suffix(suffix)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn header(kind: Kind, pages: &[u32]) -> Header {
        Header {
            version: VERSION,
            state: None,
            kind,
            page_size: 1024,
            seq: 7,
            db_pages: 10,
            page_count: pages.len() as u32,
            timestamp_ms: 1_700_000_000_000,
            wal: WalRange {
                salt1: 1,
                salt2: 2,
                first_frame: 3,
                end_frame: 9,
                checksum: (5, 6),
            },
            prev_hash: [9; 32],
            sealed: None,
            run: None,
        }
    }

    fn encode(h: Header, pages: &[u32]) -> (Vec<u8>, [u8; 32]) {
        encode_with(h, pages, None)
    }

    fn encode_with(h: Header, pages: &[u32], key: Option<&Key>) -> (Vec<u8>, [u8; 32]) {
        let mut enc = Encoder::new(h, key, Vec::new()).unwrap();
        for p in pages {
            enc.add_page(*p, &vec![*p as u8; 1024]).unwrap();
        }
        let (hash, bytes) = enc.finish(None).unwrap();
        (bytes, hash)
    }

    #[test]
    fn the_state_digest_comes_back_and_first_format_objects_still_read() {
        let pages = [1, 3];
        let mut enc = Encoder::new(header(Kind::Delta, &pages), None, Vec::new()).unwrap();
        for p in pages {
            enc.add_page(p, &vec![p as u8; 1024]).unwrap();
        }
        let (_, bytes) = enc.finish(Some([5; 32])).unwrap();
        let (h, _) = verify(Cursor::new(&bytes), bytes.len() as u64).unwrap();
        assert_eq!(
            (h.version, h.kind, h.state),
            (VERSION, Kind::Delta, Some([5; 32]))
        );
        assert_eq!(read_pages(&bytes, None).unwrap(), pages);

        // The same object as the first format wrote it: version 1, no digest.
        let mut v1 = bytes[..bytes.len() - TRAILER_SIZE_V2].to_vec();
        v1[8..10].copy_from_slice(&VERSION_1.to_be_bytes());
        v1[10] = Kind::Wal.code();
        let trailer: [u8; 32] = Sha256::digest(&v1).into();
        v1.extend_from_slice(&trailer);
        let (h, hash) = verify(Cursor::new(&v1), v1.len() as u64).unwrap();
        assert_eq!((h.version, h.state, hash), (VERSION_1, None, trailer));
        assert_eq!(read_pages(&v1, None).unwrap(), pages);
        // A delta did not exist in the first format.
        v1[10] = Kind::Delta.code();
        assert!(matches!(Header::decode(&v1), Err(Error::UnknownKind(3))));
    }

    #[test]
    fn round_trip() {
        let pages = [1, 2, 5, 10];
        let h = header(Kind::Wal, &pages);
        let (bytes, hash) = encode(h, &pages);
        let (decoded, vhash) = verify(Cursor::new(&bytes), bytes.len() as u64).unwrap();
        assert_eq!(decoded, h);
        assert_eq!(vhash, hash);
        assert_eq!(read_pages(&bytes, None).unwrap(), pages);
    }

    #[test]
    fn a_large_body_compressed_on_several_threads_reads_back_whole() {
        // 1 KiB pages: past PARALLEL_FROM, so the workers take it in jobs.
        let pages: Vec<u32> = (1..=(PARALLEL_FROM / 1024) as u32 + 3000).collect();
        for key in [None, Some(Key::from_bytes(&[7; 32]))] {
            let h = Header {
                db_pages: pages.len() as u32,
                ..header(Kind::Snapshot, &pages)
            };
            assert!(u64::from(h.page_count) * u64::from(h.page_size) >= PARALLEL_FROM);
            let (bytes, hash) = encode_with(h, &pages, key.as_ref());
            let (decoded, vhash) = verify(Cursor::new(&bytes), bytes.len() as u64).unwrap();
            assert_eq!((decoded.page_count, vhash), (h.page_count, hash));
            let keys = key.map(|k| Keys::new(Some(k), vec![]));
            assert_eq!(read_pages(&bytes, keys.as_ref()).unwrap(), pages);
        }
    }

    fn read_pages(bytes: &[u8], keys: Option<&Keys>) -> Result<Vec<u32>> {
        let mut r = PageReader::new(Cursor::new(bytes), bytes.len() as u64, keys)?;
        let mut buf = vec![0u8; 1024];
        let mut seen = Vec::new();
        while let Some(p) = r.next_page(&mut buf)? {
            assert!(buf.iter().all(|b| *b == p as u8));
            seen.push(p);
        }
        Ok(seen)
    }

    fn keys(bytes: &[&[u8; 32]]) -> Keys {
        let mut all = bytes.iter().map(|b| Key::from_bytes(b));
        let current = all.next();
        Keys::new(current, all.collect())
    }

    #[test]
    fn encrypted_round_trip_needs_the_right_key() {
        let pages: Vec<u32> = (1..=10).collect();
        let mut h = header(Kind::Snapshot, &pages);
        h.db_pages = 10;
        let ring = keys(&[&[1; 32]]);
        let (bytes, hash) = encode_with(h, &pages, Some(ring.current().unwrap()));
        let (decoded, vhash) = verify(Cursor::new(&bytes), bytes.len() as u64).unwrap();
        assert_eq!(vhash, hash);
        assert_eq!(
            decoded.sealed.map(|s| s.key_id),
            Some(ring.current().unwrap().id())
        );
        assert_eq!(
            Header {
                sealed: None,
                run: None,
                ..decoded
            },
            h
        );
        assert_eq!(read_pages(&bytes, Some(&ring)).unwrap(), pages);
        // An old key among several still opens it.
        let rotated = keys(&[&[2; 32], &[1; 32]]);
        assert_eq!(read_pages(&bytes, Some(&rotated)).unwrap(), pages);
        assert!(matches!(
            read_pages(&bytes, None),
            Err(Error::MissingKey(id)) if id == ring.current().unwrap().id()
        ));
        let other = keys(&[&[3; 32]]);
        let err = read_pages(&bytes, Some(&other)).unwrap_err();
        assert!(matches!(err, Error::WrongKey { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&ring.current().unwrap().id().to_string())
        );
        // No page content is visible in the stored bytes.
        let plain = encode(h, &pages).0;
        assert!(bytes.len() > plain.len());
        for p in &pages {
            assert!(!bytes.windows(64).any(|w| w.iter().all(|b| *b == *p as u8)));
        }
    }

    #[test]
    fn a_run_names_its_objects_plain_or_sealed() {
        let pages = [2, 5];
        let mut h = header(Kind::Run, &pages);
        h.run = Some(Run {
            first: 3,
            last_hash: [4; 32],
        });
        let ring = keys(&[&[1; 32]]);
        for key in [None, Some(ring.current().unwrap())] {
            let (bytes, hash) = encode_with(h, &pages, key);
            let (decoded, vhash) = verify(Cursor::new(&bytes), bytes.len() as u64).unwrap();
            assert_eq!(vhash, hash);
            assert_eq!((decoded.kind, decoded.run), (Kind::Run, h.run));
            assert_eq!(
                decoded.encoded_len(),
                h.encoded_len() + if key.is_some() { SEAL_SIZE } else { 0 }
            );
            assert_eq!(read_pages(&bytes, Some(&ring)).unwrap(), pages);
        }
        // The run's extent is part of what the seal authenticates: changed
        // and given a fresh trailer, the object no longer opens.
        let (mut bytes, _) = encode_with(h, &pages, Some(ring.current().unwrap()));
        bytes[HEADER_SIZE + SEAL_SIZE + 7] ^= 1;
        let end = bytes.len() - 32;
        let fresh: [u8; 32] = Sha256::digest(&bytes[..end]).into();
        bytes[end..].copy_from_slice(&fresh);
        assert!(read_pages(&bytes, Some(&ring)).is_err());
        // A run must say what it stands for, and only a run may.
        let mut no_extent = h;
        no_extent.run = None;
        assert!(matches!(
            Encoder::new(no_extent, None, Vec::new()),
            Err(Error::BadRun { .. })
        ));
        let mut stray = header(Kind::Wal, &pages);
        stray.run = h.run;
        assert!(Encoder::new(stray, None, Vec::new()).is_err());
        let mut backwards = h;
        backwards.run = Some(Run {
            first: 8,
            last_hash: [0; 32],
        });
        assert!(Encoder::new(backwards, None, Vec::new()).is_err());
        let (mut bytes, _) = encode(h, &pages);
        bytes[HEADER_SIZE..HEADER_SIZE + 8].copy_from_slice(&9u64.to_be_bytes());
        assert!(matches!(
            Header::decode(&bytes),
            Err(Error::BadRun { first: 9, last: 7 })
        ));
    }

    #[test]
    fn an_encrypted_object_altered_with_a_fresh_trailer_is_refused() {
        // Whoever can write to storage can recompute the SHA-256 trailer but
        // not the authentication tags, which cover the header too.
        let pages = [1, 2];
        let ring = keys(&[&[1; 32]]);
        let (bytes, _) = encode_with(
            header(Kind::Wal, &pages),
            &pages,
            Some(ring.current().unwrap()),
        );
        // The state digest (the 32 bytes before the trailer) is covered by
        // the trailer only: altering it makes restore refuse, as deleting
        // the object would; it cannot change a page.
        for at in [24, 33, 64, 100, 130, bytes.len() - TRAILER_SIZE_V2 - 8] {
            let mut bad = bytes[..bytes.len() - TRAILER_SIZE].to_vec();
            bad[at] ^= 1;
            let trailer: [u8; 32] = Sha256::digest(&bad).into();
            bad.extend_from_slice(&trailer);
            verify(Cursor::new(&bad), bad.len() as u64).unwrap();
            assert!(
                read_pages(&bad, Some(&ring)).is_err(),
                "flip at {at} accepted"
            );
        }
    }

    /// A download is checked in whatever pieces the network hands it:
    /// every split gives what the whole gives, and a flip is caught.
    #[test]
    fn a_check_fed_in_pieces_agrees_with_the_whole() {
        let pages = [1, 3];
        let ring = keys(&[&[1; 32]]);
        let (plain, _) = encode(header(Kind::Snapshot, &pages), &pages);
        let (sealed, _) = encode_with(
            header(Kind::Wal, &pages),
            &pages,
            Some(ring.current().unwrap()),
        );
        for bytes in [plain, sealed] {
            let whole = verify(Cursor::new(&bytes), bytes.len() as u64).unwrap();
            for piece in [1, 7, 31, 32, 63, 64, 65, 100, 4096, bytes.len()] {
                let fed = |bytes: &[u8]| {
                    let mut check = Check::default();
                    for chunk in bytes.chunks(piece) {
                        check.update(chunk);
                    }
                    check.finish()
                };
                let (header, hash) = fed(&bytes).unwrap();
                assert_eq!(
                    (header.state, header.seq, hash),
                    (whole.0.state, whole.0.seq, whole.1)
                );
                for at in [0, 50, bytes.len() / 2, bytes.len() - 40, bytes.len() - 1] {
                    let mut bad = bytes.clone();
                    bad[at] ^= 1;
                    assert!(fed(&bad).is_err(), "flip at {at}, pieces of {piece}");
                }
                assert!(fed(&bytes[..bytes.len() - 1]).is_err());
            }
        }
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let pages = [1, 3];
        let (bytes, _) = encode(header(Kind::Snapshot, &pages), &pages);
        for at in (0..bytes.len()).step_by(7) {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            assert!(
                verify(Cursor::new(&bad), bad.len() as u64).is_err(),
                "flip at {at} not detected"
            );
        }
        let cut = &bytes[..bytes.len() - 1];
        assert!(verify(Cursor::new(cut), cut.len() as u64).is_err());
    }

    /// A cheap stand-in for fuzzing (no nightly toolchain here): mutated and
    /// random inputs must be refused with an error, never a panic or a hang.
    #[test]
    fn mutated_and_random_inputs_never_panic() {
        let pages = [1, 2, 7];
        let ring = keys(&[&[1; 32]]);
        let (plain, _) = encode(header(Kind::Wal, &pages), &pages);
        let (sealed, _) = encode_with(
            header(Kind::Wal, &pages),
            &pages,
            Some(ring.current().unwrap()),
        );
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut buf = vec![0u8; 65536];
        for round in 0..3000 {
            let mut bytes = if round % 2 == 0 {
                sealed.clone()
            } else {
                plain.clone()
            };
            match round % 3 {
                0 => {
                    for _ in 0..1 + next() % 8 {
                        let at = (next() as usize) % bytes.len();
                        bytes[at] = next() as u8;
                    }
                }
                1 => bytes.truncate((next() as usize) % bytes.len()),
                _ => {
                    let len = (next() % 400) as usize;
                    bytes = (0..len).map(|_| next() as u8).collect();
                    if len >= 8 && next() % 2 == 0 {
                        bytes[..8].copy_from_slice(&MAGIC);
                    }
                }
            }
            let len = bytes.len() as u64;
            let _ = verify(Cursor::new(&bytes), len);
            let keys = (round % 2 == 0).then_some(&ring);
            if let Ok(mut reader) = PageReader::new(Cursor::new(&bytes), len, keys) {
                let size = reader.header().page_size as usize;
                let mut count = 0;
                while let Ok(Some(_)) = reader.next_page(&mut buf[..size]) {
                    count += 1;
                    assert!(count <= reader.header().page_count);
                }
            }
        }
    }

    #[test]
    fn decoder_rejects_what_it_does_not_understand() {
        let h = header(Kind::Wal, &[]);
        let mut b = h.encode();
        b[8..10].copy_from_slice(&3u16.to_be_bytes());
        assert!(matches!(
            Header::decode(&b),
            Err(Error::UnsupportedVersion(3))
        ));
        let mut b = h.encode();
        b[10] = 9;
        assert!(matches!(Header::decode(&b), Err(Error::UnknownKind(9))));
        let mut b = h.encode();
        b[11] = 2;
        assert!(matches!(Header::decode(&b), Err(Error::UnknownFlags(2))));
        // The encrypted flag needs the seal after the fixed header.
        let mut b = h.encode();
        b[11] = 1;
        assert!(matches!(Header::decode(&b), Err(Error::TooShort(96))));
        let mut b = h.encode();
        b[0] = b'X';
        assert!(matches!(Header::decode(&b), Err(Error::BadMagic)));
    }

    #[test]
    fn encoder_refuses_unsorted_or_out_of_range_pages() {
        let mut enc = Encoder::new(header(Kind::Wal, &[1, 2]), None, Vec::new()).unwrap();
        enc.add_page(2, &[0; 1024]).unwrap();
        assert!(enc.add_page(1, &[0; 1024]).is_err());
        let mut enc = Encoder::new(header(Kind::Wal, &[11]), None, Vec::new()).unwrap();
        assert!(enc.add_page(11, &[0; 1024]).is_err());
        let enc = Encoder::new(header(Kind::Wal, &[1]), None, Vec::new()).unwrap();
        assert!(matches!(
            enc.finish(None),
            Err(Error::PageCountMismatch { .. })
        ));
    }

    #[test]
    fn keys_sort_in_apply_order_and_parse_back() {
        let a = object_key("app", 9);
        let b = object_key("app", 10);
        assert_eq!(a, "app/0000000000000009.seg");
        assert!(a < b);
        assert_eq!(
            parse_object_name("000000000000000a.seg"),
            Some(Name::Object(10))
        );
        assert_eq!(
            parse_object_name("000000000000000a.is-snapshot"),
            Some(Name::SnapshotMark(10))
        );
        assert_eq!(
            parse_object_name("000000000000000a.snapshot"),
            Some(Name::Legacy(10, Kind::Snapshot))
        );
        assert_eq!(
            legacy_object_key("app", 9, Kind::Wal),
            "app/0000000000000009.wal"
        );
        assert_eq!(parse_object_name("000000000000000A.wal"), None);
        assert_eq!(parse_object_name("0a.wal"), None);
        assert_eq!(parse_object_name("000000000000000a.tmp"), None);
    }
}
