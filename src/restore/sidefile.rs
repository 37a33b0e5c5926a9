//! Files walsync makes beside the user's files (restore's temp file, the
//! follower's position, locks). Each is created exclusively under a name no
//! one can guess, or opened without following a link: a file or symlink
//! someone put at a predictable name never receives a database, and two
//! walsync processes never write through one file.

use std::fs::{File, OpenOptions, Permissions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The directory a file at `path` lives in.
pub fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A new, empty temp file beside `target`, named `.NAME.walsync-WHAT-XXXXXX`,
/// created with `O_EXCL` (so never through a link) and the permissions a
/// plain create would give (0666 less the umask). Removed when dropped unless
/// persisted.
pub fn temp_beside(target: &Path, what: &str) -> io::Result<tempfile::NamedTempFile> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    tempfile::Builder::new()
        .prefix(&format!(".{name}.walsync-{what}-"))
        .permissions(Permissions::from_mode(0o666))
        .tempfile_in(dir_of(target))
}

/// An exclusive lock on `target`, for as long as it is held: a second
/// process asking for it is told at once instead of writing beside the
/// first. Kept in `.NAME.walsync-lock`, opened without following a link.
#[derive(Debug)]
pub struct TargetLock {
    path: PathBuf,
    _file: File,
}

impl TargetLock {
    /// `Ok(None)` when another process holds it.
    pub fn try_acquire(target: &Path) -> io::Result<Option<Self>> {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = dir_of(target).join(format!(".{name}.walsync-lock"));
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)?;
            // SAFETY: flock(2) on a descriptor we own; it is released when
            // the file closes.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Ok(None);
                }
                return Err(e);
            }
            // The holder before us removes the file as it lets go: the lock
            // counts only on the file that is still at the path.
            let held = file.metadata()?;
            match std::fs::symlink_metadata(&path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    return Ok(Some(Self { path, _file: file }));
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for TargetLock {
    fn drop(&mut self) {
        // Removed while still held, so no one can take a lock on it that a
        // later process would not see.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_at_a_predictable_name_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim.txt");
        std::fs::write(&victim, b"precious").unwrap();
        let target = dir.path().join("out.db");
        std::os::unix::fs::symlink(&victim, dir.path().join(".out.db.walsync-lock")).unwrap();
        assert!(TargetLock::try_acquire(&target).is_err());
        let mut tmp = temp_beside(&target, "tmp").unwrap();
        io::Write::write_all(&mut tmp, b"database").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(
            tmp.path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".out.db.walsync-tmp-")
        );
    }

    #[test]
    fn a_second_holder_is_told_at_once_and_the_lock_is_gone_after() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.db");
        let first = TargetLock::try_acquire(&target).unwrap().unwrap();
        assert!(TargetLock::try_acquire(&target).unwrap().is_none());
        let path = first.path.clone();
        drop(first);
        assert!(!path.exists());
        assert!(TargetLock::try_acquire(&target).unwrap().is_some());
    }
}
