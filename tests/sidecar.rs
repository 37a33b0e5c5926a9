//! Sidecar mode and the container entrypoint, with the real binary, a real
//! app process (Python's sqlite3) and a real S3 protocol server.

mod common;

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

fn restore(store: &TestStore, s: &Setup, out: &Path) -> Vec<String> {
    let output = command(WALSYNC, store)
        .args(["restore", "--prefix", "app", "--force", "--config"])
        .arg(&s.config)
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
        let restored = restore(&store, &s, &s.dir.path().join("check.db"));
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
        let restored = restore(&store, &s, &s.dir.path().join("check.db"));
        assert_eq!(
            restored,
            vec!["seed", "start 1", "goodbye"],
            "{kind}\n{log}"
        );
    }
}
