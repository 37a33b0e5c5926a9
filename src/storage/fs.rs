//! Local-directory storage: the embedded default, same key layout as S3.
//!
//! A put writes a temp file beside the target, fsyncs it, then hard-links it
//! to the final name. `link(2)` fails if the name exists, which gives the same
//! create-only guarantee as S3's `If-None-Match: *`, atomically, even between
//! processes. The directory is fsynced so the new name survives a crash.

use std::fs::{self, File};
use std::io::{self, SeekFrom, Write};

use super::FileBody;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use super::{Error, ObjectMeta, ObjectReader, Payload, Result, Storage};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
const TEMP_MARKER: &str = ".walsync-tmp-";

#[derive(Debug, Clone)]
pub struct FsStorage {
    root: PathBuf,
}

impl FsStorage {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> Result<PathBuf> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|part| part.is_empty() || part == "." || part == "..")
        {
            return Err(Error::Io {
                key: key.to_string(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "invalid object key"),
            });
        }
        Ok(self.root.join(key))
    }
}

fn io_err(key: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        key: key.to_string(),
        source,
    }
}

/// Makes an object found already durable before it counts as written (the
/// writer that put it there may not have synced its directory yet).
fn sync_existing(path: &Path, dir: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()?;
    File::open(dir)?.sync_all()
}

/// True if the file at `path` holds exactly the `len` bytes `body` reads:
/// a directory keeps no hash beside its objects, so a write of an object it
/// has already (a retry whose first attempt landed, a copy made again) is
/// told from another writer's by its bytes.
fn same_bytes(path: &Path, len: u64, body: &mut dyn io::Read) -> io::Result<bool> {
    let mut existing = File::open(path)?;
    if existing.metadata()?.len() != len {
        return Ok(false);
    }
    let (mut a, mut b) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(a.len() as u64)).unwrap_or(a.len());
        io::Read::read_exact(&mut existing, &mut a[..n])?;
        body.read_exact(&mut b[..n])?;
        if a[..n] != b[..n] {
            return Ok(false);
        }
        left -= n as u64;
    }
    Ok(true)
}

/// True when `a` and `b` would be taken for each other by anyone reading
/// the store: owner, group, mode and every extended attribute (default
/// ACLs a directory hands down, a security label) alike.
fn same_attributes(a: &File, b: &File) -> io::Result<bool> {
    let (ma, mb) = (a.metadata()?, b.metadata()?);
    if (ma.uid(), ma.gid(), ma.mode()) != (mb.uid(), mb.gid(), mb.mode()) {
        return Ok(false);
    }
    Ok(xattrs(a)? == xattrs(b)?)
}

/// Every extended attribute of `file`, by name.
fn xattrs(file: &File) -> io::Result<std::collections::BTreeMap<Vec<u8>, Vec<u8>>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: the buffer is valid for `buf.len()` bytes (none when empty,
    // which asks for the size).
    let names = sized(|buf| unsafe { libc::flistxattr(fd, buf.as_mut_ptr().cast(), buf.len()) })?;
    let mut out = std::collections::BTreeMap::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let c_name = std::ffi::CString::new(name)?;
        // SAFETY: as above; `c_name` is NUL-terminated and outlives the call.
        let value = sized(|buf| unsafe {
            libc::fgetxattr(fd, c_name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        })?;
        out.insert(name.to_vec(), value);
    }
    Ok(out)
}

/// The bytes an xattr call returns: asked for its size first, then filled
/// (again if it grew meanwhile). A filesystem without xattrs has none.
fn sized(mut call: impl FnMut(&mut [u8]) -> libc::ssize_t) -> io::Result<Vec<u8>> {
    loop {
        let size = call(&mut []);
        if size < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOTSUP) => Ok(Vec::new()),
                _ => Err(e),
            };
        }
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; usize::try_from(size).unwrap_or(0)];
        let got = call(&mut buf);
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(e);
        }
        match usize::try_from(got) {
            Ok(got) if got <= buf.len() => buf.truncate(got),
            _ => continue,
        }
        return Ok(buf);
    }
}

/// Gives the unnamed file `file` (opened with `O_TMPFILE`) the name `to`.
/// Fails (and the caller copies) where `file` has a name already or was
/// made on another filesystem, or `/proc` is not mounted.
fn link_unnamed(file: &File, to: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let fd = file.as_raw_fd();
    let from = CString::new(format!("/proc/self/fd/{fd}"))?;
    let to = CString::new(to.as_os_str().as_bytes())?;
    // Only a file with no name at all is linked, so one spool becomes at
    // most one store's object: a body written to two stores at once must
    // not leave them sharing a file. The lock makes the check and the link
    // one step within the process, the only one holding the spool.
    static LINKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = LINKING.lock().unwrap_or_else(|e| e.into_inner());
    if file.metadata()?.nlink() != 0 {
        return Err(io::Error::other("not an unnamed file"));
    }
    // SAFETY: both paths are NUL-terminated and outlive the call.
    let linked = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if linked == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn put_blocking(path: &Path, key: &str, body: Payload) -> Result<()> {
    let dir = path.parent().ok_or_else(|| Error::Io {
        key: key.to_string(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "key has no parent directory"),
    })?;
    fs::create_dir_all(dir).map_err(io_err(key))?;
    if path.exists() {
        let same = match &body {
            Payload::Bytes(bytes) => same_bytes(path, bytes.len() as u64, &mut bytes.as_slice()),
            Payload::File { file, len } => same_bytes(path, *len, &mut FileBody::new(file, *len)),
        };
        return match same {
            Ok(true) => sync_existing(path, dir).map_err(io_err(key)),
            Ok(false) => Err(Error::AlreadyExists {
                key: key.to_string(),
            }),
            Err(e) => Err(io_err(key)(e)),
        };
    }
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("object");
    let temp = dir.join(format!(
        "{file_name}{TEMP_MARKER}{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _writing = Writing::begin(&temp);
    let result = (|| -> io::Result<()> {
        let mut out = File::create(&temp)?;
        // A large body was spooled to an unnamed file: where that file is on
        // this directory's filesystem, and looks to every reader like the
        // file just created here (owner, group, mode, ACLs, security
        // label), it is given a name instead of being copied (a 1 GiB
        // database's snapshot spent a sixth of its time copying the spool).
        // Nothing writes to a spool once it is a body.
        if let Payload::File { file, len } = &body
            && file.metadata()?.len() == *len
            && same_attributes(file, &out).unwrap_or(false)
        {
            drop(out);
            fs::remove_file(&temp)?;
            if link_unnamed(file, &temp).is_ok() {
                return file.sync_all();
            }
            out = File::create(&temp)?;
        }
        match body {
            Payload::Bytes(bytes) => out.write_all(&bytes)?,
            Payload::File { file, len } => {
                let copied = io::copy(&mut super::spool::FileBody::new(&file, len), &mut out)?;
                if copied != len {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "spool file shorter than its recorded length",
                    ));
                }
            }
        }
        out.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&temp);
        return Err(io_err(key)(e));
    }
    let linked = fs::hard_link(&temp, path);
    let same = match &linked {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            File::open(&temp).and_then(|mut t| {
                let len = t.metadata()?.len();
                same_bytes(path, len, &mut t)
            })
        }
        _ => Ok(false),
    };
    let _ = fs::remove_file(&temp);
    match (linked, same) {
        (Ok(()), _) => {}
        (Err(_), Ok(true)) => return sync_existing(path, dir).map_err(io_err(key)),
        (Err(_), Err(e)) => return Err(io_err(key)(e)),
        (Err(e), Ok(false)) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(Error::AlreadyExists {
                key: key.to_string(),
            });
        }
        (Err(e), Ok(false)) => return Err(io_err(key)(e)),
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(key))?;
    Ok(())
}

fn list_blocking(root: &Path, prefix: &str) -> Result<Vec<ObjectMeta>> {
    let mut out = Vec::new();
    walk(root, prefix, &mut |batch| {
        out.extend(batch);
        true
    })?;
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// Hands the objects under `prefix` to `each`, one directory at a time,
/// until it returns false.
fn walk(root: &Path, prefix: &str, each: &mut dyn FnMut(Vec<ObjectMeta>) -> bool) -> Result<()> {
    walk_files(root, prefix, false, each)
}

/// [`walk`], of the temp files of unfinished puts instead (`temps`).
fn walk_files(
    root: &Path,
    prefix: &str,
    temps: bool,
    each: &mut dyn FnMut(Vec<ObjectMeta>) -> bool,
) -> Result<()> {
    // Walk only the directory that can hold the prefix, not the whole root.
    let start_rel = match prefix.rfind('/') {
        Some(i) => &prefix[..i],
        None => "",
    };
    let start = if start_rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(start_rel)
    };
    // A directory reached through a link is walked like any other, under
    // each name it is reached by: the listing of one prefix follows links on
    // its path, and a listing of the whole store must see the same objects
    // under the same keys. A link back to a directory above it is not walked
    // again (it would never end).
    let mut stack = vec![(start, Vec::new())];
    while let Some((dir, mut above)) = stack.pop() {
        if let Ok(meta) = fs::metadata(&dir) {
            let id = (meta.dev(), meta.ino());
            if above.contains(&id) {
                continue;
            }
            above.push(id);
        }
        let mut out = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(prefix)(e)),
        };
        // What went since the directory was opened is left out (see the
        // size below), not an error for the whole listing.
        let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(io_err(prefix)(e)),
            };
            let path = entry.path();
            let mut file_type = match entry.file_type() {
                Ok(t) => t,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(io_err(prefix)(e)),
            };
            if file_type.is_symlink() {
                match fs::metadata(&path) {
                    Ok(target) if target.is_dir() => file_type = target.file_type(),
                    // A link to a file, or dangling: not an object.
                    _ => continue,
                }
            }
            let Ok(rel) = path.strip_prefix(root) else {
                continue;
            };
            let Some(rel) = rel.to_str() else { continue };
            let rel = rel.replace(std::path::MAIN_SEPARATOR, "/");
            if file_type.is_dir() {
                if rel.starts_with(prefix) || prefix.starts_with(&format!("{rel}/")) {
                    stack.push((path, above.clone()));
                }
            } else if file_type.is_file()
                && rel.starts_with(prefix)
                && rel.contains(TEMP_MARKER) == temps
            {
                let size = match entry.metadata() {
                    Ok(meta) => meta.len(),
                    // Deleted since the directory was read (a running
                    // `watch` deletes objects past the exact window): it is
                    // not listed, as it would not be a moment later.
                    Err(e) if gone(&e) => continue,
                    Err(e) => return Err(io_err(prefix)(e)),
                };
                out.push(ObjectMeta { key: rel, size });
            }
        }
        if !out.is_empty() && !each(out) {
            break;
        }
    }
    Ok(())
}

/// The temp files this process is writing now. A container's walsync is
/// often PID 1 at every start, so its own PID does not tell a temp file
/// being written from one a killed predecessor left.
static WRITING: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// One entry of [`WRITING`], removed when the put ends however it ends.
struct Writing(PathBuf);

impl Writing {
    fn begin(temp: &Path) -> Self {
        writing().push(temp.to_path_buf());
        Self(temp.to_path_buf())
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        writing().retain(|p| *p != self.0);
    }
}

fn writing() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    WRITING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether process `pid` of this machine is running (this one is). A temp
/// file named after one that is not was left by a put it never finished.
fn running(pid: i32) -> bool {
    if pid <= 0 {
        return true;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let sent = unsafe { libc::kill(pid, 0) };
    sent == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

async fn blocking<T: Send + 'static>(
    key: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Io {
            key: key.to_string(),
            source: io::Error::other(e),
        })?
}

#[async_trait]
impl Storage for FsStorage {
    async fn put_new(&self, key: &str, body: Payload, _sha256: [u8; 32]) -> Result<()> {
        let path = self.path_of(key)?;
        let owned = key.to_string();
        blocking(key, move || put_blocking(&path, &owned, body)).await
    }

    async fn get(&self, key: &str) -> Result<ObjectReader> {
        let path = self.path_of(key)?;
        match tokio::fs::File::open(&path).await {
            Ok(file) => Ok(Box::new(file)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::NotFound {
                key: key.to_string(),
            }),
            Err(e) => Err(io_err(key)(e)),
        }
    }

    async fn get_part(&self, key: &str, offset: u64, len: u64) -> Result<ObjectReader> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let path = self.path_of(key)?;
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound {
                    key: key.to_string(),
                });
            }
            Err(e) => return Err(io_err(key)(e)),
        };
        file.seek(SeekFrom::Start(offset))
            .await
            .map_err(io_err(key))?;
        Ok(Box::new(file.take(len)))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let root = self.root.clone();
        let owned = prefix.to_string();
        blocking(prefix, move || list_blocking(&root, &owned)).await
    }

    async fn list_each(
        &self,
        prefix: &str,
        each: &mut (dyn FnMut(Vec<ObjectMeta>) + Send),
    ) -> Result<()> {
        let (batches, mut arriving) = tokio::sync::mpsc::channel(2);
        let root = self.root.clone();
        let owned = prefix.to_string();
        let walker = tokio::task::spawn_blocking(move || {
            // A receiver gone (the listing dropped) ends the walk.
            walk(&root, &owned, &mut |batch| {
                batches.blocking_send(batch).is_ok()
            })
        });
        while let Some(batch) = arriving.recv().await {
            each(batch);
        }
        walker.await.map_err(|e| Error::Io {
            key: prefix.to_string(),
            source: io::Error::other(e),
        })?
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(key)(e)),
        }
    }

    async fn sweep_unfinished(
        &self,
        prefix: &str,
        ours: &(dyn for<'k> Fn(&'k str) -> bool + Sync),
    ) -> Result<Vec<String>> {
        let under = super::under(prefix);
        let mut temps = Vec::new();
        let (root, walked) = (self.root.clone(), under.clone());
        blocking(prefix, move || {
            walk_files(&root, &walked, true, &mut |batch| {
                temps.extend(batch);
                true
            })
            .map(|()| temps)
        })
        .await?
        .into_iter()
        .filter(|temp| {
            let Some((key, writer)) = temp.key.split_once(TEMP_MARKER) else {
                return false;
            };
            let pid = writer
                .split_once('-')
                .and_then(|(pid, _)| pid.parse::<i32>().ok());
            let own = pid == i32::try_from(std::process::id()).ok();
            let left = if own {
                !writing().contains(&self.root.join(&temp.key))
            } else {
                pid.is_some_and(|pid| !running(pid))
            };
            key.strip_prefix(&under).is_some_and(ours) && left
        })
        .map(|temp| async move {
            let path = self.root.join(&temp.key);
            match tokio::fs::remove_file(&path).await {
                Ok(()) => Ok(Some(temp.key)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_err(&temp.key)(e)),
            }
        })
        .collect::<futures_util::future::TryJoinAll<_>>()
        .await
        .map(|swept| swept.into_iter().flatten().collect())
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.path_of(key).ok()
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}
