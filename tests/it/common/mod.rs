//! Shared integration-test harness: fresh, isolated storage for every test,
//! on every backend, plus what is needed to point the real binary at it.
//!
//! S3 runs against an in-process `s3s-fs` server (one per test process, on its
//! own runtime thread), or against the server named by
//! `WALSYNC_TEST_S3_ENDPOINT` (a moto server in CI).

pub mod app;
pub mod faults;
mod s3server;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use walsync::replica::{Replica, SyncOptions};
use walsync::storage::Storage;
use walsync::storage::fs::FsStorage;
use walsync::storage::s3::S3Storage;

pub use s3server::server_kind;

/// One isolated store. Dropping it cleans up what it can.
pub struct TestStore {
    pub storage: Arc<dyn Storage>,
    /// The storage URL for the `walsync` binary (`s3://bucket/prefix` or `file:///...`).
    pub url: String,
    /// Environment for the `walsync` binary so that it reaches the same store with no extra flags.
    pub env: Vec<(String, String)>,
    _guard: Guard,
}

impl TestStore {
    /// A walsync.toml whose `[storage]` is this store, followed by `rest`
    /// (other sections and the `[[databases]]` entries).
    pub fn config(&self, rest: &str) -> String {
        format!("[storage]\nurl = \"{}\"\n{rest}", self.url)
    }
}

impl std::fmt::Debug for TestStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestStore")
            .field("storage", &self.storage)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

// The fields are held only to be dropped (removing the directory, emptying
// the bucket).
#[allow(dead_code)]
enum Guard {
    Dir(tempfile::TempDir),
    Bucket(s3server::BucketCleanup),
    None,
}

/// Key prefix inside each fresh bucket, so prefix handling is always exercised.
pub const S3_PREFIX: &str = "walsync-test/root";

static BUCKET_COUNTER: AtomicU64 = AtomicU64::new(0);

fn fresh_bucket_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "walsync-{}-{}-{:08x}",
        std::process::id(),
        BUCKET_COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

/// `store`'s bucket reached through another endpoint (a fault proxy in
/// front of the test S3 server).
pub fn s3_storage_through(store: &TestStore, endpoint: &str) -> S3Storage {
    let server = s3server::server();
    let config = server
        .client()
        .config()
        .to_builder()
        .endpoint_url(endpoint)
        .build();
    let bucket = store
        .url
        .strip_prefix("s3://")
        .and_then(|rest| rest.split('/').next())
        .unwrap();
    S3Storage::with_client(aws_sdk_s3::Client::from_conf(config), bucket, S3_PREFIX)
}

/// A fresh bucket on the test S3 server, with storage rooted at [`S3_PREFIX`].
pub async fn s3_store() -> TestStore {
    let server = s3server::server();
    let bucket = fresh_bucket_name();
    let client = server.client();
    client
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "creating bucket {bucket} on {} ({}): {}",
                server.endpoint,
                server.kind,
                aws_sdk_s3::error::DisplayErrorContext(&e)
            )
        });
    let storage = S3Storage::with_client(client, &bucket, S3_PREFIX)
        .with_endpoint_label(server.endpoint.clone());
    let env = vec![
        ("AWS_ACCESS_KEY_ID".to_string(), server.access_key.clone()),
        (
            "AWS_SECRET_ACCESS_KEY".to_string(),
            server.secret_key.clone(),
        ),
        ("AWS_REGION".to_string(), server.region.clone()),
        ("AWS_ENDPOINT_URL_S3".to_string(), server.endpoint.clone()),
        // Never wait on instance metadata when something is missing.
        ("AWS_EC2_METADATA_DISABLED".to_string(), "true".to_string()),
    ];
    let guard = match server.cleanup_for(&bucket) {
        Some(cleanup) => Guard::Bucket(cleanup),
        None => Guard::None,
    };
    TestStore {
        storage: Arc::new(storage),
        url: format!("s3://{bucket}/{S3_PREFIX}"),
        env,
        _guard: guard,
    }
}

/// A client for the test S3 server (explicit credentials), for checks that
/// look past the `Storage` trait.
pub fn s3_client() -> aws_sdk_s3::Client {
    s3server::server().client()
}

/// The bucket of an `s3://bucket/prefix` URL.
pub fn bucket_of(url: &str) -> &str {
    let rest = url.strip_prefix("s3://").unwrap_or(url);
    rest.split('/').next().unwrap_or(rest)
}

/// Local storage in a fresh temp dir.
pub fn fs_store() -> TestStore {
    let dir = tempfile::Builder::new()
        .prefix("walsync-fs-")
        .tempdir()
        .expect("create temp dir");
    let root = dir.path().join("store");
    TestStore {
        storage: Arc::new(FsStorage::new(&root)),
        url: format!("file://{}", root.display()),
        env: Vec::new(),
        _guard: Guard::Dir(dir),
    }
}

/// Every backend, each fresh: `("fs", ..)`, `("s3", ..)`.
pub async fn all_stores() -> Vec<(&'static str, TestStore)> {
    vec![("fs", fs_store()), ("s3", s3_store().await)]
}

/// How many snapshots the chain of `prefix` holds.
pub async fn count_snapshots(storage: &dyn Storage, prefix: &str) -> usize {
    walsync::chain::list(storage, prefix)
        .await
        .unwrap()
        .iter()
        .filter(|o| o.kind == walsync::segment::Kind::Snapshot)
        .count()
}

/// How many WAL generations (distinct salts) the chain's segments came from.
pub async fn wal_generations(storage: &dyn Storage, prefix: &str) -> usize {
    let mut salts = std::collections::HashSet::new();
    for object in walsync::chain::list(storage, prefix).await.unwrap() {
        if object.kind == walsync::segment::Kind::Wal {
            let header = walsync::chain::read_header(storage, &object).await.unwrap();
            salts.insert((header.wal.salt1, header.wal.salt2));
        }
    }
    salts.len()
}

/// Options for tests that drive syncs by hand: everything as `watch`
/// defaults, except the timer checkpoint that a test would trip by chance.
pub fn replica_opts() -> SyncOptions {
    SyncOptions {
        sync_interval: std::time::Duration::ZERO,
        checkpoint_interval: std::time::Duration::from_secs(3600),
        ..SyncOptions::default()
    }
}

/// A replica of `db` under `prefix` in `store`, as `watch` would open it.
pub async fn open_replica(
    db: &std::path::Path,
    prefix: &str,
    store: &TestStore,
    opts: SyncOptions,
) -> Replica {
    Replica::open(db, prefix, store.storage.clone(), opts)
        .await
        .unwrap()
}

/// Waits up to a minute for `prefix` to hold at least `n` objects; `why`
/// adds what explains a failure (say, walsync's log).
pub async fn wait_for_objects(store: &TestStore, prefix: &str, n: usize, why: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let objects = walsync::chain::list(store.storage.as_ref(), prefix)
            .await
            .unwrap();
        if objects.len() >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{prefix}: only {} objects in storage; {}",
            objects.len(),
            why()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The `walsync` binary, with nothing from the caller's environment that
/// would point it elsewhere, logging at info.
pub fn walsync() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_walsync"));
    cmd.env_remove("WALSYNC_STORAGE")
        .env_remove("WALSYNC_CONFIG")
        .env_remove("WALSYNC_ENCRYPTION_KEY")
        .env("WALSYNC_LOG", "info");
    cmd
}

/// Restores `prefix` to `out` (replacing it), as `walsync restore --force` does.
pub async fn restore(
    store: &TestStore,
    prefix: &str,
    out: &std::path::Path,
    target: walsync::restore::Target,
    keys: Option<Arc<walsync::encryption::Keys>>,
) -> Result<(), String> {
    walsync::restore::restore(
        store.storage.as_ref(),
        &walsync::restore::RestoreOptions {
            prefix: prefix.into(),
            output: out.to_path_buf(),
            target,
            force: true,
            keys,
            parallelism: walsync::restore::FETCH_PARALLELISM,
        },
    )
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// Copies every object of `from` (and its snapshot mark) under `to`: a
/// second writer that starts from the same chain.
pub async fn copy_chain(storage: &dyn Storage, from: &str, to: &str) {
    for object in walsync::chain::list(storage, from).await.unwrap() {
        for key in std::iter::once(&object.key).chain(object.mark.as_ref()) {
            let bytes = walsync::storage::get_bytes(storage, key).await.unwrap();
            let name = key.rsplit('/').next().unwrap();
            storage
                .put_new(
                    &format!("{to}/{name}"),
                    walsync::storage::Payload::Bytes(bytes),
                    [0; 32],
                )
                .await
                .unwrap();
        }
    }
}

/// Stores object `seq` of `from` under `into` with the first layout's key,
/// which names the kind: how an old walsync (or a store that ignores
/// conditional writes) let a second writer's object sit beside the first's.
pub async fn plant_legacy(storage: &dyn Storage, from: &str, seq: u64, into: &str) -> String {
    let key = walsync::segment::object_key(from, seq);
    let bytes = walsync::storage::get_bytes(storage, &key).await.unwrap();
    let header = walsync::segment::Header::decode(&bytes).unwrap();
    let planted = walsync::segment::legacy_object_key(into, seq, header.kind);
    storage
        .put_new(&planted, walsync::storage::Payload::Bytes(bytes), [0; 32])
        .await
        .unwrap();
    planted
}

/// Whether `restore --follow` into `output` has written its position file.
pub fn position_written(output: &std::path::Path) -> bool {
    walsync::follow::position_path(output).exists()
}

/// A child process that is killed and reaped when dropped, so a test that
/// panics leaves no `walsync` running behind it.
pub struct Reaped(Option<std::process::Child>);

impl Reaped {
    pub fn new(child: std::process::Child) -> Self {
        Self(Some(child))
    }

    /// The child, no longer killed on drop.
    pub fn into_inner(mut self) -> std::process::Child {
        self.0.take().unwrap()
    }
}

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().unwrap()
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_mut().unwrap()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// The rows of an app's table `t(id, v)` in id order, `v` as text.
pub type Rows = Vec<(i64, String)>;
/// The same with `v` as bytes (the app processes write random blobs).
pub type BlobRows = Vec<(i64, Vec<u8>)>;

pub fn rows(path: &std::path::Path) -> Rows {
    table_rows(path)
}

pub fn blob_rows(path: &std::path::Path) -> BlobRows {
    table_rows(path)
}

fn table_rows<V: rusqlite::types::FromSql>(path: &std::path::Path) -> Vec<(i64, V)> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn.prepare("SELECT id, v FROM t ORDER BY id").unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A database with table `t(id, v)` in WAL mode holding `rows` rows, and
/// the connection an app in this process would keep.
pub fn create_db(path: &std::path::Path, rows: usize) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    for i in 0..rows {
        conn.execute("INSERT INTO t(v) VALUES (?1)", [format!("row {i}")])
            .unwrap();
    }
    conn
}

/// Waits (up to 60 s) until `ready` says so.
pub async fn wait_for(what: &str, mut ready: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !ready().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
