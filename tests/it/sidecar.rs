//! Sidecar mode and the container entrypoint, with the real binary, a real
//! app process (Python's sqlite3) and a real S3 protocol server.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use walsync::chain;

use common::TestStore;

const WALSYNC: &str = env!("CARGO_BIN_EXE_walsync");

/// An app that adds one row per start, notes how many it found, then either
/// exits with status 3 or (with `serve`) runs until SIGTERM, when it writes
/// a last row and exits with status 7.
const APP: &str = r#"
import signal, sqlite3, sys, time
db, seen, mode = sys.argv[1], sys.argv[2], sys.argv[3]
conn = sqlite3.connect(db, isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
found = conn.execute("SELECT count(*) FROM t").fetchone()[0]
conn.execute("INSERT INTO t(v) VALUES (?)", (f"start {found}",))
def goodbye(signum, frame):
    conn.execute("INSERT INTO t(v) VALUES ('goodbye')")
    sys.exit(7)
signal.signal(signal.SIGTERM, goodbye)
with open(seen, "w") as f:
    f.write(str(found))
if mode == "serve":
    while True:
        time.sleep(0.05)
sys.exit(3)
"#;

fn rows(path: &Path) -> Vec<String> {
    let conn = Connection::open(path).unwrap();
    let mut stmt = conn.prepare("SELECT v FROM t ORDER BY id").unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

struct Setup {
    dir: tempfile::TempDir,
    db: PathBuf,
    config: PathBuf,
    app: PathBuf,
    seen: PathBuf,
}

fn setup(store: &TestStore) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let db = data.join("app.db");
    let config = dir.path().join("walsync.toml");
    std::fs::write(
        &config,
        store.config(&format!(
            "[sync]\nsync_interval = \"0s\"\n[[databases]]\npath = \"{}\"\nprefix = \"app\"\n",
            db.display()
        )),
    )
    .unwrap();
    let app = dir.path().join("app.py");
    std::fs::write(&app, APP).unwrap();
    let seen = dir.path().join("seen");
    Setup {
        dir,
        db,
        config,
        app,
        seen,
    }
}

fn command(program: &str, store: &TestStore) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_remove("WALSYNC_STORAGE")
        .env("WALSYNC_LOG", "info")
        .env("WALSYNC_BIN", WALSYNC);
    for (k, v) in &store.env {
        cmd.env(k, v);
    }
    cmd
}

fn remove_db(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(name));
    }
}

/// The rows of `app` restored into `out`, with `extra` arguments (a point).
fn restore(store: &TestStore, s: &Setup, out: &Path, extra: &[&str]) -> Vec<String> {
    let output = command(WALSYNC, store)
        .args(["restore", "--prefix", "app", "--force", "--config"])
        .arg(&s.config)
        .args(extra)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    rows(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_entrypoint_restores_what_the_disk_lost_then_runs_the_app() {
    let entrypoint = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/entrypoint.sh");
    for (kind, store) in common::all_stores().await {
        let s = setup(&store);
        let start = |expect_found: &str| {
            let output = command(entrypoint, &store)
                .env("WALSYNC_CONFIG", &s.config)
                .args(["python3", s.app.to_str().unwrap()])
                .arg(&s.db)
                .arg(&s.seen)
                .arg("once")
                .output()
                .unwrap();
            let log = String::from_utf8_lossy(&output.stderr).to_string();
            assert_eq!(
                output.status.code(),
                Some(3),
                "{kind}: the app's status\n{log}"
            );
            let found = std::fs::read_to_string(&s.seen).unwrap();
            assert_eq!(found, expect_found, "{kind}: rows the app found\n{log}");
        };
        // First deployment: nothing in storage, no database yet.
        start("0");
        // The disk is lost: the next start restores the database first.
        remove_db(&s.db);
        start("1");
        // With the database present, nothing is restored over it.
        start("2");
        let restored = restore(&store, &s, &s.dir.path().join("check.db"), &[]);
        assert_eq!(restored, vec!["start 0", "start 1", "start 2"], "{kind}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_starts_the_app_after_the_first_sync_and_ships_its_last_write() {
    for (kind, store) in common::all_stores().await {
        let s = setup(&store);
        {
            let conn = Connection::open(&s.db).unwrap();
            conn.pragma_update(None, "journal_mode", "WAL").unwrap();
            conn.execute_batch(
                "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t(v) VALUES ('seed');",
            )
            .unwrap();
        }
        let exec = format!(
            "python3 '{}' '{}' '{}' serve",
            s.app.display(),
            s.db.display(),
            s.seen.display()
        );
        let mut child = command(WALSYNC, &store)
            .args(["watch", "--config"])
            .arg(&s.config)
            .args(["--exec", &exec])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !s.seen.exists() {
            assert!(Instant::now() < deadline, "{kind}: the app never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The app started only after the database was in storage.
        let objects = chain::list(store.storage.as_ref(), "app").await.unwrap();
        assert!(
            !objects.is_empty(),
            "{kind}: app started before the first sync"
        );
        // And that object is the database as the app found it.
        let first = objects[0].seq.to_string();
        let found = restore(
            &store,
            &s,
            &s.dir.path().join("first.db"),
            &["--txid", &first],
        );
        assert_eq!(found, vec!["seed"], "{kind}");

        let kill = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let status = child.wait().unwrap();
        let mut log = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
        assert_eq!(
            status.code(),
            Some(7),
            "{kind}: walsync exits with the app's status\n{log}"
        );
        let restored = restore(&store, &s, &s.dir.path().join("check.db"), &[]);
        assert_eq!(
            restored,
            vec!["seed", "start 1", "goodbye"],
            "{kind}\n{log}"
        );
    }
}

/// Issue 11, 10: a SIGHUP that comes while walsync syncs before starting the
/// app is dropped, not delivered the instant the app starts (which would
/// kill it before it can set handlers); and the app dies with walsync, even
/// when walsync is SIGKILLed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_before_the_app_starts_are_dropped_and_the_app_dies_with_walsync() {
    let store = common::fs_store();
    let s = setup(&store);
    {
        // Big and incompressible: the first snapshot takes a moment.
        let conn = Connection::open(&s.db).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); CREATE TABLE blob(b);")
            .unwrap();
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 60000) \
             INSERT INTO blob SELECT randomblob(3000) FROM n",
            [],
        )
        .unwrap();
    }
    let exec = format!(
        "python3 '{}' '{}' '{}' serve",
        s.app.display(),
        s.db.display(),
        s.seen.display()
    );
    let log_path = s.dir.path().join("walsync.log");
    let mut child = command(WALSYNC, &store)
        .args(["watch", "--config"])
        .arg(&s.config)
        .args(["--exec", &exec])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log().contains("taking a snapshot") {
        assert!(Instant::now() < deadline, "no snapshot started:\n{}", log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    while !s.seen.exists() {
        assert!(
            Instant::now() < deadline,
            "the app never started:\n{}",
            log()
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("walsync exited {status} before the app ran:\n{}", log());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        log().contains("dropping a signal that came before the app started"),
        "the SIGHUP came after the app started; the test proves nothing:\n{}",
        log()
    );
    // The app is running; SIGKILL walsync: the app must not run on.
    let children = Command::new("pgrep")
        .args(["-P", &child.id().to_string()])
        .output()
        .unwrap();
    let app_pid: i32 = String::from_utf8_lossy(&children.stdout)
        .split_whitespace()
        .next()
        .expect("the app is walsync's child")
        .parse()
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    // SAFETY: kill(pid, 0) only asks whether the process exists.
    while unsafe { libc::kill(app_pid, 0) } == 0 {
        // A zombie not yet reaped by init also answers; look at its state.
        let state = std::fs::read_to_string(format!("/proc/{app_pid}/stat")).unwrap_or_default();
        if state.split_whitespace().nth(2) == Some("Z") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the app runs on after walsync was killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 11, 10: the entrypoint passes every argument to `--exec` exactly,
/// trailing newlines and quotes included.
#[test]
fn the_entrypoint_passes_arguments_exactly() {
    let entrypoint = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/entrypoint.sh");
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("walsync");
    let got = dir.path().join("exec");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nif [ \"$1\" = watch ]; then printf '%s' \"$5\" > '{}'; fi\n",
            got.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let status = Command::new(entrypoint)
        .env("WALSYNC_BIN", &fake)
        .env("WALSYNC_CONFIG", dir.path().join("walsync.toml"))
        .args(["app", "line\n", "it's", "two words"])
        .status()
        .unwrap();
    assert!(status.success());
    let exec = std::fs::read_to_string(&got).unwrap();
    assert_eq!(
        walsync::sidecar::parse(&exec).unwrap(),
        vec!["app", "line\n", "it's", "two words"]
    );
}
