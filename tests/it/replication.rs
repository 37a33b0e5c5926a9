//! Replication scenarios, each run against a real S3 protocol server and the
//! local-directory backend, comparing the restored database with the source
//! row for row.
//!
//! The app whose database walsync replicates runs in its own process
//! (`tests/app/sqlite_app.py` through `tests/it/common/app.rs`): SQLite's locks
//! only conflict between processes, so an app inside the test process could
//! not show a pin or a write lock that walsync lost (DESIGN.md invariant 2a).

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;
use sha2::{Digest, Sha256};
use walsync::chain;
use walsync::encryption::{Key, Keys};
use walsync::follow;
use walsync::replica::{Replica, SyncOptions};
use walsync::restore::{self, RestoreOptions};
use walsync::segment::{self, Kind};
use walsync::storage::{self, Payload, Storage};

use common::app::{AppOptions, AppProcess};
// This file's apps write blobs: its rows are the blob rows.
use common::{
    BlobRows as Rows, TestStore, blob_rows as rows, copy_chain, count_snapshots, open_replica,
    plant_legacy, replica_opts, wal_generations,
};

/// The app, in its own process (tests/it/common/app.rs): only there do
/// SQLite's locks conflict with walsync's as they do in production.
fn app_process(path: &Path, page_size: u32) -> AppProcess {
    AppProcess::spawn(path, AppOptions::page_size(page_size))
}

/// `n` rows of `size` random bytes, one commit each.
fn insert(app: &mut AppProcess, n: usize, size: usize) {
    app.insert_each(n, size);
}

async fn restore_rows(store: &TestStore, prefix: &str, dir: &Path, txid: Option<u64>) -> Rows {
    let out = dir.join(format!("restored-{prefix}-{}.db", txid.unwrap_or(0)));
    let target = txid.map_or(restore::Target::Latest, restore::Target::Seq);
    restore_to(store, prefix, &out, target).await.unwrap()
}

/// Restores `prefix` as of `target` over `out`; the rows, or the error as text.
async fn restore_to(
    store: &TestStore,
    prefix: &str,
    out: &Path,
    target: restore::Target,
) -> Result<Rows, String> {
    restore_with(store, prefix, out, target, None).await
}

async fn restore_with(
    store: &TestStore,
    prefix: &str,
    out: &Path,
    target: restore::Target,
    keys: Option<Arc<Keys>>,
) -> Result<Rows, String> {
    common::restore(store, prefix, out, target, keys)
        .await
        .map(|()| rows(out))
}

fn db_in(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_then_restore_latest_and_past_txid() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "app.db");
        let mut app = app_process(&db, 4096);
        insert(&mut app, 100, 200);
        let mut r = open_replica(&db, "app", &store, replica_opts()).await;
        let report = r.sync().await.unwrap();
        assert_eq!(report.snapshots, 1, "{kind}: first sync snapshots");

        insert(&mut app, 50, 300);
        r.sync().await.unwrap();
        let past = r.head().unwrap().seq;
        let past_rows = rows(&db);

        insert(&mut app, 50, 5000);
        app.exec("DELETE FROM t WHERE id % 7 = 0");
        app.exec("UPDATE t SET v = x'00' WHERE id % 5 = 0");
        let report = r.sync().await.unwrap();
        assert!(report.segments >= 1, "{kind}: changes shipped");

        assert_eq!(
            restore_rows(&store, "app", dir.path(), None).await,
            rows(&db),
            "{kind}"
        );
        assert_eq!(
            restore_rows(&store, "app", dir.path(), Some(past)).await,
            past_rows,
            "{kind}: restore to txid {past}"
        );
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn restore_at(store: &TestStore, prefix: &str, out: &Path, ms: u64) -> Result<Rows, String> {
    restore_to(store, prefix, out, restore::Target::Time(ms)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamp_restore_picks_the_newest_state_at_or_before_the_instant() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "pitr.db");
        let out = db_in(&dir, "restored.db");
        let mut app = app_process(&db, 4096);
        insert(&mut app, 10, 100);
        let before_any = now_ms() - 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut r = open_replica(&db, "pitr", &store, replica_opts()).await;
        r.sync().await.unwrap();
        // Seven states, each shipped as its own object, 30 ms apart; a
        // snapshot in the middle so the search also crosses snapshots.
        let mut states: Vec<(u64, Rows)> = Vec::new();
        for round in 0..7 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            states.push((now_ms(), rows(&db)));
            tokio::time::sleep(Duration::from_millis(30)).await;
            insert(&mut app, 3, 100);
            if round == 3 {
                r.force_snapshot(walsync::reason::SnapshotReason::Requested("test"))
                    .await
                    .unwrap();
            } else {
                r.sync().await.unwrap();
            }
        }
        for (at, expected) in &states {
            assert_eq!(
                &restore_at(&store, "pitr", &out, *at).await.unwrap(),
                expected,
                "{kind}: restore as of {at}"
            );
        }
        assert_eq!(
            restore_at(&store, "pitr", &out, now_ms()).await.unwrap(),
            rows(&db),
            "{kind}: now is the head"
        );
        let err = restore_at(&store, "pitr", &out, before_any)
            .await
            .unwrap_err();
        assert!(
            err.contains("no restore point at or before"),
            "{kind}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_only_what_no_kept_restore_point_needs() {
    use walsync::retention::{self, Retention};
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "ret.db");
        let out = db_in(&dir, "restored.db");
        let mut app = app_process(&db, 4096);
        let keep_two = SyncOptions {
            retention: Retention {
                age: None,
                snapshots: Some(2),
            },
            ..replica_opts()
        };
        let mut r = open_replica(&db, "ret", &store, keep_two).await;
        // Four rounds of: snapshot, then two segments; the state after each object.
        let mut states: Vec<(u64, Rows)> = Vec::new();
        let mut snapshot_times = Vec::new();
        for round in 0..4 {
            // Snapshots in distinct milliseconds, for the age checks below.
            tokio::time::sleep(Duration::from_millis(5)).await;
            insert(&mut app, 5, 100);
            if round == 0 {
                r.sync().await.unwrap();
            } else {
                r.force_snapshot(walsync::reason::SnapshotReason::Requested("test"))
                    .await
                    .unwrap();
            }
            let head = r.head().unwrap().seq;
            let header = chain::read_header(
                store.storage.as_ref(),
                &chain::list(store.storage.as_ref(), "ret")
                    .await
                    .unwrap()
                    .last()
                    .unwrap()
                    .clone(),
            )
            .await
            .unwrap();
            snapshot_times.push((head, header.timestamp_ms));
            states.push((head, rows(&db)));
            for _ in 0..2 {
                insert(&mut app, 5, 100);
                r.sync().await.unwrap();
                states.push((r.head().unwrap().seq, rows(&db)));
            }
        }
        let objects = chain::list(store.storage.as_ref(), "ret").await.unwrap();
        let first_kept = snapshot_times[2].0;
        assert_eq!(
            objects.first().map(|o| o.seq),
            Some(first_kept),
            "{kind}: everything before the second-newest snapshot is gone"
        );
        // Every retained restore point still restores, to exactly its state.
        for (seq, expected) in states.iter().filter(|(seq, _)| *seq >= first_kept) {
            let restored = restore_to(&store, "ret", &out, restore::Target::Seq(*seq))
                .await
                .unwrap_or_else(|e| panic!("{kind}: restore to {seq}: {e}"));
            assert_eq!(&restored, expected, "{kind}: state {seq}");
        }

        // By age: as of a moment just after the newest snapshot plus the age,
        // only that snapshot covers the window; a moment earlier, the one before it.
        let age = Duration::from_secs(3600);
        let rules = Retention {
            age: Some(age),
            snapshots: None,
        };
        let newest = snapshot_times[3];
        let now = newest.1 + 3_600_000;
        let plan = retention::plan(store.storage.as_ref(), "ret", rules, now)
            .await
            .unwrap();
        assert_eq!(plan.keep_from, Some(newest.0), "{kind}");
        let plan = retention::plan(store.storage.as_ref(), "ret", rules, now - 1)
            .await
            .unwrap();
        assert_eq!(plan.keep_from, Some(first_kept), "{kind}");
        assert!(plan.objects.is_empty(), "{kind}");
        // Both rules: an object goes only when both let it go.
        let both = Retention {
            age: Some(age),
            snapshots: Some(2),
        };
        let plan = retention::plan(store.storage.as_ref(), "ret", both, now + 10)
            .await
            .unwrap();
        assert_eq!(plan.keep_from, Some(first_kept), "{kind}");
        // A stretch that ends on a snapshot gets no run (snapshot 10 ends
        // the stretch 9..=10 of two).
        let pairs =
            walsync::compact::compact_chain(store.storage.as_ref(), "ret", &[2], None, dir.path())
                .await
                .unwrap();
        assert_eq!(pairs.built, vec![(newest.0 + 1, newest.0 + 2)], "{kind}");
        store
            .storage
            .delete(&segment::run_key("ret", newest.0 + 1, newest.0 + 2))
            .await
            .unwrap();
        // Runs of three objects where they fit (one before the newest
        // snapshot, one after it): retention takes the one whose objects go.
        let compacted =
            walsync::compact::compact_chain(store.storage.as_ref(), "ret", &[3], None, dir.path())
                .await
                .unwrap();
        assert_eq!(
            compacted.built,
            vec![(newest.0 - 2, newest.0 - 1), (newest.0 + 1, newest.0 + 2)],
            "{kind}"
        );
        // Nothing ever takes the newest snapshot or what follows it.
        let all_gone = Retention {
            age: Some(Duration::from_millis(1)),
            snapshots: Some(1),
        };
        let pruned = retention::apply(store.storage.as_ref(), "ret", all_gone, now * 2)
            .await
            .unwrap();
        assert_eq!(pruned.keep_from, Some(newest.0), "{kind}");
        assert_eq!(
            restore_to(&store, "ret", &out, restore::Target::Latest)
                .await
                .unwrap(),
            rows(&db),
            "{kind}: the head still restores"
        );
        let (_, runs) = chain::list_with_runs(store.storage.as_ref(), "ret")
            .await
            .unwrap();
        let runs: Vec<(u64, u64)> = runs.iter().map(|(f, r)| (*f, r.seq)).collect();
        assert_eq!(runs, vec![(newest.0 + 1, newest.0 + 2)], "{kind}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_auto_checkpoints_many_times_without_breaking_the_chain() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "auto.db");
        let mut app = app_process(&db, 4096);
        app.pragma("wal_autocheckpoint=8");
        let mut r = open_replica(
            &db,
            "auto",
            &store,
            SyncOptions {
                checkpoint_pages: 40,
                ..replica_opts()
            },
        )
        .await;
        r.sync().await.unwrap();
        for round in 0..30 {
            insert(&mut app, 100, 150);
            if round % 3 == 0 {
                app.exec(&format!("DELETE FROM t WHERE id % 11 = {}", round % 11));
            }
            r.sync().await.unwrap();
        }
        r.sync().await.unwrap();
        assert_eq!(
            rows(&db).len(),
            restore_rows(&store, "auto", dir.path(), None).await.len()
        );
        assert_eq!(
            restore_rows(&store, "auto", dir.path(), None).await,
            rows(&db),
            "{kind}"
        );
        // walsync's own sealed checkpoints let the WAL restart many times: the
        // chain continues through every new generation without a snapshot.
        assert_eq!(
            count_snapshots(store.storage.as_ref(), "auto").await,
            1,
            "{kind}"
        );
        let generations = wal_generations(store.storage.as_ref(), "auto").await;
        assert!(
            generations > 3,
            "{kind}: only {generations} WAL generations"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_checkpoints_passive_truncate_restart_while_running() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "ck.db");
        let mut app = app_process(&db, 4096);
        app.pragma("busy_timeout=50");
        let mut r = open_replica(&db, "ck", &store, replica_opts()).await;
        r.sync().await.unwrap();
        let modes = ["PASSIVE", "TRUNCATE", "RESTART"];
        for round in 0..12 {
            insert(&mut app, 40, 500);
            let mode = modes[round % 3];
            let ck = app.checkpoint(mode);
            // The 40 rows just written are not shipped: walsync's pin keeps
            // the WAL from being restarted past them.
            if mode != "PASSIVE" {
                assert_eq!(ck.busy, 1, "{kind}: round {round}, {mode}: {ck:?}");
            }
            insert(&mut app, 10, 100);
            if round % 2 == 0 {
                r.sync().await.unwrap();
            }
        }
        r.sync().await.unwrap();
        assert_eq!(
            restore_rows(&store, "ck", dir.path(), None).await,
            rows(&db),
            "{kind}"
        );
        assert_eq!(
            count_snapshots(store.storage.as_ref(), "ck").await,
            1,
            "{kind}: the app's checkpoints broke continuity"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_continues_the_chain_or_snapshots_after_a_gap() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "gap.db");
        let mut app = app_process(&db, 4096);
        insert(&mut app, 50, 100);
        let mut r = open_replica(&db, "gap", &store, replica_opts()).await;
        r.sync().await.unwrap();
        drop(r);

        // Stopped, the app writes; nothing checkpoints: the chain just continues.
        insert(&mut app, 30, 100);
        let mut r = open_replica(&db, "gap", &store, replica_opts()).await;
        let report = r.sync().await.unwrap();
        assert_eq!(
            (report.snapshots, report.segments),
            (0, 1),
            "{kind}: continued"
        );
        drop(r);

        // Stopped, the app writes and truncates the WAL: the gap is detected.
        insert(&mut app, 30, 100);
        assert_eq!(app.checkpoint("TRUNCATE").busy, 0);
        insert(&mut app, 10, 100);
        let mut r = open_replica(&db, "gap", &store, replica_opts()).await;
        // The state record shows which pages differ: only those are shipped.
        let report = r.sync().await.unwrap();
        assert_eq!(
            (report.snapshots, report.deltas),
            (0, 1),
            "{kind}: gap detected, the pages that differ shipped"
        );
        insert(&mut app, 5, 100);
        r.sync().await.unwrap();
        assert_eq!(count_snapshots(store.storage.as_ref(), "gap").await, 1);
        assert_eq!(
            restore_rows(&store, "gap", dir.path(), None).await,
            rows(&db),
            "{kind}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_transactions_never_appear() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "rb.db");
        let mut app = app_process(&db, 4096);
        insert(&mut app, 10, 100);
        let mut r = open_replica(&db, "rb", &store, replica_opts()).await;
        r.sync().await.unwrap();
        app.pragma("cache_size=5");
        app.begin();
        insert(&mut app, 300, 3000);
        // The big transaction has spilled frames into the WAL; none may ship.
        r.sync().await.unwrap();
        app.rollback();
        app.ok("script BEGIN; INSERT INTO t(v) VALUES (x'dead'); ROLLBACK;");
        insert(&mut app, 3, 10);
        r.sync().await.unwrap();
        let restored = restore_rows(&store, "rb", dir.path(), None).await;
        assert_eq!(restored.len(), 13, "{kind}");
        assert_eq!(restored, rows(&db), "{kind}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vacuum_shrinks_and_every_page_size_round_trips() {
    for (kind, store) in common::all_stores().await {
        for page_size in [1024u32, 4096, 65536] {
            let dir = tempfile::tempdir().unwrap();
            let db = db_in(&dir, "vac.db");
            let prefix = format!("vac{page_size}");
            let mut app = app_process(&db, page_size);
            let got: u32 = app.pragma("page_size").parse().unwrap();
            assert_eq!(got, page_size);
            insert(&mut app, 400, 700);
            let mut r = open_replica(&db, &prefix, &store, replica_opts()).await;
            r.sync().await.unwrap();
            insert(&mut app, 100, 700);
            r.sync().await.unwrap();
            let before: u32 = app.pragma("page_count").parse().unwrap();
            app.exec("DELETE FROM t WHERE id > 20");
            app.exec("VACUUM");
            let after: u32 = app.pragma("page_count").parse().unwrap();
            assert!(after < before, "VACUUM shrank the database");
            r.sync().await.unwrap();
            let out = dir.path().join("out.db");
            let report = restore::restore(
                store.storage.as_ref(),
                &RestoreOptions {
                    prefix: prefix.clone(),
                    output: out.clone(),
                    target: restore::Target::Latest,
                    force: false,
                    keys: None,
                    parallelism: walsync::restore::FETCH_PARALLELISM,
                },
            )
            .await
            .unwrap();
            assert_eq!(report.db_pages, after, "{kind} {page_size}");
            assert_eq!(
                std::fs::metadata(&out).unwrap().len(),
                u64::from(after) * u64::from(page_size)
            );
            assert_eq!(rows(&out), rows(&db), "{kind} page size {page_size}");
        }
    }
}

/// Builds a chain of a snapshot and three WAL segments for `prefix`.
async fn build_chain(
    store: &TestStore,
    dir: &Path,
    name: &str,
) -> (PathBuf, Vec<chain::ObjectRef>) {
    let db = dir.join(format!("{name}.db"));
    let mut app = app_process(&db, 4096);
    insert(&mut app, 20, 100);
    let mut r = open_replica(&db, name, store, replica_opts()).await;
    r.sync().await.unwrap();
    for _ in 0..3 {
        insert(&mut app, 5, 100);
        r.sync().await.unwrap();
    }
    // walsync stops first, then the app: its last connection checkpoints.
    drop(r);
    app.quit();
    let objects = chain::list(store.storage.as_ref(), name).await.unwrap();
    assert_eq!(objects.len(), 4);
    (db, objects)
}

async fn replace_object(storage: &dyn Storage, key: &str, bytes: Vec<u8>) {
    storage.delete(key).await.unwrap();
    storage
        .put_new(key, Payload::Bytes(bytes), [0; 32])
        .await
        .unwrap();
}

/// Restores over an existing file and expects a refusal naming `key`,
/// with the existing file left as it was.
async fn expect_refusal(store: &TestStore, prefix: &str, dir: &Path, key: &str) -> String {
    let out = dir.join("existing.db");
    std::fs::write(&out, b"precious").unwrap();
    let err = restore::restore(
        store.storage.as_ref(),
        &RestoreOptions {
            prefix: prefix.into(),
            output: out.clone(),
            target: restore::Target::Latest,
            force: true,
            keys: None,
            parallelism: walsync::restore::FETCH_PARALLELISM,
        },
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains(key),
        "error {err} does not name {key}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            // The writers' state records beside their databases are not leftovers.
            name.contains("walsync")
                && (name.contains("walsync-tmp") || name.starts_with(".walsync"))
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "temp files left behind: {leftovers:?}"
    );
    err.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_missing_or_foreign_objects_are_refused_by_name() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let (_, objects) = build_chain(&store, dir.path(), "victim").await;
        let (_, foreign) = build_chain(&store, dir.path(), "other").await;

        // Altered: one byte flipped in the middle object.
        let key = objects[2].key.clone();
        let original = storage::get_bytes(store.storage.as_ref(), &key)
            .await
            .unwrap();
        let mut altered = original.clone();
        let mid = altered.len() / 2;
        altered[mid] ^= 0x01;
        replace_object(store.storage.as_ref(), &key, altered).await;
        expect_refusal(&store, "victim", dir.path(), &key).await;

        // Copied from another database's chain, under the right name.
        let theirs = storage::get_bytes(store.storage.as_ref(), &foreign[2].key)
            .await
            .unwrap();
        replace_object(store.storage.as_ref(), &key, theirs).await;
        expect_refusal(&store, "victim", dir.path(), &key).await;

        // Deleted from the middle.
        store.storage.delete(&key).await.unwrap();
        expect_refusal(&store, "victim", dir.path(), &key).await;

        // A foreign snapshot as the newest object: it starts a chain, but the
        // object before it says it does not belong here.
        let head = chain::list(store.storage.as_ref(), "victim").await.unwrap();
        let seq = head.last().unwrap().seq + 1;
        let next = segment::object_key("victim", seq);
        let forged = segment::Header {
            version: segment::VERSION,
            state: None,
            kind: Kind::Snapshot,
            page_size: 4096,
            seq,
            db_pages: 1,
            page_count: 1,
            timestamp_ms: 0,
            wal: segment::WalRange::default(),
            prev_hash: [7; 32],
            sealed: None,
            run: None,
        };
        let mut enc = segment::Encoder::new(forged, None, Vec::new()).unwrap();
        enc.add_page(1, &[0u8; 4096]).unwrap();
        let (hash, bytes) = enc.finish(None).unwrap();
        store
            .storage
            .put_new(&next, Payload::Bytes(bytes), hash)
            .await
            .unwrap();
        let mark = segment::snapshot_mark_key("victim", seq);
        let empty: [u8; 32] = Sha256::digest([]).into();
        store
            .storage
            .put_new(&mark, Payload::Bytes(Vec::new()), empty)
            .await
            .unwrap();
        let err = expect_refusal(&store, "victim", dir.path(), &next).await;
        assert!(err.contains("does not follow"), "{kind}: {err}");
        store.storage.delete(&next).await.unwrap();

        // Put back as it was, the chain restores again.
        replace_object(store.storage.as_ref(), &key, original).await;
        let out = dir.path().join("ok.db");
        restore::restore(
            store.storage.as_ref(),
            &RestoreOptions {
                prefix: "victim".into(),
                output: out,
                target: restore::Target::Latest,
                force: false,
                keys: None,
                parallelism: walsync::restore::FETCH_PARALLELISM,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{kind}: {e}"));
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Key rings from raw keys; the first one encrypts.
fn ring(keys: &[u8]) -> Option<Arc<Keys>> {
    let mut all = keys.iter().map(|b| Key::from_bytes(&[*b; 32]));
    let current = all.next()?;
    Some(Arc::new(Keys::new(Some(current), all.collect())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_replicas_restore_only_with_their_keys() {
    // High-entropy, so that compression alone would leave it readable.
    let marker: Vec<u8> = (0..8u8)
        .flat_map(|i| Sha256::digest([i]).to_vec())
        .collect();
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "secret.db");
        let mut app = app_process(&db, 4096);
        let sealed = |keys: Option<Arc<Keys>>| SyncOptions {
            encryption: keys,
            ..replica_opts()
        };
        app.exec(&format!("INSERT INTO t(v) VALUES (x'{}')", hex(&marker)));
        insert(&mut app, 50, 300);
        let mut replica = open_replica(&db, "secret", &store, sealed(ring(&[1]))).await;
        replica.sync().await.unwrap();
        app.exec(&format!("INSERT INTO t(v) VALUES (x'{}')", hex(&marker)));
        replica.sync().await.unwrap();
        let first_state = rows(&db);
        let first_seq = replica.head().unwrap().seq;
        assert_eq!(first_seq, 2, "{kind}: a snapshot and a segment");

        let storage = store.storage.as_ref();
        for object in chain::list(storage, "secret").await.unwrap() {
            let bytes = storage::get_bytes(storage, &object.key).await.unwrap();
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker),
                "{kind}: {} holds plaintext",
                object.key
            );
            let header = chain::read_header(storage, &object).await.unwrap();
            assert!(header.sealed.is_some(), "{kind}: {}", object.key);
        }

        let out = dir.path().join("out.db");
        let latest = restore::Target::Latest;
        let err = restore_with(&store, "secret", &out, latest, None)
            .await
            .unwrap_err();
        assert!(
            err.contains("secret/0000000000000001.seg") && err.contains("no encryption key"),
            "{kind}: {err}"
        );
        assert!(!out.exists(), "{kind}: a refused restore wrote a file");
        let err = restore_with(&store, "secret", &out, latest, ring(&[9]))
            .await
            .unwrap_err();
        assert!(err.contains("wrong key"), "{kind}: {err}");
        assert_eq!(
            restore_with(&store, "secret", &out, latest, ring(&[1])).await,
            Ok(first_state.clone()),
            "{kind}"
        );

        // A new key (the old one kept for reading) starts with a snapshot.
        drop(replica);
        let mut replica = open_replica(&db, "secret", &store, sealed(ring(&[2, 1]))).await;
        insert(&mut app, 10, 300);
        let report = replica.sync().await.unwrap();
        assert_eq!(report.snapshot_reasons, vec!["key"], "{kind}");
        insert(&mut app, 10, 300);
        replica.sync().await.unwrap();
        let old = restore::Target::Seq(first_seq);
        assert_eq!(
            restore_with(&store, "secret", &out, latest, ring(&[2, 1])).await,
            Ok(rows(&db)),
            "{kind}"
        );
        assert_eq!(
            restore_with(&store, "secret", &out, old, ring(&[2, 1])).await,
            Ok(first_state),
            "{kind}"
        );
        assert_eq!(
            restore_with(&store, "secret", &out, latest, ring(&[2])).await,
            Ok(rows(&db)),
            "{kind}"
        );
        let err = restore_with(&store, "secret", &out, old, ring(&[2]))
            .await
            .unwrap_err();
        assert!(err.contains("wrong key"), "{kind}: {err}");

        // A plain object appended to an encrypted chain (by someone who can
        // write to storage but has no key) links correctly and is still refused.
        let objects = chain::list(storage, "secret").await.unwrap();
        let head = objects.last().unwrap();
        let (head_header, head_hash, _) = chain::read_verified(storage, head).await.unwrap();
        let seq = head.seq + 1;
        let injected = segment::object_key("secret", seq);
        let forged = segment::Header {
            version: segment::VERSION,
            kind: Kind::Wal,
            seq,
            page_count: 1,
            prev_hash: head_hash,
            sealed: None,
            run: None,
            ..head_header
        };
        let mut enc = segment::Encoder::new(forged, None, Vec::new()).unwrap();
        enc.add_page(1, &[0u8; 4096]).unwrap();
        let (hash, bytes) = enc.finish(None).unwrap();
        storage
            .put_new(&injected, Payload::Bytes(bytes), hash)
            .await
            .unwrap();
        let err = restore_with(&store, "secret", &out, latest, ring(&[2, 1]))
            .await
            .unwrap_err();
        assert!(
            err.contains(&injected) && err.contains("encrypted differently"),
            "{kind}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_on_the_same_prefix_is_stopped_not_interleaved() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "two.db");
        let mut app = app_process(&db, 4096);
        insert(&mut app, 10, 100);
        let mut first = open_replica(&db, "two", &store, replica_opts()).await;
        first.sync().await.unwrap();
        // Another database (a second machine's, say) on the same prefix.
        let other = db_in(&dir, "other.db");
        let mut other_app = app_process(&other, 4096);
        insert(&mut other_app, 3, 100);
        let mut second = open_replica(&other, "two", &store, replica_opts()).await;
        insert(&mut app, 10, 100);
        first.sync().await.unwrap();
        // The second's first object finds its key taken since it listed the
        // chain: it never builds on an object its WAL does not hold, and
        // starts again with a full snapshot after it.
        second.sync().await.unwrap();
        let snapshot = second.head().unwrap().seq;
        assert_eq!(snapshot, 3, "{kind}");
        // The first, which had shipped since it listed, stops for good.
        insert(&mut app, 10, 100);
        let err = first.sync().await.unwrap_err();
        assert!(err.is_fatal(), "{kind}: {err}");
        assert!(err.to_string().contains("two"), "{err}");
        insert(&mut app, 10, 100);
        assert!(first.sync().await.is_err());
        insert(&mut other_app, 3, 100);
        second.sync().await.unwrap();
        // Never interleaved: the head restores to the second database alone.
        assert_eq!(
            count_snapshots(store.storage.as_ref(), "two").await,
            2,
            "{kind}"
        );
        assert_eq!(
            restore_rows(&store, "two", dir.path(), None).await,
            rows(&other),
            "{kind}"
        );
    }
}

/// Two databases with no WAL (their apps closed), older than the clock's
/// tick, each taking its first snapshot on one prefix at once. The second's
/// finds its key taken by the first's: a snapshot read with no WAL names no
/// frames its own WAL could be checked against, so nothing tells it from
/// another database's, and it is never built on (the second's next segment
/// on top of it would restore a mix of both). A full snapshot follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_snapshot_taken_before_mine_with_no_wal_is_never_built_on() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (db_in(&dir, "a.db"), db_in(&dir, "b.db"));
        for (path, n) in [(&a, 30), (&b, 7)] {
            Connection::open(path)
                .unwrap()
                .execute_batch(&format!(
                    "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
                     WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < {n})
                     INSERT INTO t(v) SELECT randomblob(100) FROM c;"
                ))
                .unwrap();
        }
        assert!(!dir.path().join("a.db-wal").exists() && !dir.path().join("b.db-wal").exists());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut first = open_replica(&a, "idle", &store, replica_opts()).await;
        let mut second = open_replica(&b, "idle", &store, replica_opts()).await;
        first.sync().await.unwrap();
        second.sync().await.unwrap();
        assert_eq!(second.head().unwrap().seq, 2, "{kind}");
        assert_eq!(
            count_snapshots(store.storage.as_ref(), "idle").await,
            2,
            "{kind}"
        );
        let conn = Connection::open(&b).unwrap();
        conn.execute("INSERT INTO t(v) VALUES (randomblob(100))", [])
            .unwrap();
        second.sync().await.unwrap();
        drop(conn);
        assert_eq!(
            restore_rows(&store, "idle", dir.path(), None).await,
            rows(&b),
            "{kind}"
        );
    }
}

/// `walsync snapshot` run right after a watch was killed with an upload on
/// its way: the upload lands after the command listed the chain, and its
/// snapshot finds that sequence number taken. A snapshot builds on nothing,
/// so it lists again and goes after it, instead of reporting another writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_after_an_object_that_landed_since_the_listing_goes_after_it() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "late.db");
        let mut app = app_process(&db, 4096);
        insert(&mut app, 10, 100);
        let mut killed = open_replica(&db, "late", &store, replica_opts()).await;
        killed.sync().await.unwrap();
        insert(&mut app, 5, 100);
        // The command lists the chain (head 1) ...
        let mut command = open_replica(&db, "late", &store, replica_opts()).await;
        // ... then the dead watch's object 2 lands.
        killed.sync().await.unwrap();
        drop(killed);
        let report = command
            .force_snapshot(walsync::reason::SnapshotReason::Requested("test"))
            .await
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(report.snapshots, 1, "{kind}");
        assert_eq!(command.head().unwrap().seq, 3, "{kind}");
        assert_eq!(
            restore_rows(&store, "late", dir.path(), None).await,
            rows(&db),
            "{kind}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writer_with_syncs_in_between() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "busy.db");
        let _ = tracing_subscriber::fmt()
            .with_env_filter("walsync=debug")
            .with_test_writer()
            .try_init();
        app_process(&db, 4096).quit();
        let mut r = open_replica(
            &db,
            "busy",
            &store,
            SyncOptions {
                checkpoint_pages: 30,
                ..replica_opts()
            },
        )
        .await;
        r.sync().await.unwrap();
        let writer_db = db.clone();
        let writer = std::thread::spawn(move || {
            let mut app = app_process(&writer_db, 4096);
            app.pragma("wal_autocheckpoint=20");
            for i in 0..1500 {
                insert(&mut app, 1, 64 + (i % 500));
            }
        });
        while !writer.is_finished() {
            r.sync().await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        writer.join().unwrap();
        r.sync().await.unwrap();
        assert_eq!(rows(&db).len(), 1500);
        assert_eq!(
            restore_rows(&store, "busy", dir.path(), None).await,
            rows(&db),
            "{kind}"
        );
        assert_eq!(
            count_snapshots(store.storage.as_ref(), "busy").await,
            1,
            "{kind}"
        );
        let generations = wal_generations(store.storage.as_ref(), "busy").await;
        assert!(
            generations > 1,
            "{kind}: only {generations} WAL generations"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_database_file_ships_what_differs_from_what_was_shipped() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "swap.db");
        let mut app = app_process(&db, 4096);
        insert(&mut app, 20, 100);
        let mut r = open_replica(&db, "swap", &store, replica_opts()).await;
        r.sync().await.unwrap();
        app.quit();

        // Another file is renamed over the database (a restore from elsewhere, say).
        let other = db_in(&dir, "other.db");
        let mut app = app_process(&other, 4096);
        insert(&mut app, 7, 33);
        assert_eq!(app.pragma("journal_mode=DELETE"), "delete");
        app.quit();
        std::fs::rename(&other, &db).unwrap();
        let _ = std::fs::remove_file(walsync::db::wal_path_of(&db));

        let report = r.sync().await.unwrap();
        assert_eq!(
            (report.snapshots, report.deltas),
            (0, 1),
            "{kind}: replacement detected"
        );
        let mut app = app_process(&db, 4096);
        insert(&mut app, 3, 10);
        r.sync().await.unwrap();
        assert_eq!(rows(&db).len(), 10);
        assert_eq!(
            restore_rows(&store, "swap", dir.path(), None).await,
            rows(&db),
            "{kind}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_interval_starts_new_snapshots_only_when_the_database_changes() {
    let store = common::fs_store();
    let dir = tempfile::tempdir().unwrap();
    let db = db_in(&dir, "interval.db");
    let mut app = app_process(&db, 4096);
    let mut r = open_replica(
        &db,
        "interval",
        &store,
        SyncOptions {
            snapshot_interval: Duration::ZERO,
            ..replica_opts()
        },
    )
    .await;
    r.sync().await.unwrap();
    r.sync().await.unwrap();
    assert_eq!(
        count_snapshots(store.storage.as_ref(), "interval").await,
        1,
        "idle: none"
    );
    insert(&mut app, 5, 10);
    let report = r.sync().await.unwrap();
    assert_eq!((report.segments, report.snapshots), (1, 1));
    assert_eq!(
        restore_rows(&store, "interval", dir.path(), None).await,
        rows(&db)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_restore_over_a_database_with_a_wal_replaces_it_safely() {
    let store = common::fs_store();
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = build_chain(&store, dir.path(), "src").await;

    // The target is a database of its own, with committed frames in its WAL.
    let target = dir.path().join("target.db");
    let mut old = app_process(&target, 4096);
    old.pragma("wal_autocheckpoint=0");
    insert(&mut old, 50, 10);
    let mut reader = AppProcess::open(&target);
    reader.begin();
    assert_eq!(reader.count(), 50);
    let opts = RestoreOptions {
        prefix: "src".into(),
        output: target.clone(),
        target: restore::Target::Latest,
        force: true,
        keys: None,
        parallelism: walsync::restore::FETCH_PARALLELISM,
    };
    // While an app still reads it, its WAL cannot be folded in: refused, untouched.
    let err = restore::restore(store.storage.as_ref(), &opts)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    assert_eq!(rows(&target).len(), 50);

    // Connected but idle, it would go on using a file that has no name.
    reader.commit();
    let err = restore::restore(store.storage.as_ref(), &opts)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    assert_eq!(rows(&target).len(), 50);

    reader.quit();
    old.quit();
    restore::restore(store.storage.as_ref(), &opts)
        .await
        .unwrap();
    assert!(!walsync::db::wal_path_of(&target).exists());
    assert_eq!(rows(&target), rows(&db));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_walks_the_chain_and_compares_with_the_live_database() {
    use walsync::verify;
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let (db, objects) = build_chain(&store, dir.path(), "checked").await;
        let report = verify::verify(
            store.storage.as_ref(),
            "checked",
            Some(&db),
            dir.path(),
            None,
            verify::Depth::Full,
        )
        .await
        .unwrap();
        assert!(report.problems.is_empty(), "{kind}: {:?}", report.problems);
        assert!(report.restored, "{kind}");
        assert!(report.compared_pages.unwrap() > 0, "{kind}");

        // A change not shipped yet: the live database is ahead, and says so.
        AppProcess::open(&db).exec("INSERT INTO t(v) VALUES (x'01')");
        let report = verify::verify(
            store.storage.as_ref(),
            "checked",
            Some(&db),
            dir.path(),
            None,
            verify::Depth::Full,
        )
        .await
        .unwrap();
        assert_eq!(report.problems.len(), 1, "{kind}: {:?}", report.problems);
        assert!(
            report.problems[0].contains("differs"),
            "{kind}: {:?}",
            report.problems
        );

        // An altered object in the middle is named, and so is the broken link after it.
        let key = objects[1].key.clone();
        let mut bytes = storage::get_bytes(store.storage.as_ref(), &key)
            .await
            .unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        replace_object(store.storage.as_ref(), &key, bytes).await;
        let report = verify::verify(
            store.storage.as_ref(),
            "checked",
            None,
            dir.path(),
            None,
            walsync::verify::Depth::Full,
        )
        .await
        .unwrap();
        assert!(
            report.problems.iter().any(|p| p.contains(&key)),
            "{kind}: {:?}",
            report.problems
        );
        assert!(!report.restored, "{kind}: a broken chain does not restore");
    }
}

/// The app writes and checkpoints while walsync is stopped, and its last
/// connection deletes the WAL: with no WAL to compare, the database file
/// written after the chain head is what shows it, and a snapshot follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_change_checkpointed_while_stopped_is_shipped_after_restart() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "gap.db");
        app_process(&db, 4096).quit();
        let mut r = open_replica(&db, "gap", &store, replica_opts()).await;
        r.sync().await.unwrap();
        drop(r);
        {
            let mut app = app_process(&db, 4096);
            insert(&mut app, 3, 100);
            app.quit();
        }
        assert!(!wal_path_of_db(&db).exists());
        let mut r = open_replica(&db, "gap", &store, replica_opts()).await;
        r.sync().await.unwrap();
        assert_eq!(
            restore_rows(&store, "gap", dir.path(), None).await,
            rows(&db),
            "{kind}"
        );
    }
}

fn wal_path_of_db(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
}

/// Inserts `n` batches of ten rows, one transaction per batch.
fn insert_batches(app: &mut AppProcess, n: usize) {
    for _ in 0..n {
        app.insert(10, 300);
    }
}

fn page_count(path: &Path) -> u32 {
    Connection::open(path)
        .unwrap()
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap()
}

/// Runs `restore --follow` in the background until the returned token is cancelled.
fn spawn_follow(
    store: &TestStore,
    opts: follow::FollowOptions,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<follow::Result<follow::FollowReport>>,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let storage = store.storage.clone();
    let token = stop.clone();
    let task = tokio::spawn(async move { follow::follow(storage.as_ref(), &opts, token).await });
    (stop, task)
}

async fn wait_for_rows(path: &Path, expected: &Rows, kind: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !path.exists() || rows(path) != *expected {
        assert!(
            std::time::Instant::now() < deadline,
            "{kind}: the follower did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_keeps_a_replica_current_readers_see_whole_transactions_and_it_resumes() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "live.db");
        let mut app = app_process(&db, 4096);
        insert_batches(&mut app, 5);
        let sealed = SyncOptions {
            encryption: ring(&[4]),
            ..replica_opts()
        };
        let mut replica = open_replica(&db, "live", &store, sealed).await;
        replica.sync().await.unwrap();

        let copy = dir.path().join("copy.db");
        let opts = follow::FollowOptions {
            prefix: "live".into(),
            output: copy.clone(),
            keys: ring(&[4]),
            interval: Duration::from_millis(20),
            force: false,
        };
        let (stop, task) = spawn_follow(&store, opts.clone());
        wait_for_rows(&copy, &rows(&db), kind).await;

        // A reader of the copy must only ever see whole transactions.
        let reading = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let reader = {
            let (copy, reading) = (copy.clone(), reading.clone());
            std::thread::spawn(move || {
                let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
                let conn = Connection::open_with_flags(&copy, flags).unwrap();
                conn.busy_timeout(Duration::from_secs(10)).unwrap();
                let mut looks = 0;
                while reading.load(std::sync::atomic::Ordering::Relaxed) {
                    let n: i64 = conn
                        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                        .unwrap();
                    assert_eq!(n % 10, 0, "a reader saw {n} rows: half a transaction");
                    looks += 1;
                }
                looks
            })
        };
        for round in 0..12 {
            insert_batches(&mut app, 3);
            if round == 5 {
                // Shrinks the file: the copy must drop the freed pages too.
                app.ok("script DELETE FROM t WHERE id <= 100; VACUUM;");
            }
            if round == 8 {
                replica
                    .force_snapshot(walsync::reason::SnapshotReason::Requested("test"))
                    .await
                    .unwrap();
            }
            replica.sync().await.unwrap();
        }
        wait_for_rows(&copy, &rows(&db), kind).await;
        reading.store(false, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0, "{kind}");
        stop.cancel();
        let report = task.await.unwrap().unwrap();
        assert!(
            report.restored && report.applied >= 12,
            "{kind}: {report:?}"
        );
        assert_eq!(page_count(&copy), page_count(&db), "{kind}");
        assert_eq!(
            report.position.unwrap().seq,
            replica.head().unwrap().seq,
            "{kind}"
        );

        // Started again, it goes on from where it stood.
        insert_batches(&mut app, 2);
        replica.sync().await.unwrap();
        let (stop, task) = spawn_follow(&store, opts.clone());
        wait_for_rows(&copy, &rows(&db), kind).await;
        stop.cancel();
        let report = task.await.unwrap().unwrap();
        assert!(
            !report.restored && report.applied == 1,
            "{kind}: {report:?}"
        );
        // Every object was checked against its state digest, and the record
        // beside the copy describes the head: the copy can be promoted.
        let objects = chain::list(store.storage.as_ref(), "live").await.unwrap();
        let head = objects.last().unwrap();
        let (head_header, head_hash, _) = chain::read_verified(store.storage.as_ref(), head)
            .await
            .unwrap();
        let record_path = walsync::state::record_path(
            &copy,
            &walsync::state::destination(&store.storage.describe(), "live"),
        );
        let mut record = walsync::state::Record::open(&record_path).unwrap().unwrap();
        record
            .check(
                walsync::state::Head {
                    seq: head.seq,
                    hash: head_hash,
                },
                &head_header.state.unwrap(),
            )
            .unwrap_or_else(|e| panic!("{kind}: {e}"));

        // A file it did not make is not taken over without --force.
        let other = dir.path().join("other.db");
        std::fs::write(&other, b"someone else's").unwrap();
        let err = follow::follow(
            store.storage.as_ref(),
            &follow::FollowOptions {
                output: other.clone(),
                ..opts.clone()
            },
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("not followed") && err.to_string().contains("--force"),
            "{kind}: {err}"
        );
        assert_eq!(std::fs::read(&other).unwrap(), b"someone else's");
    }
}

/// Storage with a fault injected once: its next put fails, as a network
/// error would (`fail`), or its next listing panics, as a bug anywhere in a
/// sync task would (`panic_listing`).
#[derive(Debug)]
struct InjectOnce {
    inner: Arc<dyn Storage>,
    fail: std::sync::atomic::AtomicBool,
    panic_listing: std::sync::atomic::AtomicBool,
}

impl InjectOnce {
    /// `inner`, whose next put fails (`fail`) or next listing panics.
    fn over(inner: &Arc<dyn Storage>, fail: bool, panic_listing: bool) -> Arc<Self> {
        Arc::new(Self {
            inner: inner.clone(),
            fail: std::sync::atomic::AtomicBool::new(fail),
            panic_listing: std::sync::atomic::AtomicBool::new(panic_listing),
        })
    }
}

#[async_trait::async_trait]
impl Storage for InjectOnce {
    async fn put_new(&self, key: &str, body: Payload, sha256: [u8; 32]) -> storage::Result<()> {
        if self.fail.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Err(storage::Error::Io {
                key: key.into(),
                source: std::io::Error::other("injected failure"),
            });
        }
        self.inner.put_new(key, body, sha256).await
    }
    async fn get(&self, key: &str) -> storage::Result<storage::ObjectReader> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> storage::Result<Vec<storage::ObjectMeta>> {
        let panic = self
            .panic_listing
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        assert!(!panic, "a listing that panics, as a bug would");
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> storage::Result<()> {
        self.inner.delete(key).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// A snapshot or a delta whose first upload fails goes up from `pending` on
/// the next sync, and only then counts: the snapshot's reason, and the
/// continuity loss the delta answers (both were lost on a retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_or_delta_that_went_up_on_a_retry_counts_its_reason() {
    use std::sync::atomic::Ordering::SeqCst;
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "retried.db");
        let mut app = app_process(&db, 4096);
        insert(&mut app, 20, 100);
        let flaky = InjectOnce::over(&store.storage, true, false);
        let mut replica = Replica::open(&db, "retried", flaky.clone(), replica_opts())
            .await
            .unwrap();
        assert!(replica.sync().await.is_err(), "{kind}");
        let report = replica.sync().await.unwrap();
        assert_eq!(report.snapshots, 1, "{kind}: {report:?}");
        assert_eq!(
            report.snapshot_reasons,
            vec!["initial"],
            "{kind}: {report:?}"
        );
        drop(replica);

        // walsync stopped; the app writes and checkpoints meanwhile, so the
        // WAL no longer shows what changed: the next start ships a delta.
        insert(&mut app, 5, 100);
        app.checkpoint("TRUNCATE");
        flaky.fail.store(true, SeqCst);
        let mut replica = Replica::open(&db, "retried", flaky.clone(), replica_opts())
            .await
            .unwrap();
        assert!(replica.sync().await.is_err(), "{kind}");
        let report = replica.sync().await.unwrap();
        assert_eq!(report.deltas, 1, "{kind}: {report:?}");
        assert_eq!(report.continuity_losses.len(), 1, "{kind}: {report:?}");
        assert!(report.snapshot_reasons.is_empty(), "{kind}: {report:?}");
        let out = dir.path().join("out.db");
        assert_eq!(
            restore_with(&store, "retried", &out, restore::Target::Latest, None).await,
            Ok(rows(&db)),
            "{kind}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_change_never_mixes_keys_and_a_lost_key_never_ships_plaintext() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "rotating.db");
        let mut app = app_process(&db, 4096);
        insert(&mut app, 20, 100);
        let flaky = InjectOnce::over(&store.storage, true, false);
        let with = |keys| SyncOptions {
            encryption: keys,
            ..replica_opts()
        };
        let mut replica = Replica::open(&db, "rotating", flaky.clone(), with(ring(&[1])))
            .await
            .unwrap();
        // The first snapshot (sealed with key 1) fails and waits to be retried;
        // meanwhile the key changes. Its retry must not let key 2 follow it.
        assert!(replica.sync().await.is_err(), "{kind}");
        replica.set_options(with(ring(&[2, 1])));
        insert(&mut app, 5, 100);
        replica.sync().await.unwrap();
        insert(&mut app, 5, 100);
        replica.sync().await.unwrap();
        let out = dir.path().join("out.db");
        let latest = restore::Target::Latest;
        assert_eq!(
            restore_with(&store, "rotating", &out, latest, ring(&[2, 1])).await,
            Ok(rows(&db)),
            "{kind}"
        );
        let objects = chain::list(store.storage.as_ref(), "rotating")
            .await
            .unwrap();
        let kinds: Vec<Kind> = objects.iter().map(|o| o.kind).collect();
        assert_eq!(kinds, [Kind::Snapshot, Kind::Snapshot, Kind::Wal], "{kind}");

        // No key at all (a lost environment variable): an error, nothing shipped.
        let before = objects.len();
        replica.set_options(with(None));
        insert(&mut app, 5, 100);
        let err = replica.sync().await.unwrap_err().to_string();
        assert!(
            err.contains("no encryption key is set") && err.contains("rotating"),
            "{kind}: {err}"
        );
        let after = chain::list(store.storage.as_ref(), "rotating")
            .await
            .unwrap();
        assert_eq!(after.len(), before, "{kind}: something was shipped");

        // Turned off on purpose: a plaintext snapshot starts, old keys still read.
        let off = Some(Arc::new(Keys::new(None, vec![Key::from_bytes(&[2; 32])])));
        replica.set_options(with(off.clone()));
        let report = replica.sync().await.unwrap();
        assert_eq!(report.snapshot_reasons, vec!["key"], "{kind}");
        let head = chain::list(store.storage.as_ref(), "rotating")
            .await
            .unwrap();
        let header = chain::read_header(store.storage.as_ref(), head.last().unwrap())
            .await
            .unwrap();
        assert!(header.sealed.is_none(), "{kind}");
        assert_eq!(
            restore_with(&store, "rotating", &out, latest, None).await,
            Ok(rows(&db)),
            "{kind}"
        );
        let old = restore::Target::Seq(before as u64);
        assert!(
            restore_with(&store, "rotating", &out, old, off)
                .await
                .is_ok(),
            "{kind}"
        );
    }
}

#[derive(Debug, Clone, Copy)]
enum ForkKind {
    TwoSnapshots,
    SnapshotAndSegment,
    TwoSegments,
}

/// Every kind of fork, on every store: restore follows the branch that goes
/// on, names the other, and restores exactly the source's rows; verify
/// reports the fork as a problem without refusing the chain; a writer that
/// starts on the forked prefix says so and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forked_chain_restores_through_the_branch_that_goes_on() {
    for (kind, store) in common::all_stores().await {
        let storage = store.storage.as_ref();
        for fork in [
            ForkKind::TwoSnapshots,
            ForkKind::SnapshotAndSegment,
            ForkKind::TwoSegments,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let db = db_in(&dir, "fork.db");
            let (main, twin) = (format!("main-{fork:?}"), format!("twin-{fork:?}"));
            let mut app = app_process(&db, 4096);
            insert(&mut app, 20, 100);
            let mut a = open_replica(&db, &main, &store, replica_opts()).await;
            a.sync().await.unwrap();
            insert(&mut app, 5, 100);
            a.sync().await.unwrap();
            let head = a.head().unwrap().seq;
            copy_chain(storage, &main, &twin).await;
            let mut b = open_replica(&db, &twin, &store, replica_opts()).await;
            insert(&mut app, 5, 100);
            // The second writer's object for head + 1 ...
            match fork {
                ForkKind::TwoSnapshots | ForkKind::SnapshotAndSegment => {
                    b.force_snapshot(walsync::reason::SnapshotReason::Requested("test"))
                        .await
                        .unwrap();
                }
                ForkKind::TwoSegments => {
                    b.sync().await.unwrap();
                }
            }
            assert_eq!(b.head().unwrap().seq, head + 1, "{kind} {fork:?}");
            drop(b);
            // ... and the first writer's, with more in it, then one more.
            insert(&mut app, 5, 100);
            match fork {
                ForkKind::TwoSnapshots => {
                    a.force_snapshot(walsync::reason::SnapshotReason::Requested("test"))
                        .await
                        .unwrap();
                }
                ForkKind::SnapshotAndSegment | ForkKind::TwoSegments => {
                    a.sync().await.unwrap();
                }
            }
            insert(&mut app, 5, 100);
            a.sync().await.unwrap();
            assert_eq!(a.head().unwrap().seq, head + 2, "{kind} {fork:?}");
            let planted = plant_legacy(storage, &twin, head + 1, &main).await;

            let objects = chain::list(storage, &main).await.unwrap();
            assert_eq!(chain::forks(&objects).len(), 1, "{kind} {fork:?}");
            let out = dir.path().join("out.db");
            let report = restore::restore(
                storage,
                &RestoreOptions {
                    prefix: main.clone(),
                    output: out.clone(),
                    target: restore::Target::Latest,
                    force: true,
                    keys: None,
                    parallelism: walsync::restore::FETCH_PARALLELISM,
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{kind} {fork:?}: {e}"));
            assert_eq!(report.seq, head + 2, "{kind} {fork:?}");
            assert_eq!(rows(&out), rows(&db), "{kind} {fork:?}");
            let branch = report.fork.expect("the fork is reported");
            let left: Vec<&str> = branch.left.iter().map(|o| o.key.as_str()).collect();
            assert_eq!(left, [planted.as_str()], "{kind} {fork:?}");
            assert!(branch.describe().contains(&planted), "{kind} {fork:?}");

            // A state before the fork is reachable too.
            let before_fork = restore_to(&store, &main, &out, restore::Target::Seq(head))
                .await
                .unwrap();
            assert_eq!(before_fork.len(), 25, "{kind} {fork:?}");

            let verified = walsync::verify::verify(
                storage,
                &main,
                Some(&db),
                dir.path(),
                None,
                walsync::verify::Depth::Full,
            )
            .await
            .unwrap();
            assert!(
                verified.restored,
                "{kind} {fork:?}: {:?}",
                verified.problems
            );
            assert_eq!(
                verified.problems.len(),
                1,
                "{kind} {fork:?}: {:?}",
                verified.problems
            );
            assert!(
                verified.problems[0].contains(&planted),
                "{kind} {fork:?}: {:?}",
                verified.problems
            );

            // A writer starting on the forked prefix says so and goes on.
            drop(a);
            let mut again = open_replica(&db, &main, &store, replica_opts()).await;
            assert!(
                again.forked().is_some_and(|f| f.contains(&planted)),
                "{kind} {fork:?}"
            );
            insert(&mut app, 5, 100);
            let report = again.sync().await.unwrap();
            assert_eq!(
                report.snapshots, 0,
                "{kind} {fork:?}: the head itself is not forked"
            );
            assert_eq!(
                restore_rows(&store, &main, dir.path(), None).await,
                rows(&db),
                "{kind} {fork:?}"
            );
            app.quit();
        }
    }
}

/// Two objects claim the newest sequence: restore takes the one read last;
/// a writer starting there cannot know which it continues and snapshots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_at_the_head_restores_the_newest_and_a_new_writer_snapshots() {
    for (kind, store) in common::all_stores().await {
        let storage = store.storage.as_ref();
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "head.db");
        let mut app = app_process(&db, 4096);
        insert(&mut app, 20, 100);
        let mut a = open_replica(&db, "head", &store, replica_opts()).await;
        a.sync().await.unwrap();
        let head = a.head().unwrap().seq;
        copy_chain(storage, "head", "head-twin").await;
        let mut b = open_replica(&db, "head-twin", &store, replica_opts()).await;
        insert(&mut app, 5, 100);
        b.sync().await.unwrap();
        drop(b);
        insert(&mut app, 5, 100);
        a.sync().await.unwrap();
        drop(a);
        let planted = plant_legacy(storage, "head-twin", head + 1, "head").await;
        // The first writer's object was read later: it is the newest state.
        assert_eq!(
            restore_rows(&store, "head", dir.path(), None).await,
            rows(&db),
            "{kind}"
        );

        let mut again = open_replica(&db, "head", &store, replica_opts()).await;
        assert!(
            again.forked().is_some_and(|f| f.contains(&planted)),
            "{kind}"
        );
        // Its state record describes the followed head (its own object),
        // which is exactly the database: nothing needs shipping.
        let report = again.sync().await.unwrap();
        assert_eq!((report.snapshots, report.deltas), (0, 1), "{kind}");
        assert_eq!(again.head().unwrap().seq, head + 1, "{kind}");
        drop(again);
        // Without its record, it cannot know which object it continues: a snapshot.
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.to_string_lossy().contains("-walsync-state-") {
                std::fs::remove_file(path).unwrap();
            }
        }
        let mut again = open_replica(&db, "head", &store, replica_opts()).await;
        let report = again.sync().await.unwrap();
        assert_eq!(report.snapshots, 1, "{kind}");
        assert_eq!(again.head().unwrap().seq, head + 2, "{kind}");
        insert(&mut app, 5, 100);
        again.sync().await.unwrap();
        assert_eq!(
            restore_rows(&store, "head", dir.path(), None).await,
            rows(&db),
            "{kind}"
        );
        app.quit();
    }
}

/// The issue's own case: `walsync snapshot` while a writer runs takes the
/// next sequence; the writer that loses the race is stopped by the store
/// (one key per sequence) instead of shipping beside it, and the prefix
/// stays restorable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_racing_a_segment_for_one_sequence_stops_the_loser() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "race.db");
        let mut app = app_process(&db, 4096);
        insert(&mut app, 20, 100);
        let mut watcher = open_replica(&db, "race", &store, replica_opts()).await;
        watcher.sync().await.unwrap();
        let mut one_off = open_replica(&db, "race", &store, replica_opts()).await;
        insert(&mut app, 5, 100);
        one_off
            .force_snapshot(walsync::reason::SnapshotReason::Requested("requested"))
            .await
            .unwrap();
        insert(&mut app, 5, 100);
        let err = watcher.sync().await.unwrap_err();
        assert!(err.is_fatal(), "{kind}: {err}");
        assert!(err.to_string().contains("already exists"), "{kind}: {err}");
        let objects = chain::list(store.storage.as_ref(), "race").await.unwrap();
        assert!(chain::forks(&objects).is_empty(), "{kind}: {objects:?}");
        assert_eq!(
            restore_rows(&store, "race", dir.path(), None).await.len(),
            25,
            "{kind}"
        );
        app.quit();
    }
}

/// Chains written in the first layout (`<seq>.snapshot`, `<seq>.wal`) still
/// restore, and a writer continues them in today's layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_in_the_first_layout_restore_and_continue() {
    for (kind, store) in common::all_stores().await {
        let storage = store.storage.as_ref();
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "old.db");
        let mut app = app_process(&db, 4096);
        insert(&mut app, 20, 100);
        let mut r = open_replica(&db, "new", &store, replica_opts()).await;
        r.sync().await.unwrap();
        for _ in 0..2 {
            insert(&mut app, 5, 100);
            r.sync().await.unwrap();
        }
        drop(r);
        for object in chain::list(storage, "new").await.unwrap() {
            plant_legacy(storage, "new", object.seq, "old").await;
        }
        let objects = chain::list(storage, "old").await.unwrap();
        assert!(objects.iter().all(|o| o.is_legacy()), "{kind}");
        assert_eq!(objects[0].kind, Kind::Snapshot, "{kind}");
        assert_eq!(
            restore_rows(&store, "old", dir.path(), None).await,
            rows(&db),
            "{kind}"
        );
        let mut r = open_replica(&db, "old", &store, replica_opts()).await;
        insert(&mut app, 5, 100);
        let report = r.sync().await.unwrap();
        assert_eq!((report.segments, report.snapshots), (1, 0), "{kind}");
        let objects = chain::list(storage, "old").await.unwrap();
        assert!(!objects.last().unwrap().is_legacy(), "{kind}");
        assert_eq!(
            restore_rows(&store, "old", dir.path(), None).await,
            rows(&db),
            "{kind}"
        );
        app.quit();
    }
}

/// A snapshot whose mark was never written (walsync stopped in between) is
/// marked by the next writer, and restores without it meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_without_its_mark_still_restores_and_is_marked_again() {
    for (kind, store) in common::all_stores().await {
        let storage = store.storage.as_ref();
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "unmarked.db");
        let mut app = app_process(&db, 4096);
        insert(&mut app, 20, 100);
        let mut r = open_replica(&db, "unmarked", &store, replica_opts()).await;
        r.sync().await.unwrap();
        drop(r);
        storage
            .delete(&segment::snapshot_mark_key("unmarked", 1))
            .await
            .unwrap();
        let objects = chain::list(storage, "unmarked").await.unwrap();
        assert_eq!(
            objects[0].kind,
            Kind::Wal,
            "{kind}: listed without its mark"
        );
        assert_eq!(
            restore_rows(&store, "unmarked", dir.path(), None).await,
            rows(&db),
            "{kind}"
        );
        let mut r = open_replica(&db, "unmarked", &store, replica_opts()).await;
        insert(&mut app, 5, 100);
        let report = r.sync().await.unwrap();
        assert_eq!(report.snapshots, 0, "{kind}");
        let objects = chain::list(storage, "unmarked").await.unwrap();
        assert_eq!(objects[0].kind, Kind::Snapshot, "{kind}: marked again");
        app.quit();
    }
}

/// A live copy refuses an object that does not follow what it applied (the
/// rule restore applies too, `link::Successor`): one naming another object
/// before it, or a plain object after encrypted ones. The refusal names the
/// object, where the copy stands and the way out; nothing of it is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_refuses_an_object_that_does_not_follow_what_it_applied() {
    for (kind, store) in common::all_stores().await {
        for encrypted in [false, true] {
            let storage = store.storage.as_ref();
            let dir = tempfile::tempdir().unwrap();
            let db = db_in(&dir, "src.db");
            let copy = db_in(&dir, "copy.db");
            let mut app = app_process(&db, 4096);
            insert(&mut app, 20, 100);
            let keys = if encrypted { ring(&[4]) } else { None };
            let sync = SyncOptions {
                encryption: keys.clone(),
                ..replica_opts()
            };
            let mut r = open_replica(&db, "watched", &store, sync).await;
            r.sync().await.unwrap();
            let opts = follow::FollowOptions {
                prefix: "watched".into(),
                output: copy.clone(),
                keys: keys.clone(),
                interval: Duration::from_millis(20),
                force: false,
            };
            let (stop, task) = spawn_follow(&store, opts.clone());
            wait_for_rows(&copy, &rows(&db), kind).await;
            stop.cancel();
            let applied = task.await.unwrap().unwrap().position.unwrap().seq;
            let before = rows(&copy);
            insert(&mut app, 5, 100);
            r.sync().await.unwrap();
            let next = segment::object_key("watched", applied + 1);
            let expected = if encrypted {
                // Written again in plain, linked as it was.
                rewrite_plain(storage, &next, keys.as_deref(), |_| {}, None).await;
                format!("{next} is encrypted differently from sequence {applied} applied here")
            } else {
                rewrite_plain(storage, &next, None, |h| h.prev_hash = [7; 32], None).await;
                format!("{next} does not follow sequence {applied} applied here")
            };
            // Accepted, the follower would apply it and go on polling.
            let followed = tokio::time::timeout(
                Duration::from_secs(30),
                follow::follow(storage, &opts, tokio_util::sync::CancellationToken::new()),
            )
            .await;
            let err = match followed {
                Ok(Err(e)) => e.to_string(),
                other => panic!("{kind}, encrypted {encrypted}: not refused: {other:?}"),
            };
            assert!(
                err.contains(&expected) && err.contains("restore afresh with --force"),
                "{kind}, encrypted {encrypted}: {err}"
            );
            assert!(rows(&copy) == before, "{kind}: part of it was applied");
        }
    }
}

/// Writes the object at `key` again, whole, self-consistent and in plain,
/// its header changed by `edit`, recording `digest` as its state digest.
async fn rewrite_plain(
    storage: &dyn Storage,
    key: &str,
    keys: Option<&Keys>,
    edit: impl FnOnce(&mut segment::Header),
    digest: Option<[u8; 32]>,
) {
    let bytes = storage::get_bytes(storage, key).await.unwrap();
    let mut reader =
        segment::PageReader::new(std::io::Cursor::new(&bytes), bytes.len() as u64, keys).unwrap();
    let mut header = segment::Header {
        sealed: None,
        ..*reader.header()
    };
    edit(&mut header);
    let mut enc = segment::Encoder::new(header, None, Vec::new()).unwrap();
    let mut page = vec![0u8; header.page_size as usize];
    while let Some(pgno) = reader.next_page(&mut page).unwrap() {
        enc.add_page(pgno, &page).unwrap();
    }
    let (_, bytes) = enc.finish(digest).unwrap();
    replace_object(storage, key, bytes).await;
}

/// A chain whose head records no state digest (written by a walsync that
/// had dropped its state record) restores, and leaves no record beside the
/// file, not even the one built on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_without_a_state_digest_leaves_no_record_behind() {
    for (kind, store) in common::all_stores().await {
        let storage = store.storage.as_ref();
        let dir = tempfile::tempdir().unwrap();
        let (db, objects) = build_chain(&store, dir.path(), "nodigest").await;
        let head = objects.last().unwrap();
        rewrite_plain(storage, &head.key, None, |_| {}, None).await;
        let restored = dir.path().join("restored");
        std::fs::create_dir(&restored).unwrap();
        let out = restored.join("out.db");
        assert_eq!(
            restore_to(&store, "nodigest", &out, restore::Target::Latest).await,
            Ok(rows(&db)),
            "{kind}"
        );
        let left: Vec<String> = std::fs::read_dir(&restored)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec!["out.db".to_string()], "{kind}");
    }
}

/// Rewrites object `key` with the same pages and link but another state digest.
async fn forge_digest(storage: &dyn Storage, key: &str) {
    rewrite_plain(storage, key, None, |_| {}, Some([9; 32])).await;
}

/// Every object records the state digest after it; restore recomputes it
/// after each object, leaves the record of what it wrote beside the file,
/// and refuses, by name, an object whose result is not what its writer had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_checks_the_state_digest_after_every_object() {
    for (kind, store) in common::all_stores().await {
        let storage = store.storage.as_ref();
        let dir = tempfile::tempdir().unwrap();
        let (db, objects) = build_chain(&store, dir.path(), "digest").await;
        for object in &objects {
            let (header, _, _) = chain::read_verified(storage, object).await.unwrap();
            assert!(
                header.state.is_some(),
                "{kind}: {} has no digest",
                object.key
            );
        }
        let out = dir.path().join("out.db");
        assert_eq!(
            restore_to(&store, "digest", &out, restore::Target::Latest).await,
            Ok(rows(&db)),
            "{kind}"
        );
        let record_path = walsync::state::record_path(
            &out,
            &walsync::state::destination(&storage.describe(), "digest"),
        );
        let head = objects.last().unwrap();
        let (head_header, head_hash, _) = chain::read_verified(storage, head).await.unwrap();
        let mut record = walsync::state::Record::open(&record_path).unwrap().unwrap();
        record
            .check(
                walsync::state::Head {
                    seq: head.seq,
                    hash: head_hash,
                },
                &head_header.state.unwrap(),
            )
            .unwrap_or_else(|e| panic!("{kind}: {e}"));

        // The head again, same pages and link, another digest.
        forge_digest(storage, &head.key).await;
        let err = expect_refusal(&store, "digest", dir.path(), &head.key).await;
        assert!(err.contains("state digest"), "{kind}: {err}");
        // The state before it is still there to have.
        assert!(
            restore_to(&store, "digest", &out, restore::Target::Seq(head.seq - 1))
                .await
                .is_ok(),
            "{kind}"
        );
    }
}

/// A restore of an older state over a database walsync has closed at rest
/// puts the restore's state record in place of walsync's. walsync must not
/// read it as its own: the file is now another state than the head, and it
/// is shipped (so that the newest state in storage is the file again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_over_a_closed_database_is_shipped_not_taken_for_the_head() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "rolled.db");
        let mut app = app_process(&db, 4096);
        insert(&mut app, 20, 100);
        let mut r = open_replica(&db, "rolled", &store, replica_opts()).await;
        r.sync().await.unwrap();
        insert(&mut app, 5, 100);
        r.sync().await.unwrap();
        let older = r.head().unwrap().seq;
        insert(&mut app, 5, 100);
        r.sync().await.unwrap();
        app.quit();
        r.sync().await.unwrap();
        let mut closed = false;
        for _ in 0..50 {
            if r.detach().await.unwrap() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(closed, "{kind}: walsync never closed the idle database");
        common::restore(&store, "rolled", &db, restore::Target::Seq(older), None)
            .await
            .unwrap();
        assert_eq!(rows(&db).len(), 25, "{kind}");
        r.sync().await.unwrap();
        let restored = restore_rows(&store, "rolled", dir.path(), None).await;
        assert!(
            restored == rows(&db),
            "{kind}: the newest state in storage ({} rows) is not the file (25 rows)",
            restored.len()
        );
    }
}

/// A delta of an encrypted chain is sealed with the chain's key: restore
/// needs the key for it, and gets exactly the source with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_of_an_encrypted_chain_is_sealed_like_the_rest() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "sealed.db");
        let mut app = app_process(&db, 4096);
        insert(&mut app, 40, 500);
        let opts = || SyncOptions {
            encryption: ring(&[6]),
            ..replica_opts()
        };
        let mut r = open_replica(&db, "sealed", &store, opts()).await;
        r.sync().await.unwrap();
        drop(r);
        // While walsync is stopped: a write, checkpointed and truncated away.
        insert(&mut app, 3, 500);
        assert_eq!(app.checkpoint("TRUNCATE").busy, 0);
        let mut r = open_replica(&db, "sealed", &store, opts()).await;
        let report = r.sync().await.unwrap();
        assert_eq!((report.snapshots, report.deltas), (0, 1), "{kind}");
        let objects = chain::list(store.storage.as_ref(), "sealed").await.unwrap();
        let (header, _, _) = chain::read_verified(store.storage.as_ref(), objects.last().unwrap())
            .await
            .unwrap();
        assert_eq!(header.kind, Kind::Delta, "{kind}");
        assert!(
            header.sealed.is_some(),
            "{kind}: a delta shipped in the clear"
        );
        let out = dir.path().join("out.db");
        let latest = restore::Target::Latest;
        assert_eq!(
            restore_with(&store, "sealed", &out, latest, ring(&[6])).await,
            Ok(rows(&db)),
            "{kind}"
        );
        assert!(
            restore_with(&store, "sealed", &out, latest, None)
                .await
                .is_err(),
            "{kind}"
        );
    }
}

/// `restore --follow` checks every object it applies against the state
/// digest its writer recorded, and applies nothing of one that differs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_refuses_an_object_whose_state_digest_differs() {
    for (kind, store) in common::all_stores().await {
        let storage = store.storage.as_ref();
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "src.db");
        let copy = db_in(&dir, "copy.db");
        let mut app = app_process(&db, 4096);
        insert(&mut app, 20, 100);
        let mut r = open_replica(&db, "watched", &store, replica_opts()).await;
        r.sync().await.unwrap();
        let opts = follow::FollowOptions {
            prefix: "watched".into(),
            output: copy.clone(),
            keys: None,
            interval: Duration::from_millis(20),
            force: false,
        };
        let (stop, task) = spawn_follow(&store, opts.clone());
        wait_for_rows(&copy, &rows(&db), kind).await;
        stop.cancel();
        task.await.unwrap().unwrap();
        let before = rows(&copy);
        insert(&mut app, 5, 100);
        r.sync().await.unwrap();
        let head = chain::list(storage, "watched")
            .await
            .unwrap()
            .pop()
            .unwrap();
        forge_digest(storage, &head.key).await;
        let err = follow::follow(storage, &opts, tokio_util::sync::CancellationToken::new())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&head.key) && err.contains("state digest"),
            "{kind}: {err}"
        );
        assert!(
            rows(&copy) == before,
            "{kind}: part of the object was applied"
        );
    }
}

/// Issue 11, 4: a tiny object cannot fill the disk. One declaring a
/// database larger than the free space is refused before a page is written;
/// one whose page 1 says another size than it declares is refused at page 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_declaring_a_huge_database_is_refused_before_writing_it() {
    for (kind, store) in common::all_stores().await {
        let storage = store.storage.as_ref();
        let dir = tempfile::tempdir().unwrap();
        let (db, objects) = build_chain(&store, dir.path(), "bomb").await;
        let head = objects.last().unwrap();
        let (head_header, head_hash, _) = chain::read_verified(storage, head).await.unwrap();
        let mut page1 = vec![0u8; 4096];
        {
            use std::os::unix::fs::FileExt;
            std::fs::File::open(&db)
                .unwrap()
                .read_exact_at(&mut page1, 0)
                .unwrap();
        }
        let forge = |db_pages: u32, with_page1: bool| {
            let pages: Vec<u32> = if with_page1 { vec![1, 2] } else { vec![2] };
            let header = segment::Header {
                kind: Kind::Wal,
                seq: head.seq + 1,
                db_pages,
                page_count: pages.len() as u32,
                prev_hash: head_hash,
                state: None,
                ..head_header
            };
            let mut enc = segment::Encoder::new(header, None, Vec::new()).unwrap();
            for p in pages {
                let data = if p == 1 {
                    page1.clone()
                } else {
                    vec![7u8; 4096]
                };
                enc.add_page(p, &data).unwrap();
            }
            enc.finish(None).unwrap()
        };
        let key = segment::object_key("bomb", head.seq + 1);
        // 2^28 pages of 4 KiB: a terabyte.
        let (hash, bytes) = forge(1 << 28, false);
        assert!(bytes.len() < 1000, "{kind}");
        storage
            .put_new(&key, Payload::Bytes(bytes), hash)
            .await
            .unwrap();
        let err = expect_refusal(&store, "bomb", dir.path(), &key).await;
        assert!(err.contains("free"), "{kind}: {err}");
        // Page 1 says the database has its real size; the object says more.
        let (hash, bytes) = forge(5000, true);
        replace_object(storage, &key, bytes).await;
        let _ = hash;
        let err = expect_refusal(&store, "bomb", dir.path(), &key).await;
        assert!(err.contains("page 1 says"), "{kind}: {err}");
    }
}

/// Issue 14, compaction's first step: a run built from the objects after a
/// snapshot, stored and read back from each store, applied onto the state at
/// the snapshot, leaves exactly the newest state; it names its objects and
/// carries the last one's state digest; listings do not show it; a run whose
/// objects do not link up, or that would swallow a snapshot, is refused by
/// the object's name.
#[tokio::test]
async fn a_run_applied_onto_the_snapshot_leaves_the_newest_state() {
    use walsync::compact;
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let (_, objects) = build_chain(&store, dir.path(), "runs").await;
        let storage = store.storage.as_ref();
        let (snapshot, snapshot_hash, _) =
            chain::read_verified(storage, &objects[0]).await.unwrap();
        assert_eq!(snapshot.kind, Kind::Snapshot);
        let (last, last_hash, _) = chain::read_verified(storage, &objects[3]).await.unwrap();

        let built = compact::build_run(
            storage,
            "runs",
            &objects[1..],
            Some(snapshot_hash),
            None,
            dir.path(),
        )
        .await
        .unwrap();
        assert_eq!(
            built.key,
            segment::run_key("runs", objects[1].seq, objects[3].seq)
        );
        assert_eq!(built.header.kind, Kind::Run);
        assert_eq!(
            built.header.run,
            Some(segment::Run {
                first: objects[1].seq,
                last_hash,
            })
        );
        assert_eq!(built.header.prev_hash, snapshot_hash);
        assert_eq!(built.header.state, last.state);

        // Applied the way restore applies an object: pages, then the size.
        let restore_to = |target, out: &Path| {
            let out = out.to_path_buf();
            async move {
                restore::restore(
                    storage,
                    &RestoreOptions {
                        prefix: "runs".into(),
                        output: out,
                        target,
                        force: false,
                        keys: None,
                        parallelism: restore::FETCH_PARALLELISM,
                    },
                )
                .await
                .unwrap()
            }
        };
        let at_snapshot = dir.path().join("at-snapshot.db");
        let newest = dir.path().join("newest.db");
        restore_to(restore::Target::Seq(objects[0].seq), &at_snapshot).await;
        let without = restore_to(restore::Target::Latest, &newest).await;
        assert_eq!(without.objects, 4);
        storage
            .put_new(&built.key, built.payload, built.hash)
            .await
            .unwrap();
        assert_eq!(
            chain::list(storage, "runs").await.unwrap(),
            objects,
            "{kind}"
        );
        let bytes = storage::get_bytes(storage, &built.key).await.unwrap();
        let (header, hash) =
            segment::verify(std::io::Cursor::new(&bytes), bytes.len() as u64).unwrap();
        assert_eq!((header.run, hash), (built.header.run, built.hash));
        let mut file = std::fs::read(&at_snapshot).unwrap();
        let size = header.page_size as usize;
        let mut reader =
            segment::PageReader::new(std::io::Cursor::new(&bytes), bytes.len() as u64, None)
                .unwrap();
        let mut page = vec![0u8; size];
        while let Some(pgno) = reader.next_page(&mut page).unwrap() {
            let at = (pgno as usize - 1) * size;
            if file.len() < at + size {
                file.resize(at + size, 0);
            }
            file[at..at + size].copy_from_slice(&page);
        }
        file.resize(header.db_pages as usize * size, 0);
        assert!(
            file == std::fs::read(&newest).unwrap(),
            "{kind}: the run leaves the newest state"
        );

        // Restore reads the snapshot and the run instead of four objects,
        // reaches the same state and leaves the same chain head for `watch`.
        let through = dir.path().join("through-run.db");
        let report = restore_to(restore::Target::Latest, &through).await;
        assert_eq!(
            (report.objects, report.seq, report.hash),
            (2, without.seq, without.hash),
            "{kind}"
        );
        assert!(
            std::fs::read(&through).unwrap() == std::fs::read(&newest).unwrap(),
            "{kind}"
        );
        // A point inside the run is reached without it.
        let inside = restore_to(
            restore::Target::Seq(objects[2].seq),
            &dir.path().join("inside.db"),
        )
        .await;
        assert_eq!(inside.objects, 3, "{kind}");
        let checked = walsync::verify::verify(
            storage,
            "runs",
            None,
            dir.path(),
            None,
            walsync::verify::Depth::Full,
        )
        .await
        .unwrap();
        assert_eq!(
            (checked.runs, checked.problems.len()),
            (1, 0),
            "{kind}: {:?}",
            checked.problems
        );
        // An altered run is refused by name, nothing written, and `verify`
        // names it.
        let mut altered = bytes.clone();
        let mid = altered.len() / 2;
        altered[mid] ^= 1;
        replace_object(storage, &built.key, altered).await;
        expect_refusal(&store, "runs", dir.path(), &built.key).await;
        let checked = walsync::verify::verify(
            storage,
            "runs",
            None,
            dir.path(),
            None,
            walsync::verify::Depth::Full,
        )
        .await
        .unwrap();
        assert!(
            checked.problems.iter().any(|p| p.contains(&built.key)),
            "{kind}: {:?}",
            checked.problems
        );
        // So is a run that claims other objects than its key names.
        let mut h = header;
        h.run = Some(segment::Run {
            first: objects[2].seq,
            ..h.run.unwrap()
        });
        h.state = None;
        let mut enc = segment::Encoder::new(h, None, Vec::new()).unwrap();
        let mut reader =
            segment::PageReader::new(std::io::Cursor::new(&bytes), bytes.len() as u64, None)
                .unwrap();
        while let Some(pgno) = reader.next_page(&mut page).unwrap() {
            enc.add_page(pgno, &page).unwrap();
        }
        let (_, forged) = enc.finish(header.state).unwrap();
        replace_object(storage, &built.key, forged).await;
        expect_refusal(&store, "runs", dir.path(), &built.key).await;

        // Objects that do not follow the object named before them.
        let err = compact::build_run(
            storage,
            "runs",
            &objects[1..],
            Some([0; 32]),
            None,
            dir.path(),
        )
        .await
        .err()
        .unwrap();
        assert!(err.to_string().contains(&objects[1].key), "{kind}: {err}");
        let err = compact::build_run(
            storage,
            "runs",
            &objects[2..],
            Some(snapshot_hash),
            None,
            dir.path(),
        )
        .await
        .err()
        .unwrap();
        assert!(err.to_string().contains(&objects[2].key), "{kind}: {err}");
        // A snapshot is a chain start, never part of a run.
        let err = compact::build_run(
            storage,
            "runs",
            &objects[..2],
            Some([0; 32]),
            None,
            dir.path(),
        )
        .await
        .err()
        .unwrap();
        assert!(err.to_string().contains(&objects[0].key), "{kind}: {err}");
    }
}

/// Issue 14: a restore racing the deletion that follows compaction. The
/// restore lists the chain; before it fetches the objects it planned, a run
/// is stored and the objects it stands for deleted (as `watch` does once
/// they age past the exact window). The restore plans itself again from the
/// run and reaches the same state; one aimed inside the deleted stretch is
/// refused, naming the nearest points, and writes nothing.
#[tokio::test]
async fn a_restore_racing_the_deletion_of_replaced_objects_goes_through_the_run() {
    use walsync::compact;
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        for (name, aimed_inside) in [("race", false), ("race-txid", true)] {
            let (_, objects) = build_chain(&store, dir.path(), name).await;
            let storage = store.storage.clone();
            let newest = dir.path().join(format!("{name}-newest.db"));
            let options = |output: PathBuf, target| RestoreOptions {
                prefix: name.into(),
                output,
                target,
                force: false,
                keys: None,
                parallelism: restore::FETCH_PARALLELISM,
            };
            let before = restore::restore(
                storage.as_ref(),
                &options(newest.clone(), restore::Target::Latest),
            )
            .await
            .unwrap();
            let run = compact::build_run(
                storage.as_ref(),
                name,
                &objects[1..],
                None,
                None,
                dir.path(),
            )
            .await
            .unwrap();
            let racing = Racing {
                inner: storage.clone(),
                trigger: objects[1].key.clone(),
                run: std::sync::Mutex::new(Some(run)),
                doomed: objects[1..3].iter().map(|o| o.key.clone()).collect(),
                missed: Default::default(),
            };
            let out = dir.path().join(format!("{name}-raced.db"));
            let target = if aimed_inside {
                restore::Target::Seq(objects[2].seq)
            } else {
                restore::Target::Latest
            };
            let raced = restore::restore(&racing, &options(out.clone(), target)).await;
            assert!(
                racing.missed.load(std::sync::atomic::Ordering::SeqCst) > 0,
                "{kind}: the restore met the deletion"
            );
            let listed = chain::list(storage.as_ref(), name).await.unwrap();
            assert_eq!(listed.len(), 2, "{kind}: {listed:?}");
            if aimed_inside {
                let err = raced.unwrap_err().to_string();
                assert!(
                    err.contains("can no longer be restored exactly")
                        && err.contains(&format!("are {} and {}", objects[0].seq, objects[3].seq)),
                    "{kind}: {err}"
                );
                assert!(!out.exists(), "{kind}: nothing written");
            } else {
                let raced = raced.unwrap();
                assert_eq!((raced.seq, raced.hash), (before.seq, before.hash), "{kind}");
                assert_eq!(raced.objects, 2, "{kind}: the snapshot and the run");
                assert_eq!(rows(&out), rows(&newest), "{kind}");
            }
            let leftovers: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(".walsync-restore")
                })
                .collect();
            assert!(leftovers.is_empty(), "{kind}: {leftovers:?}");
        }
    }
}

/// A store in which, the first time `trigger` is read, `run` is stored and
/// `doomed` deleted: the compactor's deletion, landing between a restore's
/// listing and its downloads.
struct Racing {
    inner: Arc<dyn Storage>,
    trigger: String,
    run: std::sync::Mutex<Option<walsync::compact::Built>>,
    doomed: Vec<String>,
    /// Reads of deleted objects: the restore did meet the deletion.
    missed: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Racing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Racing")
    }
}

impl Racing {
    async fn race(&self, key: &str) {
        if self.doomed.iter().any(|k| k == key) && self.run.lock().unwrap().is_none() {
            self.missed
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        if key != self.trigger {
            return;
        }
        let Some(run) = self.run.lock().unwrap().take() else {
            return;
        };
        self.missed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner
            .put_new(&run.key, run.payload, run.hash)
            .await
            .unwrap();
        for key in &self.doomed {
            self.inner.delete(key).await.unwrap();
        }
    }
}

#[async_trait::async_trait]
impl Storage for Racing {
    async fn put_new(&self, key: &str, body: Payload, sha256: [u8; 32]) -> storage::Result<()> {
        self.inner.put_new(key, body, sha256).await
    }
    async fn get(&self, key: &str) -> storage::Result<storage::ObjectReader> {
        self.race(key).await;
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> storage::Result<Vec<u8>> {
        self.race(key).await;
        self.inner.get_range(key, offset, len).await
    }
    async fn list(&self, prefix: &str) -> storage::Result<Vec<storage::ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> storage::Result<()> {
        self.inner.delete(key).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// A store whose objects `doomed` go right after it first answers a listing
/// of them: `watch` deleting, past the exact window, what runs stand for,
/// between a restore's listing and its reads.
#[derive(Debug)]
struct DeletesAfterListing {
    inner: Arc<dyn Storage>,
    doomed: std::sync::Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Storage for DeletesAfterListing {
    async fn put_new(&self, key: &str, body: Payload, sha256: [u8; 32]) -> storage::Result<()> {
        self.inner.put_new(key, body, sha256).await
    }
    async fn get(&self, key: &str) -> storage::Result<storage::ObjectReader> {
        self.inner.get(key).await
    }
    async fn get_part(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> storage::Result<storage::ObjectReader> {
        self.inner.get_part(key, offset, len).await
    }
    async fn list(&self, prefix: &str) -> storage::Result<Vec<storage::ObjectMeta>> {
        let listed = self.inner.list(prefix).await?;
        let doomed = std::mem::take(&mut *self.doomed.lock().unwrap());
        self.inner.delete_many(&doomed).await?;
        Ok(listed)
    }
    async fn delete(&self, key: &str) -> storage::Result<()> {
        self.inner.delete(key).await
    }
    fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.inner.local_path(key)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Found by CI: a restore to a time reads a few headers to find the point,
/// and one deleted since the listing (the exact window moved past it, a run
/// stands for it) failed the restore as "not found". It lists again and
/// restores the newest point at or before the time that is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_restore_lists_again_when_an_object_it_reads_has_gone() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "app.db");
        let mut app = app_process(&db, 4096);
        insert(&mut app, 5, 100);
        let mut r = open_replica(&db, "gone", &store, replica_opts()).await;
        let mut states = vec![(0, Rows::default())];
        r.sync().await.unwrap();
        states.push((r.head().unwrap().seq, rows(&db)));
        for _ in 0..39 {
            insert(&mut app, 1, 100);
            r.sync().await.unwrap();
            states.push((r.head().unwrap().seq, rows(&db)));
        }
        drop(app);
        let storage = store.storage.as_ref();
        walsync::compact::compact_chain(storage, "gone", &[16], None, dir.path())
            .await
            .unwrap();
        let (objects, runs) = chain::list_with_runs(storage, "gone").await.unwrap();
        assert_eq!(objects.len(), 40, "{kind}");
        assert_eq!(runs.len(), 2, "{kind}: runs 2..=16 and 17..=32");
        let at_20 = objects.iter().find(|o| o.seq == 20).unwrap();
        let time = chain::read_header(storage, at_20)
            .await
            .unwrap()
            .timestamp_ms;
        let doomed = objects
            .iter()
            .filter(|o| (2..=32).contains(&o.seq))
            .map(|o| o.key.clone())
            .collect();
        let going = DeletesAfterListing {
            inner: store.storage.clone(),
            doomed: std::sync::Mutex::new(doomed),
        };
        let out = dir.path().join("at-20.db");
        let report = restore::restore(
            &going,
            &RestoreOptions {
                prefix: "gone".into(),
                output: out.clone(),
                target: restore::Target::Time(time),
                force: false,
                keys: None,
                parallelism: restore::FETCH_PARALLELISM,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{kind}: {e}"));
        // 20 went; 16, the end of the run before it, is the newest point left.
        assert_eq!(report.seq, 16, "{kind}");
        let want = &states.iter().find(|(seq, _)| *seq == 16).unwrap().1;
        assert_eq!(&rows(&out), want, "{kind}");
    }
}

/// The task syncing a database panics (its first open lists a store that
/// panics): `watch` does not leave that database marked as syncing for good
/// but opens it again at its next sync, and it is replicated; the panic is
/// logged as a failed sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_task_that_panics_is_opened_again_and_replicates() {
    use walsync::replicator::{self, DbSpec, Plan};
    let store = common::fs_store();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let conn = common::create_db(&db, 10);
    let storage: Arc<dyn Storage> = InjectOnce::over(&store.storage, false, true);
    let plan = Plan::Fixed {
        specs: vec![DbSpec {
            path: db.clone(),
            prefix: "app".into(),
            storage,
            sync: common::replica_opts(),
        }],
        watch: walsync::config::WatchSettings::default(),
    };
    let token = tokio_util::sync::CancellationToken::new();
    let board = walsync::status::Board::default();
    let run = tokio::spawn(replicator::run(
        plan,
        token.clone(),
        replicator::Hooks {
            board: board.clone(),
            ..replicator::Hooks::default()
        },
    ));
    common::wait_for_objects(&store, "app", 1, String::new).await;
    conn.execute("INSERT INTO t(v) VALUES ('after the panic')", [])
        .unwrap();
    common::wait_for_objects(&store, "app", 2, String::new).await;
    let status = board.snapshot();
    let app = status.databases.iter().find(|d| d.prefix == "app").unwrap();
    assert_eq!(app.errors.get("worker"), Some(&1), "{app:?}");
    token.cancel();
    run.await.unwrap().unwrap();
    let out = dir.path().join("restored.db");
    common::restore(&store, "app", &out, restore::Target::Latest, None)
        .await
        .unwrap();
    assert_eq!(common::rows(&out), common::rows(&db));
}

/// A store that, at every listing, also names an object that is not there
/// (listed, then gone when read: a running watch deleting what passed the
/// exact window): a different one each time unless `same`.
#[derive(Debug)]
struct ListsAGhost {
    inner: Arc<dyn Storage>,
    listings: std::sync::atomic::AtomicU64,
    same: bool,
}

#[async_trait::async_trait]
impl Storage for ListsAGhost {
    async fn put_new(&self, key: &str, body: Payload, sha256: [u8; 32]) -> storage::Result<()> {
        self.inner.put_new(key, body, sha256).await
    }
    async fn get(&self, key: &str) -> storage::Result<storage::ObjectReader> {
        self.inner.get(key).await
    }
    async fn get_part(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> storage::Result<storage::ObjectReader> {
        self.inner.get_part(key, offset, len).await
    }
    async fn list(&self, prefix: &str) -> storage::Result<Vec<storage::ObjectMeta>> {
        let mut listed = self.inner.list(prefix).await?;
        let n = self
            .listings
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // Past the head, where nothing links to it.
        let seq = if self.same { 1000 } else { 1000 + n };
        if let Some(last) = listed.last().cloned() {
            listed.push(storage::ObjectMeta {
                key: segment::object_key("ghost", seq),
                ..last
            });
        }
        Ok(listed)
    }
    async fn delete(&self, key: &str) -> storage::Result<()> {
        self.inner.delete(key).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// `verify` beside a watch that keeps deleting: when every listing meets an
/// object gone by the time it is read, what differs from one listing to the
/// next is the store moving on, not a problem (CI-like runs beside a
/// compacting watch reported a whole chain broken); what every listing
/// finds is still reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_only_what_every_listing_finds_wrong() {
    use walsync::restore::verify::{Depth, verify};
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let db = db_in(&dir, "ghost.db");
        let mut app = app_process(&db, 4096);
        insert(&mut app, 5, 100);
        let mut r = open_replica(&db, "ghost", &store, replica_opts()).await;
        r.sync().await.unwrap();
        for _ in 0..3 {
            insert(&mut app, 1, 100);
            r.sync().await.unwrap();
        }
        drop(app);
        for same in [false, true] {
            let ghosts = ListsAGhost {
                inner: store.storage.clone(),
                listings: Default::default(),
                same,
            };
            let report = verify(&ghosts, "ghost", None, dir.path(), None, Depth::ChainOnly)
                .await
                .unwrap();
            let listings = ghosts.listings.load(std::sync::atomic::Ordering::SeqCst);
            assert!(listings > 1, "{kind}: listed again: {listings}");
            if same {
                assert!(
                    !report.problems.is_empty()
                        && report.problems.iter().all(|p| p.contains("not found")),
                    "{kind}: {:?}",
                    report.problems
                );
            } else {
                assert_eq!(report.problems, Vec::<String>::new(), "{kind}");
            }
        }
    }
}
