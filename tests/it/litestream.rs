//! Issue 16, 4: users switching from Litestream 0.5 keep their history.
//! Litestream 0.5.17 itself (its release binary, as `.ci/run` installs it)
//! replicates a database written in this process to moto and to a
//! directory; `walsync restore --litestream` brings it back equal to the
//! source and byte for byte equal to Litestream's own restore, latest and
//! as of an earlier transaction, refuses a file with one byte changed, and
//! `watch` starts walsync's own chain from the restored file.

use crate::cli::{run, with_store};
use crate::common::{self, TestStore, create_db, rows, walsync};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use walsync::litestream;
use walsync::storage::{Payload, get_bytes};

/// Litestream's binary: `WALSYNC_TEST_LITESTREAM` (set by `.ci/run`, which
/// then requires it), else the one in `.ci/run`'s venv if it is there.
fn litestream_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("WALSYNC_TEST_LITESTREAM") {
        let path = PathBuf::from(path);
        assert!(path.exists(), "WALSYNC_TEST_LITESTREAM={}", path.display());
        return Some(path);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-venv/bin/litestream");
    path.exists().then_some(path)
}

/// The replica section of a litestream.yml for a replica at `path` under
/// `store` (the same place walsync reads as `--storage STORE/ls --prefix app.db`).
fn replica_yaml(store: &TestStore, path: &str) -> String {
    match store.url.strip_prefix("file://") {
        Some(root) => format!("type: file\n      path: {root}/{path}"),
        None => {
            let env = |key: &str| {
                store
                    .env
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.clone())
                    .unwrap()
            };
            format!(
                "type: s3\n      bucket: {}\n      path: {}/{path}\n      endpoint: {}\n      \
                 region: {}\n      force-path-style: true",
                common::bucket_of(&store.url),
                common::S3_PREFIX,
                env("AWS_ENDPOINT_URL_S3"),
                env("AWS_REGION"),
            )
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_litestream_replica_restores_as_litestream_restores_it() {
    let Some(litestream_bin) = litestream_binary() else {
        eprintln!("skipped: no Litestream binary (run .ci/run, or set WALSYNC_TEST_LITESTREAM)");
        return;
    };
    let mut stores = vec![("dir", common::fs_store())];
    if common::server_kind() == "moto" {
        stores.push(("moto", common::s3_store().await));
    }
    for (kind, store) in stores {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        let conn = create_db(&db, 0);
        let config = dir.path().join("litestream.yml");
        std::fs::write(
            &config,
            format!(
                "dbs:\n  - path: {}\n    monitor-interval: 100ms\n    replica:\n      {}\n      sync-interval: 100ms\n",
                db.display(),
                replica_yaml(&store, "ls/app.db")
            ),
        )
        .unwrap();
        let litestream = |args: &[&str]| {
            let mut cmd = Command::new(&litestream_bin);
            // Go's AWS SDK refuses a CA bundle over plain HTTP (this
            // machine sets one for its proxy): the store here is local.
            cmd.args(args).env_remove("AWS_CA_BUNDLE");
            with_store(&mut cmd, &store);
            cmd
        };
        let mut replicating = litestream(&["replicate", "-config", config.to_str().unwrap()]);
        replicating.stdout(Stdio::null()).stderr(Stdio::null());
        let mut replicating = common::Reaped::new(replicating.spawn().unwrap());

        // Writes of every kind, over several of Litestream's syncs; a
        // VACUUM shrinks the database.
        for i in 0..30 {
            conn.execute_batch("BEGIN").unwrap();
            for j in 0..20 {
                conn.execute(
                    "INSERT INTO t(v) VALUES (?1)",
                    [format!("{i}-{j} {}", "x".repeat(200))],
                )
                .unwrap();
            }
            conn.execute_batch("COMMIT").unwrap();
            if i == 15 {
                conn.execute_batch(
                    "DELETE FROM t WHERE id % 3 = 0; UPDATE t SET v = 'changed' WHERE id % 5 = 0",
                )
                .unwrap();
            }
            if i == 25 {
                conn.execute_batch("DELETE FROM t WHERE id < 300; VACUUM")
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        let source = rows(&db);
        // Until Litestream's own restore shows every row, it has not shipped them.
        let theirs = dir.path().join("theirs.db");
        let replica_url = match store.url.strip_prefix("file://") {
            Some(root) => format!("file://{root}/ls/app.db"),
            None => format!("{}/ls/app.db", store.url),
        };
        let endpoint_args: Vec<String> = store
            .env
            .iter()
            .find(|(k, _)| k == "AWS_ENDPOINT_URL_S3")
            .map(|(_, e)| {
                format!("{replica_url}?endpoint={e}&forcePathStyle=true&region=us-east-1")
            })
            .into_iter()
            .collect();
        let their_url = endpoint_args
            .first()
            .cloned()
            .unwrap_or(replica_url.clone());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let _ = std::fs::remove_file(&theirs);
            let said = run(&mut litestream(&[
                "restore",
                "-o",
                theirs.to_str().unwrap(),
                &their_url,
            ]));
            if said.status.success() && rows(&theirs) == source {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{kind}: Litestream never shipped every row: {}",
                String::from_utf8_lossy(&said.stderr)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drop(replicating.kill());
        drop(conn);

        let storage_url = format!("{}/ls", store.url);
        let restore = |out: &Path, extra: &[&str]| {
            let mut cmd = walsync();
            cmd.args(["restore", "--litestream", "--storage", &storage_url])
                .args(["--prefix", "app.db", "-o"])
                .arg(out)
                .args(extra);
            with_store(&mut cmd, &store);
            run(&mut cmd)
        };
        let ours = dir.path().join("ours.db");
        let said = restore(&ours, &[]);
        assert!(said.status.success(), "{kind}: {said:?}");
        assert_eq!(rows(&ours), source, "{kind}");
        assert!(
            std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
            "{kind}: byte for byte as Litestream restores it"
        );

        // An earlier transaction, as Litestream restores it.
        let storage = store.storage.as_ref();
        let files = litestream::list(storage, "ls/app.db").await.unwrap();
        let head = files.iter().map(|f| f.max_txid).max().unwrap();
        assert!(head >= 4, "{kind}: {head} transactions");
        let earlier = head / 2;
        let (ours_then, theirs_then) = (
            dir.path().join("ours-then.db"),
            dir.path().join("theirs-then.db"),
        );
        let said = restore(&ours_then, &["--txid", &format!("0x{earlier:x}")]);
        assert!(said.status.success(), "{kind}: {said:?}");
        let said = run(&mut litestream(&[
            "restore",
            "-txid",
            &format!("{earlier:016x}"),
            "-o",
            theirs_then.to_str().unwrap(),
            &their_url,
        ]));
        assert!(said.status.success(), "{kind}: {said:?}");
        assert!(
            std::fs::read(&ours_then).unwrap() == std::fs::read(&theirs_then).unwrap(),
            "{kind}: transaction {earlier:x} as Litestream restores it"
        );
        assert_ne!(rows(&ours_then), source, "{kind}: an earlier state");
        // The same state by the time Litestream wrote that transaction's file.
        // Level 0 keeps a file per transaction (for 5 minutes by default).
        let file = files
            .iter()
            .find(|f| f.level == 0 && f.max_txid == earlier)
            .unwrap();
        let head = storage.get_range(&file.key, 0, 100).await.unwrap();
        let written = litestream::ltx::read_header(&head).unwrap().timestamp_ms;
        let at = std::time::UNIX_EPOCH + Duration::from_millis(written as u64);
        let at = humantime::format_rfc3339_millis(at).to_string();
        let by_time = dir.path().join("by-time.db");
        let said = restore(&by_time, &["--timestamp", &at]);
        assert!(said.status.success(), "{kind}: {said:?}");
        assert!(
            std::fs::read(&by_time).unwrap() == std::fs::read(&ours_then).unwrap(),
            "{kind}: as of {at}, transaction {earlier:x}"
        );

        // By time: the newest state written by then; none before the first.
        let later = dir.path().join("later.db");
        let said = restore(&later, &["--timestamp", "2100-01-01T00:00:00Z"]);
        assert!(said.status.success(), "{kind}: {said:?}");
        assert_eq!(rows(&later), source, "{kind}");
        let said = restore(
            &dir.path().join("before.db"),
            &["--timestamp", "2001-01-01T00:00:00Z"],
        );
        assert!(!said.status.success(), "{kind}: a time before the replica");

        // One byte changed in the newest file the restore reads: refused, by name.
        let newest = litestream::plan(&files, None).unwrap().pop().unwrap();
        let original = get_bytes(storage, &newest.key).await.unwrap();
        let mut changed = original.clone();
        changed[original.len() / 2] ^= 0x40;
        storage.delete(&newest.key).await.unwrap();
        storage
            .put_new(&newest.key, Payload::Bytes(changed), [0; 32])
            .await
            .unwrap();
        let refused = dir.path().join("refused.db");
        let said = restore(&refused, &[]);
        let err = String::from_utf8_lossy(&said.stderr);
        assert!(!said.status.success(), "{kind}: a changed file restored");
        // walsync reads the replica from STORE/ls: keys there lack "ls/".
        let named = newest.key.strip_prefix("ls/").unwrap();
        assert!(err.contains(named), "{kind}: {err}");
        assert!(!refused.exists(), "{kind}");

        // walsync's own chain starts from the restored file.
        let mut watch = walsync();
        watch
            .args(["watch", ours.to_str().unwrap(), "--storage", &store.url])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        with_store(&mut watch, &store);
        let mut watching = common::Reaped::new(watch.spawn().unwrap());
        common::wait_for_objects(&store, "ours", 1, String::new).await;
        let app = rusqlite::Connection::open(&ours).unwrap();
        app.execute("INSERT INTO t(v) VALUES ('after the switch')", [])
            .unwrap();
        drop(app);
        common::wait_for_objects(&store, "ours", 2, String::new).await;
        let pid = nix_pid(&watching);
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(watching.wait().unwrap().success(), "{kind}");
        let back = dir.path().join("back.db");
        let mut cmd = walsync();
        cmd.args(["restore", "--storage", &store.url, "--prefix", "ours", "-o"])
            .arg(&back);
        with_store(&mut cmd, &store);
        let said = run(&mut cmd);
        assert!(said.status.success(), "{kind}: {said:?}");
        assert_eq!(rows(&back), rows(&ours), "{kind}");
        assert_eq!(rows(&back).len(), source.len() + 1, "{kind}");
    }
}

fn nix_pid(child: &common::Reaped) -> String {
    child.id().to_string()
}
