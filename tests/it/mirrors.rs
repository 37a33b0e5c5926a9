//! Issue 16, 5: one database replicated to two stores (`[storage]` and a
//! `[[mirrors]]` entry), each holding the whole chain. The release binary
//! runs as the user runs it, the app in its own process, and the store that
//! fails is an S3 bucket behind the fault proxy while the other, a local
//! directory, goes on.

use std::process::Stdio;
use std::time::{Duration, Instant};

use walsync::chain;
use walsync::segment::Kind;
use walsync::storage::Storage;

use crate::cli::{LiveLog, cfg, free_port, run, terminate, wait_for_status, with_store};
use crate::common::app::{AppOptions, AppProcess};
use crate::common::faults::{Counts, FaultProxy, Plan};
use crate::common::{self, TestStore, blob_rows, walsync};

/// `(sequence, kind, key)` of every object of `prefix` (runs aside).
async fn objects(storage: &dyn Storage, prefix: &str) -> Vec<(u64, Kind, String)> {
    chain::list(storage, prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.seq, o.kind, o.key))
        .collect()
}

/// Waits up to a minute for `check` to hold.
async fn wait_until(what: &str, log: &LiveLog, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(Instant::now() < deadline, "never {what}:\n{}", log.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The lines of the database's `stores` column on `/status.json`.
fn store_lines(d: &serde_json::Value) -> Vec<String> {
    d["stores"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// `walsync watch --config CONFIG`, with `store`'s credentials, its log read
/// as it comes.
fn watch_logged(config: &std::path::Path, store: &TestStore) -> (common::Reaped, LiveLog) {
    let mut cmd = walsync();
    cmd.args(["watch", "--config", cfg(config)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    with_store(&mut cmd, store);
    let mut child = common::Reaped::new(cmd.spawn().unwrap());
    let log = LiveLog::of(&mut child);
    (child, log)
}

/// `walsync sync --wait` of the running `watch`, failing if it takes longer
/// than `timeout`: every commit so far is in a store.
fn sync_wait_within(config: &std::path::Path, log: &LiveLog, timeout: &str) {
    let output = run(walsync()
        .args(["sync", "--config", cfg(config), "--wait"])
        .args(["--timeout", timeout]));
    assert!(
        output.status.success(),
        "sync --wait: {}{}",
        String::from_utf8_lossy(&output.stderr),
        log.text()
    );
}

/// `walsync restore` of `app` with `config`, from `[storage]` or the mirror
/// `from` (reached with `store`'s credentials), into a file beside the
/// configuration: it must hold the rows of `db`.
fn restored_equal(
    config: &std::path::Path,
    store: &TestStore,
    from: Option<&str>,
    db: &std::path::Path,
) {
    let name = from.unwrap_or("storage");
    let out = config.with_file_name(format!("restored-{name}.db"));
    let mut cmd = walsync();
    cmd.args([
        "restore",
        "--config",
        cfg(config),
        "--prefix",
        "app",
        "--force",
    ])
    .args(["-o", cfg(&out)]);
    if let Some(name) = from {
        cmd.args(["--from", name]);
    }
    with_store(&mut cmd, store);
    let output = run(&mut cmd);
    assert!(
        output.status.success(),
        "restore from {name}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(blob_rows(&out), blob_rows(db), "restored from {name}");
}

struct Setup {
    s3: TestStore,
    proxy: FaultProxy,
    local: TestStore,
    /// Holds the database and the configuration until the test ends.
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    config: std::path::PathBuf,
    addr: String,
}

/// A database, an S3 bucket behind a fault proxy and a local directory,
/// and a walsync.toml with the bucket as `[storage]` (`s3_first`) or as
/// the mirror `far`.
async fn setup(s3_first: bool, sync: &str) -> Setup {
    let (s3, proxy) = FaultProxy::before_s3_store().await;
    let local = common::fs_store();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let addr = format!("127.0.0.1:{}", free_port());
    let s3_keys = format!("url = \"{}\"\nendpoint = \"{}\"\n", s3.url, proxy.endpoint);
    let local_keys = format!("url = \"{}\"\n", local.url);
    let (storage, mirror) = if s3_first {
        (s3_keys, local_keys)
    } else {
        (local_keys, s3_keys)
    };
    let text = format!(
        "[storage]\n{storage}\n[[mirrors]]\nname = \"far\"\n{mirror}\n\
         [sync]\nsync_interval = \"100ms\"\n{sync}\n[watch]\nlisten = \"{addr}\"\n\
         [[databases]]\npath = \"{}\"\nprefix = \"app\"\n",
        db.display()
    );
    let config = dir.path().join("walsync.toml");
    std::fs::write(&config, text).unwrap();
    Setup {
        s3,
        proxy,
        local,
        _dir: dir,
        db,
        config,
        addr,
    }
}

impl Setup {
    /// An app process that writes 20 rows, and `watch` running until both
    /// stores hold the first snapshot.
    async fn start(&self) -> (AppProcess, common::Reaped, LiveLog) {
        let mut app = AppProcess::spawn(&self.db, AppOptions::default());
        app.insert(20, 100);
        let (child, log) = self.watch();
        let (s3, local) = (self.s3.storage.as_ref(), self.local.storage.as_ref());
        // Its mark too: a store going dark between the two would owe one
        // more PUT than the objects it missed.
        wait_until("both stores have the snapshot", &log, async || {
            objects(s3, "app").await.len() == 1
                && objects(local, "app").await.len() == 1
                && common::count_snapshots(s3, "app").await == 1
                && common::count_snapshots(local, "app").await == 1
        })
        .await;
        (app, child, log)
    }

    fn watch(&self) -> (common::Reaped, LiveLog) {
        watch_logged(&self.config, &self.s3)
    }

    /// The bucket resets every request (`true`), or answers again.
    fn dark(&self, dark: bool) {
        self.proxy.set_plan(Plan {
            outage: dark,
            ..Plan::healthy()
        });
    }

    /// `walsync sync --wait`: every commit so far is in a store.
    fn sync_wait(&self, log: &LiveLog) {
        sync_wait_within(&self.config, log, "60s");
    }

    /// `watch`, running until `[storage]` holds the database's snapshot.
    async fn watch_until_storage_has_it(&self) -> (common::Reaped, LiveLog) {
        let (child, log) = self.watch();
        let local = self.local.storage.as_ref();
        wait_until("[storage] has the snapshot", &log, async || {
            !objects(local, "app").await.is_empty()
        })
        .await;
        (child, log)
    }

    /// Waits until the mirror holds what `[storage]` holds, stops `watch`
    /// and the app, and checks that the mirror got one snapshot and that
    /// both stores restore the app's rows.
    async fn caught_up_once(&self, app: AppProcess, mut child: common::Reaped, log: &LiveLog) {
        let (s3, local) = (self.s3.storage.as_ref(), self.local.storage.as_ref());
        wait_until("the mirror caught up", log, async || {
            objects(s3, "app").await == objects(local, "app").await
        })
        .await;
        assert!(terminate(&mut child).success(), "{}", log.text());
        assert_eq!(common::count_snapshots(s3, "app").await, 1);
        app.quit();
        self.restore_from_both();
    }

    /// Restores `app` from `[storage]` and from the mirror; each must equal
    /// the source's rows.
    fn restore_from_both(&self) {
        for from in [None, Some("far")] {
            restored_equal(&self.config, &self.s3, from, &self.db);
        }
    }
}

/// The bucket goes dark for a while (every request reset) while the app
/// commits; the local store keeps receiving every object, the status page
/// names the store behind, and once the bucket answers again the objects it
/// missed are copied to it: both chains end up identical, with no second
/// snapshot taken, and each restores the source's rows. Run with the bucket
/// as `[storage]` and as the mirror: neither holds back the other.
async fn one_store_down_then_caught_up(s3_first: bool) {
    let setup = setup(s3_first, "compaction = \"off\"").await;
    let (s3, local) = (setup.s3.storage.as_ref(), setup.local.storage.as_ref());
    let (mut app, mut child, log) = setup.start().await;

    setup.dark(true);
    let dark = objects(s3, "app").await;
    let shipped = objects(local, "app").await.len();
    for _ in 0..5 {
        app.insert(3, 100);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The running watch says every commit is in storage: the store that
    // went on counts.
    setup.sync_wait(&log);
    assert!(objects(local, "app").await.len() > shipped);
    let which = if s3_first { "[storage]" } else { "mirror far" };
    wait_for_status(&setup.addr, "app", "a store behind", |d| {
        store_lines(d)
            .iter()
            .any(|l| l.starts_with(which) && l.contains("behind"))
            && d["state"] != "failing"
    })
    .await;
    assert_eq!(
        objects(s3, "app").await,
        dark,
        "nothing reached the dark bucket"
    );

    let puts = || Counts::get(&setup.proxy.counts().puts);
    let puts_before = puts();
    setup.dark(false);
    wait_until("the bucket caught up", &log, async || {
        objects(s3, "app").await == objects(local, "app").await
    })
    .await;
    wait_for_status(&setup.addr, "app", "no store behind", |d| {
        store_lines(d).is_empty()
    })
    .await;
    // New commits go to both again.
    let before = objects(local, "app").await.len();
    app.insert(2, 100);
    wait_until("the next commit reached both", &log, async || {
        let both = objects(local, "app").await;
        both.len() > before && objects(s3, "app").await == both
    })
    .await;
    assert!(terminate(&mut child).success(), "{}", log.text());
    let text = log.text();
    assert_eq!(log.count("walsync::mirror: caught up"), 1, "{text}");
    assert_eq!(log.count("taking a snapshot"), 1, "{text}");
    assert_eq!(common::count_snapshots(s3, "app").await, 1, "{text}");
    assert_eq!(common::count_snapshots(local, "app").await, 1, "{text}");
    // One PUT per object the bucket missed (and the one after): the copy
    // did not send the chain again.
    let missed = objects(s3, "app").await.len() - dark.len();
    assert_eq!(puts() - puts_before, missed as u64, "{text}");
    app.quit();
    setup.restore_from_both();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_fails_never_holds_back_storage_and_catches_up() {
    one_store_down_then_caught_up(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_that_fails_never_holds_back_the_mirror_and_catches_up() {
    one_store_down_then_caught_up(true).await;
}

/// The mirror stays dark until compaction has deleted, from the store that
/// went on, objects the mirror lacks: copying cannot catch it up, so the
/// next snapshot does (to both stores, reason `catch_up`), and the mirror
/// restores the source's rows from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_whose_missing_objects_are_gone_is_caught_up_by_a_snapshot() {
    let setup = setup(false, "compaction = [4]\nexact_window = \"1s\"").await;
    let (s3, local) = (setup.s3.storage.as_ref(), setup.local.storage.as_ref());
    let (mut app, mut child, log) = setup.start().await;
    setup.dark(true);
    for _ in 0..20 {
        app.insert(3, 100);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    wait_until(
        "compaction deleted what the mirror lacks",
        &log,
        async || {
            let listed = objects(local, "app").await;
            listed.last().is_some_and(|o| (listed.len() as u64) < o.0)
        },
    )
    .await;
    setup.dark(false);
    wait_for_status(&setup.addr, "app", "the mirror caught up", |d| {
        store_lines(d).is_empty() && d["snapshots"]["catch_up"] == 1
    })
    .await;
    let mirror = objects(s3, "app").await;
    let newest_snapshot = mirror.iter().rev().find(|o| o.1 == Kind::Snapshot).unwrap();
    assert!(newest_snapshot.0 > 1, "a new snapshot: {mirror:?}");
    assert!(
        objects(local, "app").await.contains(newest_snapshot),
        "the same snapshot in both stores"
    );
    assert!(terminate(&mut child).success(), "{}", log.text());
    assert_eq!(common::count_snapshots(local, "app").await, 2);
    app.quit();
    setup.restore_from_both();
}

/// Mistakes in `[[mirrors]]` are refused up front, each naming the entry;
/// `--from` a name the file does not have says which it has.
#[test]
fn mirror_mistakes_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("walsync.toml");
    let base = "[storage]\nurl = \"/r/a\"\n[[databases]]\npath = \"/data/app.db\"\n";
    for (mirrors, says) in [
        (
            "[[mirrors]]\nurl = \"/r/b\"\n",
            "mirrors[0]: name is missing",
        ),
        (
            "[[mirrors]]\nname = \"a b\"\nurl = \"/r/b\"\n",
            "mirrors[0].name must be",
        ),
        (
            "[[mirrors]]\nname = \"x\"\nurl = \"/r/a\"\n",
            "mirrors[0] (x): the same store as [storage]",
        ),
        (
            "[[mirrors]]\nname = \"x\"\nurl = \"/r/b\"\n[[mirrors]]\nname = \"x\"\nurl = \"/r/c\"\n",
            "mirrors[1]: two mirrors are named x",
        ),
        (
            "[[mirrors]]\nname = \"x\"\nurl = \"/r/b\"\n[[mirrors]]\nname = \"y\"\nurl = \"/r/b/\"\n",
            "mirrors[1] (y): the same store as mirror x",
        ),
        (
            "[[mirrors]]\nname = \"x\"\nbucket = \"b\"\nurl = \"/r/b\"\n",
            "mirrors[0] (x): give either url or bucket",
        ),
        (
            "[[mirrors]]\nname = \"x\"\nurl = \"/r/b\"\nregion_name = \"eu\"\n",
            "mirrors[0]: unknown field `region_name`",
        ),
        (
            "[[mirrors]]\nname = 5\nurl = \"/r/b\"\n",
            "mirrors[0].name must be a string",
        ),
        (
            "[[mirrors]]\nname = \"x\"\nurl = \"file:///r/./a/\"\n",
            "mirrors[0] (x): the same store as [storage]",
        ),
        (
            "[[mirrors]]\nname = \"x\"\nurl = \"/r/a/inner\"\n",
            "mirrors[0] (x): inside, or around, the store of [storage]",
        ),
    ] {
        std::fs::write(&config, format!("{base}{mirrors}")).unwrap();
        let output = run(walsync().args(["explain", "--config", cfg(&config)]));
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{mirrors}");
        assert!(err.contains(says), "{mirrors}: {err}");
        assert!(err.contains(cfg(&config)), "names the file: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }

    std::fs::write(
        &config,
        format!("{base}[[mirrors]]\nname = \"far\"\nurl = \"/r/b\"\n"),
    )
    .unwrap();
    let output = run(walsync().args(["explain", "--config", cfg(&config)]));
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{out}");
    assert!(out.contains("mirror far") && out.contains("/r/b"), "{out}");
    for command in ["list", "verify"] {
        let output = run(walsync().args([command, "--config", cfg(&config), "--from", "near"]));
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(
            err.contains("no [[mirrors]] entry is named near (mirrors: far)"),
            "{command}: {err}"
        );
    }
    // A mirror naming an unset variable is needed only to read that mirror.
    let replica = dir.path().join("replica");
    std::fs::create_dir_all(&replica).unwrap();
    std::fs::write(
        &config,
        format!(
            "[storage]\nurl = \"{}\"\n[[mirrors]]\nname = \"far\"\n\
             url = \"${{WALSYNC_TEST_UNSET_MIRROR}}\"\n[[databases]]\npath = \"/data/app.db\"\n",
            replica.display()
        ),
    )
    .unwrap();
    let list = |more: &[&str]| {
        let mut cmd = walsync();
        cmd.env_remove("WALSYNC_TEST_UNSET_MIRROR")
            .args(["list", "--config", cfg(&config)])
            .args(more);
        run(&mut cmd)
    };
    let output = list(&[]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = list(&["--from", "far"]);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        err.contains("mirror far") && err.contains("WALSYNC_TEST_UNSET_MIRROR"),
        "{err}"
    );
    let output = run(walsync().env_remove("WALSYNC_TEST_UNSET_MIRROR").args([
        "explain",
        "--config",
        cfg(&config),
    ]));
    assert!(
        !output.status.success(),
        "watch and explain need every mirror"
    );

    // No configuration anywhere: --from has nothing to name.
    let empty = tempfile::tempdir().unwrap();
    let output = run(walsync()
        .current_dir(empty.path())
        .args(["list", "--from", "far"]));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        err.contains("--from far names a [[mirrors]] entry") && err.contains("--config"),
        "{err}"
    );
}

/// walsync stops while `[storage]` is dark and starts again once it is
/// back: the listing at start finds the mirror ahead, goes on from the
/// mirror's head (the database is continued, no snapshot), and copies to
/// `[storage]` what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_while_storage_is_behind_it_goes_on_from_the_mirror() {
    let setup = setup(true, "compaction = \"off\"").await;
    let (s3, local) = (setup.s3.storage.as_ref(), setup.local.storage.as_ref());
    let (mut app, mut child, log) = setup.start().await;
    setup.dark(true);
    for _ in 0..3 {
        app.insert(3, 100);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    setup.sync_wait(&log);
    assert!(terminate(&mut child).success(), "{}", log.text());
    assert_eq!(objects(s3, "app").await.len(), 1);
    let shipped = objects(local, "app").await;
    assert!(shipped.len() > 1);

    setup.dark(false);
    let (mut child, log) = setup.watch();
    wait_until("[storage] caught up", &log, async || {
        objects(s3, "app").await == objects(local, "app").await
    })
    .await;
    app.insert(1, 100);
    setup.sync_wait(&log);
    wait_until("the next commit reached both", &log, async || {
        let both = objects(local, "app").await;
        both.len() > shipped.len() && objects(s3, "app").await == both
    })
    .await;
    assert!(terminate(&mut child).success(), "{}", log.text());
    let text = log.text();
    assert_eq!(log.count("taking a snapshot"), 0, "{text}");
    assert_eq!(log.count("continuing the chain in storage"), 1, "{text}");
    assert_eq!(common::count_snapshots(s3, "app").await, 1);
    app.quit();
    setup.restore_from_both();
}

/// The mirror answers nothing for 20 s (every request held by the proxy)
/// instead of failing: `[storage]` does not wait for it. Commits ship to
/// the local store while the mirror's first write is still held, and once
/// that write lands the mirror is caught up with the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_hangs_never_holds_back_storage() {
    let setup = setup(false, "compaction = \"off\"").await;
    let (s3, local) = (setup.s3.storage.as_ref(), setup.local.storage.as_ref());
    let (mut app, mut child, log) = setup.start().await;
    setup.proxy.set_plan(Plan {
        delay: 1.0,
        delay_for: Duration::from_secs(20),
        ..Plan::healthy()
    });
    let counts = setup.proxy.counts();
    // Each commit is in storage long before the mirror's write is let
    // through (20 s): nothing waits for it.
    for _ in 0..3 {
        app.insert(3, 100);
        sync_wait_within(&setup.config, &log, "10s");
    }
    assert!(objects(local, "app").await.len() >= 4);
    assert!(
        Counts::get(&counts.in_flight) > 0,
        "the mirror's write is still held while three commits shipped:\n{}",
        log.text()
    );
    setup.dark(false);
    wait_until("the mirror caught up", &log, async || {
        objects(s3, "app").await == objects(local, "app").await
    })
    .await;
    assert!(terminate(&mut child).success(), "{}", log.text());
    assert_eq!(log.count("a store is slow"), 1, "{}", log.text());
    assert_eq!(common::count_snapshots(s3, "app").await, 1);
    app.quit();
    setup.restore_from_both();
}

/// The mirror answers nothing when walsync starts (every request held for
/// 40 s): its start-up check and listing are given up on after a bounded
/// time, so `[storage]` has the database's snapshot before the mirror has
/// answered a single request, and the mirror is caught up once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_hangs_at_start_never_holds_back_storage() {
    let setup = setup(false, "compaction = \"off\"").await;
    let mut app = AppProcess::spawn(&setup.db, AppOptions::default());
    app.insert(20, 100);
    setup.proxy.set_plan(Plan {
        delay: 1.0,
        delay_for: Duration::from_secs(40),
        ..Plan::healthy()
    });
    let counts = setup.proxy.counts();
    let (child, log) = setup.watch_until_storage_has_it().await;
    assert_eq!(
        Counts::get(&counts.forwarded),
        0,
        "[storage] waited for the mirror:\n{}",
        log.text()
    );
    assert_eq!(
        log.count("did not answer the start-up check"),
        1,
        "{}",
        log.text()
    );
    setup.proxy.set_plan(Plan::healthy());
    app.insert(3, 100);
    setup.sync_wait(&log);
    setup.caught_up_once(app, child, &log).await;
}

/// The mirror is dark when walsync starts, so it cannot be listed: the
/// database is replicated to `[storage]` at once, and the mirror, once it
/// answers, is listed, found empty and caught up from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_dark_at_start_is_listed_and_caught_up_later() {
    let setup = setup(false, "compaction = \"off\"").await;
    let mut app = AppProcess::spawn(&setup.db, AppOptions::default());
    app.insert(20, 100);
    setup.dark(true);
    let (child, log) = setup.watch_until_storage_has_it().await;
    app.insert(3, 100);
    setup.sync_wait(&log);
    assert!(objects(setup.s3.storage.as_ref(), "app").await.is_empty());
    setup.dark(false);
    setup.caught_up_once(app, child, &log).await;
}

/// walsync starts while the mirror, which holds the whole chain, is dark:
/// once it answers it is listed, found to end at the chain's head (its
/// last object is the head itself), and is current again without a single
/// object written, although the database has not changed since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_dark_at_start_that_has_everything_is_current_once_listed() {
    let setup = setup(false, "compaction = \"off\"").await;
    let (s3, local) = (setup.s3.storage.as_ref(), setup.local.storage.as_ref());
    let (mut app, mut child, log) = setup.start().await;
    app.insert(3, 100);
    setup.sync_wait(&log);
    wait_until("both stores have every object", &log, async || {
        objects(s3, "app").await.len() == 2 && objects(local, "app").await.len() == 2
    })
    .await;
    assert!(terminate(&mut child).success(), "{}", log.text());

    setup.dark(true);
    let (mut child, log) = setup.watch();
    wait_for_status(&setup.addr, "app", "the mirror behind", |d| {
        store_lines(d)
            .iter()
            .any(|l| l.starts_with("mirror far behind"))
    })
    .await;
    let puts = Counts::get(&setup.proxy.counts().puts);
    setup.dark(false);
    wait_for_status(&setup.addr, "app", "the mirror current", |d| {
        store_lines(d).is_empty()
    })
    .await;
    assert_eq!(
        Counts::get(&setup.proxy.counts().puts),
        puts,
        "nothing written"
    );
    assert!(terminate(&mut child).success(), "{}", log.text());
    assert_eq!(objects(s3, "app").await, objects(local, "app").await);
    app.quit();
    setup.restore_from_both();
}

/// Another writer's object sits in the mirror where the chain's next one
/// goes: the mirror is stopped for this database, by name, the object is
/// left as it is, and `[storage]` goes on shipping and restores every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_writer_in_the_mirror_stops_the_mirror_alone() {
    use walsync::storage::Payload;
    let setup = setup(false, "compaction = \"off\"").await;
    let (s3, local) = (setup.s3.storage.as_ref(), setup.local.storage.as_ref());
    let (mut app, mut child, log) = setup.start().await;
    let squatter = walsync::segment::object_key("app", 2);
    let foreign = b"another writer's object".to_vec();
    let sha: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&foreign).into();
    s3.put_new(&squatter, Payload::Bytes(foreign.clone()), sha)
        .await
        .unwrap();
    for _ in 0..3 {
        app.insert(3, 100);
        setup.sync_wait(&log);
    }
    wait_for_status(&setup.addr, "app", "the mirror stopped", |d| {
        store_lines(d)
            .iter()
            .any(|l| l.starts_with("mirror far stopped") && l.contains("already exists"))
            && d["state"] != "stopped"
    })
    .await;
    assert!(objects(local, "app").await.len() >= 4);
    let (code, health) = crate::cli::http_get(&setup.addr, "/health");
    assert_eq!(code, 200, "{health}");
    assert!(
        health.contains("store: app: mirror far stopped"),
        "{health}"
    );
    assert_eq!(
        walsync::storage::get_bytes(s3, &squatter).await.unwrap(),
        foreign
    );
    assert!(terminate(&mut child).success(), "{}", log.text());
    assert!(
        log.text()
            .contains("another writer owns this prefix in this store")
    );
    app.quit();
    restored_equal(&setup.config, &setup.s3, None, &setup.db);
}

/// `[storage]` holds another writer's object where the chain's next goes
/// while the mirror is behind (dark): the database does not stop. Once the
/// mirror answers it starts again from a snapshot (reason `catch_up`) and
/// restores every row; the other writer's object is left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_writer_in_storage_while_the_mirror_is_behind_does_not_stop_the_database() {
    use walsync::storage::Payload;
    let setup = setup(false, "compaction = \"off\"").await;
    let (s3, local) = (setup.s3.storage.as_ref(), setup.local.storage.as_ref());
    let (mut app, mut child, log) = setup.start().await;
    setup.dark(true);
    app.insert(3, 100);
    setup.sync_wait(&log);
    wait_for_status(&setup.addr, "app", "the mirror behind", |d| {
        store_lines(d)
            .iter()
            .any(|l| l.starts_with("mirror far behind"))
    })
    .await;
    let head = objects(local, "app").await.last().unwrap().0;
    let squatter = walsync::segment::object_key("app", head + 1);
    let foreign = b"another writer's object".to_vec();
    let sha: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&foreign).into();
    local
        .put_new(&squatter, Payload::Bytes(foreign.clone()), sha)
        .await
        .unwrap();
    app.insert(3, 100);
    wait_for_status(&setup.addr, "app", "[storage] stopped", |d| {
        store_lines(d)
            .iter()
            .any(|l| l.starts_with("[storage] stopped"))
    })
    .await;
    setup.dark(false);
    wait_for_status(
        &setup.addr,
        "app",
        "the mirror caught up by a snapshot",
        |d| d["snapshots"]["catch_up"] == 1 && d["state"] != "stopped" && d["state"] != "failing",
    )
    .await;
    app.insert(1, 100);
    setup.sync_wait(&log);
    assert!(terminate(&mut child).success(), "{}", log.text());
    assert_eq!(
        walsync::storage::get_bytes(local, &squatter).await.unwrap(),
        foreign
    );
    app.quit();
    restored_equal(&setup.config, &setup.s3, Some("far"), &setup.db);
    assert!(common::count_snapshots(s3, "app").await >= 2);
}

/// Two buckets, each behind its own fault proxy. `[storage]` is dark while
/// the mirror takes every commit; walsync stops; it starts again with the
/// mirror dark and `[storage]` back. The state record beside the database
/// shows walsync shipped further than `[storage]` reaches, so the database
/// waits for the mirror instead of forking the chain from `[storage]`'s
/// shorter one; once the mirror answers, the chain goes on from it with no
/// snapshot and `[storage]` is caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_cannot_list_the_store_that_reaches_furthest_waits_for_it() {
    let (first, first_proxy) = FaultProxy::before_s3_store().await;
    let (second, second_proxy) = FaultProxy::before_s3_store().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let config = dir.path().join("walsync.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\nurl = \"{}\"\nendpoint = \"{}\"\n[[mirrors]]\nname = \"far\"\n\
             url = \"{}\"\nendpoint = \"{}\"\n[sync]\nsync_interval = \"100ms\"\n\
             compaction = \"off\"\n[[databases]]\npath = \"{}\"\nprefix = \"app\"\n",
            first.url,
            first_proxy.endpoint,
            second.url,
            second_proxy.endpoint,
            db.display()
        ),
    )
    .unwrap();
    let dark = |proxy: &FaultProxy, dark: bool| {
        proxy.set_plan(Plan {
            outage: dark,
            ..Plan::healthy()
        })
    };
    let watch = || watch_logged(&config, &first);
    let sync_wait = |log: &LiveLog| sync_wait_within(&config, log, "60s");
    let (storage, mirror) = (first.storage.as_ref(), second.storage.as_ref());
    let mut app = AppProcess::spawn(&db, AppOptions::default());
    app.insert(20, 100);
    let (mut child, log) = watch();
    wait_until("both stores have the snapshot", &log, async || {
        objects(storage, "app").await.len() == 1 && objects(mirror, "app").await.len() == 1
    })
    .await;
    dark(&first_proxy, true);
    for _ in 0..3 {
        app.insert(3, 100);
        sync_wait(&log);
    }
    assert!(terminate(&mut child).success(), "{}", log.text());
    let shipped = objects(mirror, "app").await;
    assert_eq!(objects(storage, "app").await.len(), 1);
    assert!(shipped.len() > 1);

    dark(&first_proxy, false);
    dark(&second_proxy, true);
    let (mut child, log) = watch();
    log.wait_for("sync failed", 1).await;
    assert_eq!(
        objects(storage, "app").await.len(),
        1,
        "nothing written to [storage]"
    );
    dark(&second_proxy, false);
    wait_until("[storage] caught up from the mirror", &log, async || {
        objects(storage, "app").await == objects(mirror, "app").await
    })
    .await;
    app.insert(1, 100);
    sync_wait(&log);
    assert!(terminate(&mut child).success(), "{}", log.text());
    let text = log.text();
    assert_eq!(log.count("taking a snapshot"), 0, "{text}");
    assert!(objects(mirror, "app").await.len() > shipped.len());
    assert_eq!(objects(storage, "app").await, objects(mirror, "app").await);
    app.quit();
    for (from, store) in [(None, &first), (Some("far"), &second)] {
        restored_equal(&config, store, from, &db);
    }
}

/// A fleet of databases `t00.db`, `t01.db` ... under `data` (prefixes
/// `tenants/NAME`): `[storage]` a local directory, the mirror `far` a bucket
/// behind the fault proxy.
struct Fleet {
    s3: TestStore,
    proxy: FaultProxy,
    local: TestStore,
    dir: tempfile::TempDir,
    data: std::path::PathBuf,
    config: std::path::PathBuf,
}

async fn fleet(databases: usize) -> Fleet {
    let (s3, proxy) = FaultProxy::before_s3_store().await;
    let local = common::fs_store();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tenants");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..databases {
        drop(common::create_db(&data.join(format!("t{i:02}.db")), 3));
    }
    let config = dir.path().join("walsync.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\nurl = \"{}\"\n[[mirrors]]\nname = \"far\"\nurl = \"{}\"\nendpoint = \"{}\"\n\
             [sync]\ncompaction = \"off\"\n[[databases]]\ndir = \"{}\"\nprefix = \"tenants/{{name}}\"\n",
            local.url,
            s3.url,
            proxy.endpoint,
            data.display()
        ),
    )
    .unwrap();
    Fleet {
        s3,
        proxy,
        local,
        dir,
        data,
        config,
    }
}

/// A fleet (32 databases, listed once per store at start) whose mirror
/// answers nothing at start (every request held for 60 s): no database
/// waits for it, neither at the start-up listing nor at its open, so every
/// one is in `[storage]` before the mirror has answered a request; once it
/// answers, each is caught up there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_whose_mirror_hangs_at_start_is_not_held_back() {
    const DATABASES: usize = 32;
    let Fleet {
        s3,
        proxy,
        local,
        dir: _dir,
        config,
        ..
    } = fleet(DATABASES).await;
    proxy.set_plan(Plan {
        delay: 1.0,
        delay_for: Duration::from_secs(60),
        ..Plan::healthy()
    });
    let (mut child, log) = watch_logged(&config, &s3);
    let (mirror, storage) = (s3.storage.as_ref(), local.storage.as_ref());
    wait_until("every database in [storage]", &log, async || {
        for i in 0..DATABASES {
            if objects(storage, &format!("tenants/t{i:02}"))
                .await
                .is_empty()
            {
                return false;
            }
        }
        true
    })
    .await;
    assert_eq!(
        Counts::get(&proxy.counts().forwarded),
        0,
        "[storage] waited for the mirror:\n{}",
        log.text()
    );
    assert_eq!(
        log.count("listing the store read nothing"),
        1,
        "{}",
        log.text()
    );
    proxy.set_plan(Plan::healthy());
    // Requests sent while it hung are let through only when their 60 s are
    // up: the catch-up waits for them first.
    let deadline = Instant::now() + Duration::from_secs(150);
    'caught_up: loop {
        assert!(
            Instant::now() < deadline,
            "never every database in the mirror:\n{}",
            log.text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in 0..DATABASES {
            let prefix = format!("tenants/t{i:02}");
            if objects(mirror, &prefix).await != objects(storage, &prefix).await {
                continue 'caught_up;
            }
        }
        break;
    }
    assert!(terminate(&mut child).success(), "{}", log.text());
}

/// A fleet (40 databases, past the size from which `watch` lists each store
/// once at start) with a mirror: the mirror is listed once for all of them,
/// not once per database, and every database reaches both stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_lists_its_mirror_once_at_start() {
    const DATABASES: usize = 40;
    let Fleet {
        s3,
        proxy,
        local,
        dir,
        data,
        config,
    } = fleet(DATABASES).await;
    let (mut child, log) = watch_logged(&config, &s3);
    let (mirror, storage) = (s3.storage.as_ref(), local.storage.as_ref());
    wait_until("every database in both stores", &log, async || {
        for i in 0..DATABASES {
            let prefix = format!("tenants/t{i:02}");
            if objects(mirror, &prefix).await.is_empty()
                || objects(storage, &prefix).await.is_empty()
            {
                return false;
            }
        }
        true
    })
    .await;
    let lists = Counts::get(&proxy.counts().lists);
    assert!(terminate(&mut child).success(), "{}", log.text());
    // The start-up check lists once, the start-up listing once (an empty
    // bucket is one page): never a listing per database.
    assert!(
        lists <= 4,
        "{lists} listings of the mirror:\n{}",
        log.text()
    );
    assert_eq!(log.count("listed the store once for the start-up"), 2);
    let out = dir.path().join("t07.restored.db");
    let mut cmd = walsync();
    cmd.args([
        "restore",
        "--config",
        cfg(&config),
        "--prefix",
        "tenants/t07",
    ])
    .args(["--from", "far", "-o", cfg(&out)]);
    with_store(&mut cmd, &s3);
    let output = run(&mut cmd);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(common::rows(&out), common::rows(&data.join("t07.db")));
}
