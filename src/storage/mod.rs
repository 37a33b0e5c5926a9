//! Where replicated objects live: one small async trait with create-only puts.
//!
//! Storage knows nothing of SQLite. Keys are `/`-separated and relative to the
//! root the backend was opened on (an S3 bucket plus optional key prefix, or a
//! local directory). Objects are immutable: [`Storage::put_new`] fails with
//! [`Error::AlreadyExists`] instead of replacing a key, which is how a second
//! writer on the same prefix is detected rather than silently interleaved.

pub mod fs;
pub mod probe;
mod resume;
pub mod retry;
pub mod s3;
mod spool;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::io::AsyncRead;

pub use spool::{FileBody, Payload, SpoolWriter};

/// Errors from a storage backend. Callers branch on the variant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key exists already: another writer owns this prefix, or an object was replayed.
    #[error("object {key} already exists in storage (another writer owns this prefix?)")]
    AlreadyExists { key: String },
    #[error("object {key} not found in storage")]
    NotFound { key: String },
    #[error("invalid storage URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("storage I/O on {key}: {source}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("S3 request {op} on {key} failed: {message}")]
    S3 {
        op: &'static str,
        key: String,
        message: String,
        /// The service's error code (`NoSuchBucket`, `AccessDenied`), if it sent one.
        code: Option<String>,
    },
}

/// Error codes no retry can cure: the bucket, the credentials or the
/// permissions are wrong until someone changes them.
const LASTING: &[&str] = &[
    "NoSuchBucket",
    "InvalidBucketName",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "AllAccessDisabled",
    "AuthorizationHeaderMalformed",
    s3::NO_CREDENTIALS,
];

impl Error {
    /// True when the store refused for a reason that lasts until someone
    /// fixes the bucket, the credentials or the permissions.
    pub fn is_lasting(&self) -> bool {
        matches!(self, Error::S3 { code: Some(code), .. } if LASTING.contains(&code.as_str()))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the storage root.
    pub key: String,
    pub size: u64,
}

/// A streaming object body.
pub type ObjectReader = Box<dyn AsyncRead + Send + Unpin>;

/// The storage contract. Backends implement only these; all of them must pass
/// the conformance suite in `tests/it/storage.rs`.
#[async_trait]
pub trait Storage: Send + Sync + fmt::Debug {
    /// Writes `key` only if it does not exist yet (S3 `If-None-Match: *`).
    ///
    /// `sha256` is the object's own content hash; it is stored beside the object
    /// so that a retried put whose first attempt did land is recognised as ours
    /// rather than reported as a second writer.
    async fn put_new(&self, key: &str, body: Payload, sha256: [u8; 32]) -> Result<()>;

    /// Opens `key` for streaming reads.
    async fn get(&self, key: &str) -> Result<ObjectReader>;

    /// Reads `len` bytes of `key` from `offset`: an object's header or its
    /// trailer without downloading the rest. Fewer bytes where the object ends
    /// sooner. Read through [`Storage::get_part`].
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::with_capacity(usize::try_from(len.min(1 << 20)).unwrap_or(0));
        self.get_part(key, offset, len)
            .await?
            .read_to_end(&mut buf)
            .await
            .map_err(|source| Error::Io {
                key: key.to_string(),
                source,
            })?;
        Ok(buf)
    }

    /// Opens `len` bytes of `key` from `offset` for streaming reads: an
    /// object's header or trailer, or one part of a large object fetched
    /// beside the others. Fewer bytes where the object ends sooner. Backends
    /// override this with a ranged read; the default streams the object from
    /// its start and skips to `offset`.
    async fn get_part(&self, key: &str, offset: u64, len: u64) -> Result<ObjectReader> {
        use tokio::io::AsyncReadExt;
        let mut reader = self.get(key).await?;
        tokio::io::copy(&mut (&mut reader).take(offset), &mut tokio::io::sink())
            .await
            .map_err(|source| Error::Io {
                key: key.to_string(),
                source,
            })?;
        Ok(Box::new(reader.take(len)))
    }

    /// Lists every object whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;

    /// Lists like [`Storage::list`], handing the objects to `each` a batch at
    /// a time (S3: a page of up to 1,000 keys; a directory: its files), in
    /// no particular order, so that a caller keeping only a summary (the
    /// names of a fleet's databases) never holds the whole listing.
    async fn list_each(
        &self,
        prefix: &str,
        each: &mut (dyn FnMut(Vec<ObjectMeta>) + Send),
    ) -> Result<()> {
        each(self.list(prefix).await?);
        Ok(())
    }

    /// Deletes `key`; deleting a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<()>;

    /// Deletes every key in `keys`, missing ones included, in as few
    /// requests as the store allows (S3: 1,000 keys per request); in no
    /// particular order, so callers that need an order call it once per
    /// step. On an error some of the keys may be gone.
    async fn delete_many(&self, keys: &[String]) -> Result<()> {
        for key in keys {
            self.delete(key).await?;
        }
        Ok(())
    }

    /// Ends what writers stopped mid-write left under `prefix`, for each key
    /// `prefix/REST` that `ours(REST)` accepts, and returns those keys: S3
    /// multipart uploads begun and neither completed nor aborted (their parts
    /// are billed, and a completion still on its way would land after the
    /// next writer listed the chain), a directory's temp files of a process
    /// no longer running. This process's own uploads are left alone, and
    /// so is a store without such leftovers.
    async fn sweep_unfinished(
        &self,
        _prefix: &str,
        _ours: &(dyn for<'k> Fn(&'k str) -> bool + Sync),
    ) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Where object `key` lies as a file on this machine, for a store that
    /// keeps objects as files (a restore links it instead of copying it).
    /// Objects are immutable, so the file never changes once it exists.
    fn local_path(&self, _key: &str) -> Option<std::path::PathBuf> {
        None
    }

    /// A human-readable location for logs (never contains credentials).
    fn describe(&self) -> String;
}

/// Reads a whole object into memory. For small objects only.
pub async fn get_bytes(storage: &dyn Storage, key: &str) -> Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut reader = storage.get(key).await?;
    let mut buf = Vec::new();
    reader
        .read_to_end(&mut buf)
        .await
        .map_err(|source| Error::Io {
            key: key.to_string(),
            source,
        })?;
    Ok(buf)
}

/// Settings needed to open S3 storage beyond what the URL says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// Custom endpoint for S3-compatible stores (MinIO, Tigris, R2, moto ...).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Path-style addressing; defaults to on when an endpoint is given.
    pub force_path_style: Option<bool>,
    /// Keys from the configuration file; `None` uses the standard AWS chain.
    pub credentials: Option<StaticCredentials>,
}

/// An access key pair. Its `Debug` output never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct StaticCredentials {
    pub access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

impl StaticCredentials {
    pub fn new(access_key_id: String, secret: String, session_token: Option<String>) -> Self {
        crate::redact::secret(&secret);
        if let Some(token) = &session_token {
            crate::redact::secret(token);
        }
        Self {
            access_key_id,
            secret_access_key: secret,
            session_token,
        }
    }

    pub(crate) fn secret(&self) -> &str {
        &self.secret_access_key
    }

    pub(crate) fn session_token(&self) -> Option<&str> {
        self.session_token.as_deref()
    }
}

impl fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"***")
            .finish()
    }
}

/// Why `url` names no store walsync can open, if it does not. The
/// configuration is checked with it too, so that `explain` and every
/// command say so before anything runs.
pub fn url_problem(url: &str) -> Option<&'static str> {
    if let Some(rest) = url.strip_prefix("s3://") {
        rest.split('/')
            .next()
            .is_none_or(str::is_empty)
            .then_some("no bucket name after s3://")
    } else if let Some(path) = url.strip_prefix("file://") {
        path.is_empty().then_some("no path after file://")
    } else if url.contains("://") {
        Some("unknown scheme (use s3://bucket/prefix, file:///path or a directory)")
    } else if url.is_empty() {
        Some("empty")
    } else {
        None
    }
}

/// Opens the storage a URL names: `s3://bucket[/prefix]`, `file:///path` or a plain path.
pub async fn open(url: &str, s3: &S3Options) -> Result<Arc<dyn Storage>> {
    if let Some(reason) = url_problem(url) {
        return Err(Error::InvalidUrl {
            url: url.to_string(),
            reason: reason.into(),
        });
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = match rest.split_once('/') {
            Some((b, p)) => (b, p.trim_matches('/')),
            None => (rest, ""),
        };
        let storage = s3::S3Storage::connect(bucket, prefix, s3).await?;
        Ok(Arc::new(storage))
    } else if let Some(path) = url.strip_prefix("file://") {
        Ok(Arc::new(fs::FsStorage::new(path)))
    } else {
        Ok(Arc::new(fs::FsStorage::new(url)))
    }
}

/// Drops any `user:password@` from a URL before it is shown or logged.
pub fn redact_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

/// Joins a root prefix and a relative key with exactly one `/`.
/// The keys under database prefix `prefix` start with this: `prefix/`, or
/// nothing for the whole store.
pub(crate) fn under(prefix: &str) -> String {
    if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    }
}

pub(crate) fn join_key(root: &str, key: &str) -> String {
    if root.is_empty() {
        key.to_string()
    } else {
        format!("{root}/{key}")
    }
}

/// Exactly `2 * N` hex digits back into bytes; `None` for anything else.
pub(crate) fn from_hex<const N: usize>(hex: &str) -> Option<[u8; N]> {
    if hex.len() != 2 * N || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
