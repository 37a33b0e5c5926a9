//! A database's objects in storage, as a chain: listing, parsing keys, and
//! reading the head. Used by replication start-up, `list` and restore.

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
    #[error("object {key}: header says sequence {found}, the key says {expected}")]
    SeqMismatch {
        key: String,
        expected: u64,
        found: u64,
    },
    #[error("objects {a} and {b} have the same sequence number")]
    Duplicate { a: String, b: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One object of a chain, from its key alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub key: String,
    pub seq: u64,
    pub kind: Kind,
    pub size: u64,
}

/// Lists the objects of the database stored under `prefix`, in apply order.
/// Keys that are not walsync objects (or that lie deeper) are ignored.
pub async fn list(storage: &dyn Storage, prefix: &str) -> Result<Vec<ObjectRef>> {
    let listed = storage.list(&format!("{prefix}/")).await?;
    let mut out: Vec<ObjectRef> = listed
        .into_iter()
        .filter_map(|meta| {
            let name = meta.key.strip_prefix(prefix)?.strip_prefix('/')?;
            let (seq, kind) = segment::parse_object_name(name)?;
            Some(ObjectRef {
                key: meta.key,
                seq,
                kind,
                size: meta.size,
            })
        })
        .collect();
    out.sort_by(|a, b| a.seq.cmp(&b.seq).then(a.key.cmp(&b.key)));
    for pair in out.windows(2) {
        if pair[0].seq == pair[1].seq {
            return Err(Error::Duplicate {
                a: pair[0].key.clone(),
                b: pair[1].key.clone(),
            });
        }
    }
    Ok(out)
}

/// Every database prefix that holds walsync objects under the storage root.
pub async fn list_databases(storage: &dyn Storage) -> Result<Vec<(String, Vec<ObjectRef>)>> {
    let listed = storage.list("").await?;
    let mut dbs: Vec<(String, Vec<ObjectRef>)> = Vec::new();
    for meta in listed {
        let Some((prefix, name)) = meta.key.rsplit_once('/') else {
            continue;
        };
        let Some((seq, kind)) = segment::parse_object_name(name) else {
            continue;
        };
        let object = ObjectRef {
            key: meta.key.clone(),
            seq,
            kind,
            size: meta.size,
        };
        match dbs.last_mut() {
            Some((p, objects)) if p == prefix => objects.push(object),
            _ => dbs.push((prefix.to_string(), vec![object])),
        }
    }
    dbs.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, objects) in &mut dbs {
        objects.sort_by_key(|o| o.seq);
    }
    Ok(dbs)
}

/// Reads and checks the whole object, returning its header and content hash.
/// Objects are spooled through a temp file so a large snapshot is never held in memory.
pub async fn read_verified(
    storage: &dyn Storage,
    object: &ObjectRef,
) -> Result<(segment::Header, [u8; 32], std::fs::File)> {
    let file = spool_object(storage, &object.key, None).await?;
    let key = object.key.clone();
    let (header, hash, file) = tokio::task::spawn_blocking(move || {
        use std::io::{Seek, SeekFrom};
        let mut file = file;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(0))?;
        let verified = segment::verify(std::io::BufReader::new(&mut file), len);
        file.seek(SeekFrom::Start(0))?;
        Ok::<_, std::io::Error>(verified.map(|(h, hash)| (h, hash, file)))
    })
    .await
    .map_err(|e| storage::Error::Io {
        key: key.clone(),
        source: std::io::Error::other(e),
    })?
    .map_err(|source| storage::Error::Io {
        key: key.clone(),
        source,
    })?
    .map_err(|source| Error::Segment {
        key: key.clone(),
        source,
    })?;
    check_key(object, &header)?;
    Ok((header, hash, file))
}

/// Checks that a header agrees with the key it was stored under.
pub fn check_key(object: &ObjectRef, header: &segment::Header) -> Result<()> {
    if header.seq != object.seq {
        return Err(Error::SeqMismatch {
            key: object.key.clone(),
            expected: object.seq,
            found: header.seq,
        });
    }
    if header.kind != object.kind {
        return Err(Error::Segment {
            key: object.key.clone(),
            source: segment::Error::UnknownKind(match header.kind {
                Kind::Snapshot => 1,
                Kind::Wal => 2,
            }),
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

/// Copies an object into an anonymous temp file, in `dir` if given (keep
/// large objects off a RAM-backed /tmp by spooling beside their destination).
pub async fn spool_object(
    storage: &dyn Storage,
    key: &str,
    dir: Option<&std::path::Path>,
) -> Result<std::fs::File> {
    let io = |source| storage::Error::Io {
        key: key.to_string(),
        source,
    };
    let mut reader = storage.get(key).await?;
    let file = match dir {
        Some(dir) => tempfile::tempfile_in(dir),
        None => tempfile::tempfile(),
    }
    .map_err(io)?;
    let mut out = tokio::fs::File::from_std(file);
    tokio::io::copy(&mut reader, &mut out).await.map_err(io)?;
    tokio::io::AsyncWriteExt::flush(&mut out)
        .await
        .map_err(io)?;
    Ok(out.into_std().await)
}
