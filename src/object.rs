//! One object of a chain being built from a database's pages: the segment
//! encoder writing into a spool, sealed with the chain's key and linked to
//! the object before it.
//!
//! [`db`](crate::db) reads pages and hands them over through its
//! [`Encode`](crate::db::Encode) trait, so the SQLite side knows nothing of
//! keys, links or payloads; [`replica`](crate::replica) makes a [`New`] for
//! each object it wants and uploads what comes back.

use std::io::Write;

use crate::db::{self, Shape};
use crate::encryption::Key;
use crate::segment::{self, Encoder, now_ms};
use crate::state::Digest;
use crate::storage::{Payload, SpoolWriter};

/// The link to the object a new one follows.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub seq: u64,
    pub prev_hash: [u8; 32],
    /// Encrypts the new object's body when set.
    pub key: Option<Key>,
}

/// An object encoded and ready to upload.
#[derive(Debug)]
pub struct Object {
    pub header: segment::Header,
    pub payload: Payload,
    pub hash: [u8; 32],
}

/// The object that follows the link it holds: begun only if the database
/// has something to put in it.
#[derive(Debug, Clone)]
pub struct New(pub Link);

/// An object being written: its header as it will be stored, its body so far.
pub struct Writing {
    header: segment::Header,
    encoder: Encoder<SpoolWriter>,
}

impl db::Encode for New {
    type Object = Object;
    type Pages = Writing;

    fn begin(self, shape: Shape) -> segment::Result<Writing> {
        let Link {
            seq,
            prev_hash,
            key,
        } = self.0;
        let header = segment::Header {
            version: segment::VERSION,
            kind: shape.kind,
            page_size: shape.page_size,
            seq,
            db_pages: shape.db_pages,
            page_count: shape.page_count,
            timestamp_ms: now_ms(),
            wal: shape.wal,
            prev_hash,
            sealed: None,
            run: None,
            state: None,
        };
        let encoder = Encoder::new(header, key.as_ref(), SpoolWriter::new())?;
        // The header as the encoder wrote it: with its seal, if encrypted.
        let header = *encoder.header();
        Ok(Writing { header, encoder })
    }
}

impl db::Pages for Writing {
    type Object = Object;

    fn add(&mut self, pgno: u32, page: &[u8]) -> segment::Result<()> {
        self.encoder.add_page(pgno, page)
    }

    fn finish(self, state: Option<Digest>) -> segment::Result<Object> {
        let Writing {
            mut header,
            encoder,
        } = self;
        header.state = state;
        let (hash, mut spool) = encoder.finish(state)?;
        spool.flush()?;
        let payload = spool.finish()?;
        Ok(Object {
            header,
            payload,
            hash,
        })
    }
}
