//! Many databases in one process, from a walsync.toml: discovery, live
//! changes, isolation, restore-all and configuration errors.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio_util::sync::CancellationToken;
use walsync::chain;
use walsync::config::Config;
use walsync::replicator::{self, Plan};
use walsync::restore;

use common::{Rows, TestStore, create_db, rows, wait_for};

fn config_text(store: &TestStore, body: &str) -> String {
    config_with_watch(store, "parallelism = 8", body)
}

/// A `[[databases]]` entry for every `*.db` in `data`, with this prefix template.
fn dir_entry(data: &Path, prefix: &str) -> String {
    format!(
        "[[databases]]\ndir = \"{}\"\nprefix = \"{prefix}\"\n",
        data.display()
    )
}

/// How many of these databases this process holds open.
fn open_databases(paths: impl Iterator<Item = PathBuf>) -> usize {
    paths.filter(|p| open_descriptors(p) > 0).count()
}

/// A configuration with these `[watch]` lines.
fn config_with_watch(store: &TestStore, watch: &str, body: &str) -> String {
    store.config(&format!(
        "\n[sync]\nsync_interval = \"0s\"\n\n[watch]\n{watch}\n\n{body}"
    ))
}

async fn snapshots(store: &TestStore, prefix: &str) -> usize {
    chain::list(store.storage.as_ref(), prefix)
        .await
        .unwrap()
        .iter()
        .filter(|o| o.kind == walsync::segment::Kind::Snapshot)
        .count()
}

/// Runs the fleet in this process until the returned token is cancelled.
fn start(
    store: &TestStore,
    config_path: &Path,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<replicator::Result<replicator::Outcome>>,
) {
    start_posting(store, config_path, walsync::status::Board::default())
}

/// [`start`], posting to `board`.
fn start_posting(
    store: &TestStore,
    config_path: &Path,
    board: walsync::status::Board,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<replicator::Result<replicator::Outcome>>,
) {
    // Logs are captured per test and shown when one fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("walsync=debug")
        .with_test_writer()
        .try_init();
    let config = Config::load(config_path).unwrap();
    let token = CancellationToken::new();
    let plan = Plan::Config {
        config,
        storage: store.storage.clone(),
        mirrors: std::sync::Arc::from([]),
    };
    let handle = tokio::spawn(replicator::run(
        plan,
        token.clone(),
        replicator::Hooks {
            board,
            ..replicator::Hooks::default()
        },
    ));
    (token, handle)
}

async fn stop(
    token: CancellationToken,
    handle: tokio::task::JoinHandle<replicator::Result<replicator::Outcome>>,
) {
    token.cancel();
    handle.await.unwrap().unwrap();
}

async fn objects(store: &TestStore, prefix: &str) -> usize {
    chain::list(store.storage.as_ref(), prefix)
        .await
        .map(|o| o.len())
        .unwrap_or(0)
}

/// Stores an object whose body is its own key: enough for what reads keys.
async fn put_named(storage: &dyn walsync::storage::Storage, key: String) {
    use sha2::{Digest, Sha256};
    let body = key.as_bytes().to_vec();
    let hash = Sha256::digest(&body).into();
    storage
        .put_new(&key, walsync::storage::Payload::Bytes(body), hash)
        .await
        .unwrap();
}

async fn restore_rows(store: &TestStore, prefix: &str, dir: &Path) -> Rows {
    let out = dir.join(format!("{}.restored.db", prefix.replace('/', "_")));
    let _ = std::fs::remove_file(&out);
    restore::restore(
        store.storage.as_ref(),
        &restore::RestoreOptions {
            prefix: prefix.into(),
            output: out.clone(),
            target: restore::Target::Latest,
            force: true,
            keys: None,
            parallelism: walsync::restore::FETCH_PARALLELISM,
        },
    )
    .await
    .unwrap();
    rows(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_databases_from_a_glob_with_concurrent_writers_restore_all() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("tenants");
        std::fs::create_dir(&data).unwrap();
        for i in 0..50 {
            drop(create_db(&data.join(format!("t{i:02}.db")), 3));
        }
        let config_path = dir.path().join("walsync.toml");
        std::fs::write(
            &config_path,
            config_text(
                &store,
                &format!(
                    "[[databases]]\npath = \"{}/*.db\"\nprefix = \"tenants/{{name}}\"\n",
                    data.display()
                ),
            ),
        )
        .unwrap();
        let (token, handle) = start(&store, &config_path);

        // Five writer threads, each writing to ten databases at once.
        let writers: Vec<_> = (0..5)
            .map(|w| {
                let data = data.clone();
                std::thread::spawn(move || {
                    let conns: Vec<Connection> = (0..10)
                        .map(|i| create_db(&data.join(format!("t{:02}.db", w * 10 + i)), 0))
                        .collect();
                    for round in 0..40 {
                        for conn in &conns {
                            conn.execute(
                                "INSERT INTO t(v) VALUES (?1)",
                                [format!("w{w} r{round}")],
                            )
                            .unwrap();
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        stop(token, handle).await;

        let out = dir.path().join("restored");
        let prefixes = (0..50).map(|i| format!("tenants/t{i:02}")).collect();
        let outcomes = restore::restore_all(
            store.storage.clone(),
            restore::into_dir(prefixes, &out, false),
            4,
        )
        .await;
        assert_eq!(outcomes.len(), 50);
        for outcome in outcomes {
            outcome
                .result
                .unwrap_or_else(|e| panic!("{kind} {}: {e}", outcome.prefix));
            let name = outcome.prefix.trim_start_matches("tenants/");
            let source = data.join(format!("{name}.db"));
            assert_eq!(rows(&outcome.output), rows(&source), "{kind} {name}");
            assert_eq!(rows(&source).len(), 43);
        }
    }
}

fn state_of(board: &walsync::status::Board, prefix: &str) -> Option<walsync::status::State> {
    board
        .snapshot()
        .databases
        .into_iter()
        .find(|d| d.prefix == prefix)
        .map(|d| d.state)
}

fn on_board(board: &walsync::status::Board, prefix: &str) -> bool {
    board
        .snapshot()
        .databases
        .iter()
        .any(|d| d.prefix == prefix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn databases_and_config_edits_are_picked_up_while_running() {
    let store = common::fs_store();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    std::fs::create_dir(&data).unwrap();
    let fixed = dir.path().join("fixed.db");
    drop(create_db(&fixed, 2));
    drop(create_db(&data.join("a.db"), 2));
    let config_path = dir.path().join("walsync.toml");
    let dir_entry = format!(
        "[[databases]]\ndir = \"{}\"\npattern = \"*.db\"\nprefix = \"d/{{name}}\"\n",
        data.display()
    );
    std::fs::write(&config_path, config_text(&store, &dir_entry)).unwrap();
    let board = walsync::status::Board::default();
    let (token, handle) = start_posting(&store, &config_path, board.clone());
    wait_for("d/a", async || objects(&store, "d/a").await > 0).await;

    // A database created in the watched directory is replicated without restart.
    let b = create_db(&data.join("b.db"), 5);
    wait_for("d/b", async || objects(&store, "d/b").await > 0).await;
    b.execute("INSERT INTO t(v) VALUES ('more')", []).unwrap();
    wait_for("d/b to catch up", async || objects(&store, "d/b").await > 1).await;

    // A removed database is released: nothing more is shipped for it.
    std::fs::remove_file(data.join("a.db")).unwrap();
    let _ = std::fs::remove_file(data.join("a.db-wal"));
    let _ = std::fs::remove_file(data.join("a.db-shm"));
    wait_for("d/a released", async || !on_board(&board, "d/a")).await;
    let a_objects = objects(&store, "d/a").await;

    // An edit adding a database and a new prefix takes effect.
    let with_fixed = format!(
        "{dir_entry}\n[[databases]]\npath = \"{}\"\nprefix = \"fixed\"\n",
        fixed.display()
    );
    std::fs::write(&config_path, config_text(&store, &with_fixed)).unwrap();
    wait_for("fixed", async || objects(&store, "fixed").await > 0).await;

    // A broken edit is refused, and says so on the board (status page,
    // /health, metrics); the running set keeps replicating.
    assert_eq!(board.snapshot().config, Default::default());
    std::fs::write(
        &config_path,
        config_text(&store, "[[databases]]\npaht = \"x.db\"\n"),
    )
    .unwrap();
    wait_for("the broken edit refused", async || {
        board.snapshot().config.refused.is_some()
    })
    .await;
    let refused = board.snapshot().config;
    assert_eq!(refused.edits_refused, 1);
    let why = refused.refused.unwrap();
    assert!(
        why.contains("walsync.toml") && why.contains("paht"),
        "names the file and the key: {why}"
    );
    let before = objects(&store, "fixed").await;
    let conn = Connection::open(&fixed).unwrap();
    conn.execute("INSERT INTO t(v) VALUES ('after the broken edit')", [])
        .unwrap();
    wait_for("fixed after the broken edit", async || {
        objects(&store, "fixed").await > before
    })
    .await;
    // A database appearing meanwhile is found under the file last accepted;
    // the file on disk stays refused.
    let c = create_db(&data.join("c.db"), 1);
    wait_for("d/c", async || objects(&store, "d/c").await > 0).await;
    assert_eq!(board.snapshot().config.refused, Some(why));

    // An edit naming two databases under one prefix is refused too, and
    // counted once: a rescan meanwhile (e.db appears) neither counts it
    // again nor takes the refused file for the one in use.
    std::fs::write(
        &config_path,
        config_text(
            &store,
            &format!(
                "{dir_entry}\n[[databases]]\npath = \"{}\"\nprefix = \"d/b\"\n",
                fixed.display()
            ),
        ),
    )
    .unwrap();
    wait_for("the clashing edit refused", async || {
        board
            .snapshot()
            .config
            .refused
            .is_some_and(|why| why.contains("share the prefix"))
    })
    .await;
    c.execute("INSERT INTO t(v) VALUES ('more')", []).unwrap();
    drop(create_db(&data.join("e.db"), 1));
    wait_for("d/e", async || objects(&store, "d/e").await > 0).await;
    assert_eq!(board.snapshot().config.edits_refused, 2);

    // An edit removing the directory entry releases its databases.
    std::fs::write(
        &config_path,
        config_text(
            &store,
            &format!(
                "[[databases]]\npath = \"{}\"\nprefix = \"fixed\"\n",
                fixed.display()
            ),
        ),
    )
    .unwrap();
    wait_for("d/b released", async || !on_board(&board, "d/b")).await;
    assert_eq!(
        board.snapshot().config.refused,
        None,
        "the mended file is in use"
    );
    // Written together (sync_interval 0): once the database still replicated
    // has shipped its write, a released one would have shipped too.
    let b_before = objects(&store, "d/b").await;
    let fixed_before = objects(&store, "fixed").await;
    b.execute("INSERT INTO t(v) VALUES ('not replicated')", [])
        .unwrap();
    conn.execute("INSERT INTO t(v) VALUES ('replicated')", [])
        .unwrap();
    wait_for("fixed, written beside the released d/b", async || {
        objects(&store, "fixed").await > fixed_before
    })
    .await;
    assert_eq!(
        objects(&store, "d/b").await,
        b_before,
        "released database still shipped"
    );
    assert_eq!(objects(&store, "d/a").await, a_objects);

    // A store edited in is used from the next start, and says so; the
    // databases keep replicating to the stores in use.
    let fixed_only = format!(
        "[[databases]]\npath = \"{}\"\nprefix = \"fixed\"\n",
        fixed.display()
    );
    let elsewhere = dir.path().join("elsewhere");
    std::fs::write(
        &config_path,
        format!(
            "{}[[mirrors]]\nname = \"far\"\nurl = \"{}\"\n",
            config_text(&store, &fixed_only),
            elsewhere.display()
        ),
    )
    .unwrap();
    wait_for("the mirror edit said", async || {
        board.snapshot().config.restart_needed.is_some()
    })
    .await;
    assert_eq!(board.snapshot().config.refused, None);
    let before = objects(&store, "fixed").await;
    conn.execute("INSERT INTO t(v) VALUES ('after the mirror edit')", [])
        .unwrap();
    wait_for("fixed after the mirror edit", async || {
        objects(&store, "fixed").await > before
    })
    .await;
    assert!(!elsewhere.exists(), "a mirror used before a restart");
    std::fs::write(&config_path, config_text(&store, &fixed_only)).unwrap();
    wait_for("the mirror edit undone", async || {
        board.snapshot().config.restart_needed.is_none()
    })
    .await;
    // So is a [watch] setting read at start only (here the HTTP listener).
    std::fs::write(
        &config_path,
        config_with_watch(
            &store,
            "parallelism = 8\nlisten = \"127.0.0.1:1\"",
            &fixed_only,
        ),
    )
    .unwrap();
    wait_for("the listen edit said", async || {
        board
            .snapshot()
            .config
            .restart_needed
            .is_some_and(|why| why.contains("[watch] listen"))
    })
    .await;
    std::fs::write(&config_path, config_text(&store, &fixed_only)).unwrap();
    wait_for("the listen edit undone", async || {
        board.snapshot().config.restart_needed.is_none()
    })
    .await;

    stop(token, handle).await;
    assert_eq!(
        restore_rows(&store, "fixed", dir.path()).await,
        rows(&fixed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_broken_database_does_not_stop_the_others() {
    let store = common::fs_store();
    let root = store.url.trim_start_matches("file://").to_string();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.db");
    let bad = dir.path().join("bad.db");
    let missing = dir.path().join("missing.db");
    drop(create_db(&good, 1));
    drop(create_db(&bad, 1));
    // The bad database's prefix cannot be a directory: every request on it fails.
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(Path::new(&root).join("bad"), b"in the way").unwrap();
    let config_path = dir.path().join("walsync.toml");
    let body = format!(
        "[[databases]]\npath = \"{}\"\n[[databases]]\npath = \"{}\"\n[[databases]]\npath = \"{}\"\n",
        good.display(),
        bad.display(),
        missing.display()
    );
    std::fs::write(&config_path, config_text(&store, &body)).unwrap();
    let board = walsync::status::Board::default();
    let (token, handle) = start_posting(&store, &config_path, board.clone());
    let conn = Connection::open(&good).unwrap();
    for i in 0..5 {
        conn.execute("INSERT INTO t(v) VALUES (?1)", [format!("x{i}")])
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for("good to be replicated", async || {
        objects(&store, "good").await > 1
    })
    .await;
    // The bad one was tried and fails, on its own.
    wait_for("bad to be failing", async || {
        state_of(&board, "bad") == Some(walsync::status::State::Failing)
    })
    .await;

    // The missing database appears later and is picked up by its retry.
    drop(create_db(&missing, 4));
    wait_for("missing to appear", async || {
        objects(&store, "missing").await > 0
    })
    .await;
    stop(token, handle).await;
    assert_eq!(restore_rows(&store, "good", dir.path()).await, rows(&good));
    assert_eq!(
        restore_rows(&store, "missing", dir.path()).await,
        rows(&missing)
    );
    assert_eq!(objects(&store, "bad").await, 0);
}

fn walsync(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_walsync"))
        .args(args)
        .env_remove("WALSYNC_CONFIG")
        .env_remove("WALSYNC_STORAGE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn invalid_configurations_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.db");
    let b = dir.path().join("sub").join("a.db");
    std::fs::create_dir_all(b.parent().unwrap()).unwrap();
    drop(create_db(&a, 0));
    drop(create_db(&b, 0));
    let head = "[storage]\nurl = \"file:///tmp/walsync-never-used\"\n";
    let cases: Vec<(String, &str)> = vec![
        (
            format!(
                "{head}[sync]\nsync_intervall = \"1s\"\n[[databases]]\npath = \"{}\"\n",
                a.display()
            ),
            "sync_intervall",
        ),
        (
            format!(
                "{head}[[databases]]\npath = \"{}\"\n[[databases]]\npath = \"{}\"\n",
                a.display(),
                b.display()
            ),
            "share the prefix",
        ),
        (
            format!(
                "{head}[[databases]]\npath = \"{}\"\nprefix = \"x\"\n[[databases]]\npath = \"{}\"\nprefix = \"y\"\n",
                a.display(),
                a.display()
            ),
            "listed twice",
        ),
        (
            format!(
                "{head}[[databases]]\npath = \"{}\"\nprefix = \"../up\"\n",
                a.display()
            ),
            "databases[0].prefix",
        ),
        (
            format!(
                "{head}[[databases]]\npath = \"{}\"\nprefix = \"/abs\"\n",
                a.display()
            ),
            "must not start with '/'",
        ),
        (
            format!(
                "{head}[[databases]]\npath = \"{}\"\nprefix = \"a//b\"\n",
                a.display()
            ),
            "empty path segment",
        ),
        (
            format!(
                "{head}[[databases]]\ndir = \"{}\"\nprefix = \"tenants\"\n",
                dir.path().display()
            ),
            "does not make prefixes unique",
        ),
        (
            format!(
                "{head}[[databases]]\ndir = \"{}\"\nrecursive = true\nprefix = \"t/{{name}}\"\n",
                dir.path().display()
            ),
            "does not make prefixes unique",
        ),
        (
            format!(
                "[storage]\nurl = \"s3://b\"\naccess_key_id = \"${{WALSYNC_TEST_UNSET_VAR}}\"\nsecret_access_key = \"x\"\n[[databases]]\npath = \"{}\"\n",
                a.display()
            ),
            "WALSYNC_TEST_UNSET_VAR",
        ),
        (
            format!("[[databases]]\npath = \"{}\"\n", a.display()),
            "storage",
        ),
        (
            format!(
                "{head}[watch]\nwatcher = \"magic\"\n[[databases]]\npath = \"{}\"\n",
                a.display()
            ),
            "watch.watcher",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = walsync(&["watch", "--config", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} accepted:\n{text}");
        assert!(err.contains(needle), "case {i}: {err}");
        assert!(
            err.contains(&format!("bad{i}.toml")),
            "case {i} does not name the file: {err}"
        );
        assert_eq!(
            err.trim().lines().count(),
            1,
            "case {i}: not one line: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_all_command_names_failures_and_exits_non_zero() {
    let store = common::fs_store();
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one.db");
    drop(create_db(&one, 3));
    let config_path = dir.path().join("walsync.toml");
    let body = format!(
        "[[databases]]\npath = \"{}\"\n[[databases]]\npath = \"{}\"\n",
        one.display(),
        dir.path().join("never.db").display()
    );
    std::fs::write(&config_path, config_text(&store, &body)).unwrap();
    let (token, handle) = start(&store, &config_path);
    wait_for("one", async || objects(&store, "one").await > 0).await;
    stop(token, handle).await;

    let out_dir = dir.path().join("out");
    let out = walsync(&[
        "restore-all",
        "--config",
        config_path.to_str().unwrap(),
        "--output-dir",
        out_dir.to_str().unwrap(),
        "--parallelism",
        "3",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a missing replica must fail the run");
    assert!(
        stdout.contains("1 restored, 0 skipped, 1 failed"),
        "{stdout}"
    );
    assert!(stderr.contains("never"), "{stderr}");
    assert_eq!(rows(&out_dir.join("one.db")), rows(&one));
}

/// 2,000 databases in one process replicate and restore correctly.
/// Run with `cargo test --test it fleet:: -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: 2,000 databases"]
async fn two_thousand_databases() {
    let store = common::fs_store();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("many");
    std::fs::create_dir(&data).unwrap();
    let n = 2000;
    for i in 0..n {
        drop(create_db(&data.join(format!("db{i:04}.db")), 2));
    }
    replicator::raise_open_file_limit();
    let config_path = dir.path().join("walsync.toml");
    std::fs::write(
        &config_path,
        config_text(&store, &dir_entry(&data, "many/{name}")),
    )
    .unwrap();
    let (token, handle) = start(&store, &config_path);
    wait_for("all databases", async || {
        chain::database_names(store.storage.as_ref())
            .await
            .map(|d| d.found.len())
            .unwrap_or(0)
            >= n
    })
    .await;
    for i in (0..n).step_by(10) {
        let conn = Connection::open(data.join(format!("db{i:04}.db"))).unwrap();
        conn.execute("INSERT INTO t(v) VALUES ('late')", [])
            .unwrap();
    }
    stop(token, handle).await;
    let out = dir.path().join("restored");
    let prefixes: Vec<String> = (0..n).map(|i| format!("many/db{i:04}")).collect();
    for outcome in restore::restore_all(
        store.storage.clone(),
        restore::into_dir(prefixes, &out, false),
        8,
    )
    .await
    {
        outcome.result.unwrap();
        let name = outcome.prefix.trim_start_matches("many/");
        assert_eq!(
            rows(&outcome.output),
            rows(&data.join(format!("{name}.db")))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn databases_beyond_max_open_are_closed_at_rest_and_reopened_on_change() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d");
        std::fs::create_dir(&data).unwrap();
        let conns: Vec<Connection> = (0..6)
            .map(|i| create_db(&data.join(format!("x{i}.db")), 2))
            .collect();
        let config_path = dir.path().join("walsync.toml");
        let text = config_with_watch(
            &store,
            // Idle closes too late to happen here: only the budget closes databases.
            "parallelism = 8\nmax_open = 2\nclose_idle_after = \"1h\"",
            &dir_entry(&data, "{name}"),
        );
        std::fs::write(&config_path, text).unwrap();
        let board = walsync::status::Board::default();
        let (token, handle) = start_posting(&store, &config_path, board.clone());
        let shipped = async || {
            let mut counts = Vec::new();
            for i in 0..6 {
                counts.push(objects(&store, &format!("x{i}")).await);
            }
            counts
        };
        for round in 0..6 {
            let before = shipped().await;
            for (i, conn) in conns.iter().enumerate() {
                conn.execute("INSERT INTO t(v) VALUES (?1)", [format!("r{round} db{i}")])
                    .unwrap();
            }
            // Every change ships, and the budget closes all but two again,
            // so the next round reopens the others.
            wait_for("the round to ship", async || {
                shipped()
                    .await
                    .iter()
                    .zip(&before)
                    .all(|(now, was)| now > was)
            })
            .await;
            wait_for("at most max_open databases open", async || {
                let snapshot = board.snapshot();
                let open = snapshot.databases.iter();
                open.filter(|d| d.state == walsync::status::State::Open)
                    .count()
                    <= 2
            })
            .await;
        }
        // The app goes away without checkpointing on close, as a long-running
        // app would: what was committed stays in the WAL for walsync.
        for conn in conns {
            conn.set_db_config(
                rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
                true,
            )
            .unwrap();
        }
        let open = || open_databases((0..6).map(|i| data.join(format!("x{i}.db"))));
        wait_for("at most max_open databases open", async || open() <= 2).await;
        stop(token, handle).await;
        for i in 0..6 {
            let prefix = format!("x{i}");
            let source = data.join(format!("{prefix}.db"));
            assert_eq!(
                restore_rows(&store, &prefix, dir.path()).await,
                rows(&source),
                "{kind} {prefix}"
            );
            let snapshots = snapshots(&store, &prefix).await;
            assert_eq!(
                snapshots, 1,
                "{kind} {prefix}: re-attaching needed no snapshot"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_polling_watcher_sees_changes_too() {
    let store = common::fs_store();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("polled.db");
    let conn = create_db(&db, 1);
    let config_path = dir.path().join("walsync.toml");
    let text = config_text(
        &store,
        &format!("[[databases]]\npath = \"{}\"\n", db.display()),
    )
    .replace(
        "parallelism = 8",
        "parallelism = 8\nwatcher = \"poll\"\npoll_interval = \"100ms\"",
    );
    std::fs::write(&config_path, text).unwrap();
    let (token, handle) = start(&store, &config_path);
    wait_for("first snapshot", async || {
        objects(&store, "polled").await > 0
    })
    .await;
    let before = objects(&store, "polled").await;
    conn.execute("INSERT INTO t(v) VALUES ('seen by polling')", [])
        .unwrap();
    wait_for("the change", async || {
        objects(&store, "polled").await > before
    })
    .await;
    stop(token, handle).await;
    assert_eq!(restore_rows(&store, "polled", dir.path()).await, rows(&db));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_right_after_start_still_ships_every_database() {
    let store = common::fs_store();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    std::fs::create_dir(&data).unwrap();
    for i in 0..20 {
        drop(create_db(&data.join(format!("s{i:02}.db")), 2));
    }
    let config_path = dir.path().join("walsync.toml");
    let text = config_with_watch(&store, "parallelism = 1", &dir_entry(&data, "{name}"));
    std::fs::write(&config_path, text).unwrap();
    let (token, handle) = start(&store, &config_path);
    stop(token, handle).await;
    for i in 0..20 {
        let prefix = format!("s{i:02}");
        assert_eq!(
            restore_rows(&store, &prefix, dir.path()).await,
            rows(&data.join(format!("{prefix}.db"))),
            "{prefix}"
        );
    }
}

/// Descriptors this process holds on `path` (database, WAL or shared memory).
fn open_descriptors(path: &Path) -> usize {
    let name = path.to_string_lossy().to_string();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with(&name))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_databases_are_closed_and_reopened_on_change() {
    let store = common::fs_store();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("idle.db");
    drop(create_db(&db, 3));
    let config_path = dir.path().join("walsync.toml");
    let text = config_with_watch(
        &store,
        "parallelism = 8\nclose_idle_after = \"300ms\"",
        &format!("[[databases]]\npath = \"{}\"\n", db.display()),
    );
    std::fs::write(&config_path, text).unwrap();
    let (token, handle) = start(&store, &config_path);
    wait_for("the snapshot", async || objects(&store, "idle").await > 0).await;
    wait_for("the idle database to be closed", async || {
        open_descriptors(&db) == 0
    })
    .await;
    // Readers touch the files' metadata and shared memory (as root, SQLite
    // chowns the WAL on open) without changing anything: that must not make
    // walsync open the database again, or its own reopen would do the same.
    for _ in 0..3 {
        let conn = Connection::open(&db).unwrap();
        let _: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
    }
    for _ in 0..100 {
        assert_eq!(
            open_descriptors(&db),
            0,
            "a reader made walsync reopen the database"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for round in 0..3 {
        let before = objects(&store, "idle").await;
        {
            let conn = Connection::open(&db).unwrap();
            conn.execute("INSERT INTO t(v) VALUES (?1)", [format!("round {round}")])
                .unwrap();
            wait_for("the change", async || {
                objects(&store, "idle").await > before
            })
            .await;
        }
        wait_for("closed again", async || open_descriptors(&db) == 0).await;
    }
    stop(token, handle).await;
    assert_eq!(restore_rows(&store, "idle", dir.path()).await, rows(&db));
    let snapshots = snapshots(&store, "idle").await;
    assert_eq!(snapshots, 1, "reopening needed no snapshot");
}

/// A restarted fleet (big enough to list its storage once at start) continues
/// every chain where it stood: no new snapshots, every row restorable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_fleet_continues_every_chain_from_one_listing() {
    for (kind, store) in common::all_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("fleet");
        std::fs::create_dir(&data).unwrap();
        let n = 40;
        let conns: Vec<Connection> = (0..n)
            .map(|i| create_db(&data.join(format!("f{i:02}.db")), 2))
            .collect();
        let config_path = dir.path().join("walsync.toml");
        let body = dir_entry(&data, "f/{name}");
        std::fs::write(&config_path, config_text(&store, &body)).unwrap();
        for round in 0..2 {
            let (token, handle) = start(&store, &config_path);
            for i in 0..n {
                let prefix = format!("f/f{i:02}");
                wait_for(&prefix, async || objects(&store, &prefix).await > round).await;
            }
            for conn in &conns {
                conn.execute("INSERT INTO t(v) VALUES (?1)", [format!("round {round}")])
                    .unwrap();
            }
            stop(token, handle).await;
            if round == 0 {
                // f00's chain forks below its head (an old writer's copy of
                // its snapshot): the start-up listing leaves it to a listing
                // of its own, and it goes on from its head all the same.
                let first = chain::list(store.storage.as_ref(), "f/f00").await.unwrap()[0].seq;
                common::plant_legacy(store.storage.as_ref(), "f/f00", first, "f/f00").await;
            }
        }
        for i in 0..n {
            let prefix = format!("f/f{i:02}");
            assert_eq!(
                snapshots(&store, &prefix).await,
                if i == 0 { 2 } else { 1 },
                "{kind} {prefix}: resumed, no new snapshot"
            );
            assert_eq!(
                restore_rows(&store, &prefix, dir.path()).await,
                rows(&data.join(format!("f{i:02}.db"))),
                "{kind} {prefix}"
            );
        }
    }
}

/// Opening stops at the budget: databases wait for others to be closed
/// rather than run the process out of descriptors, and all get replicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_wait_for_room_under_max_open() {
    let store = common::fs_store();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("many");
    std::fs::create_dir(&data).unwrap();
    let n = 24;
    for i in 0..n {
        drop(create_db(&data.join(format!("m{i:02}.db")), 2));
    }
    let config_path = dir.path().join("walsync.toml");
    let text = config_with_watch(
        &store,
        "parallelism = 2\nmax_open = 3\nclose_idle_after = \"1h\"",
        &dir_entry(&data, "{name}"),
    );
    std::fs::write(&config_path, text).unwrap();
    let (token, handle) = start(&store, &config_path);
    let open_now = || open_databases((0..n).map(|i| data.join(format!("m{i:02}.db"))));
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        most = most.max(open_now());
        let mut done = 0;
        for i in 0..n {
            if objects(&store, &format!("m{i:02}")).await > 0 {
                done += 1;
            }
        }
        if done == n {
            break;
        }
        assert!(Instant::now() < deadline, "only {done} of {n} replicated");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop(token, handle).await;
    // max_open, plus one job per parallel slot that may be opening.
    assert!(most <= 3 + 2, "{most} databases were open at once");
}

/// A database whose first open fails at start (here: its file is away) is
/// retried with a fresh listing of its own prefix, not the start-up listing,
/// so it continues its chain when it is back instead of colliding with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_first_open_lists_its_own_prefix() {
    let store = common::fs_store();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fleet");
    std::fs::create_dir(&data).unwrap();
    let n = 34;
    for i in 0..n {
        drop(create_db(&data.join(format!("r{i:02}.db")), 2));
    }
    let config_path = dir.path().join("walsync.toml");
    let mut body = dir_entry(&data, "r/{name}");
    // Named on its own as well, so it stays configured while its file is away.
    let away = dir.path().join("away.db");
    drop(create_db(&away, 2));
    body.push_str(&format!("[[databases]]\npath = \"{}\"\n", away.display()));
    std::fs::write(&config_path, config_text(&store, &body)).unwrap();
    let (token, handle) = start(&store, &config_path);
    wait_for("away", async || objects(&store, "away").await > 0).await;
    stop(token, handle).await;

    let parked = dir.path().join("parked.db");
    std::fs::rename(&away, &parked).unwrap();
    let board = walsync::status::Board::default();
    let (token, handle) = start_posting(&store, &config_path, board.clone());
    wait_for("the others", async || objects(&store, "r/r33").await > 0).await;
    // Its first open has failed (the file is away): the next one is a retry.
    wait_for("away's first open to fail", async || {
        state_of(&board, "away") == Some(walsync::status::State::Failing)
    })
    .await;
    std::fs::rename(&parked, &away).unwrap();
    {
        let conn = Connection::open(&away).unwrap();
        conn.execute("INSERT INTO t(v) VALUES ('back')", [])
            .unwrap();
    }
    wait_for("away again", async || objects(&store, "away").await > 1).await;
    stop(token, handle).await;
    assert_eq!(restore_rows(&store, "away", dir.path()).await, rows(&away));
}

/// What the start-up listing keeps of each database (see `tips`) is what a
/// listing of that prefix alone would give the writer: the newest snapshot
/// and the head, marks folded in; a chain that forks is left for a listing
/// of its own; a prefix of marks alone is no database. One chain spans more
/// than an S3 page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_listing_of_the_store_gives_each_chain_the_tips_its_own_listing_gives() {
    use walsync::segment;
    for (kind, store) in common::all_stores().await {
        let storage = store.storage.as_ref();
        let put = async |key: String| put_named(storage, key).await;
        let mark = |prefix: &str, seq| segment::snapshot_mark_key(prefix, seq);
        // long: 1,200 objects, snapshots at 0 and 500, a run beside them.
        for seq in 0..1200 {
            put(segment::object_key("t/long", seq)).await;
        }
        put(mark("t/long", 0)).await;
        put(mark("t/long", 500)).await;
        put(segment::run_key("t/long", 1, 499)).await;
        // snap: the head is a snapshot.
        for seq in 0..3 {
            put(segment::object_key("t/snap", seq)).await;
        }
        put(mark("t/snap", 0)).await;
        put(mark("t/snap", 2)).await;
        // gone: the newest mark's object is gone; the one before stands.
        for seq in 0..6 {
            put(segment::object_key("t/gone", seq)).await;
        }
        put(mark("t/gone", 1)).await;
        put(mark("t/gone", 9)).await;
        // marks: marks alone.
        put(mark("t/marks", 4)).await;
        // forked: an old writer's key claims a sequence a new one claims.
        for seq in 0..4 {
            put(segment::object_key("t/forked", seq)).await;
        }
        put(mark("t/forked", 0)).await;
        put("t/forked/0000000000000002.wal".into()).await;
        // legacy: the first layout, kind in the key.
        put("t/legacy/0000000000000000.snapshot".into()).await;
        put("t/legacy/0000000000000001.wal".into()).await;
        put("t/legacy/0000000000000002.snapshot".into()).await;
        put("t/legacy/0000000000000003.wal".into()).await;

        let tips = walsync::tips::list_tips(storage).await.unwrap();
        assert!(tips.refused.is_empty(), "{kind}: {:?}", tips.refused);
        let names: Vec<&str> = tips.found.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            ["t/forked", "t/gone", "t/legacy", "t/long", "t/snap"],
            "{kind}"
        );
        for found in &tips.found {
            let (prefix, got) = (&found.name, &found.tips);
            let all = chain::list(storage, prefix).await.unwrap();
            assert_eq!(found.objects, all.len() as u64, "{kind} {prefix}");
            let bytes: u64 = all.iter().map(|o| o.size).sum();
            assert_eq!(found.bytes, bytes, "{kind} {prefix}");
            if !chain::forks(&all).is_empty() {
                assert_eq!(got, &None, "{kind} {prefix}: forks, listed on its own");
                continue;
            }
            let head = all.last().unwrap();
            let mut expected: Vec<chain::ObjectRef> = all
                .iter()
                .rev()
                .find(|o| o.kind == segment::Kind::Snapshot)
                .filter(|o| o.seq < head.seq)
                .into_iter()
                .cloned()
                .collect();
            expected.push(head.clone());
            assert_eq!(got.as_ref(), Some(&expected), "{kind} {prefix}");
        }
        let seqs = |prefix: &str| {
            let found = tips.found.iter().find(|f| f.name == prefix).unwrap();
            let got = found.tips.as_ref().unwrap();
            got.iter().map(|o| (o.seq, o.kind)).collect::<Vec<_>>()
        };
        use segment::Kind::{Snapshot, Wal};
        assert_eq!(seqs("t/long"), [(500, Snapshot), (1199, Wal)], "{kind}");
        assert_eq!(seqs("t/snap"), [(2, Snapshot)], "{kind}");
        assert_eq!(seqs("t/gone"), [(1, Snapshot), (5, Wal)], "{kind}");
        assert_eq!(seqs("t/legacy"), [(2, Snapshot), (3, Wal)], "{kind}");
    }
}

/// In a local store, a directory reached through a link (a volume mounted
/// elsewhere) is listed under the link's name by the whole-store listing,
/// as the listing of that prefix alone finds it: otherwise a fleet would
/// start a new chain over the one it cannot see. A link back up ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_directory_in_a_local_store_is_listed_as_its_own_prefix_is() {
    use walsync::segment;
    let store = common::fs_store();
    let storage = store.storage.as_ref();
    for seq in 0..3 {
        put_named(storage, segment::object_key("real/db", seq)).await;
    }
    let root = std::path::PathBuf::from(store.url.trim_start_matches("file://"));
    std::os::unix::fs::symlink(root.join("real"), root.join("tenants")).unwrap();
    std::os::unix::fs::symlink(&root, root.join("real").join("up")).unwrap();
    let tips = walsync::tips::list_tips(storage).await.unwrap();
    let names: Vec<&str> = tips.found.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["real/db", "tenants/db"]);
    for found in &tips.found {
        let own = chain::list(storage, &found.name).await.unwrap();
        assert_eq!(own.len(), 3, "{}", found.name);
        assert_eq!(found.tips.as_ref().unwrap().last(), own.last());
    }
}

/// A watched directory removed and made again is a new directory the old
/// watch does not see: it is watched again, so a database made in it is
/// found, and its commits ship on their file events, with no edit of the
/// configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_removed_and_made_again_is_watched_again() {
    let store = common::fs_store();
    let dir = tempfile::tempdir().unwrap();
    // Nothing watched sees `data` come back (its parent is not watched):
    // only walsync looking for it again does.
    let (conf, data) = (dir.path().join("conf"), dir.path().join("data"));
    std::fs::create_dir(&conf).unwrap();
    std::fs::create_dir(&data).unwrap();
    drop(create_db(&data.join("a.db"), 1));
    let config = conf.join("walsync.toml");
    let quiet = config_with_watch(
        &store,
        "close_idle_after = \"0s\"",
        &dir_entry(&data, "t/{name}"),
    );
    std::fs::write(&config, quiet).unwrap();
    let (token, handle) = start(&store, &config);
    wait_for("a's snapshot", async || snapshots(&store, "t/a").await == 1).await;
    std::fs::remove_dir_all(&data).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::create_dir(&data).unwrap();
    let conn = create_db(&data.join("z.db"), 3);
    wait_for("z in the new directory", async || {
        snapshots(&store, "t/z").await == 1
    })
    .await;
    for n in 2..5 {
        conn.execute("INSERT INTO t(v) VALUES ('more')", [])
            .unwrap();
        wait_for("z's commit", async || objects(&store, "t/z").await == n).await;
    }
    token.cancel();
    handle.await.unwrap().unwrap();
}

/// A configuration file that is a link into another directory (where it
/// is edited) reloads on an edit there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_configuration_reloads_when_its_target_is_edited() {
    let store = common::fs_store();
    let dir = tempfile::tempdir().unwrap();
    let (conf, data) = (dir.path().join("conf"), dir.path().join("data"));
    std::fs::create_dir(&conf).unwrap();
    std::fs::create_dir(&data).unwrap();
    let (a, b) = (data.join("a.db"), data.join("b.db"));
    drop(create_db(&a, 1));
    drop(create_db(&b, 1));
    let entry = |db: &Path, prefix: &str| {
        format!(
            "[[databases]]\npath = \"{}\"\nprefix = \"{prefix}\"\n",
            db.display()
        )
    };
    // Kept open and left alone, `a` makes no file events that would make
    // walsync read the configuration again by the way.
    let text = |body: &str| config_with_watch(&store, "close_idle_after = \"0s\"", body);
    let target = conf.join("walsync.toml");
    std::fs::write(&target, text(&entry(&a, "a"))).unwrap();
    let link = dir.path().join("walsync.toml");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let (token, handle) = start(&store, &link);
    wait_for("a's snapshot", async || snapshots(&store, "a").await == 1).await;
    // The rescan the snapshot's own files set off is over.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Edited in place where the file is.
    let both = format!("{}{}", entry(&a, "a"), entry(&b, "b"));
    std::fs::write(&target, text(&both)).unwrap();
    wait_for("b, added by the edit", async || {
        snapshots(&store, "b").await == 1
    })
    .await;
    token.cancel();
    handle.await.unwrap().unwrap();
}

/// A file a `path` entry names is that entry's, also where a `dir` entry
/// matches it too, and also when it appears only after the start: it is
/// replicated under its own prefix, the directory's other databases under
/// theirs, and discovery goes on (it had refused the whole set, so every
/// database made later went unreplicated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_named_on_its_own_is_left_out_of_its_directorys_entry() {
    let store = common::fs_store();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    drop(create_db(&data.join("a.db"), 1));
    let special = data.join("special.db");
    let config = dir.path().join("walsync.toml");
    let body = format!(
        "{}[[databases]]\npath = \"{}\"\nprefix = \"special\"\n",
        dir_entry(&data, "t/{name}"),
        special.display()
    );
    std::fs::write(&config, config_text(&store, &body)).unwrap();
    let (token, handle) = start(&store, &config);
    wait_for("a", async || snapshots(&store, "t/a").await == 1).await;
    drop(create_db(&special, 2));
    wait_for("special, under its own prefix", async || {
        snapshots(&store, "special").await == 1
    })
    .await;
    drop(create_db(&data.join("y.db"), 3));
    wait_for("y, made after", async || {
        snapshots(&store, "t/y").await == 1
    })
    .await;
    assert_eq!(objects(&store, "t/special").await, 0);
    token.cancel();
    handle.await.unwrap().unwrap();
}
