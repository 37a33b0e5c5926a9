//! Whether a store refuses to replace an object. Every object is written
//! with `If-None-Match: *`, which is how a second writer on one prefix is
//! caught at its first object instead of silently interleaving its chain
//! with ours. Some S3-compatible servers accept the header and overwrite
//! anyway (Garage and s3rver did when tried), so `watch` asks the store
//! once at start, by writing one key twice, and says so where it does not.

use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use super::{Error, Payload, Result, Storage};

/// Where the start-up checks look and write: no database's prefix, and
/// nothing a listing of databases takes for one (it holds no object named
/// like a chain's).
pub const DIR: &str = ".walsync-start-check/";

/// True when `storage` refused the second of two writes to one key. The
/// probe key is deleted again; a store whose objects are our own files
/// refuses by construction and is not asked.
pub async fn refuses_overwrite(storage: &dyn Storage) -> Result<bool> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let key = format!("{DIR}create-only-{}-{nanos}", std::process::id());
    if storage.local_path(&key).is_some() {
        return Ok(true);
    }
    // Different bodies, so that the second write cannot pass for a retry of
    // the first (a retried put whose hash matches counts as done).
    let write = |body: &'static [u8]| {
        storage.put_new(
            &key,
            Payload::Bytes(body.to_vec()),
            Sha256::digest(body).into(),
        )
    };
    match write(b"first").await {
        Ok(()) => {}
        // Taken already (a key left by an earlier start): refused, as asked.
        Err(Error::AlreadyExists { .. }) => return Ok(true),
        Err(e) => return Err(e),
    }
    let second = write(b"second").await;
    if let Err(e) = storage.delete(&key).await {
        tracing::warn!(
            key,
            error = %e,
            "could not delete the start-up probe (no permission to delete?); it is harmless"
        );
    }
    match second {
        Ok(()) => Ok(false),
        Err(Error::AlreadyExists { .. }) => Ok(true),
        Err(e) => Err(e),
    }
}
