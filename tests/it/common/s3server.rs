//! The S3 server the tests talk to: in-process `s3s-fs`, or an external
//! server (moto) named by `WALSYNC_TEST_S3_ENDPOINT`.
//!
//! Each `#[tokio::test]` has its own runtime that ends with the test, so the
//! in-process server runs on a dedicated thread with its own runtime and is
//! shared by every test of the process.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::OnceLock;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};

/// Environment variable naming an external S3 endpoint (e.g. `http://127.0.0.1:5000`, moto).
pub const ENDPOINT_ENV: &str = "WALSYNC_TEST_S3_ENDPOINT";

const ROOT_PREFIX: &str = "walsync-s3s-";

pub struct Server {
    pub kind: &'static str,
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    /// Data directory of the in-process server.
    root: Option<PathBuf>,
}

/// "s3s-fs" (in-process default) or "moto" (`WALSYNC_TEST_S3_ENDPOINT` set).
pub fn server_kind() -> &'static str {
    if external_endpoint().is_some() {
        "moto"
    } else {
        "s3s-fs"
    }
}

fn external_endpoint() -> Option<String> {
    std::env::var(ENDPOINT_ENV)
        .ok()
        .map(|v| v.trim().trim_end_matches('/').to_string())
        .filter(|v| !v.is_empty())
}

pub fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| match external_endpoint() {
        Some(endpoint) => Server {
            kind: "moto",
            endpoint,
            // moto accepts any credentials.
            access_key: "test".into(),
            secret_key: "test".into(),
            region: "us-east-1".into(),
            root: None,
        },
        None => start_s3s(),
    })
}

impl Server {
    /// A client with explicit credentials: nothing read from the process environment.
    pub fn client(&self) -> Client {
        let builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(Credentials::new(
                &self.access_key,
                &self.secret_key,
                None,
                None,
                "walsync-tests",
            ));
        Client::from_conf(walsync::storage::s3::tune_config(builder).build())
    }

    /// Removes a bucket's files when the test store is dropped (in-process server only).
    pub fn cleanup_for(&self, bucket: &str) -> Option<BucketCleanup> {
        self.root.as_ref().map(|root| BucketCleanup {
            root: root.clone(),
            bucket: bucket.to_string(),
        })
    }
}

fn start_s3s() -> Server {
    remove_stale_roots();
    let root = tempfile::Builder::new()
        .prefix(&format!("{ROOT_PREFIX}{}-", std::process::id()))
        .tempdir()
        .expect("create s3s-fs root")
        .keep();
    let access_key = "walsync-test-access".to_string();
    let secret_key = "walsync-test-secret".to_string();

    let fs = s3s_fs::FileSystem::new(&root).expect("open s3s-fs root");
    let service = {
        let mut b = S3ServiceBuilder::new(fs);
        // Without an auth provider s3s answers 501 to signed requests.
        b.set_auth(SimpleAuth::from_single(
            access_key.clone(),
            secret_key.clone(),
        ));
        b.build()
    };

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind s3s-fs listener");
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let addr = listener.local_addr().expect("listener address");

    std::thread::Builder::new()
        .name("s3s-fs-server".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("s3s-fs-worker")
                .enable_all()
                .build()
                .expect("s3s-fs runtime");
            runtime.block_on(serve(listener, service));
        })
        .expect("spawn s3s-fs thread");

    Server {
        kind: "s3s-fs",
        endpoint: format!("http://{addr}"),
        access_key,
        secret_key,
        region: "us-east-1".into(),
        root: Some(root),
    }
}

async fn serve(listener: TcpListener, service: S3Service) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let socket = match listener.accept().await {
            Ok((socket, _)) => socket,
            Err(e) => {
                eprintln!("s3s-fs: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        // Without this, small responses wait on delayed ACKs (~40 ms per GET).
        let _ = socket.set_nodelay(true);
        let conn = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

/// Roots left by earlier test processes (the root is never dropped: it lives
/// in a static) are removed once their process is gone.
fn remove_stale_roots() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(ROOT_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Deletes one bucket's directory and s3s-fs's sidecar files for it.
pub struct BucketCleanup {
    root: PathBuf,
    bucket: String,
}

impl Drop for BucketCleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.root.join(&self.bucket));
        // s3s-fs keeps metadata beside the buckets as `.bucket-<base64url(bucket)>.object-...`.
        let sidecar = format!(".bucket-{}.", base64_url(self.bucket.as_bytes()));
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for entry in entries.flatten() {
                if entry
                    .file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(&sidecar))
                {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

/// URL-safe base64 without padding.
fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}
