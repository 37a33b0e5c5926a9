//! The rule between consecutive objects of a chain, one check for the
//! readers that go along it and stop at the first problem (restore,
//! `restore --follow`): each object names the hash the one before it handed
//! on, is sealed with the same key unless it is a snapshot (a key change
//! takes one), and keeps the page size of the object before it (a follower,
//! which starts from its position, checks the page size against its file).
//! An object that breaks it was altered, reordered, written by another
//! writer or copied from another database's chain, and is refused before any
//! of its pages is written. `verify` walks the chain on its own: it reports
//! every problem and every branch of a fork.

use crate::chain;
use crate::encryption::KeyId;
use crate::segment::{Header, Kind};
use crate::storage::to_hex;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(
        "object {key} does not follow {prev}: its link is {found}, expected {expected} \
         (altered, reordered, or copied from another database's chain)"
    )]
    Broken {
        key: String,
        prev: String,
        found: String,
        expected: String,
    },
    #[error(
        "object {key} is encrypted differently from {prev}, the object before it, and is \
         not a snapshot: refusing an object that was not written with the rest"
    )]
    MixedEncryption { key: String, prev: String },
    #[error("object {key} has page size {found}, the chain started with {expected}")]
    PageSizeChanged {
        key: String,
        found: u32,
        expected: u32,
    },
}

/// Where a reader of the chain stands: what the next object must be.
#[derive(Debug, Clone, Default)]
pub struct Successor {
    /// The hash the next object must name, and what handed it on.
    link: Option<([u8; 32], String)>,
    /// The key the object before was sealed with, where that is known.
    sealed: Option<Option<KeyId>>,
    page_size: Option<u32>,
}

impl Successor {
    /// After `prev` (a key, or a description such as a position), which
    /// handed on `hash`. `sealed` is the key it was sealed with, where known.
    pub fn after(prev: String, hash: [u8; 32], sealed: Option<Option<KeyId>>) -> Self {
        Self {
            link: Some((hash, prev)),
            sealed,
            page_size: None,
        }
    }

    /// Checks the object at `key` (its verified header and content hash)
    /// against the rule, and stands after it. Returns the hash the object
    /// hands on: its own, or for a run that of the last object it stands for.
    pub fn accept(
        &mut self,
        key: &str,
        header: &Header,
        hash: [u8; 32],
    ) -> Result<[u8; 32], Error> {
        let prev = || {
            self.link
                .as_ref()
                .map_or_else(String::new, |(_, prev)| prev.clone())
        };
        if header.kind != Kind::Snapshot
            && let Some(sealed) = self.sealed
            && sealed != header.sealed.map(|s| s.key_id)
        {
            return Err(Error::MixedEncryption {
                key: key.to_string(),
                prev: prev(),
            });
        }
        if let Some((expected, _)) = &self.link
            && header.prev_hash != *expected
        {
            return Err(Error::Broken {
                key: key.to_string(),
                prev: prev(),
                found: to_hex(&header.prev_hash),
                expected: to_hex(expected),
            });
        }
        if let Some(expected) = self.page_size
            && header.page_size != expected
        {
            return Err(Error::PageSizeChanged {
                key: key.to_string(),
                found: header.page_size,
                expected,
            });
        }
        let handed_on = chain::handed_on(header, hash);
        *self = Self {
            link: Some((handed_on, key.to_string())),
            sealed: Some(header.sealed.map(|s| s.key_id)),
            page_size: Some(header.page_size),
        };
        Ok(handed_on)
    }

    /// The hash the next object must name, once there is one.
    pub fn hash(&self) -> Option<[u8; 32]> {
        self.link.as_ref().map(|(hash, _)| *hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encryption::NONCE_SIZE;
    use crate::segment::{Run, Seal, WalRange};

    fn header(seq: u64, kind: Kind, prev_hash: [u8; 32], key: Option<u8>) -> Header {
        Header {
            version: crate::segment::VERSION,
            kind,
            page_size: 4096,
            seq,
            db_pages: 1,
            page_count: 1,
            timestamp_ms: 0,
            wal: WalRange::default(),
            prev_hash,
            sealed: key.map(|k| Seal {
                key_id: KeyId([k; 8]),
                nonce: [0; NONCE_SIZE],
            }),
            run: None,
            state: None,
        }
    }

    #[test]
    fn each_object_names_what_the_one_before_handed_on() {
        let mut next = Successor::after("p/1".into(), [1; 32], None);
        assert_eq!(
            next.accept("p/2", &header(2, Kind::Wal, [1; 32], None), [2; 32])
                .unwrap(),
            [2; 32]
        );
        // A run hands on the hash of the last object it stands for.
        let mut run = header(6, Kind::Run, [2; 32], None);
        run.run = Some(Run {
            first: 3,
            last_hash: [6; 32],
        });
        assert_eq!(next.accept("p/3-6", &run, [9; 32]).unwrap(), [6; 32]);
        assert_eq!(next.hash(), Some([6; 32]));
        let wrong = next.accept("p/7", &header(7, Kind::Wal, [9; 32], None), [7; 32]);
        assert!(
            matches!(&wrong, Err(Error::Broken { key, prev, .. }) if key == "p/7" && prev == "p/3-6"),
            "{wrong:?}"
        );
        // Refused, it stands where it stood.
        assert_eq!(next.hash(), Some([6; 32]));
    }

    #[test]
    fn only_a_snapshot_changes_the_key_or_starts_without_one() {
        let mut next = Successor::after("position".into(), [1; 32], Some(Some(KeyId([1; 8]))));
        let plain = next.accept("p/2", &header(2, Kind::Wal, [1; 32], None), [2; 32]);
        assert!(
            matches!(&plain, Err(Error::MixedEncryption { prev, .. }) if prev == "position"),
            "{plain:?}"
        );
        let other = next.accept("p/2", &header(2, Kind::Wal, [1; 32], Some(2)), [2; 32]);
        assert!(matches!(other, Err(Error::MixedEncryption { .. })));
        next.accept("p/2", &header(2, Kind::Snapshot, [1; 32], Some(2)), [2; 32])
            .unwrap();
        next.accept("p/3", &header(3, Kind::Wal, [2; 32], Some(2)), [3; 32])
            .unwrap();
        // Where nothing is known before, the first object is taken as it is.
        let mut first = Successor::default();
        first
            .accept("p/9", &header(9, Kind::Wal, [5; 32], Some(1)), [9; 32])
            .unwrap();
    }

    #[test]
    fn the_page_size_stays() {
        let mut next = Successor::default();
        next.accept("p/1", &header(1, Kind::Snapshot, [0; 32], None), [1; 32])
            .unwrap();
        let mut bigger = header(2, Kind::Wal, [1; 32], None);
        bigger.page_size = 8192;
        assert!(matches!(
            next.accept("p/2", &bigger, [2; 32]),
            Err(Error::PageSizeChanged {
                found: 8192,
                expected: 4096,
                ..
            })
        ));
    }
}
