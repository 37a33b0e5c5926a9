//! Client-side encryption of segment bodies, so storage never sees a page.
//!
//! AES-256-GCM over the compressed body, in chunks of [`CHUNK`] bytes sealed
//! one by one so that neither side holds a whole object in memory. Chunk `i`
//! uses the object's random nonce with `i` XORed into its last eight bytes,
//! and authenticates the object's header, `i`, and whether it is the last
//! chunk: a chunk moved, dropped or cut off at the end, or a header field
//! changed, fails to open. A key is known by its id (8 bytes of a SHA-256 over
//! it), which the header records so that restore can pick the right key among
//! several after a key change, and name the one that is missing.

use std::fmt;
use std::io::{self, Read, Write};

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{AeadInPlace, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce};
use sha2::{Digest, Sha256};

/// Plaintext bytes per sealed chunk.
pub const CHUNK: usize = 64 * 1024;
pub const TAG_SIZE: usize = 16;
pub const NONCE_SIZE: usize = 12;

/// Names a key without revealing it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("an encryption key is 64 hex digits (32 bytes), this one has {0} characters")]
    Length(usize),
    #[error("an encryption key is 64 hex digits, this one has other characters")]
    NotHex,
}

/// A 256-bit key. Its bytes are never printed: `Debug` shows only the id.
#[derive(Clone)]
pub struct Key {
    id: KeyId,
    cipher: Aes256Gcm,
}

impl Key {
    /// Parses 64 hex digits (`openssl rand -hex 32` makes one).
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        if text.len() != 64 {
            return Err(KeyError::Length(text.chars().count()));
        }
        let bytes = crate::storage::from_hex::<32>(text).ok_or(KeyError::NotHex)?;
        crate::redact::secret(text);
        Ok(Self::from_bytes(&bytes))
    }

    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        let digest = Sha256::new()
            .chain_update(b"walsync key id\0")
            .chain_update(bytes)
            .finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        Self {
            id: KeyId(id),
            cipher: Aes256Gcm::new(bytes.into()),
        }
    }

    pub fn id(&self) -> KeyId {
        self.id
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.id)
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for Key {}

/// The keys of one database: new objects are sealed with the current one;
/// the others only open objects written before a key change. No current key
/// means encryption was turned off on purpose (`encryption_key = "off"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    current: Option<Key>,
    previous: Vec<Key>,
}

impl Keys {
    pub fn new(current: Option<Key>, previous: Vec<Key>) -> Self {
        Self { current, previous }
    }

    pub fn current(&self) -> Option<&Key> {
        self.current.as_ref()
    }

    pub fn previous(&self) -> &[Key] {
        &self.previous
    }

    /// Every key of `sets`, once each, for reading; the first found is current.
    pub fn union<'a>(sets: impl IntoIterator<Item = &'a Keys>) -> Option<Keys> {
        let mut keys: Vec<Key> = Vec::new();
        for key in sets.into_iter().flat_map(Keys::all) {
            if !keys.contains(key) {
                keys.push(key.clone());
            }
        }
        let mut keys = keys.into_iter();
        let current = keys.next()?;
        Some(Keys::new(Some(current), keys.collect()))
    }

    /// The current key first.
    pub fn all(&self) -> impl Iterator<Item = &Key> {
        self.current.iter().chain(&self.previous)
    }

    pub fn find(&self, id: KeyId) -> Option<&Key> {
        self.all().find(|k| k.id == id)
    }

    /// The ids, for error messages.
    pub fn ids(&self) -> String {
        self.all()
            .map(|k| k.id.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A fresh random nonce for one object.
pub fn new_nonce() -> [u8; NONCE_SIZE] {
    let mut nonce = [0u8; NONCE_SIZE];
    OsRng.fill_bytes(&mut nonce);
    nonce
}

/// What each chunk authenticates besides its own bytes.
struct ChunkContext {
    cipher: Aes256Gcm,
    nonce: [u8; NONCE_SIZE],
    header: Vec<u8>,
    index: u64,
}

impl ChunkContext {
    fn nonce_and_aad(&self, last: bool) -> ([u8; NONCE_SIZE], Vec<u8>) {
        let mut nonce = self.nonce;
        for (n, i) in nonce[4..].iter_mut().zip(self.index.to_be_bytes()) {
            *n ^= i;
        }
        let mut aad = Vec::with_capacity(self.header.len() + 9);
        aad.extend_from_slice(&self.header);
        aad.extend_from_slice(&self.index.to_be_bytes());
        aad.push(u8::from(last));
        (nonce, aad)
    }
}

/// Encrypts what is written through it; [`Sealer::finish`] seals the last chunk.
pub struct Sealer<W: Write> {
    out: W,
    context: ChunkContext,
    buf: Vec<u8>,
}

impl<W: Write> Sealer<W> {
    /// `header` is the object's header as written, authenticated by every chunk.
    pub fn new(out: W, key: &Key, nonce: [u8; NONCE_SIZE], header: Vec<u8>) -> Self {
        Self {
            out,
            context: ChunkContext {
                cipher: key.cipher.clone(),
                nonce,
                header,
                index: 0,
            },
            buf: Vec::with_capacity(CHUNK + TAG_SIZE),
        }
    }

    fn seal(&mut self, last: bool) -> io::Result<()> {
        let (nonce, aad) = self.context.nonce_and_aad(last);
        self.context
            .cipher
            .encrypt_in_place(Nonce::from_slice(&nonce), &aad, &mut self.buf)
            .map_err(|_| io::Error::other("encryption failed"))?;
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        self.context.index += 1;
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.seal(true)?;
        Ok(self.out)
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut rest = data;
        while !rest.is_empty() {
            // A full chunk is sealed only once more data follows, so that the
            // final one (marked last) is never empty unless the body is.
            if self.buf.len() == CHUNK {
                self.seal(false)?;
            }
            let take = (CHUNK - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Decrypts a sealed body of `len` bytes read from `R`, chunk by chunk.
pub struct Opener<R: Read> {
    inner: R,
    context: ChunkContext,
    key_id: KeyId,
    remaining: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl<R: Read> Opener<R> {
    pub fn new(inner: R, key: &Key, nonce: [u8; NONCE_SIZE], header: Vec<u8>, len: u64) -> Self {
        Self {
            inner,
            context: ChunkContext {
                cipher: key.cipher.clone(),
                nonce,
                header,
                index: 0,
            },
            key_id: key.id,
            remaining: len,
            buf: Vec::with_capacity(CHUNK + TAG_SIZE),
            pos: 0,
        }
    }

    fn open_next(&mut self) -> io::Result<()> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
        let n = self.remaining.min((CHUNK + TAG_SIZE) as u64) as usize;
        if n < TAG_SIZE {
            return Err(invalid(format!(
                "encrypted chunk {} is cut short",
                self.context.index
            )));
        }
        let last = self.remaining == n as u64;
        self.buf.resize(n, 0);
        self.inner.read_exact(&mut self.buf)?;
        let (nonce, aad) = self.context.nonce_and_aad(last);
        self.context
            .cipher
            .decrypt_in_place(Nonce::from_slice(&nonce), &aad, &mut self.buf)
            .map_err(|_| {
                invalid(format!(
                    "encrypted chunk {} does not open with key {}: the object was altered",
                    self.context.index, self.key_id
                ))
            })?;
        self.remaining -= n as u64;
        self.context.index += 1;
        self.pos = 0;
        Ok(())
    }
}

impl<R: Read> Read for Opener<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.remaining == 0 {
                if self.context.index == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "encrypted body is empty",
                    ));
                }
                return Ok(0);
            }
            self.open_next()?;
        }
        let n = (self.buf.len() - self.pos).min(out.len());
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Key {
        Key::from_bytes(&[byte; 32])
    }

    fn seal(key: &Key, header: &[u8], data: &[u8]) -> Vec<u8> {
        let mut s = Sealer::new(Vec::new(), key, [7; NONCE_SIZE], header.to_vec());
        // Odd write sizes cross chunk boundaries at every offset.
        for part in data.chunks(10_007) {
            s.write_all(part).unwrap();
        }
        s.finish().unwrap()
    }

    fn open(key: &Key, header: &[u8], sealed: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        Opener::new(
            sealed,
            key,
            [7; NONCE_SIZE],
            header.to_vec(),
            sealed.len() as u64,
        )
        .read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn round_trips_at_chunk_boundaries() {
        let k = key(1);
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let sealed = seal(&k, b"head", &data);
            let chunks = len.div_ceil(CHUNK).max(1);
            assert_eq!(sealed.len(), len + chunks * TAG_SIZE, "len {len}");
            assert!(
                data.len() < 64 || !sealed.windows(64).any(|w| w == &data[..64]),
                "plaintext visible"
            );
            assert_eq!(open(&k, b"head", &sealed).unwrap(), data, "len {len}");
        }
    }

    #[test]
    fn refuses_wrong_key_header_changes_truncation_and_reordering() {
        let k = key(1);
        let data: Vec<u8> = (0..3 * CHUNK).map(|i| (i % 253) as u8).collect();
        let sealed = seal(&k, b"head", &data);
        assert!(open(&key(2), b"head", &sealed).is_err());
        assert!(open(&k, b"HEAD", &sealed).is_err());
        // Dropping the last chunk leaves a non-last chunk at the end.
        assert!(open(&k, b"head", &sealed[..2 * (CHUNK + TAG_SIZE)]).is_err());
        let mut swapped = sealed.clone();
        let c = CHUNK + TAG_SIZE;
        swapped[..c].copy_from_slice(&sealed[c..2 * c]);
        swapped[c..2 * c].copy_from_slice(&sealed[..c]);
        assert!(open(&k, b"head", &swapped).is_err());
        let mut flipped = sealed;
        flipped[100] ^= 1;
        assert!(open(&k, b"head", &flipped).is_err());
    }

    #[test]
    fn keys_parse_from_hex_and_never_print() {
        let hex = "00".repeat(31) + "ff";
        let k = Key::from_hex(&hex).unwrap();
        assert_eq!(
            k,
            Key::from_bytes(&{
                let mut b = [0u8; 32];
                b[31] = 0xff;
                b
            })
        );
        assert!(!format!("{k:?}").contains(&hex));
        assert_eq!(Key::from_hex("abc").unwrap_err(), KeyError::Length(3));
        assert_eq!(
            Key::from_hex(&"zz".repeat(32)).unwrap_err(),
            KeyError::NotHex
        );
        assert_eq!(
            Key::from_hex(&"+f".repeat(32)).unwrap_err(),
            KeyError::NotHex
        );
        let keys = Keys::new(Some(key(1)), vec![key(2)]);
        assert_eq!(keys.find(key(2).id()), Some(&key(2)));
        assert_eq!(keys.find(key(3).id()), None);
    }
}
