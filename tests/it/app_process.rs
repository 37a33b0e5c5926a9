//! walsync against an app in **another process** (DESIGN.md invariants 2 and
//! 2a; issue 9). SQLite's WAL locks are POSIX advisory locks, which never
//! conflict within one process: only an app in its own process can show that
//! walsync's pin and write lock really hold. The app is
//! `tests/app/sqlite_app.py` (see `tests/it/common/app.rs`).
//!
//! Every scenario runs against every store (the local directory and S3), the
//! stores side by side. Durations come from the environment so that the same
//! tests serve CI and long torture runs (`bench/torture_loop.sh`):
//! `WALSYNC_TEST_STEADY_SECS` (default 20), `WALSYNC_TEST_BULK_SECS` (the
//! ignored bulk runs, default 10) and `WALSYNC_TEST_SHORT_BULK_SECS` (the bulk
//! runs CI always does, default 3).

use crate::common;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use sha2::{Digest as _, Sha256};
use walsync::chain;
use walsync::db::Database;
use walsync::object::{Link, New};
use walsync::replica::{self, Replica, SyncOptions, SyncReport};
use walsync::restore;
use walsync::segment::Kind;

use common::app::{AppOptions, AppProcess};
use common::{
    TestStore, count_snapshots, open_replica, replica_opts, wait_for_objects, wal_generations,
    walsync,
};

/// Commits per second of the steady-state apps.
const STEADY_RATE: u32 = 300;

fn env_secs(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: expected seconds")),
        Err(_) => default,
    }
}

fn steady_secs() -> f64 {
    env_secs("WALSYNC_TEST_STEADY_SECS", 20.0)
}

fn bulk_secs() -> f64 {
    env_secs("WALSYNC_TEST_BULK_SECS", 10.0)
}

fn short_bulk_secs() -> f64 {
    env_secs("WALSYNC_TEST_SHORT_BULK_SECS", 3.0)
}

/// Runs `scenario` once per store, the stores concurrently; a panic in any
/// of them fails the test with its message.
async fn each_store<F, Fut>(scenario: F)
where
    F: Fn(&'static str, TestStore) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut tasks = Vec::new();
    for (kind, store) in common::all_stores().await {
        tasks.push(tokio::spawn(scenario(kind, store)));
    }
    for task in tasks {
        if let Err(e) = task.await {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// What a database holds, compactly: rows, highest id, SHA-256 of every row.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Digest {
    rows: i64,
    max_id: i64,
    sha256: String,
}

fn digest(path: &Path) -> Digest {
    let conn = Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(30)).unwrap();
    let mut stmt = conn.prepare("SELECT id, v FROM t ORDER BY id").unwrap();
    let mut rows = stmt.query([]).unwrap();
    let mut hash = Sha256::new();
    let (mut n, mut max_id) = (0i64, 0i64);
    while let Some(row) = rows.next().unwrap() {
        let id: i64 = row.get(0).unwrap();
        let v = row.get_ref(1).unwrap();
        let bytes = v.as_blob().unwrap_or_default();
        hash.update(id.to_le_bytes());
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
        n += 1;
        max_id = id;
    }
    Digest {
        rows: n,
        max_id,
        sha256: hash.finalize().iter().map(|b| format!("{b:02x}")).collect(),
    }
}

fn has_row(path: &Path, id: i64) -> bool {
    let conn = Connection::open(path).unwrap();
    conn.query_row("SELECT count(*) FROM t WHERE id = ?1", [id], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap()
        == 1
}

/// `PRAGMA integrity_check` of a file: "ok" or its problems.
fn integrity(path: &Path) -> String {
    let conn = Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(30)).unwrap();
    let mut stmt = conn.prepare("PRAGMA integrity_check").unwrap();
    let lines: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    lines.join(" | ")
}

async fn restore_to(
    store: &TestStore,
    prefix: &str,
    out: &Path,
    target: restore::Target,
) -> Result<(), String> {
    common::restore(store, prefix, out, target, None).await
}

/// The newest state in storage, restored beside the source.
async fn restored_digest(store: &TestStore, prefix: &str, dir: &Path) -> Digest {
    let out = dir.join(format!("{}-restored.db", prefix.replace('/', "_")));
    restore_to(store, prefix, &out, restore::Target::Latest)
        .await
        .unwrap_or_else(|e| panic!("{prefix}: restore of the head failed: {e}"));
    digest(&out)
}

/// Restores every snapshot and a sample of segments (by sequence number):
/// each must restore (restore itself runs `integrity_check`) and pass
/// `PRAGMA integrity_check` again here. Returns how many were checked.
async fn check_restore_points(store: &TestStore, prefix: &str, dir: &Path, kind: &str) -> usize {
    let objects = chain::list(store.storage.as_ref(), prefix).await.unwrap();
    let mut seqs: Vec<u64> = objects
        .iter()
        .filter(|o| o.kind == Kind::Snapshot)
        .map(|o| o.seq)
        .collect();
    let segments: Vec<u64> = objects
        .iter()
        .filter(|o| o.kind == Kind::Wal)
        .map(|o| o.seq)
        .collect();
    // Ten spread over the chain, the last one, and the first after each snapshot.
    let step = (segments.len() / 10).max(1);
    seqs.extend(segments.iter().step_by(step));
    seqs.extend(segments.last());
    for s in objects.iter().filter(|o| o.kind == Kind::Snapshot) {
        seqs.extend(segments.iter().find(|&&seq| seq > s.seq));
    }
    seqs.sort_unstable();
    seqs.dedup();
    let out = dir.join(format!("{}-point.db", prefix.replace('/', "_")));
    let mut failures = Vec::new();
    for &seq in &seqs {
        match restore_to(store, prefix, &out, restore::Target::Seq(seq)).await {
            Ok(()) => {
                let check = integrity(&out);
                if check != "ok" {
                    failures.push(format!("seq {seq}: integrity_check: {check}"));
                }
            }
            Err(e) => failures.push(format!("seq {seq}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{kind} {prefix}: {} of {} restore points failed: {failures:#?}",
        failures.len(),
        seqs.len()
    );
    seqs.len()
}

/// What a run of syncs did, for the assertions after it.
#[derive(Debug, Default)]
struct SyncLog {
    syncs: u64,
    snapshot_reasons: Vec<&'static str>,
    checkpoints: u64,
    /// The write lock or a snapshot's lock could not be had in time.
    busy: u64,
    /// Anything else that failed.
    errors: Vec<String>,
}

impl SyncLog {
    fn record(&mut self, result: replica::Result<SyncReport>) {
        self.syncs += 1;
        match result {
            Ok(report) => {
                self.snapshot_reasons.extend(report.snapshot_reasons);
                self.checkpoints += report.checkpoint_modes.len() as u64;
            }
            Err(replica::Error::Busy { .. }) => self.busy += 1,
            Err(e) => {
                if self.errors.len() < 20 {
                    self.errors.push(e.to_string());
                }
            }
        }
    }

    /// Continuity snapshots: every snapshot but the first one.
    fn unexpected_snapshots(&self) -> Vec<&'static str> {
        self.snapshot_reasons
            .iter()
            .copied()
            .filter(|r| *r != "initial")
            .collect()
    }
}

/// Syncs until nothing is left to ship (commits SQLite was still publishing included).
async fn sync_to_end(r: &mut Replica, log: &mut SyncLog) {
    for _ in 0..100 {
        log.record(r.sync().await);
        if !r.wants_recheck() && log.errors.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // One more with nothing new: the head is what the source holds.
    log.record(r.sync().await);
}

async fn wait_app(app: &mut AppProcess) -> Result<String, String> {
    loop {
        if let Some(reply) = app.try_finish(Duration::ZERO) {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One database replicated through the in-process [`Replica`] API while
/// its app (another process) runs a loop.
struct Case {
    name: &'static str,
    db: PathBuf,
    app: AppProcess,
    replica: Replica,
    log: SyncLog,
    loop_reply: Option<Result<String, String>>,
}

/// Syncs every case every `period` until each app's started loop replied,
/// then syncs them to the end.
async fn drive(cases: &mut [Case], period: Duration) {
    loop {
        let mut running = false;
        for c in cases.iter_mut() {
            if c.loop_reply.is_none() {
                c.loop_reply = c.app.try_finish(Duration::ZERO);
                running |= c.loop_reply.is_none();
            }
            let result = c.replica.sync().await;
            c.log.record(result);
        }
        if !running {
            break;
        }
        tokio::time::sleep(period).await;
    }
    for c in cases.iter_mut() {
        sync_to_end(&mut c.replica, &mut c.log).await;
    }
}

fn steady_app(db: &Path, autocheckpoint: Option<u32>) -> AppProcess {
    let mut app = AppProcess::spawn(
        db,
        AppOptions {
            autocheckpoint,
            // Several hundred commits a second even where fsync is slow.
            synchronous: Some("NORMAL"),
            ..AppOptions::default()
        },
    );
    app.insert(100, 200);
    app
}

async fn steady_state_replica(kind: &'static str, store: TestStore) {
    let secs = steady_secs();
    let dir = tempfile::tempdir().unwrap();
    let mut cases = Vec::new();
    for (name, autocheckpoint) in [("default", None), ("ac100", Some(100))] {
        let db = dir.path().join(format!("{name}.db"));
        let app = steady_app(&db, autocheckpoint);
        let replica = open_replica(&db, name, &store, replica_opts()).await;
        cases.push(Case {
            name,
            db,
            app,
            replica,
            log: SyncLog::default(),
            loop_reply: None,
        });
    }
    for c in &mut cases {
        c.app.start_rate_insert(STEADY_RATE, secs, 200);
    }
    drive(&mut cases, Duration::from_millis(100)).await;
    for c in &mut cases {
        let name = c.name;
        let commits = c.loop_reply.take().unwrap();
        let commits = commits.unwrap_or_else(|e| panic!("{kind} {name}: app failed: {e}"));
        let snapshots = count_snapshots(store.storage.as_ref(), name).await;
        let generations = wal_generations(store.storage.as_ref(), name).await;
        let context = format!(
            "{kind} {name}: {commits} commits in {secs} s, {snapshots} snapshots, \
             {generations} WAL generations, {:?}",
            c.log
        );
        assert!(c.log.errors.is_empty(), "{context}");
        assert_eq!(
            restored_digest(&store, name, dir.path()).await,
            digest(&c.db),
            "{context}"
        );
        assert_eq!(
            c.log.unexpected_snapshots(),
            Vec::<&str>::new(),
            "{context}"
        );
        assert_eq!(snapshots, 1, "{context}");
        if secs >= 10.0 {
            // walsync's own checkpoints restarted the WAL, and the chain went on.
            assert!(generations > 1, "{context}");
        }
    }
}

/// An app at several hundred commits/s, with SQLite's default
/// auto-checkpoint and with 100 pages: one snapshot (the first) in all, and
/// the restore is the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn steady_state_app_process_takes_exactly_one_snapshot() {
    each_store(steady_state_replica).await;
}

async fn checkpointer_replica(kind: &'static str, store: TestStore) {
    let secs = steady_secs();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ck.db");
    let app = steady_app(&db, None);
    let mut checkpointer = AppProcess::spawn(
        &db,
        AppOptions {
            busy_timeout_ms: Some(100),
            ..AppOptions::default()
        },
    );
    let replica = open_replica(&db, "ck", &store, replica_opts()).await;
    let mut cases = [Case {
        name: "ck",
        db: db.clone(),
        app,
        replica,
        log: SyncLog::default(),
        loop_reply: None,
    }];
    // The first snapshot before the checkpointer starts.
    cases[0].log.record(cases[0].replica.sync().await);
    cases[0].app.start_rate_insert(STEADY_RATE, secs, 200);
    checkpointer.start_checkpoint_loop(&["PASSIVE", "FULL", "RESTART", "TRUNCATE"], 200, secs);
    drive(&mut cases, Duration::from_millis(100)).await;
    let loops = wait_app(&mut checkpointer).await.unwrap();
    let [c] = &mut cases;
    let commits = c.loop_reply.take().unwrap().unwrap();
    let snapshots = count_snapshots(store.storage.as_ref(), "ck").await;
    let context = format!(
        "{kind}: {commits} commits in {secs} s, checkpointer: {loops}; {snapshots} snapshots, {:?}",
        c.log
    );
    assert!(c.log.errors.is_empty(), "{context}");
    assert_eq!(
        restored_digest(&store, "ck", dir.path()).await,
        digest(&db),
        "{context}"
    );
    assert_eq!(
        c.log.unexpected_snapshots(),
        Vec::<&str>::new(),
        "{context}"
    );
    assert_eq!(snapshots, 1, "{context}");
    let counts = common::app::CheckpointLoop::parse_reply(&loops);
    assert_eq!(counts.errors, 0, "{context}");
    let (restarts, restart_busy) = counts.mode("RESTART");
    let (truncates, truncate_busy) = counts.mode("TRUNCATE");
    assert!(restarts > 0 && truncates > 0, "{context}");
    // The pin holds frames not yet shipped: the app cannot restart past them.
    assert!(restart_busy + truncate_busy > 0, "{context}");
}

/// A second app process runs wal_checkpoint(PASSIVE), (FULL), (RESTART) and
/// (TRUNCATE) in turn while the first writes: still one snapshot, the
/// restore is the source, and RESTART/TRUNCATE report busy while frames are
/// unshipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpointing_app_process_cannot_restart_past_unshipped_frames() {
    each_store(checkpointer_replica).await;
}

/// The pin, directly: after walsync has read the WAL (and shipped some of
/// it), another process's RESTART or TRUNCATE must not get past the frames
/// it has not shipped yet.
async fn pin_after_read(kind: &'static str, store: TestStore) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("pin.db");
    let mut app = AppProcess::spawn(
        &db,
        AppOptions {
            busy_timeout_ms: Some(100),
            autocheckpoint: Some(0),
            ..AppOptions::default()
        },
    );
    app.insert_each(20, 100);
    let mut r = open_replica(&db, "pin", &store, replica_opts()).await;
    let mut log = SyncLog::default();
    log.record(r.sync().await);
    for mode in ["RESTART", "TRUNCATE"] {
        app.insert_each(10, 100);
        // walsync reads the WAL and ships it.
        log.record(r.sync().await);
        // Frames it has not read yet.
        app.insert_each(10, 100);
        let ck = app.checkpoint(mode);
        app.insert_each(3, 100);
        log.record(r.sync().await);
        let context = format!("{kind}: {mode} returned {ck:?}; {log:?}");
        assert_eq!(
            ck.busy, 1,
            "{context}: the app restarted the WAL past the pin"
        );
        assert!(log.errors.is_empty(), "{context}");
        assert_eq!(log.unexpected_snapshots(), Vec::<&str>::new(), "{context}");
    }
    sync_to_end(&mut r, &mut log).await;
    assert_eq!(
        restored_digest(&store, "pin", dir.path()).await,
        digest(&db),
        "{kind}: {log:?}"
    );
    assert_eq!(
        count_snapshots(store.storage.as_ref(), "pin").await,
        1,
        "{kind}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pin_holds_against_another_process_after_walsync_reads_the_wal() {
    each_store(pin_after_read).await;
}

/// The sealed case: after walsync's own complete checkpoint, the app
/// restarts the WAL with commit A, runs TRUNCATE and commits B before
/// walsync reads again. With the pin held the TRUNCATE cannot copy A and
/// reports busy; if it did truncate, the chain cannot simply continue (A
/// would be missing): walsync must take a snapshot and say why. Either way
/// the restore is the source. `idle_sync` adds a sync with nothing new
/// between the seal and the app's commits, as a timer or a reader's file
/// event would.
/// An app process that wrote `rows` commits and a replica of it under
/// `name` whose last sync shipped five more and sealed the WAL.
struct Sealed {
    db: PathBuf,
    app: AppProcess,
    r: Replica,
    log: SyncLog,
}

async fn sealed(kind: &str, store: &TestStore, dir: &Path, name: &str, rows: usize) -> Sealed {
    let db = dir.join(format!("{name}.db"));
    let mut app = AppProcess::spawn(
        &db,
        AppOptions {
            busy_timeout_ms: Some(100),
            ..AppOptions::default()
        },
    );
    app.insert_each(rows, 100);
    let opts = SyncOptions {
        checkpoint_pages: 1,
        ..replica_opts()
    };
    let mut r = open_replica(&db, name, store, opts).await;
    let mut log = SyncLog::default();
    log.record(r.sync().await);
    app.insert_each(5, 100);
    let report = r.sync().await.unwrap();
    assert_eq!(report.checkpoint_modes, ["passive"], "{kind}: {report:?}");
    assert!(
        r.next_wakeup().is_none(),
        "{kind}: the checkpoint did not seal the WAL"
    );
    Sealed { db, app, r, log }
}

async fn sealed_then_restart_truncate(kind: &'static str, store: TestStore, idle_sync: bool) {
    let dir = tempfile::tempdir().unwrap();
    let Sealed {
        db,
        mut app,
        mut r,
        mut log,
    } = sealed(kind, &store, dir.path(), "sealed", 50).await;
    if idle_sync {
        log.record(r.sync().await);
    }
    // A has overflow pages of its own, which B's commit does not rewrite:
    // skipping A's generation loses them even where B's pages carry A's row.
    let a = app.insert_each(1, 20_000);
    let ck = app.checkpoint("TRUNCATE");
    let b = app.insert_each(1, 100);
    let report = r.sync().await;
    let context = format!("{kind} (idle sync: {idle_sync}): TRUNCATE {ck:?}, then {report:?}");
    let report = report.unwrap();
    sync_to_end(&mut r, &mut log).await;
    let out = dir.path().join("restored.db");
    restore_to(&store, "sealed", &out, restore::Target::Latest)
        .await
        .unwrap_or_else(|e| panic!("{context}: the restore failed: {e}"));
    assert!(has_row(&db, a) && has_row(&db, b), "{context}");
    assert_eq!(integrity(&out), "ok", "{context}");
    assert!(has_row(&out, a), "{context}: commit A ({a}) was lost");
    assert!(has_row(&out, b), "{context}: commit B ({b}) was lost");
    assert_eq!(digest(&out), digest(&db), "{context}");
    let snapshots = count_snapshots(store.storage.as_ref(), "sealed").await;
    if ck.busy == 0 {
        assert!(
            report.snapshot_reasons.contains(&"continuity"),
            "{context}: the WAL was truncated past commit A, yet no snapshot says so"
        );
    } else {
        // The pin kept A in the WAL: nothing to recover, so no snapshot either.
        assert_eq!(snapshots, 1, "{context}; {log:?}");
    }
    assert!(log.errors.is_empty(), "{context}; {log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_seal_restart_truncate_and_commit_lose_nothing() {
    each_store(|kind, store| sealed_then_restart_truncate(kind, store, false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_seal_and_an_idle_sync_restart_truncate_and_commit_lose_nothing() {
    each_store(|kind, store| sealed_then_restart_truncate(kind, store, true)).await;
}

/// After a seal, an app that runs TRUNCATE twice with no commit in between
/// (say a checkpoint on a timer, while idle) moves salt-1 on twice, and
/// loses nothing: the restore is the source, with no snapshot.
async fn idle_truncates_after_a_seal(kind: &'static str, store: TestStore) {
    let dir = tempfile::tempdir().unwrap();
    let Sealed {
        db,
        mut app,
        mut r,
        mut log,
    } = sealed(kind, &store, dir.path(), "idle", 20).await;
    let first = app.checkpoint("TRUNCATE");
    let second = app.checkpoint("TRUNCATE");
    app.insert_each(3, 100);
    sync_to_end(&mut r, &mut log).await;
    let context = format!("{kind}: TRUNCATE {first:?} then {second:?}; {log:?}");
    assert!(log.errors.is_empty(), "{context}");
    assert_eq!(
        restored_digest(&store, "idle", dir.path()).await,
        digest(&db),
        "{context}"
    );
    // SQLite's commit counter proves the two empty generations held nothing.
    assert_eq!(
        count_snapshots(store.storage.as_ref(), "idle").await,
        1,
        "{context}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_truncates_after_a_seal_lose_nothing() {
    each_store(idle_truncates_after_a_seal).await;
}

/// While walsync holds its write lock (the sealing handshake of a
/// checkpoint), an app process cannot write: `BEGIN IMMEDIATE` with no busy
/// timeout gets SQLITE_BUSY, one with a timeout waits, and both go through
/// once walsync lets go.
#[test]
fn an_app_process_waits_for_the_write_lock_walsync_holds() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("lock.db");
    let mut app = AppProcess::open(&db_path);
    app.insert_each(10, 100);
    let mut db = Database::open(&db_path).unwrap();
    for round in 0..3 {
        app.insert_each(5, 100);
        let link = Link {
            seq: 2 + round,
            prev_hash: [0; 32],
            key: None,
        };
        // Whatever it read (nothing was shipped, so it may call that a
        // loss), it holds the write lock until released.
        let tail = db.lock_and_read_tail(New(link)).unwrap();
        assert!(tail.is_some(), "round {round}: the write lock was not had");
        let err = app
            .begin_write(0)
            .expect_err("the app took the write lock walsync holds");
        assert!(
            err.contains("SQLITE_BUSY") || err.contains("locked"),
            "round {round}: {err}"
        );
        // A writer with a busy timeout waits, and is let in on release.
        app.start("begin_write 20000");
        assert_eq!(
            app.try_finish(Duration::from_millis(500)),
            None,
            "round {round}: the app's write did not wait for walsync's lock"
        );
        db.release_write_lock().unwrap();
        app.finish().unwrap();
        app.ok("insert_each 1 10");
        app.commit();
        app.begin_write(0).unwrap();
        app.rollback();
        // What was read under the lock is not shipped here: nothing to record.
    }
    assert_eq!(app.count(), 10 + 3 * 6);
}

// ---------------------------------------------------------------------------
// The real binary: `walsync watch` as its own process, the apps as theirs.

/// `walsync watch DB... --storage URL ARGS`, logging to a file.
struct Watch {
    child: Child,
    log: PathBuf,
}

impl Watch {
    fn spawn(store: &TestStore, dbs: &[&Path], args: &[&str], log: PathBuf) -> Self {
        let mut cmd = walsync();
        cmd.arg("watch")
            .args(dbs)
            .args(["--storage", &store.url])
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in &store.env {
            cmd.env(k, v);
        }
        Self {
            child: cmd.spawn().unwrap(),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then its exit status and log.
    async fn terminate(mut self) -> (ExitStatus, String) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child, which has not been reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "walsync did not exit after SIGTERM:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Lines of walsync's log that announce a snapshot after the first one.
fn continuity_lines(log: &str, prefix: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("taking a snapshot") && l.contains(&format!("prefix={prefix}")))
        .filter(|l| !l.contains("no replica in storage yet"))
        .map(str::to_string)
        .take(5)
        .collect()
}

/// The end of a log, for an assertion message.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// What a watched app did, for the checks after walsync stopped.
struct Watched {
    name: &'static str,
    db: PathBuf,
    app: AppProcess,
    reply: Option<Result<String, String>>,
}

/// Starts `walsync watch` on the apps' databases, waits for the first
/// snapshots, lets `start` set each app going, waits for all of them, stops
/// walsync with SIGTERM and checks: exit 0 with everything flushed, the
/// source passes integrity_check, the restore of the head is the source,
/// every snapshot and a sample of segments restore and pass integrity_check,
/// and there is exactly one snapshot per database.
async fn watch_run(
    kind: &'static str,
    store: &TestStore,
    dir: &Path,
    apps: &mut [Watched],
    args: &[&str],
    start: impl Fn(&mut AppProcess),
) {
    let dbs: Vec<&Path> = apps.iter().map(|a| a.db.as_path()).collect();
    let watch = Watch::spawn(store, &dbs, args, dir.join("walsync.log"));
    for a in apps.iter() {
        wait_for_objects(store, a.name, 1, || {
            format!("walsync's log:\n{}", watch.log())
        })
        .await;
    }
    for a in apps.iter_mut() {
        start(&mut a.app);
    }
    for a in apps.iter_mut() {
        a.reply = Some(wait_app(&mut a.app).await);
    }
    let (status, log) = watch.terminate().await;
    let context = |name: &str| {
        format!(
            "{kind} {name} (walsync {args:?}); continuity snapshots logged: {:#?}; \
             end of walsync's log:\n{}",
            continuity_lines(&log, name),
            tail(&log)
        )
    };
    assert!(status.success(), "exit {status}: {}", context(""));
    assert!(log.contains("every database flushed"), "{}", context(""));
    for a in apps.iter_mut() {
        let name = a.name;
        let reply = a.reply.take().unwrap();
        let commits = reply.unwrap_or_else(|e| panic!("{kind} {name}: the app failed: {e}"));
        let context = format!("{commits} commits: {}", context(name));
        assert_eq!(a.app.integrity_check(), "ok", "source: {context}");
        assert_eq!(integrity(&a.db), "ok", "source: {context}");
        let source = digest(&a.db);
        assert_eq!(
            restored_digest(store, name, dir).await,
            source,
            "restore of the head: {context}"
        );
        let checked = check_restore_points(store, name, dir, kind).await;
        assert!(checked >= 1, "{context}");
        assert_eq!(
            count_snapshots(store.storage.as_ref(), name).await,
            1,
            "snapshots: {context}"
        );
    }
}

fn watched(dir: &Path, name: &'static str, opts: AppOptions) -> Watched {
    let db = dir.join(format!("{name}.db"));
    let mut app = AppProcess::spawn(&db, opts);
    app.insert(100, 200);
    Watched {
        name,
        db,
        app,
        reply: None,
    }
}

async fn steady_state_watch(kind: &'static str, store: TestStore) {
    let secs = steady_secs();
    let dir = tempfile::tempdir().unwrap();
    let normal = |autocheckpoint| AppOptions {
        autocheckpoint,
        synchronous: Some("NORMAL"),
        ..AppOptions::default()
    };
    let mut apps = [
        watched(dir.path(), "default", normal(None)),
        watched(dir.path(), "ac100", normal(Some(100))),
    ];
    watch_run(kind, &store, dir.path(), &mut apps, &[], |app| {
        app.start_rate_insert(STEADY_RATE, secs, 200)
    })
    .await;
}

/// The steady state with the real `walsync watch` and its default settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn steady_state_under_walsync_watch_takes_exactly_one_snapshot() {
    each_store(steady_state_watch).await;
}

/// Tight-loop writers with `synchronous=NORMAL`, one with auto-checkpoint
/// off and one with SQLite's default, under `walsync watch` with defaults.
async fn bulk_writers(kind: &'static str, store: TestStore, secs: f64) {
    let dir = tempfile::tempdir().unwrap();
    let normal = |autocheckpoint| AppOptions {
        autocheckpoint,
        synchronous: Some("NORMAL"),
        ..AppOptions::default()
    };
    let mut apps = [
        watched(dir.path(), "bulk_noac", normal(Some(0))),
        watched(dir.path(), "bulk_ac", normal(None)),
    ];
    watch_run(kind, &store, dir.path(), &mut apps, &[], |app| {
        app.start_loop_insert(secs, 100)
    })
    .await;
}

/// An app writing 64 KiB blobs (freeing older ones, so overflow pages keep
/// changing hands) under `walsync watch --sync-interval 0`.
async fn blob_writer(kind: &'static str, store: TestStore, secs: f64) {
    let dir = tempfile::tempdir().unwrap();
    let opts = AppOptions {
        synchronous: Some("NORMAL"),
        ..AppOptions::default()
    };
    let mut apps = [watched(dir.path(), "blobs", opts)];
    watch_run(
        kind,
        &store,
        dir.path(),
        &mut apps,
        &["--sync-interval", "0"],
        |app| app.start_blob_loop(secs, 65536, 64),
    )
    .await;
}

/// Issue 14, item 5: a writer that outruns the sync interval, its
/// auto-checkpoint off, under a sync interval of an hour. Only walsync's
/// TRUNCATE can bound the WAL, and the interval would let it grow for an
/// hour; the WAL's growth starts each sync instead, so walsync truncates it
/// again and again while the app writes and it stays near `truncate_pages`,
/// with one object per half `truncate_pages` written, not one per commit. `never_pauses` commits in a tight loop
/// instead of at a fixed rate.
async fn writer_outrunning_the_interval(kind: &'static str, store: TestStore, never_pauses: bool) {
    const TRUNCATE_PAGES: u64 = 500;
    let dir = tempfile::tempdir().unwrap();
    let opts = AppOptions {
        autocheckpoint: Some(0),
        synchronous: Some("NORMAL"),
        ..AppOptions::default()
    };
    let mut a = watched(dir.path(), "outrun", opts);
    let watch = Watch::spawn(
        &store,
        &[a.db.as_path()],
        &[
            "--sync-interval",
            "1h",
            "--truncate-pages",
            &TRUNCATE_PAGES.to_string(),
        ],
        dir.path().join("walsync.log"),
    );
    wait_for_objects(&store, a.name, 1, || {
        format!("walsync's log:\n{}", watch.log())
    })
    .await;
    if never_pauses {
        a.app.start_loop_insert(short_bulk_secs(), 100);
    } else {
        a.app.start_rate_insert(2000, short_bulk_secs(), 100);
    }
    let wal = dir.path().join("outrun.db-wal");
    // The WAL shrinks only when walsync truncates it: with an hour between
    // syncs, only syncs started by its growth can do that while the app writes.
    let (mut largest, mut last, mut truncated) = (0, 0, 0);
    let reply = loop {
        let now = std::fs::metadata(&wal).map_or(0, |m| m.len());
        if now < last {
            truncated += 1;
        }
        (largest, last) = (largest.max(now), now);
        if let Some(reply) = a.app.try_finish(Duration::ZERO) {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let commits: u64 = reply.unwrap().trim().parse().unwrap();
    let shipped_while_writing = chain::list(store.storage.as_ref(), a.name)
        .await
        .unwrap()
        .len();
    let (status, log) = watch.terminate().await;
    assert!(status.success(), "{log}");
    let limit = TRUNCATE_PAGES * 4096;
    let objects = chain::list(store.storage.as_ref(), a.name).await.unwrap();
    eprintln!(
        "{kind}: {commits} commits, largest WAL {largest} bytes ({:.1} x truncate_pages), \
         truncated {truncated} times, {shipped_while_writing} objects while writing, {} in all",
        largest as f64 / limit as f64,
        objects.len()
    );
    assert!(truncated >= 2, "{kind}: truncated {truncated} times\n{log}");
    // Truncating under its own lock keeps the chain: no snapshot after the first.
    assert_eq!(
        count_snapshots(store.storage.as_ref(), a.name).await,
        1,
        "{kind}\n{log}"
    );
    assert!(
        shipped_while_writing >= 3,
        "{kind}: {shipped_while_writing} objects while the app wrote\n{log}"
    );
    // The target is twice `truncate_pages`; this bound only catches a WAL
    // left to grow (the tests share the machine, and a sync can be slow).
    assert!(largest < 8 * limit, "{kind}: WAL grew to {largest}\n{log}");
    assert!(
        // Each commit writes a page: a sync per half `truncate_pages` is a
        // few hundred commits here; one per commit would be thousands.
        (objects.len() as u64) < commits / 20,
        "{kind}: {} objects for {commits} commits",
        objects.len()
    );
    assert_eq!(a.app.integrity_check(), "ok", "{kind}");
    assert_eq!(
        restored_digest(&store, a.name, dir.path()).await,
        digest(&a.db),
        "{kind}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writer_outrunning_the_interval_keeps_the_wal_near_truncate_pages() {
    each_store(|kind, store| writer_outrunning_the_interval(kind, store, false)).await;
}

/// The same with a writer that never pauses (about 30,000 commits a second
/// here, 100-160 MB of WAL a second). Fails in the test (debug) build: no
/// sync finishes while the app runs (no object shipped after the snapshot),
/// so nothing truncates. The release build keeps the WAL under twice
/// `truncate_pages` against the same writer (`bench/bulk_writer.py`,
/// docs/benchmarks.md). Not the write lock: taking it before the read
/// transaction (SQLite's SQLITE_ENABLE_SETLK_TIMEOUT, tried 2026-12-06)
/// changed neither build's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "fails in debug builds only: no sync finishes beside this writer (issue 14, item 5)"]
async fn a_writer_that_never_pauses_keeps_the_wal_near_truncate_pages() {
    each_store(|kind, store| writer_outrunning_the_interval(kind, store, true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulk_writers_lose_nothing_and_every_restore_point_is_sound() {
    each_store(|kind, store| bulk_writers(kind, store, short_bulk_secs())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blob_writer_with_sync_interval_zero_loses_nothing_and_every_restore_point_is_sound() {
    each_store(|kind, store| blob_writer(kind, store, short_bulk_secs())).await;
}

/// The long runs (`WALSYNC_TEST_BULK_SECS`, default 10 s); `bench/torture_loop.sh`
/// repeats them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long: run with --ignored, or bench/torture_loop.sh"]
async fn torture_bulk_writers() {
    each_store(|kind, store| bulk_writers(kind, store, bulk_secs())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long: run with --ignored, or bench/torture_loop.sh"]
async fn torture_blob_writer_with_sync_interval_zero() {
    each_store(|kind, store| blob_writer(kind, store, bulk_secs())).await;
}

/// walsync killed (SIGKILL) while the app writes, the app's TRUNCATE
/// checkpoint while it is down, walsync started again: the restart notices
/// the lost continuity, snapshots once and goes on shipping. Before walsync
/// reopened its connections after an error, this case could leave every later
/// sync failing ("cannot rollback - no transaction is active").
async fn killed_then_truncated(kind: &'static str, store: TestStore) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("killed.db");
    let mut app = AppProcess::spawn(&db, AppOptions::default());
    app.insert(100, 200);
    let first = Watch::spawn(&store, &[&db], &[], dir.path().join("first.log"));
    wait_for_objects(&store, "killed", 1, || {
        format!("walsync's log:\n{}", first.log())
    })
    .await;
    app.start_rate_insert(200, 6.0, 200);
    // Shipping the app's writes when killed: the snapshot and two segments.
    wait_for_objects(&store, "killed", 3, || {
        format!("walsync's log:\n{}", first.log())
    })
    .await;
    drop(first); // SIGKILL: no final sync, no locks left behind
    // Until it is not busy: a busy one truncates nothing, and the restart
    // would then be an ordinary one.
    let mut checkpointer = AppProcess::open(&db);
    let mut truncated = checkpointer.checkpoint("TRUNCATE");
    for _ in 0..50 {
        if truncated.busy == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        truncated = checkpointer.checkpoint("TRUNCATE");
    }
    assert_eq!(truncated.busy, 0, "{kind}: TRUNCATE {truncated:?}");
    let second = Watch::spawn(&store, &[&db], &[], dir.path().join("second.log"));
    let commits = wait_app(&mut app)
        .await
        .unwrap_or_else(|e| panic!("{kind}: the app failed: {e}"));
    let (status, log) = second.terminate().await;
    let context = format!(
        "{kind}: {commits} commits, TRUNCATE {truncated:?}; log:\n{}",
        tail(&log)
    );
    assert!(status.success(), "exit {status}: {context}");
    assert!(log.contains("every database flushed"), "{context}");
    assert!(!log.contains("ERROR"), "{context}");
    // The restart saw the WAL the app truncated under it.
    assert!(
        log.contains("continuity lost") || log.contains("WARN walsync::replica: taking a snapshot"),
        "{context}"
    );
    assert_eq!(integrity(&db), "ok", "source: {context}");
    assert_eq!(
        restored_digest(&store, "killed", dir.path()).await,
        digest(&db),
        "{context}"
    );
    // The first snapshot, and at most one for the restart.
    let snapshots = count_snapshots(store.storage.as_ref(), "killed").await;
    assert!(
        (1..=2).contains(&snapshots),
        "{snapshots} snapshots: {context}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_walsync_restarted_after_the_app_truncated_loses_nothing() {
    each_store(killed_then_truncated).await;
}

// ---------------------------------------------------------------------------
// Lost continuity ships only the pages that changed (issue 10, part 2).

impl Watch {
    /// `walsync watch --config CONFIG`, logging to `log`.
    fn with_config(store: &TestStore, config: &Path, log: PathBuf) -> Self {
        let mut cmd = walsync();
        cmd.args(["watch", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in &store.env {
            cmd.env(k, v);
        }
        Self {
            child: cmd.spawn().unwrap(),
            log,
        }
    }
}

impl Watch {
    /// Waits (up to a minute) until walsync has closed the idle `db`.
    async fn closed(&self, db: &Path, kind: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while holds_open(self.child.id(), db) {
            assert!(
                Instant::now() < deadline,
                "{kind}: walsync never closed the idle database\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `DIR/walsync.toml`: `[watch]` and `[sync]` lines, then one database per
/// `(path, prefix)`.
fn config_for(store: &TestStore, dir: &Path, settings: &str, dbs: &[(&Path, &str)]) -> PathBuf {
    let mut text = settings.to_string();
    for (path, prefix) in dbs {
        text.push_str(&format!(
            "\n[[databases]]\npath = \"{}\"\nprefix = \"{prefix}\"\n",
            path.display()
        ));
    }
    let config = dir.join("walsync.toml");
    std::fs::write(&config, store.config(&text)).unwrap();
    config
}

/// Each object's kind and page count, read from its header.
async fn kinds_and_pages(store: &TestStore, prefix: &str) -> Vec<(Kind, u32)> {
    let mut out = Vec::new();
    for object in chain::list(store.storage.as_ref(), prefix).await.unwrap() {
        let header = chain::read_header(store.storage.as_ref(), &object)
            .await
            .unwrap();
        out.push((header.kind, header.page_count));
    }
    out
}

/// A database of `rows` rows of 1 KiB (about a page each), its app gone.
fn seeded_db(dir: &Path, name: &str, rows: usize) -> PathBuf {
    let db = dir.join(name);
    let mut app = AppProcess::open(&db);
    app.insert(rows, 1000);
    app.quit();
    db
}

/// Whether process `pid` holds a descriptor of `db` or of its side files.
fn holds_open(pid: u32, db: &Path) -> bool {
    let name = db.to_string_lossy().into_owned();
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with(&name))
        })
    })
}

async fn request_per_connection_app(kind: &'static str, store: TestStore) {
    let dir = tempfile::tempdir().unwrap();
    let db = seeded_db(dir.path(), "php.db", 300);
    let config = config_for(
        &store,
        dir.path(),
        "[watch]\nclose_idle_after = \"1s\"\n[sync]\nsync_interval = \"1s\"\n",
        &[(&db, "php")],
    );
    let watch = Watch::with_config(&store, &config, dir.path().join("walsync.log"));
    wait_for_objects(&store, "php", 1, || watch.log()).await;
    for round in 0..3 {
        // walsync has closed the idle database; then a request opens its
        // connection, writes one row and closes it. The last close
        // checkpoints and deletes the WAL before walsync looks.
        watch.closed(&db, kind).await;
        let mut app = AppProcess::open(&db);
        app.insert(1, 100);
        app.quit();
        wait_for_objects(&store, "php", 2 + round, || watch.log()).await;
    }
    let (status, log) = watch.terminate().await;
    assert!(status.success(), "{kind}: {}", tail(&log));
    let objects = kinds_and_pages(&store, "php").await;
    let snapshots = objects.iter().filter(|(k, _)| *k == Kind::Snapshot).count();
    let deltas = objects.iter().filter(|(k, _)| *k == Kind::Delta).count();
    assert_eq!(snapshots, 1, "{kind}: {objects:?}\n{}", tail(&log));
    // Whether a request's close found walsync detached (and deleted the
    // WAL: a delta) or walsync reattached first (a plain segment) is a race
    // on a loaded machine; either way no write may cost a snapshot.
    // `changes_made_while_stopped…` exercises the delta path for certain.
    eprintln!("{kind}: {deltas} of 3 requests shipped as deltas");
    for (k, pages) in &objects[1..] {
        assert!(
            *pages <= 8,
            "{kind}: a {k:?} of {pages} pages for one row: {objects:?}"
        );
    }
    assert_eq!(
        restored_digest(&store, "php", dir.path()).await,
        digest(&db),
        "{kind}"
    );
}

/// An app that opens a connection per request, writes one row and closes it
/// (the last close checkpoints and deletes the WAL) while walsync has the
/// idle database closed: each write costs a few pages, never a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_per_request_app_costs_pages_not_snapshots() {
    each_store(request_per_connection_app).await;
}

/// walsync closes an idle database after its own complete checkpoint; the
/// app then opens it (rebuilding the WAL-index, which forgets what was
/// checkpointed), commits, checkpoints and commits again. The WAL then looks
/// restarted once after walsync's seal while the first commit is only in the
/// database file: that is a lost continuity (a delta), never a skipped
/// commit. Every round's state restores, as `sync --wait` promised.
async fn commit_checkpoint_commit_while_closed(kind: &'static str, store: TestStore) {
    let dir = tempfile::tempdir().unwrap();
    let db = seeded_db(dir.path(), "idle.db", 10);
    let config = config_for(
        &store,
        dir.path(),
        "[watch]\nclose_idle_after = \"1s\"\n\
         [sync]\nsync_interval = \"200ms\"\ncheckpoint_interval = \"300ms\"\n",
        &[(&db, "idle")],
    );
    let watch = Watch::with_config(&store, &config, dir.path().join("walsync.log"));
    wait_for_objects(&store, "idle", 1, || watch.log()).await;
    for round in 0..4 {
        watch.closed(&db, kind).await;
        // At once, as an app does: walsync reopens on the first commit's
        // file event, too late to hold the checkpoint off.
        let mut app = AppProcess::open(&db);
        app.ok("script INSERT INTO t(v) VALUES (hex(randomblob(1500))); \
             PRAGMA wal_checkpoint(TRUNCATE); \
             INSERT INTO t(v) VALUES (hex(randomblob(1500))); \
             INSERT INTO t(v) VALUES (hex(randomblob(1500)));");
        app.quit();
        let mut sync = walsync();
        sync.args(["sync", "--config"]).arg(&config).arg("--wait");
        let synced = sync.output().unwrap();
        assert!(synced.status.success(), "{kind}: {synced:?}");
        let out = dir.path().join(format!("round{round}"));
        std::fs::create_dir(&out).unwrap();
        assert_eq!(
            restored_digest(&store, "idle", &out).await,
            digest(&db),
            "{kind}: round {round}\n{}",
            tail(&watch.log())
        );
    }
    let (status, log) = watch.terminate().await;
    assert!(status.success(), "{kind}: {}", tail(&log));
    assert!(
        log.contains("while walsync had the database closed"),
        "{kind}: no round met walsync closed\n{}",
        tail(&log)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_checkpointed_while_walsync_had_the_database_closed_is_never_skipped() {
    each_store(commit_checkpoint_commit_while_closed).await;
}

async fn restore_all_then_watch(kind: &'static str, store: TestStore) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let a = seeded_db(&src, "a.db", 200);
    let b = seeded_db(&src, "b.db", 50);
    let config = config_for(&store, &src, "", &[(&a, "a"), (&b, "b")]);
    let watch = Watch::with_config(&store, &config, dir.path().join("first.log"));
    wait_for_objects(&store, "a", 1, || watch.log()).await;
    wait_for_objects(&store, "b", 1, || watch.log()).await;
    let (status, _) = watch.terminate().await;
    assert!(status.success());

    let out = dir.path().join("out");
    let mut cmd = walsync();
    cmd.args(["restore-all", "--config"])
        .arg(&config)
        .arg("--output-dir")
        .arg(&out);
    for (k, v) in &store.env {
        cmd.env(k, v);
    }
    let restored = cmd.output().unwrap();
    assert!(
        restored.status.success(),
        "{kind}: {}",
        String::from_utf8_lossy(&restored.stderr)
    );
    let find = |name: &str| -> PathBuf {
        walk(&out)
            .into_iter()
            .find(|p| p.ends_with(name))
            .unwrap_or_else(|| panic!("{name} not restored under {}", out.display()))
    };
    let (ra, rb) = (find("a.db"), find("b.db"));
    let before: Vec<usize> = vec![
        chain::list(store.storage.as_ref(), "a")
            .await
            .unwrap()
            .len(),
        chain::list(store.storage.as_ref(), "b")
            .await
            .unwrap()
            .len(),
    ];
    let moved = dir.path().join("moved");
    std::fs::create_dir(&moved).unwrap();
    let addr = format!("127.0.0.1:{}", crate::cli::free_port());
    let config = config_for(
        &store,
        &moved,
        &format!("[watch]\nlisten = \"{addr}\"\n"),
        &[(&ra, "a"), (&rb, "b")],
    );
    let watch = Watch::with_config(&store, &config, dir.path().join("second.log"));
    // Each database synced once since the start (`sync --wait` answers once
    // a sync that started after it asked is done): what it shipped, if
    // anything, is in storage now.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut sync = walsync();
        sync.args(["sync", "--config"]).arg(&config).arg("--wait");
        for (k, v) in &store.env {
            sync.env(k, v);
        }
        let out = sync.output().unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{kind}: sync --wait never answered: {}\nwalsync's log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            watch.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after: Vec<usize> = vec![
        chain::list(store.storage.as_ref(), "a")
            .await
            .unwrap()
            .len(),
        chain::list(store.storage.as_ref(), "b")
            .await
            .unwrap()
            .len(),
    ];
    assert_eq!(
        after,
        before,
        "{kind}: walsync shipped the databases it was given back:\n{}",
        tail(&watch.log())
    );
    // Every page of each was compared with what was shipped, and matched:
    // nothing was lost, so nothing counts towards a degraded database.
    let (_, status) = crate::cli::http_get(&addr, "/status.json");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    for prefix in ["a", "b"] {
        let d = crate::cli::db_status(&status, prefix);
        assert_eq!(d["continuity_losses"], 0, "{kind}: {d}");
        assert_eq!(d["deltas"], 1, "{kind}: the comparison is counted: {d}");
    }
    let mut app = AppProcess::open(&ra);
    app.insert(1, 100);
    app.quit();
    wait_for_objects(&store, "a", before[0] + 1, || watch.log()).await;
    let (status, log) = watch.terminate().await;
    assert!(status.success(), "{kind}: {}", tail(&log));
    let objects = kinds_and_pages(&store, "a").await;
    assert_eq!(
        objects.iter().filter(|(k, _)| *k == Kind::Snapshot).count(),
        1,
        "{kind}: {objects:?}"
    );
    assert_eq!(
        restored_digest(&store, "a", dir.path()).await,
        digest(&ra),
        "{kind}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// `restore-all`, then `watch` on what it wrote: nothing is shipped until
/// an app writes (the state record restore left proves the files are the
/// chain heads), and then only what the app wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_all_then_watch_ships_nothing_until_the_app_writes() {
    each_store(restore_all_then_watch).await;
}

/// Where walsync keeps the state record of `db` replicated to `prefix` in `store`.
fn record_of(store: &TestStore, db: &Path, prefix: &str) -> PathBuf {
    walsync::state::record_path(
        db,
        &walsync::state::destination(&store.storage.describe(), prefix),
    )
}

/// How a test spoils the state record before walsync restarts.
#[derive(Debug, Clone, Copy)]
enum Spoil {
    Keep,
    Altered,
    Stale,
    Foreign,
}

async fn changed_while_stopped(kind: &'static str, store: TestStore, spoil: Spoil) {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("stopped-{spoil:?}").to_lowercase();
    let db = seeded_db(dir.path(), &format!("{name}.db"), 2000);
    let other = seeded_db(dir.path(), "other.db", 20);
    let config = config_for(
        &store,
        dir.path(),
        "",
        &[(&db, name.as_str()), (&other, "other")],
    );
    let record = record_of(&store, &db, &name);
    let watch = Watch::with_config(&store, &config, dir.path().join("first.log"));
    wait_for_objects(&store, &name, 1, || watch.log()).await;
    wait_for_objects(&store, "other", 1, || watch.log()).await;
    // The record is placed just after the snapshot is in storage.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !record.exists() {
        assert!(
            Instant::now() < deadline,
            "{kind}: no state record at {}",
            record.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let early = std::fs::read(&record).unwrap();
    let mut app = AppProcess::open(&db);
    app.insert(1, 100);
    wait_for_objects(&store, &name, 2, || watch.log()).await;
    app.quit();
    let (status, _) = watch.terminate().await;
    assert!(status.success());
    // While walsync is stopped: ten rows rewritten, then the app's last
    // close checkpoints them into the file and deletes the WAL.
    let mut app = AppProcess::open(&db);
    app.exec("UPDATE t SET v = randomblob(1000) WHERE id % 200 = 7");
    app.quit();
    match spoil {
        Spoil::Keep => {}
        Spoil::Altered => {
            let mut bytes = std::fs::read(&record).unwrap();
            let at = bytes.len() - 100;
            bytes[at] ^= 0x40;
            std::fs::write(&record, bytes).unwrap();
        }
        Spoil::Stale => std::fs::write(&record, early).unwrap(),
        Spoil::Foreign => {
            std::fs::copy(record_of(&store, &other, "other"), &record).unwrap();
        }
    }
    let before = chain::list(store.storage.as_ref(), &name)
        .await
        .unwrap()
        .len();
    let watch = Watch::with_config(&store, &config, dir.path().join("second.log"));
    wait_for_objects(&store, &name, before + 1, || watch.log()).await;
    let (status, log) = watch.terminate().await;
    assert!(status.success(), "{kind} {spoil:?}: {}", tail(&log));
    let objects = kinds_and_pages(&store, &name).await;
    let (last_kind, last_pages) = *objects.last().unwrap();
    match spoil {
        Spoil::Keep => {
            assert_eq!(
                last_kind,
                Kind::Delta,
                "{kind}: {objects:?}\n{}",
                tail(&log)
            );
            assert!(
                (10..=40).contains(&last_pages),
                "{kind}: {last_pages} pages shipped for 10 changed rows"
            );
        }
        _ => {
            assert_eq!(last_kind, Kind::Snapshot, "{kind} {spoil:?}: {objects:?}");
            let why = log
                .lines()
                .find(|l| l.contains("taking a snapshot") && l.contains(&name))
                .unwrap_or_else(|| panic!("{kind} {spoil:?}: no snapshot logged:\n{}", tail(&log)))
                .to_string();
            assert!(why.contains("state record"), "{kind} {spoil:?}: {why}");
        }
    }
    assert_eq!(
        restored_digest(&store, &name, dir.path()).await,
        digest(&db),
        "{kind} {spoil:?}"
    );
}

/// Ten rows changed while walsync was stopped: the restart ships about the
/// pages that changed, not the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_stopped_ship_as_the_pages_that_changed() {
    each_store(|kind, store| changed_while_stopped(kind, store, Spoil::Keep)).await;
}

/// A state record that does not describe the chain head (altered, stale, or
/// another database's) is found out before use: a full snapshot, with why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_does_not_describe_the_head_costs_a_snapshot() {
    for spoil in [Spoil::Altered, Spoil::Stale, Spoil::Foreign] {
        each_store(move |kind, store| changed_while_stopped(kind, store, spoil)).await;
    }
}

/// The POSIX locks process `pid` holds on `file`, as `(start, end)` byte
/// ranges (`/proc/locks`; `end` is `None` for "to the end of the file").
fn locks_held(pid: u32, file: &Path) -> Vec<(u64, Option<u64>)> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(file).unwrap().ino();
    let table = std::fs::read_to_string("/proc/locks").unwrap();
    table
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // "1: POSIX  ADVISORY  WRITE 4321 08:01:5678 0 EOF"; a blocked
            // waiter has "->" after the number.
            let f = if f.get(1) == Some(&"->") {
                &f[1..]
            } else {
                &f[..]
            };
            let held_by_pid = f.get(1) == Some(&"POSIX") && f.get(4) == Some(&&*pid.to_string());
            let on_file = f
                .get(5)
                .and_then(|id| id.rsplit(':').next())
                .is_some_and(|i| i == ino.to_string());
            (held_by_pid && on_file).then(|| (f[6].parse().unwrap(), f[7].parse().ok()))
        })
        .collect()
}

/// A configuration edit that changes only a database's prefix: the old
/// replica's last flush is still uploading when the new one has opened the
/// same file. Closing the old one must not take the new one's pin and
/// claim with it (DESIGN.md 2a: SQLite's locks and walsync's claim belong to
/// the process, and closing any descriptor of the `-shm` drops them all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_changed_by_a_reload_keeps_the_pin_and_the_claim() {
    use common::faults::{FaultProxy, Plan};
    let (mut store, proxy) = FaultProxy::before_s3_store().await;
    for (k, v) in &mut store.env {
        if k == "AWS_ENDPOINT_URL_S3" {
            v.clone_from(&proxy.endpoint);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("moved.db");
    let shm = dir.path().join("moved.db-shm");
    let mut app = AppProcess::spawn(
        &db,
        AppOptions {
            busy_timeout_ms: Some(100),
            autocheckpoint: Some(0),
            ..AppOptions::default()
        },
    );
    app.insert_each(10, 100);
    // Nothing ships or checkpoints on a timer: only the first snapshot, the
    // old replica's last flush and `sync --wait` do.
    let settings = "[sync]\nsync_interval = \"1h\"\ncheckpoint_interval = \"1h\"\n";
    let config = config_for(&store, dir.path(), settings, &[(&db, "old")]);
    let watch = Watch::with_config(&store, &config, dir.path().join("walsync.log"));
    wait_for_objects(&store, "old", 1, || watch.log()).await;
    // Commits the old replica has not shipped: its last flush uploads them,
    // and the store holds that upload 3 s, long after the new one opened.
    app.insert_each(5, 100);
    proxy.set_plan(Plan {
        delay: 1.0,
        delay_for: Duration::from_secs(3),
        delay_only: Some("/old/"),
        ..Plan::healthy()
    });
    config_for(&store, dir.path(), settings, &[(&db, "new")]);
    wait_for_objects(&store, "new", 1, || watch.log()).await;
    wait_for_objects(&store, "old", 2, || watch.log()).await;
    proxy.set_plan(Plan::healthy());
    // The old replica is dropped once its flush returned.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = watch.child.id();

    let claim = 1u64 << 40;
    let locks = locks_held(pid, &shm);
    assert!(
        locks.contains(&(claim, Some(claim))),
        "walsync's claim on the -shm is gone: it holds {locks:?}\n{}",
        tail(&watch.log())
    );
    let mut snap = walsync();
    snap.arg("snapshot")
        .arg(&db)
        .args(["--prefix", "probe", "--storage", &store.url]);
    for (k, v) in &store.env {
        snap.env(k, v);
    }
    let probe = snap.output().unwrap();
    assert!(
        !probe.status.success()
            && String::from_utf8_lossy(&probe.stderr).contains("another walsync process"),
        "a second walsync was let in: {probe:?}"
    );

    // The pin: after walsync read the WAL, frames it has not read yet stay
    // out of the app's TRUNCATE.
    let sync_wait = || {
        let mut sync = walsync();
        sync.args(["sync", "--wait", "--config"]).arg(&config);
        let out = sync.output().unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    app.insert_each(10, 100);
    sync_wait();
    app.insert_each(10, 100);
    let ck = app.checkpoint("TRUNCATE");
    assert_eq!(
        ck.busy,
        1,
        "the app truncated the WAL past walsync's pin: {ck:?}\n{}",
        tail(&watch.log())
    );
    app.insert_each(3, 100);
    sync_wait();
    let (status, log) = watch.terminate().await;
    assert!(status.success(), "{}", tail(&log));
    assert_eq!(
        count_snapshots(store.storage.as_ref(), "new").await,
        1,
        "{}",
        tail(&log)
    );
    assert_eq!(count_snapshots(store.storage.as_ref(), "probe").await, 0);
    assert_eq!(
        restored_digest(&store, "new", dir.path()).await,
        digest(&db)
    );
    app.quit();
}

/// `walsync snapshot` run while a `watch` has the database closed at rest
/// (so unclaimed: a nightly cron job, say) ships an object from this very
/// file. The watch, at the database's next change, sees its state record
/// rewritten, resumes from storage as a restart would, and goes on: it
/// does not take the snapshot's sequence number for a second writer and
/// stop replicating the database for good.
async fn snapshot_while_closed(kind: &'static str, store: TestStore) {
    let dir = tempfile::tempdir().unwrap();
    let db = seeded_db(dir.path(), "cron.db", 20);
    let config = config_for(
        &store,
        dir.path(),
        "[watch]\nclose_idle_after = \"1s\"\n[sync]\nsync_interval = \"200ms\"\n",
        &[(&db, "cron")],
    );
    let watch = Watch::with_config(&store, &config, dir.path().join("walsync.log"));
    wait_for_objects(&store, "cron", 1, || watch.log()).await;
    for round in 0..2 {
        watch.closed(&db, kind).await;
        let mut snap = walsync();
        snap.arg("snapshot")
            .arg(&db)
            .args(["--prefix", "cron", "--storage", &store.url]);
        for (k, v) in &store.env {
            snap.env(k, v);
        }
        let shipped = snap.output().unwrap();
        assert!(shipped.status.success(), "{kind}: {shipped:?}");
        let mut app = AppProcess::open(&db);
        app.insert(5, 500);
        app.quit();
        let mut sync = walsync();
        sync.args(["sync", "--wait", "--config"]).arg(&config);
        let synced = sync.output().unwrap();
        assert!(
            synced.status.success(),
            "{kind}: round {round}: {synced:?}\n{}",
            tail(&watch.log())
        );
        let out = dir.path().join(format!("round{round}"));
        std::fs::create_dir(&out).unwrap();
        assert_eq!(
            restored_digest(&store, "cron", &out).await,
            digest(&db),
            "{kind}: round {round}"
        );
    }
    let (status, log) = watch.terminate().await;
    assert!(status.success(), "{kind}: {}", tail(&log));
    // The first and the two the command took: the watch took none.
    assert_eq!(
        count_snapshots(store.storage.as_ref(), "cron").await,
        3,
        "{kind}: {}",
        tail(&log)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_taken_while_the_watch_had_the_database_closed_does_not_stop_it() {
    each_store(snapshot_while_closed).await;
}

/// A walsync killed (SIGKILL) while the store held its upload: the request
/// had left, and the store finished it after a new walsync had listed the
/// chain without it. The new walsync's first object then finds that
/// sequence number taken. The object there was read from this very WAL, so
/// it lists the chain again and goes on from it, instead of stopping for
/// good as for a second writer; nothing is lost and no snapshot is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_of_a_killed_walsync_landing_after_the_restart_does_not_stop_it() {
    use common::faults::{Counts, FaultProxy, Plan};
    let (mut store, proxy) = FaultProxy::before_s3_store().await;
    for (k, v) in &mut store.env {
        if k == "AWS_ENDPOINT_URL_S3" {
            v.clone_from(&proxy.endpoint);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("late.db");
    let mut app = AppProcess::spawn(&db, AppOptions::default());
    app.insert_each(10, 100);
    let config = config_for(
        &store,
        dir.path(),
        "[sync]\nsync_interval = \"100ms\"\n",
        &[(&db, "late")],
    );
    let first = Watch::with_config(&store, &config, dir.path().join("first.log"));
    wait_for_objects(&store, "late", 1, || first.log()).await;
    // Object 2 reaches the store 4 s after it was sent, sender or not.
    let second_object = "/late/0000000000000002.seg";
    proxy.set_plan(Plan {
        delay: 1.0,
        delay_for: Duration::from_secs(4),
        delay_only: Some(second_object),
        late: true,
        ..Plan::healthy()
    });
    app.insert_each(5, 100);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Counts::get(&proxy.counts().delayed) == 0 {
        assert!(Instant::now() < deadline, "{}", tail(&first.log()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(first); // SIGKILL, its upload on its way
    // The new walsync's own object 2 is held longer, so the dead one's lands first.
    proxy.set_plan(Plan {
        delay: 1.0,
        delay_for: Duration::from_secs(7),
        delay_only: Some(second_object),
        ..Plan::healthy()
    });
    let second = Watch::with_config(&store, &config, dir.path().join("second.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !second.log().contains("continuing the chain") {
        assert!(Instant::now() < deadline, "{}", tail(&second.log()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        Counts::get(&proxy.counts().landed_late),
        0,
        "the killed walsync's upload landed before the restart listed the chain: \
         nothing was tested"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !second.log().contains("going on from it") {
        assert!(
            Instant::now() < deadline && !second.log().contains("another writer"),
            "{}",
            tail(&second.log())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.insert_each(5, 100);
    let mut sync = walsync();
    sync.args(["sync", "--wait", "--config"]).arg(&config);
    let synced = sync.output().unwrap();
    assert!(
        synced.status.success(),
        "{synced:?}\n{}",
        tail(&second.log())
    );
    let (status, log) = second.terminate().await;
    assert!(status.success(), "{}", tail(&log));
    assert_eq!(
        count_snapshots(store.storage.as_ref(), "late").await,
        1,
        "{}",
        tail(&log)
    );
    assert_eq!(
        restored_digest(&store, "late", dir.path()).await,
        digest(&db)
    );
    app.quit();
}

/// One edit that swaps two databases' prefixes: each prefix's old
/// database flushes what it had not shipped, and only then does its new
/// database start writing there. Neither finds a sequence number taken (as
/// if by a second writer) and stops; each prefix restores to the database
/// now configured for it.
async fn prefixes_swapped(kind: &'static str, store: TestStore) {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    let mut app_a = AppProcess::open(&a);
    let mut app_b = AppProcess::open(&b);
    app_a.insert(20, 300);
    app_b.insert(30, 300);
    // Only the first snapshots, the releases' flushes and `sync --wait` ship.
    let settings = "[sync]\nsync_interval = \"1h\"\n";
    let config = config_for(&store, dir.path(), settings, &[(&a, "pa"), (&b, "pb")]);
    let watch = Watch::with_config(&store, &config, dir.path().join("walsync.log"));
    wait_for_objects(&store, "pa", 1, || watch.log()).await;
    wait_for_objects(&store, "pb", 1, || watch.log()).await;
    for round in 0..3 {
        // Unshipped commits in both: both releases flush.
        app_a.insert(5, 300);
        app_b.insert(5, 300);
        let swapped = if round % 2 == 0 {
            [(&*a, "pb"), (&*b, "pa")]
        } else {
            [(&*a, "pa"), (&*b, "pb")]
        };
        config_for(&store, dir.path(), settings, &swapped);
        let deadline = Instant::now() + Duration::from_secs(60);
        while watch.log().matches("configuration reloaded").count() <= round {
            assert!(
                Instant::now() < deadline,
                "{kind}: round {round}: no reload"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut sync = walsync();
        sync.args(["sync", "--wait", "--config"]).arg(&config);
        let out = sync.output().unwrap();
        assert!(
            out.status.success(),
            "{kind}: round {round}: {out:?}\n{}",
            tail(&watch.log())
        );
        let (on_pa, on_pb) = if round % 2 == 0 { (&b, &a) } else { (&a, &b) };
        let here = dir.path().join(format!("round{round}"));
        std::fs::create_dir(&here).unwrap();
        assert_eq!(
            restored_digest(&store, "pa", &here).await,
            digest(on_pa),
            "{kind}: {round}"
        );
        assert_eq!(
            restored_digest(&store, "pb", &here).await,
            digest(on_pb),
            "{kind}: {round}"
        );
    }
    let (status, log) = watch.terminate().await;
    assert!(status.success(), "{kind}: {}", tail(&log));
    assert!(!log.contains("another writer"), "{kind}: {}", tail(&log));
    app_a.quit();
    app_b.quit();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_swapped_in_one_edit_flush_first_and_both_go_on() {
    each_store(prefixes_swapped).await;
}
