//! Downloading a restore's objects, several at a time, each checked
//! (checksums, header against key) as it arrives; from a local directory
//! they are linked instead of copied.

use super::*;

/// Downloads every object of `resolved` into `scratch` and verifies each
/// (trailer, key, link to the one before, encryption, page size) before
/// anything is written. Returns them with the hash the newest hands on and
/// the bytes read.
pub(super) async fn fetch_all(
    storage: &dyn Storage,
    opts: &RestoreOptions,
    resolved: &Resolved,
    scratch: &Path,
) -> Result<(Vec<Verified>, Option<[u8; 32]>, u64)> {
    // A snapshot starts the chain, but where the object before it still
    // exists the snapshot must link to it too: a snapshot of another database renamed
    // into this prefix is refused.
    let mut successor = link::Successor::default();
    if let Some(before) = &resolved.before {
        let (_, hash, _) = chain::read_verified(storage, before).await?;
        successor = link::Successor::after(before.key.clone(), hash, None);
    }
    let mut verified: Vec<Verified> = Vec::with_capacity(resolved.objects.len());
    let mut bytes = 0u64;
    let spool_dir = scratch.to_path_buf();
    // Objects are fetched and decoded several at a time, in chain order;
    // the links between them are checked below, one after another.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let fetched = futures_util::stream::iter(resolved.objects.clone().into_iter().map(|object| {
        let (stop, spool_dir) = (&stop, &spool_dir);
        async move {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(Error::Io {
                    path: spool_dir.clone(),
                    source: io::Error::other("not fetched: the restore failed"),
                });
            }
            fetch_checked(storage, spool_dir, object).await
        }
    }))
    .buffered(opts.parallelism.max(1));
    let mut fetched = std::pin::pin!(fetched);
    let checked: Result<()> = async {
        while let Some(next) = fetched.next().await {
            let (object, header, hash, spool) = next?;
            // A missing or wrong key is found before anything is written.
            header
                .key(opts.keys.as_deref())
                .map_err(|source| Error::Corrupt {
                    key: object.key.clone(),
                    source,
                })?;
            let hash = successor.accept(&object.key, &header, hash)?;
            bytes += object.size;
            crate::progress::current().fetched(object.size);
            verified.push(Verified {
                object,
                header,
                hash,
                spool,
            });
        }
        Ok(())
    }
    .await;
    if let Err(e) = checked {
        // Downloads already under way write their spool files from tokio's
        // blocking threads even once dropped: let them end before the
        // scratch directory goes, or one lands in it after its removal.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        while fetched.next().await.is_some() {}
        return Err(e);
    }

    Ok((verified, successor.hash(), bytes))
}

/// Whether `e` says an object was not there: one deleted between the
/// listing and the download (compacted after the exact window meanwhile).
pub(super) fn is_gone(e: &Error) -> bool {
    match e {
        Error::Storage(storage::Error::NotFound { .. }) => true,
        Error::Chain(e) => e.is_not_found(),
        _ => false,
    }
}

/// An object downloaded and checked, waiting to be applied.
pub(super) struct Verified {
    pub(super) object: ObjectRef,
    pub(super) header: segment::Header,
    pub(super) hash: [u8; 32],
    pub(super) spool: PathBuf,
}

/// What applying one object needs.
pub(super) struct Item {
    pub(super) key: String,
    pub(super) spool: PathBuf,
    pub(super) hash: [u8; 32],
    /// The state digest the object says the database has after it.
    pub(super) state: Option<state::Digest>,
}

/// Downloads one object into `scratch` and checks it on its own: its
/// checksums, and that its header matches its key.
pub(super) async fn fetch_checked(
    storage: &dyn Storage,
    scratch: &Path,
    object: ObjectRef,
) -> Result<(ObjectRef, segment::Header, [u8; 32], PathBuf)> {
    let spool = scratch.join(format!("{:016x}", object.seq));
    // A plan made again after an object went (see `is_gone`) fetches into
    // the same directory: an earlier attempt's file may be a link to the
    // store's own object, which must never be written to.
    match std::fs::remove_file(&spool) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at(&spool)(e)),
    }
    let spooling = |e| match e {
        chain::Error::Local { key, source } => Error::Spool {
            key,
            path: spool.clone(),
            source,
        },
        e => Error::Chain(e),
    };
    let (header, hash) = match link_local(storage, &object.key, &spool)? {
        true => verify_file(&object.key, &spool).await?,
        false => {
            // Read too: a download in parts is hashed back from the file.
            let mut out = tokio::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&spool)
                .await
                .map_err(io_at(&spool))?;
            if object.size >= chain::PARTS_FROM && storage.local_path(&object.key).is_none() {
                let out = out.into_std().await;
                let split = chain::Split::for_size(object.size);
                chain::download(storage, &object.key, object.size, out, split)
                    .await
                    .map_err(spooling)?
            } else {
                chain::copy_object(storage, &object.key, &mut out)
                    .await
                    .map_err(spooling)?
            }
        }
    };
    chain::check_key(&object, &header)?;
    Ok((object, header, hash, spool))
}

/// Links an object of a store on this machine into the scratch directory:
/// no copy to write, and the link keeps it readable if retention deletes
/// it meanwhile. `false` where the store is remote or the link cannot be
/// made (another filesystem, say): the object is downloaded instead.
pub(super) fn link_local(storage: &dyn Storage, key: &str, spool: &Path) -> Result<bool> {
    let Some(path) = storage.local_path(key) else {
        return Ok(false);
    };
    match std::fs::hard_link(&path, spool) {
        Ok(()) => Ok(true),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound && spool.parent().is_some_and(Path::exists) =>
        {
            Err(Error::Storage(storage::Error::NotFound {
                key: key.to_string(),
            }))
        }
        Err(e) => {
            tracing::debug!(key, error = %e, "cannot link the object; copying it");
            Ok(false)
        }
    }
}

/// Reads a whole object file once, checking it as [`chain::copy_object`]
/// checks a download.
pub(super) async fn verify_file(key: &str, path: &Path) -> Result<(segment::Header, [u8; 32])> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<_> {
        let file = File::open(&owned).map_err(io_at(&owned))?;
        let len = file.metadata().map_err(io_at(&owned))?.len();
        Ok(segment::verify(file, len))
    })
    .await
    .map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: io::Error::other(e),
    })??
    .map_err(|source| Error::Corrupt {
        key: key.to_string(),
        source,
    })
}
