//! The descriptor of a database's `-shm`: one per file per process, shared by
//! every [`super::Database`] open on it.
//!
//! POSIX locks belong to the process, and closing *any* descriptor of a file
//! drops every lock the process holds on it (DESIGN.md 2a). Two `Database`s
//! on one file in one process happen: a configuration edit that changes a
//! database's prefix opens the new replica while the old one's last flush
//! still runs. If each had its own descriptor, the old one's close would
//! silently take the new one's pin and claim with it. So the descriptor is
//! shared, and closed only when the last holder lets go, under the same lock
//! that hands it out: a new holder never gets a descriptor about to close.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// A file by identity: (device, inode).
type FileId = (u64, u64);

static OPEN: Mutex<BTreeMap<FileId, Weak<File>>> = Mutex::new(BTreeMap::new());

fn open_table() -> MutexGuard<'static, BTreeMap<FileId, Weak<File>>> {
    // The table stays consistent whatever panicked while it was held: every
    // change is one insert or remove.
    OPEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One holder of a `-shm` descriptor.
#[derive(Debug)]
pub(super) struct Shm {
    file: Option<Arc<File>>,
    id: FileId,
}

impl Shm {
    /// The process's descriptor of the `-shm` at `path`, opened if no
    /// holder has it. `None` when there is no such file. Writable where it
    /// can be, so that the claim can be a write lock; nothing is written
    /// through it.
    pub(super) fn open(path: &Path) -> io::Result<Option<Self>> {
        let mut table = open_table();
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let id = (meta.dev(), meta.ino());
        if let Some(file) = table.get(&id).and_then(Weak::upgrade) {
            return Ok(Some(Self {
                file: Some(file),
                id,
            }));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .or_else(|e| match e.kind() {
                io::ErrorKind::NotFound => Err(e),
                // A read-only mount or file: read it as before, unclaimed.
                _ => File::open(path),
            });
        let file = match file {
            Ok(file) => Arc::new(file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // Replaced between the look and the open: file it under what was
        // opened. (An open connection keeps SQLite from deleting it, so
        // this is a file another program put there.)
        let meta = file.metadata()?;
        let id = (meta.dev(), meta.ino());
        table.insert(id, Arc::downgrade(&file));
        Ok(Some(Self {
            file: Some(file),
            id,
        }))
    }

    /// The descriptor (`None` only inside `drop`, which takes it to close it
    /// with the table held).
    pub(super) fn file(&self) -> Option<&File> {
        self.file.as_deref()
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        let mut table = open_table();
        if let Some(file) = self.file.take()
            && Arc::strong_count(&file) == 1
        {
            table.remove(&self.id);
            // Closed here, with the table held.
            drop(file);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn holders_of_one_file_share_one_descriptor_until_the_last_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db-shm");
        std::fs::write(&path, [0u8; 64]).unwrap();
        let first = Shm::open(&path).unwrap().unwrap();
        let second = Shm::open(&path).unwrap().unwrap();
        let fd = first.file().unwrap().as_raw_fd();
        assert_eq!(second.file().unwrap().as_raw_fd(), fd);
        drop(first);
        // Still open: a descriptor the second holder reads through.
        assert_eq!(second.file().unwrap().metadata().unwrap().len(), 64);
        assert!(open_table().contains_key(&second.id));
        let id = second.id;
        drop(second);
        assert!(!open_table().contains_key(&id));

        // A new file at the path is a new descriptor.
        std::fs::remove_file(&path).unwrap();
        assert!(Shm::open(&path).unwrap().is_none());
        std::fs::write(&path, [0u8; 32]).unwrap();
        let third = Shm::open(&path).unwrap().unwrap();
        assert_eq!(third.file().unwrap().metadata().unwrap().len(), 32);
    }
}
