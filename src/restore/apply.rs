//! Writing the checked objects' pages into a file beside the output,
//! keeping the state digest as it goes, checking the result with SQLite,
//! and putting it in place (retiring an old file's WAL first).

use super::*;

pub(super) fn apply(
    items: &[Item],
    output: &Path,
    force: bool,
    keys: Option<&Keys>,
    destination: &str,
    before_place: impl FnOnce(&Path) -> io::Result<()>,
) -> Result<()> {
    // A new file of our own, never one someone put at a name we chose.
    let tmp_file = sidefile::temp_beside(output, "tmp").map_err(io_at(output))?;
    let tmp = tmp_file.path().to_path_buf();
    let tmp_record = state::record_path(&tmp, destination);
    let result = apply_into(items, tmp_file.as_file(), &tmp, &tmp_record, keys)
        .and_then(|record| check_integrity(&tmp).map(|()| record))
        .and_then(|record| {
            before_place(&tmp).map_err(io_at(&tmp))?;
            place(&tmp, output, force).map(|()| record)
        });
    // Built as the objects were applied, but describing nothing placed
    // (a failure, or a head that records no digest): not left behind.
    if !matches!(result, Ok(Some(_))) {
        let _ = std::fs::remove_file(&tmp_record);
    }
    // Gone already if placed; removed here if not.
    drop(tmp_file);
    // The record of what was written lets the first `watch` continue the
    // chain without shipping anything; a record of what the file held before
    // would only be a stale one.
    let record_path = state::record_path(output, destination);
    match result? {
        Some(mut record) => record.rename(&record_path).map_err(io_at(&record_path))?,
        None => state::forget(&record_path).map_err(io_at(&record_path))?,
    }
    let dir = sidefile::dir_of(output);
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(&dir))?;
    Ok(())
}

/// Moves the checked file into place. Without `force` it must not replace
/// anything, not even a file created while the restore ran.
pub(super) fn place(tmp: &Path, output: &Path, force: bool) -> Result<()> {
    if !force {
        return match std::fs::hard_link(tmp, output) {
            Ok(()) => std::fs::remove_file(tmp).map_err(io_at(tmp)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(Error::OutputExists {
                path: output.to_path_buf(),
            }),
            Err(e) => Err(io_at(output)(e)),
        };
    }
    retire_wal_of(output)?;
    std::fs::rename(tmp, output).map_err(io_at(output))
}

/// A `-wal` left beside the file being replaced would be replayed onto the
/// restored one. Fold it into the old file first (so a crash before the
/// rename loses nothing), refusing if a live app still has the file open:
/// one in a transaction keeps the checkpoint from finishing, and any other
/// connection keeps SQLite from deleting the WAL as the last one closes. An
/// app left connected to the replaced file would read (and write) a file
/// that no longer has a name.
pub(super) fn retire_wal_of(output: &Path) -> Result<()> {
    let side = |suffix: &str| {
        let mut s = output.as_os_str().to_owned();
        s.push(suffix);
        PathBuf::from(s)
    };
    let (wal, shm) = (side("-wal"), side("-shm"));
    if wal.exists() {
        let in_use = || Error::InUse {
            path: output.to_path_buf(),
        };
        // Busy or locked: an app has it. Anything else (not a database, a
        // directory walsync cannot write) says what it is.
        let refused = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                in_use()
            }
            Some(rusqlite::ErrorCode::NotADatabase) => Error::WalNotCheckpointable {
                path: output.to_path_buf(),
                reason: "it is not a SQLite database".into(),
            },
            _ => Error::WalNotCheckpointable {
                path: output.to_path_buf(),
                reason: e.to_string(),
            },
        };
        let conn = rusqlite::Connection::open(output).map_err(refused)?;
        conn.busy_timeout(std::time::Duration::from_secs(1))?;
        // SQLite deletes the WAL of a file it cannot read as a database when
        // the last connection to it closes: a WAL that may hold someone's last
        // commits is left alone until the file has read as a database.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )?;
        conn.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0))
            .map_err(refused)?;
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            false,
        )?;
        let busy: i64 = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .map_err(refused)?;
        if busy != 0 {
            return Err(in_use());
        }
        drop(conn);
        if wal.exists() {
            return Err(in_use());
        }
    }
    for path in [wal, shm] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(&path)(e)),
        }
    }
    Ok(())
}

/// Writes every object's pages into `tmp`, keeping the state record beside
/// it and checking, after each object that records one, that the state
/// digest of what was written is the one the writer had. Returns the record
/// if the last object's digest is known (it describes the file written).
/// Pages are hashed on a second thread while this one decodes and writes.
pub(super) fn apply_into(
    items: &[Item],
    out: &File,
    tmp: &Path,
    record_path: &Path,
    keys: Option<&Keys>,
) -> Result<Option<Record>> {
    // A chain whose objects record no state digest (the first format) has
    // nothing to check and no record worth leaving: no page is hashed.
    let tracked = items.iter().any(|i| i.state.is_some());
    let record = std::thread::scope(|scope| -> Result<Option<Record>> {
        let mut hasher = tracked.then(|| Hasher::spawn(scope));
        let mut record: Option<Record> = None;
        for item in items {
            let done = apply_object(
                item,
                out,
                tmp,
                record_path,
                keys,
                hasher.as_mut(),
                record.take(),
            )?;
            record = done;
        }
        Ok(record)
    })?;
    out.sync_all().map_err(io_at(tmp))?;
    Ok(record.filter(|_| items.last().is_some_and(|i| i.state.is_some())))
}

/// The most one write puts into the restored file. Per 4 KiB page, the
/// system calls cost; 1 MiB at a time, ext4 copied into the page cache at a
/// quarter of the speed (measured on Linux 6.18, a 1 GiB restore: 4 KiB
/// 3.5-3.8 s, 64 KiB 2.9-3.2 s, 256 KiB 3.3-3.5 s, 1 MiB 4.6-5.1 s). A
/// multiple of every page size, so a chunk never splits a page.
pub(super) const WRITE_BYTES: usize = 64 << 10;

/// Where the hashes of an object's pages go, in the order read: a
/// snapshot's build its record, any other object's change the one before.
pub(super) enum Hashes {
    Building(state::Builder),
    Changing(Vec<(u32, u128)>),
}

impl Hashes {
    fn take(&mut self, batch: &Batch, record_path: &Path) -> Result<()> {
        match self {
            Hashes::Building(b) => {
                for (_, hash) in batch.hashed() {
                    b.push(hash).map_err(io_at(record_path))?;
                }
            }
            Hashes::Changing(changed) => changed.extend(batch.hashed()),
        }
        Ok(())
    }
}

/// [`apply_into`] for one object: `record` is the state before it (if
/// tracked), the result the state after it.
pub(super) fn apply_object(
    item: &Item,
    out: &File,
    tmp: &Path,
    record_path: &Path,
    keys: Option<&Keys>,
    mut hasher: Option<&mut Hasher>,
    record: Option<Record>,
) -> Result<Option<Record>> {
    let corrupt = |source| Error::Corrupt {
        key: item.key.clone(),
        source,
    };
    let stopped = |e: page_hashes::Stopped| Error::Io {
        path: tmp.to_path_buf(),
        source: io::Error::other(e),
    };
    let file = File::open(&item.spool).map_err(io_at(&item.spool))?;
    let len = file.metadata().map_err(io_at(&item.spool))?.len();
    let mut reader =
        PageReader::new(BufReader::with_capacity(1 << 20, file), len, keys).map_err(corrupt)?;
    let header = *reader.header();
    let head = state::Head {
        seq: header.seq,
        hash: item.hash,
    };
    let page_size = header.page_size as usize;
    // A snapshot holds every page in order: its record is built as it
    // streams. Anything else changes some pages of the record before it.
    let mut hashes = match header.kind {
        Kind::Snapshot if hasher.is_some() => Hashes::Building(
            state::Builder::new(record_path, header.page_size).map_err(io_at(record_path))?,
        ),
        _ => Hashes::Changing(Vec::new()),
    };
    // A small object can declare a huge database: what it declares must
    // fit on the disk, and agree with what its page 1 says.
    let declared = u64::from(header.db_pages) * u64::from(header.page_size);
    let written = out.metadata().map_err(io_at(tmp))?.len();
    if declared > written {
        let free = free_space(tmp).map_err(io_at(tmp))?;
        if declared - written > free {
            return Err(Error::TooLarge {
                key: item.key.clone(),
                declared,
                free,
            });
        }
    }
    let mut batch = match hasher.as_deref_mut() {
        Some(h) => h.batch(page_size),
        None => Batch::new(page_size),
    };
    loop {
        let read = reader.next_page(batch.slot()).map_err(corrupt)?;
        if let Some(pgno) = read {
            if pgno == 1
                && let Some(says) = header_page_count(batch.slot())
                && says != header.db_pages
            {
                return Err(Error::SizeMismatch {
                    key: item.key.clone(),
                    declared: header.db_pages,
                    says,
                });
            }
            batch.keep(pgno);
            if !batch.is_full() {
                continue;
            }
        }
        for (first, bytes) in batch.stretches() {
            let at = u64::from(first - 1) * u64::from(header.page_size);
            for (i, chunk) in bytes.chunks(WRITE_BYTES).enumerate() {
                out.write_all_at(chunk, at + (i * WRITE_BYTES) as u64)
                    .map_err(io_at(tmp))?;
            }
        }
        match hasher.as_deref_mut() {
            Some(h) => {
                let next = h.batch(page_size);
                let full = std::mem::replace(&mut batch, next);
                if !full.is_empty()
                    && let Some(hashed) = h.send(full).map_err(stopped)?
                {
                    hashes.take(&hashed, record_path)?;
                    h.recycle(hashed);
                }
            }
            None => batch.clear(),
        }
        if read.is_none() {
            break;
        }
    }
    // Pages past the new end are gone, also if a later object grows the file again.
    out.set_len(u64::from(header.db_pages) * u64::from(header.page_size))
        .map_err(io_at(tmp))?;
    let Some(h) = hasher else {
        return Ok(None);
    };
    h.recycle(batch);
    while let Some(hashed) = h.next_hashed().map_err(stopped)? {
        hashes.take(&hashed, record_path)?;
        h.recycle(hashed);
    }
    let record = match (hashes, record) {
        (Hashes::Building(b), _) => b.place(record_path, head).map_err(io_at(record_path))?,
        (Hashes::Changing(changed), Some(mut r)) => {
            let sum = r
                .advance(header.db_pages, &changed)
                .map_err(io_at(record_path))?;
            r.apply(sum, &changed, head).map_err(io_at(record_path))?;
            r
        }
        (Hashes::Changing(_), None) => {
            // Plans start at a snapshot (its header is checked against
            // its listing); this is not reached.
            return Err(Error::NoSnapshot {
                prefix: item.key.clone(),
                target: header.seq,
            });
        }
    };
    if let Some(expected) = item.state
        && record.sum.digest() != expected
    {
        return Err(Error::StateMismatch {
            key: item.key.clone(),
        });
    }
    Ok(Some(record))
}

/// The database size page 1's header gives, where SQLite would trust it
/// (non-zero, and written by the commit that last changed the file: the
/// version-valid-for number equals the change counter).
pub(crate) fn header_page_count(page1: &[u8]) -> Option<u32> {
    if page1.len() < 100 || !page1.starts_with(b"SQLite format 3\0") {
        return None;
    }
    let be =
        |at: usize| u32::from_be_bytes([page1[at], page1[at + 1], page1[at + 2], page1[at + 3]]);
    let (counter, size, valid_for) = (be(24), be(28), be(92));
    (size != 0 && valid_for == counter).then_some(size)
}

/// Bytes an unprivileged writer may still use on the filesystem of `path`.
pub(super) fn free_space(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: statvfs(3) on a NUL-terminated path into a zeroed struct we own.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// A read-only SQLite URI for `path` that SQLite opens as immutable: every
/// byte its URI parser would read as syntax (`?`, `#`, `%`) or that is not
/// plain ASCII is percent-encoded, so any file name opens the file it names
/// (`restore -o 'a#b.db'` once checked the file `a`).
pub(crate) fn immutable_uri(path: &Path) -> String {
    use std::fmt::Write as _;
    use std::os::unix::ffi::OsStrExt;
    let mut uri = String::from("file:");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/._-~+,=@".contains(&b) {
            uri.push(char::from(b));
        } else {
            let _ = write!(uri, "%{b:02x}");
        }
    }
    uri.push_str("?immutable=1");
    uri
}

pub(super) fn check_integrity(path: &Path) -> Result<()> {
    let conn = rusqlite::Connection::open_with_flags(
        immutable_uri(path),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
    )?;
    let mut stmt = conn.prepare("PRAGMA integrity_check")?;
    let problems: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<_>>()?;
    if problems.len() == 1 && problems[0] == "ok" {
        Ok(())
    } else {
        Err(Error::Integrity(problems.join("; ")))
    }
}
