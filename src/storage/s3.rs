//! S3 and S3-compatible storage (AWS, MinIO, R2, Tigris, moto, ...).
//!
//! Create-only puts use `If-None-Match: *`. Every object carries its own
//! sha256 as user metadata ([`SHA256_METADATA`]), so when a put is refused
//! because the key exists we can tell our own earlier attempt (an SDK retry
//! after a lost response) from a second writer. Bodies of
//! [`SPOOL_MEMORY_LIMIT`] bytes or more that are spooled to a file go up as a
//! multipart upload, a few parts at a time.
//!
//! Why this file is long: it is the whole S3 backend, every request walsync
//! makes (create-only put, multipart upload, ranged and resumed get, list,
//! batch delete) and the one mapping of their errors, which they share.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::meta::region::RegionProviderChain;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{ConfigBag, Intercept, Region, RuntimeComponents};
use aws_sdk_s3::error::{BoxError, DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use futures_util::{StreamExt, TryStreamExt};

mod uploads;

pub use uploads::abort_unfinished;

use super::retry::{Pace, attempts, backoff};
use super::spool::SPOOL_MEMORY_LIMIT;
use super::{
    Error, ObjectMeta, ObjectReader, Payload, Result, S3Options, Storage, join_key, to_hex,
};

/// User-metadata key (`x-amz-meta-walsync-sha256`) holding the hex sha256 of the body.
pub const SHA256_METADATA: &str = "walsync-sha256";

/// Region used when neither the options nor the AWS configuration name one.
const FALLBACK_REGION: &str = "us-east-1";

/// Preferred multipart part size; grown for huge bodies to stay within S3's part limit.
const PART_SIZE: u64 = 8 * 1024 * 1024;
/// Parts of one object uploaded at once: a part is in memory while it goes
/// up, so this bounds the memory an upload takes (24 MiB at 8 MiB parts).
const PARTS_AT_ONCE: usize = 3;
const MAX_PARTS: u64 = 10_000;

#[derive(Debug, Clone)]
pub struct S3Storage {
    client: Client,
    /// Paces every attempt of every request of this process to this store.
    pace: std::sync::Arc<Pace>,
    bucket: String,
    /// Key prefix without leading or trailing `/`; may be empty.
    prefix: String,
    /// Custom endpoint, for `describe()` only.
    endpoint: Option<String>,
}

/// Applies walsync's retry and timeout settings to an S3 client config.
/// [`S3Storage::connect`] uses it; callers of [`S3Storage::with_client`] should too.
pub fn tune_config(builder: aws_sdk_s3::config::Builder) -> aws_sdk_s3::config::Builder {
    builder
        .retry_config(retry_config())
        .timeout_config(timeout_config())
}

/// Tigris answers a request in the region that received it, from that
/// region's copy, unless the request asks for the object's leader region
/// with `X-Tigris-Consistent: true`. Without it a create-only PUT is
/// decided on a copy that may not have seen another region's write yet,
/// so two walsyncs in two regions could both create one key, and a listing
/// may miss an object just written. Every request to a Tigris endpoint
/// carries the header ([`S3Storage::connect`] adds it; callers of
/// [`S3Storage::with_client`] reaching Tigris should too).
pub fn tigris_consistent(builder: aws_sdk_s3::config::Builder) -> aws_sdk_s3::config::Builder {
    builder.interceptor(TigrisConsistent)
}

#[derive(Debug)]
struct TigrisConsistent;

impl Intercept for TigrisConsistent {
    fn name(&self) -> &'static str {
        "TigrisConsistent"
    }

    // Before signing, so that the header is signed with the rest.
    fn modify_before_signing(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> std::result::Result<(), BoxError> {
        context
            .request_mut()
            .headers_mut()
            .insert("X-Tigris-Consistent", "true");
        Ok(())
    }
}

/// Whether `endpoint` (a URL) is one of Tigris's: `fly.storage.tigris.dev`
/// (what `fly storage create` sets), `t3.storage.dev`, or a name under them.
pub fn is_tigris(endpoint: &str) -> bool {
    let Some(host) = endpoint.parse::<hyper::Uri>().ok().and_then(|uri| {
        uri.host()
            .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
    }) else {
        return false;
    };
    ["tigris.dev", "t3.storage.dev"]
        .iter()
        .any(|domain| host == *domain || host.ends_with(&format!(".{domain}")))
}

/// The SDK does not retry: walsync does, per request ([`super::retry`]).
fn retry_config() -> RetryConfig {
    RetryConfig::disabled()
}

/// Timeouts that catch a hung connection without cutting off a slow 8 MiB part upload.
fn timeout_config() -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(10))
        // Covers sending the request (up to one part) and waiting for the response head.
        .read_timeout(Duration::from_secs(120))
        .operation_attempt_timeout(Duration::from_secs(5 * 60))
        .operation_timeout(Duration::from_secs(15 * 60))
        .build()
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl S3Storage {
    /// Production constructor: credentials from the standard AWS chain
    /// (environment, profile, SSO, web identity, ECS, IMDS ...).
    pub async fn connect(bucket: &str, prefix: &str, opts: &S3Options) -> Result<Self> {
        let region = RegionProviderChain::first_try(opts.region.clone().map(Region::new))
            .or_default_provider()
            .or_else(Region::from_static(FALLBACK_REGION));
        let sdk_config = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .load()
            .await;

        // An endpoint from the options wins; otherwise the SDK applies
        // AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / the profile itself, and we
        // only look at them to default path-style addressing and for describe().
        let endpoint = opts
            .endpoint
            .clone()
            .or_else(|| env_nonempty("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env_nonempty("AWS_ENDPOINT_URL"))
            .or_else(|| sdk_config.endpoint_url().map(str::to_owned));
        let path_style = opts.force_path_style.unwrap_or(endpoint.is_some());

        let mut builder = tune_config(aws_sdk_s3::config::Builder::from(&sdk_config))
            .force_path_style(path_style);
        if let Some(creds) = &opts.credentials {
            builder = builder.credentials_provider(aws_sdk_s3::config::Credentials::new(
                creds.access_key_id.clone(),
                creds.secret().to_string(),
                creds.session_token().map(str::to_string),
                None,
                "walsync-config",
            ));
        }
        if let Some(url) = &opts.endpoint {
            builder = builder.endpoint_url(url);
        }
        let tigris = endpoint.as_deref().is_some_and(is_tigris);
        if tigris {
            builder = tigris_consistent(builder);
        }
        let client = Client::from_conf(builder.build());
        let mut storage = Self::with_client(client, bucket, prefix);
        storage.endpoint = endpoint;
        tracing::debug!(storage = %storage.describe(), path_style, tigris, "S3 storage configured");
        Ok(storage)
    }

    /// Wraps a client configured by the caller (tests use explicit credentials).
    pub fn with_client(client: Client, bucket: &str, prefix: &str) -> Self {
        Self {
            client,
            pace: std::sync::Arc::new(Pace::default()),
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint: None,
        }
    }

    /// Sets the endpoint shown by `describe()` (for clients built by the caller).
    pub fn with_endpoint_label(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn full_key(&self, key: &str) -> String {
        join_key(&self.prefix, key)
    }

    /// Sends one request under walsync's retry policy ([`super::retry`]):
    /// a fault that may pass (5xx, throttling, a reset, a timeout) is tried
    /// again, up to [`attempts`] times in all, each attempt paced.
    async fn send<T, E, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        mut attempt: F,
    ) -> std::result::Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let mut tries = 0;
        loop {
            self.pace.wait().await;
            tries += 1;
            let failure = match attempt().await {
                Ok(out) => return Ok(out),
                Err(err) => Failure::new(err),
            };
            if !failure.transient || tries >= attempts() {
                return Err(failure.after(tries));
            }
            let wait = backoff(tries);
            tracing::debug!(op, key, attempt = tries, error = %failure.message, ?wait, "retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// Same key rules as the local backend, so both accept exactly the same keys.
    fn check_key(&self, op: &'static str, key: &str) -> Result<String> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|part| part.is_empty() || part == "." || part == "..")
        {
            return Err(Error::S3 {
                op,
                key: key.to_string(),
                message: "invalid object key".into(),
                code: None,
            });
        }
        Ok(self.full_key(key))
    }

    /// The object `full` from byte `offset` on, only if it is still the
    /// version `etag` names.
    async fn get_from(&self, full: &str, etag: Option<&str>, offset: u64) -> Result<ObjectReader> {
        let range = format!("bytes={offset}-");
        let out = self
            .send("GetObject", full, || {
                self.client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(full)
                    .range(&range)
                    .set_if_match(etag.map(str::to_owned))
                    .send()
            })
            .await
            .map_err(|failure| failure.into_error("GetObject", full))?;
        Ok(Box::new(out.body.into_async_read()))
    }

    /// Whether `full` exists, and the sha256 recorded on it if any.
    async fn existing(&self, full: &str) -> Result<Existing> {
        match self
            .send("HeadObject", full, || {
                self.client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(full)
                    .send()
            })
            .await
        {
            Ok(out) => Ok(Existing::Present(
                out.metadata().and_then(|m| m.get(SHA256_METADATA)).cloned(),
            )),
            Err(failure) => {
                if failure.is_not_found() {
                    Ok(Existing::Missing)
                } else {
                    Err(failure.into_error("HeadObject", full))
                }
            }
        }
    }

    /// The key was refused as existing: Ok if the object there is ours (same sha256).
    async fn resolve_conflict(&self, key: &str, full: &str, sha: &str) -> Result<()> {
        match self.existing(full).await? {
            Existing::Present(Some(theirs)) if theirs.eq_ignore_ascii_case(sha) => {
                tracing::debug!(
                    key = full,
                    "object already present with our sha256; treating put as done"
                );
                Ok(())
            }
            _ => Err(Error::AlreadyExists {
                key: key.to_string(),
            }),
        }
    }

    async fn put_single(&self, key: &str, full: &str, body: Vec<u8>, sha: &str) -> Result<()> {
        let body = hyper::body::Bytes::from(body);
        // A retry after a lost response finds the key taken (412): by our
        // own first attempt, which the sha256 tells apart from another writer.
        let result = self
            .send("PutObject", full, || {
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(full)
                    .body(ByteStream::from(body.clone()))
                    .metadata(SHA256_METADATA, sha)
                    .if_none_match("*")
                    .send()
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(failure) => {
                if failure.is_exists_conflict() {
                    self.resolve_conflict(key, full, sha).await
                } else {
                    Err(failure.into_error("PutObject", full))
                }
            }
        }
    }

    async fn put_multipart(
        &self,
        key: &str,
        full: &str,
        file: std::fs::File,
        len: u64,
        sha: &str,
    ) -> Result<()> {
        // Some S3-compatible servers ignore If-None-Match on completion: check first.
        match self.existing(full).await? {
            Existing::Missing => {}
            Existing::Present(Some(theirs)) if theirs.eq_ignore_ascii_case(sha) => {
                tracing::debug!(
                    key = full,
                    "object already present with our sha256; skipping upload"
                );
                return Ok(());
            }
            Existing::Present(_) => {
                return Err(Error::AlreadyExists {
                    key: key.to_string(),
                });
            }
        }

        let created = self
            .send("CreateMultipartUpload", full, || {
                self.client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(full)
                    .metadata(SHA256_METADATA, sha)
                    .send()
            })
            .await
            .map_err(|failure| failure.into_error("CreateMultipartUpload", full))?;
        let Some(upload_id) = created.upload_id().map(str::to_owned) else {
            return Err(Error::S3 {
                op: "CreateMultipartUpload",
                key: full.to_string(),
                message: "response carries no upload id".into(),
                code: None,
            });
        };
        let mut guard = uploads::Guard::new(&self.client, &self.bucket, full, &upload_id);

        let parts = match self.upload_parts(full, &upload_id, file, len).await {
            Ok(parts) => parts,
            Err(e) => {
                guard.abort().await;
                return Err(e);
            }
        };

        let result = self
            .send("CompleteMultipartUpload", full, || {
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(full)
                    .upload_id(&upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts.clone()))
                            .build(),
                    )
                    .if_none_match("*")
                    .send()
            })
            .await;
        match result {
            Ok(_) => {
                guard.disarm();
                // Some servers (moto among them) check If-None-Match on completion
                // without making it atomic, so two racing completions can both
                // succeed. One HEAD per large object tells whose body is there now.
                match self.existing(full).await? {
                    Existing::Present(Some(theirs)) if theirs.eq_ignore_ascii_case(sha) => Ok(()),
                    Existing::Present(_) => {
                        tracing::warn!(
                            key = full,
                            "another writer's object replaced ours right after our multipart upload completed \
                             (the server does not enforce If-None-Match atomically)"
                        );
                        Err(Error::AlreadyExists {
                            key: key.to_string(),
                        })
                    }
                    Existing::Missing => Err(Error::S3 {
                        op: "CompleteMultipartUpload",
                        key: full.to_string(),
                        message: "object missing right after its upload completed".into(),
                        code: None,
                    }),
                }
            }
            Err(failure) => {
                guard.abort().await;
                if failure.is_exists_conflict() {
                    self.resolve_conflict(key, full, sha).await
                } else if failure.code.as_deref() == Some("NoSuchUpload") {
                    // A retried completion whose first attempt succeeded finds the upload gone.
                    match self.existing(full).await? {
                        Existing::Present(Some(theirs)) if theirs.eq_ignore_ascii_case(sha) => {
                            Ok(())
                        }
                        Existing::Present(_) => Err(Error::AlreadyExists {
                            key: key.to_string(),
                        }),
                        Existing::Missing => {
                            Err(failure.into_error("CompleteMultipartUpload", full))
                        }
                    }
                } else {
                    Err(failure.into_error("CompleteMultipartUpload", full))
                }
            }
        }
    }

    /// Uploads `len` bytes of `file` from its start, [`PARTS_AT_ONCE`] parts
    /// at a time (one connection to S3 carries far less than the link), each
    /// read into memory only when its turn comes.
    async fn upload_parts(
        &self,
        full: &str,
        upload_id: &str,
        file: std::fs::File,
        len: u64,
    ) -> Result<Vec<CompletedPart>> {
        let part_size = part_size_for(len);
        let file = Arc::new(file);
        let count = len.div_ceil(part_size);
        let uploads = futures_util::stream::iter(0..count)
            .map(|index| {
                let file = file.clone();
                async move {
                    let offset = index * part_size;
                    let this_len = part_size.min(len - offset);
                    let number = i32::try_from(index + 1).map_err(|_| Error::Io {
                        key: full.to_string(),
                        source: io::Error::other("too many parts"),
                    })?;
                    let size = usize::try_from(this_len).map_err(|_| Error::Io {
                        key: full.to_string(),
                        source: io::Error::other("part size does not fit in memory"),
                    })?;
                    let buf = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; size];
                        std::os::unix::fs::FileExt::read_exact_at(file.as_ref(), &mut buf, offset)
                            .map(|()| buf)
                    })
                    .await
                    .map_err(|e| Error::Io {
                        key: full.to_string(),
                        source: io::Error::other(e),
                    })?
                    .map_err(io_err(full))?;
                    let buf = hyper::body::Bytes::from(buf);
                    let out = self
                        .send("UploadPart", full, || {
                            self.client
                                .upload_part()
                                .bucket(&self.bucket)
                                .key(full)
                                .upload_id(upload_id)
                                .part_number(number)
                                .body(ByteStream::from(buf.clone()))
                                .send()
                        })
                        .await
                        .map_err(|failure| failure.into_error("UploadPart", full))?;
                    let Some(e_tag) = out.e_tag() else {
                        return Err(Error::S3 {
                            op: "UploadPart",
                            key: full.to_string(),
                            message: format!("response for part {number} carries no ETag"),
                            code: None,
                        });
                    };
                    Ok(CompletedPart::builder()
                        .part_number(number)
                        .e_tag(e_tag)
                        .build())
                }
            })
            .buffered(PARTS_AT_ONCE);
        uploads.try_collect().await
    }
}

/// 8 MiB, or more (whole MiB) when the body would otherwise need over 10,000 parts.
fn part_size_for(len: u64) -> u64 {
    const MIB: u64 = 1024 * 1024;
    let needed = len.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
    needed.max(PART_SIZE)
}

fn io_err(key: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        key: key.to_string(),
        source,
    }
}

/// Positioned, not through the file's offset (see `spool::FileBody`).
async fn read_small_file(file: std::fs::File, len: u64) -> io::Result<Vec<u8>> {
    let size = usize::try_from(len).map_err(io::Error::other)?;
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; size];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 0)?;
        Ok(buf)
    })
    .await
    .map_err(io::Error::other)?
}

enum Existing {
    Missing,
    /// Present, with its `walsync-sha256` metadata if it has any.
    Present(Option<String>),
}

/// The parts of an SDK error we branch on, plus a readable message.
struct Failure {
    status: Option<u16>,
    code: Option<String>,
    message: String,
    /// A fault that may pass: worth another attempt.
    transient: bool,
    /// Attempts made, once given up.
    attempts: u32,
    /// Everything the SDK knows (raw response included), for debug logs.
    detail: String,
}

impl Failure {
    fn new<E>(err: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        if no_credentials(&err) {
            return Self {
                status,
                code: Some(NO_CREDENTIALS.to_string()),
                message: NO_CREDENTIALS_MESSAGE.to_string(),
                transient: false,
                attempts: 1,
                detail: DisplayErrorContext(&err).to_string(),
            };
        }
        let code = err.code().map(str::to_owned);
        let message = readable_message(&err, status);
        let transient = match &err {
            // 501 Not Implemented: the store lacks the operation, for good.
            SdkError::ServiceError(_)
                if status == Some(501) || code.as_deref() == Some("NotImplemented") =>
            {
                false
            }
            SdkError::ServiceError(_) => {
                status.is_some_and(|s| s >= 500 || s == 429)
                    || matches!(
                        code.as_deref(),
                        Some(
                            "SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable"
                        )
                    )
            }
            // A request that could not even be built will not build next time.
            SdkError::ConstructionFailure(_) => false,
            // Timeouts, resets, refused connections, bodies cut short.
            _ => true,
        };
        Self {
            status,
            code,
            message,
            transient,
            attempts: 1,
            detail: DisplayErrorContext(&err).to_string(),
        }
    }
    fn after(mut self, attempts: u32) -> Self {
        self.attempts = attempts;
        self
    }

    /// 412 PreconditionFailed, or 409 ConditionalRequestConflict (a racing conditional write).
    fn is_exists_conflict(&self) -> bool {
        self.status == Some(412)
            || matches!(
                self.code.as_deref(),
                Some("PreconditionFailed" | "ConditionalRequestConflict")
            )
    }

    fn is_not_found(&self) -> bool {
        match self.code.as_deref() {
            Some("NoSuchKey" | "NotFound") => true,
            Some("NoSuchBucket" | "NoSuchUpload") => false,
            _ => self.status == Some(404),
        }
    }

    fn into_error(self, op: &'static str, full_key: &str) -> Error {
        tracing::debug!(op, key = full_key, detail = %self.detail, "S3 request failed");
        let message = if self.attempts > 1 {
            format!("{} (after {} attempts)", self.message, self.attempts)
        } else {
            self.message
        };
        Error::S3 {
            op,
            key: full_key.to_string(),
            message,
            code: self.code,
        }
    }
}

/// `NoSuchBucket: The specified bucket does not exist (HTTP 404, request id ...)` for
/// service errors, the chain of causes for the rest (`dispatch failure: io error: ...`).
/// (`DisplayErrorContext` alone also dumps the raw response's `Debug`: too long for a log line.)
/// The code walsync gives a request the SDK could not sign: no credentials.
pub(super) const NO_CREDENTIALS: &str = "NoCredentials";

/// What a user reads instead of the SDK's chain of provider failures (which
/// ends with the instance metadata service, and points the wrong way).
const NO_CREDENTIALS_MESSAGE: &str = "no AWS credentials found: set AWS_ACCESS_KEY_ID and \
     AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or web identity), or access_key_id and \
     secret_access_key in [storage]";

/// Whether `err` is the SDK finding no credentials to sign with. Retrying
/// does not make credentials appear, and each attempt asks every provider
/// of the chain again (the instance metadata service last, with its own
/// retries).
fn no_credentials<E>(err: &SdkError<E, HttpResponse>) -> bool
where
    E: std::error::Error + 'static,
{
    use aws_credential_types::provider::error::CredentialsError;
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if let Some(e) = cause.downcast_ref::<CredentialsError>() {
            return matches!(
                e,
                CredentialsError::CredentialsNotLoaded(_) | CredentialsError::ProviderError(_)
            );
        }
        source = cause.source();
    }
    false
}

fn readable_message<E>(err: &SdkError<E, HttpResponse>, status: Option<u16>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_sdk_s3::operation::RequestId;
    use std::fmt::Write;

    if let SdkError::ServiceError(service) = err {
        let mut out = match (err.code(), err.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.to_string(),
            (None, Some(message)) => message.to_string(),
            (None, None) => "service error".to_string(),
        };
        let status = status.unwrap_or_else(|| service.raw().status().as_u16());
        let _ = write!(out, " (HTTP {status}");
        if let Some(id) = err.request_id() {
            let _ = write!(out, ", request id {id}");
        }
        out.push(')');
        return out;
    }
    let mut out = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            let _ = write!(out, ": {text}");
        }
        source = cause.source();
    }
    out
}

#[async_trait]
impl Storage for S3Storage {
    async fn put_new(&self, key: &str, body: Payload, sha256: [u8; 32]) -> Result<()> {
        let full = self.check_key("PutObject", key)?;
        let sha = to_hex(&sha256);
        match body {
            Payload::Bytes(bytes) => self.put_single(key, &full, bytes, &sha).await,
            Payload::File { file, len } if len < SPOOL_MEMORY_LIMIT as u64 => {
                let bytes = read_small_file(file, len).await.map_err(io_err(&full))?;
                self.put_single(key, &full, bytes, &sha).await
            }
            Payload::File { file, len } => self.put_multipart(key, &full, file, len, &sha).await,
        }
    }

    async fn get(&self, key: &str) -> Result<ObjectReader> {
        let full = self.check_key("GetObject", key)?;
        match self
            .send("GetObject", &full, || {
                self.client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(&full)
                    .send()
            })
            .await
        {
            Ok(out) => {
                // The rest of this very object (the same ETag), from where
                // the stream broke off.
                let len = out.content_length().and_then(|l| u64::try_from(l).ok());
                let etag = out.e_tag().map(str::to_owned);
                let this = self.clone();
                let reopen: super::resume::Reopen = Box::new(move |offset, resumed| {
                    let (this, full, etag) = (this.clone(), full.clone(), etag.clone());
                    Box::pin(async move {
                        tokio::time::sleep(backoff(resumed)).await;
                        this.get_from(&full, etag.as_deref(), offset)
                            .await
                            .map_err(io::Error::other)
                    })
                });
                Ok(Box::new(super::resume::Resuming::new(
                    Box::new(out.body.into_async_read()),
                    len,
                    reopen,
                )))
            }
            Err(failure) => {
                if failure.is_not_found() {
                    Err(Error::NotFound {
                        key: key.to_string(),
                    })
                } else {
                    Err(failure.into_error("GetObject", &full))
                }
            }
        }
    }

    async fn get_part(&self, key: &str, offset: u64, len: u64) -> Result<ObjectReader> {
        use tokio::io::AsyncReadExt;
        let full = self.check_key("GetObject", key)?;
        if len == 0 {
            return Ok(Box::new(tokio::io::empty()));
        }
        let range = format!("bytes={offset}-{}", offset + len - 1);
        match self
            .send("GetObject", &full, || {
                self.client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(&full)
                    .range(&range)
                    .send()
            })
            .await
        {
            Ok(out) if out.content_range().is_some() => Ok(Box::new(out.body.into_async_read())),
            // A store (or proxy) that ignores Range sends the whole object.
            Ok(out) => {
                let mut whole = out.body.into_async_read();
                tokio::io::copy(&mut (&mut whole).take(offset), &mut tokio::io::sink())
                    .await
                    .map_err(io_err(key))?;
                Ok(Box::new(whole.take(len)))
            }
            // Past the end: there is nothing there, as on a local directory.
            Err(failure)
                if failure.status == Some(416)
                    || failure.code.as_deref() == Some("InvalidRange") =>
            {
                Ok(Box::new(tokio::io::empty()))
            }
            Err(failure) if failure.is_not_found() => Err(Error::NotFound {
                key: key.to_string(),
            }),
            Err(failure) => Err(failure.into_error("GetObject", &full)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        self.list_each(prefix, &mut |page| out.extend(page)).await?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn list_each(
        &self,
        prefix: &str,
        each: &mut (dyn FnMut(Vec<ObjectMeta>) + Send),
    ) -> Result<()> {
        let full_prefix = join_key(&self.prefix, prefix);
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut token: Option<String> = None;
        loop {
            let mut out = Vec::new();
            let mut request = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .encoding_type(aws_sdk_s3::types::EncodingType::Url)
                .set_continuation_token(token.take());
            if !full_prefix.is_empty() {
                request = request.prefix(&full_prefix);
            }
            let page = self
                .send("ListObjectsV2", &full_prefix, || request.clone().send())
                .await
                .map_err(|failure| failure.into_error("ListObjectsV2", &full_prefix))?;
            // Keys come URL-encoded where the store honours the request
            // (it says so); one that does not decode to UTF-8 is no key
            // walsync wrote.
            let encoded = page.encoding_type() == Some(&aws_sdk_s3::types::EncodingType::Url);
            for object in page.contents() {
                let Some(raw) = object.key() else { continue };
                let full = if encoded {
                    match percent_encoding::percent_decode_str(raw).decode_utf8() {
                        Ok(full) => full,
                        Err(_) => continue,
                    }
                } else {
                    std::borrow::Cow::Borrowed(raw)
                };
                if !full.starts_with(&full_prefix) {
                    continue;
                }
                out.push(ObjectMeta {
                    key: full[strip..].to_string(),
                    size: object
                        .size()
                        .and_then(|s| u64::try_from(s).ok())
                        .unwrap_or(0),
                });
            }
            each(out);
            match (page.is_truncated(), page.next_continuation_token()) {
                (Some(true), Some(next)) if !next.is_empty() => token = Some(next.to_string()),
                (Some(true), _) => {
                    return Err(Error::S3 {
                        op: "ListObjectsV2",
                        key: full_prefix,
                        message: "truncated listing without a continuation token".into(),
                        code: None,
                    });
                }
                _ => break,
            }
        }
        Ok(())
    }

    async fn sweep_unfinished(
        &self,
        prefix: &str,
        ours: &(dyn for<'k> Fn(&'k str) -> bool + Sync),
    ) -> Result<Vec<String>> {
        let under = super::under(prefix);
        let full_prefix = join_key(&self.prefix, &under);
        let mut swept = Vec::new();
        let mut markers: (Option<String>, Option<String>) = (None, None);
        loop {
            let page = self
                .send("ListMultipartUploads", &full_prefix, || {
                    let mut request = self
                        .client
                        .list_multipart_uploads()
                        .bucket(&self.bucket)
                        .set_key_marker(markers.0.clone())
                        .set_upload_id_marker(markers.1.clone());
                    if !full_prefix.is_empty() {
                        request = request.prefix(&full_prefix);
                    }
                    request.send()
                })
                .await;
            let page = match page {
                Ok(page) => page,
                // s3s-fs, for one: such a store shows no unfinished upload.
                Err(failure)
                    if failure.status == Some(501)
                        || failure.code.as_deref() == Some("NotImplemented") =>
                {
                    tracing::debug!(
                        key = full_prefix,
                        "the store cannot list unfinished multipart uploads"
                    );
                    break;
                }
                Err(failure) => {
                    return Err(failure.into_error("ListMultipartUploads", &full_prefix));
                }
            };
            for upload in page.uploads() {
                let (Some(full), Some(id)) = (upload.key(), upload.upload_id()) else {
                    continue;
                };
                let Some(rest) = full.strip_prefix(&full_prefix) else {
                    continue;
                };
                if !ours(rest) || uploads::is_open_here(id) {
                    continue;
                }
                let aborted = self
                    .send("AbortMultipartUpload", full, || {
                        self.client
                            .abort_multipart_upload()
                            .bucket(&self.bucket)
                            .key(full)
                            .upload_id(id)
                            .send()
                    })
                    .await;
                match aborted {
                    // Gone meanwhile: completed (then listed with the chain) or aborted.
                    Err(failure) if failure.code.as_deref() == Some("NoSuchUpload") => {}
                    Err(failure) => return Err(failure.into_error("AbortMultipartUpload", full)),
                    Ok(_) => swept.push(format!("{under}{rest}")),
                }
            }
            match (
                page.is_truncated(),
                page.next_key_marker(),
                page.next_upload_id_marker(),
            ) {
                (Some(true), key, id)
                    if (key.is_some() || id.is_some())
                        && (key, id) != (markers.0.as_deref(), markers.1.as_deref()) =>
                {
                    markers = (key.map(str::to_owned), id.map(str::to_owned));
                }
                _ => break,
            }
        }
        Ok(swept)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let full = self.check_key("DeleteObject", key)?;
        match self
            .send("DeleteObject", &full, || {
                self.client
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(&full)
                    .send()
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(failure) => {
                if failure.is_not_found() {
                    Ok(())
                } else {
                    Err(failure.into_error("DeleteObject", &full))
                }
            }
        }
    }

    async fn delete_many(&self, keys: &[String]) -> Result<()> {
        // DeleteObjects takes at most 1,000 keys; quiet mode answers only
        // with the keys that failed.
        for chunk in keys.chunks(1000) {
            let mut ids = Vec::with_capacity(chunk.len());
            for key in chunk {
                let full = self.check_key("DeleteObjects", key)?;
                let id = ObjectIdentifier::builder()
                    .key(&full)
                    .build()
                    .map_err(|e| Error::S3 {
                        op: "DeleteObjects",
                        key: full.clone(),
                        message: e.to_string(),
                        code: None,
                    })?;
                ids.push(id);
            }
            let first = ids
                .first()
                .map(|id| id.key().to_string())
                .unwrap_or_default();
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| Error::S3 {
                    op: "DeleteObjects",
                    key: first.clone(),
                    message: e.to_string(),
                    code: None,
                })?;
            let out = self
                .send("DeleteObjects", &first, || {
                    self.client
                        .delete_objects()
                        .bucket(&self.bucket)
                        .delete(delete.clone())
                        .send()
                })
                .await
                .map_err(|failure| failure.into_error("DeleteObjects", &first))?;
            if let Some(failed) = out
                .errors()
                .iter()
                .find(|e| !matches!(e.code(), Some("NoSuchKey" | "NotFound")))
            {
                return Err(Error::S3 {
                    op: "DeleteObjects",
                    key: failed.key().unwrap_or(&first).to_string(),
                    message: failed
                        .message()
                        .unwrap_or("the store did not delete it")
                        .to_string(),
                    code: failed.code().map(str::to_string),
                });
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let location = if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        };
        match &self.endpoint {
            Some(endpoint) => format!("{location} (endpoint {})", super::redact_userinfo(endpoint)),
            None => location,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes() {
        assert_eq!(part_size_for(20 * 1024 * 1024), PART_SIZE);
        assert_eq!(part_size_for(50 * 1024 * 1024 * 1024), PART_SIZE);
        let huge = 200 * 1024 * 1024 * 1024u64;
        let size = part_size_for(huge);
        assert!(huge.div_ceil(size) <= MAX_PARTS);
        assert_eq!(size % (1024 * 1024), 0);
    }

    /// `connect` adds the header for a Tigris endpoint, and only for one
    /// (no request is made: the client is only built).
    #[tokio::test]
    async fn connect_asks_tigris_alone_for_consistency() {
        for (endpoint, tigris) in [
            ("https://fly.storage.tigris.dev", true),
            ("https://t3.storage.dev", true),
            ("http://127.0.0.1:9000", false),
        ] {
            let opts = S3Options {
                endpoint: Some(endpoint.to_string()),
                region: Some("auto".to_string()),
                force_path_style: None,
                credentials: Some(crate::storage::StaticCredentials::new(
                    "AKID".to_string(),
                    "not-a-secret".to_string(),
                    None,
                )),
            };
            let storage = S3Storage::connect("bucket", "prefix", &opts).await.unwrap();
            let asks = storage
                .client
                .config()
                .interceptors()
                .any(|i| i.name() == "TigrisConsistent");
            assert_eq!(asks, tigris, "{endpoint}");
        }
    }

    #[test]
    fn tigris_endpoints_are_told_from_others() {
        for tigris in [
            "https://fly.storage.tigris.dev",
            "https://fly.storage.tigris.dev/",
            "https://t3.storage.dev",
            "https://T3.Storage.Dev:443/bucket",
            "https://bucket.fly.storage.tigris.dev",
            "https://key:secret@fly.storage.tigris.dev",
            "fly.storage.tigris.dev",
        ] {
            assert!(is_tigris(tigris), "{tigris}");
        }
        for other in [
            "https://s3.amazonaws.com",
            "http://127.0.0.1:9000",
            "https://ACCOUNT.r2.cloudflarestorage.com",
            "https://nottigris.dev",
            "https://tigris.dev.example.com",
            "https://storage.dev",
            "https://example.com/fly.storage.tigris.dev",
            "https://fly.storage.tigris.dev@evil.example",
        ] {
            assert!(!is_tigris(other), "{other}");
        }
    }

    #[test]
    fn endpoint_redaction() {
        assert_eq!(
            crate::storage::redact_userinfo("http://127.0.0.1:9000"),
            "http://127.0.0.1:9000"
        );
        assert_eq!(
            crate::storage::redact_userinfo("https://user:pw@host.example/x@y"),
            "https://host.example/x@y"
        );
    }

    #[test]
    fn describe_has_no_secrets() {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "AKIDSECRETLESS",
                "very-secret",
                None,
                None,
                "test",
            ))
            .build();
        let s = S3Storage::with_client(Client::from_conf(conf), "b", "/p/q/")
            .with_endpoint_label("http://k:s@localhost:9000");
        assert_eq!(s.describe(), "s3://b/p/q (endpoint http://localhost:9000)");
        assert!(!s.describe().contains("secret"));
    }
}
