//! Issue 16, 2: the status page in a real browser. Debian's Chromium,
//! headless, loads `/` from a running `watch` whose fleet holds a database
//! in every state (fine, lagging, failing, degraded) and the DOM it builds is
//! checked: problems first, each said, the rest after. A page of 10,000
//! databases renders short, the problems on top. The screenshot it takes is
//! the one in docs/.

use crate::cli::{db_status, free_port, http_get, wait_for_status, with_store};
use crate::common::{self, create_db, walsync};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use walsync::serve::page::status_page;
use walsync::status::{DbStatus, Snapshot, State};

/// Chromium: `WALSYNC_TEST_CHROMIUM` (set by `.ci/run`, which then requires
/// it), else Debian's if installed.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("WALSYNC_TEST_CHROMIUM") {
        let path = PathBuf::from(path);
        assert!(path.exists(), "WALSYNC_TEST_CHROMIUM={}", path.display());
        return Some(path);
    }
    let path = PathBuf::from("/usr/bin/chromium");
    path.exists().then_some(path)
}

/// The DOM Chromium builds from `url`, and with `screenshot` a picture of it.
fn render(chromium: &Path, url: &str, screenshot: Option<&Path>) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(chromium);
    // As root, without a sandbox; no background traffic on a closed network.
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()));
    match screenshot {
        Some(path) => cmd
            .arg(format!("--screenshot={}", path.display()))
            .arg("--window-size=1280,640"),
        None => cmd.arg("--dump-dom"),
    };
    let output = cmd.arg(url).stdin(Stdio::null()).output().unwrap();
    assert!(
        output.status.success(),
        "chromium {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// The rows of the rendered table: (class, cells).
fn rows(dom: &str) -> Vec<(String, Vec<String>)> {
    let table = &dom[dom.find("<table id=\"databases\"").unwrap()..];
    table
        .split("<tr")
        .skip(2)
        .map(|tr| {
            let class = tr
                .strip_prefix(" class=\"")
                .and_then(|c| c.split('"').next())
                .unwrap_or("")
                .to_string();
            let cells = tr
                .split("<td")
                .skip(1)
                .map(|td| {
                    let text = td.split_once('>').map_or("", |(_, t)| t);
                    text.split("</td>").next().unwrap_or("").to_string()
                })
                .collect();
            (class, cells)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_a_browser_shows_every_state_problems_first() {
    use common::faults::{FaultProxy, Plan};
    let Some(chromium) = chromium() else {
        eprintln!("skipped: no Chromium (apt-get install chromium, or set WALSYNC_TEST_CHROMIUM)");
        return;
    };
    let (store, proxy) = FaultProxy::before_s3_store().await;
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(format!("{name}.db"));
    for name in ["fine", "also-fine", "slow", "churn"] {
        drop(create_db(&path(name), 3));
    }
    // A file a pattern finds once `watch` runs, and not a database.
    std::fs::create_dir(dir.path().join("later")).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("walsync.toml");
    let mut entries: String = ["fine", "also-fine", "slow", "churn"]
        .iter()
        .map(|n| format!("[[databases]]\npath = \"{}\"\n", path(n).display()))
        .collect();
    entries.push_str(&format!(
        "[[databases]]\npath = \"{}/later/*.db\"\n",
        dir.path().display()
    ));
    std::fs::write(
        &config,
        store.config(&format!(
            "[sync]\nsync_interval = \"0s\"\n[watch]\nlisten = \"{addr}\"\n\
             close_idle_after = \"200ms\"\n{entries}"
        )),
    )
    .unwrap();
    let mut cmd = walsync();
    cmd.args(["watch", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    with_store(&mut cmd, &store);
    cmd.env("AWS_ENDPOINT_URL_S3", &proxy.endpoint);
    let _watch = common::Reaped::new(cmd.spawn().unwrap());
    let closed = |d: &serde_json::Value| d["state"] == "closed";
    for name in ["fine", "also-fine", "slow", "churn"] {
        wait_for_status(&addr, name, "shipped and closed", closed).await;
    }
    std::fs::write(dir.path().join("later/broken.db"), vec![0x5a; 8192]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, status) = http_get(&addr, "/status.json");
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        let stopped = status["databases"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["prefix"] == "broken" && d["state"] == "stopped");
        if stopped {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never stopped: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Degraded: the file replaced three times, each loss caught.
    for round in 1..=3u64 {
        let other = dir.path().join("other.db");
        let conn = create_db(&other, 1);
        conn.execute("INSERT INTO t(v) VALUES (?1)", [format!("round {round}")])
            .unwrap();
        drop(conn);
        std::fs::rename(&other, path("churn")).unwrap();
        wait_for_status(&addr, "churn", "shipped after the replacement", |d| {
            d["continuity_losses"] == round && closed(d)
        })
        .await;
    }
    // Lagging: its store answers its writes after 120 s, long past the grace.
    proxy.set_plan(Plan {
        delay: 1.0,
        delay_for: Duration::from_secs(120),
        delay_only: Some("/slow/"),
        ..Plan::healthy()
    });
    let conn = rusqlite::Connection::open(path("slow")).unwrap();
    conn.execute("INSERT INTO t(v) VALUES ('late')", [])
        .unwrap();
    drop(conn);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, health) = http_get(&addr, "/health");
        if code == 503 && health.contains("slow: changes unshipped") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never lagging: {health}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, status) = http_get(&addr, "/status.json");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!(db_status(&status, "fine")["last_error"].is_null());

    let url = format!("http://{addr}/");
    let dom = render(&chromium, &url, None);
    assert!(
        dom.contains("5 databases: 3 with a problem (2 unhealthy, 1 degraded), 2 fine"),
        "{dom}"
    );
    assert!(dom.contains("id=\"degraded\""), "{dom}");
    let rows = rows(&dom);
    let summary: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|(class, cells)| (class.as_str(), cells[0].as_str(), cells[2].as_str()))
        .collect();
    // The lagging one is open or closed, as its sync stands: its problem says it.
    let slow_state = summary.get(1).map_or("", |r| r.2);
    assert_eq!(
        summary,
        [
            ("bad", "broken", "stopped"),
            ("bad", "slow", slow_state),
            ("degraded", "churn", "degraded"),
            ("", "also-fine", "closed"),
            ("", "fine", "closed"),
        ],
        "{dom}"
    );
    assert!(
        rows[0].1[6].contains("not a SQLite database"),
        "{:?}",
        rows[0]
    );
    assert!(
        rows[1].1[6].contains("changes unshipped for"),
        "{:?}",
        rows[1]
    );
    assert!(
        rows[2].1[6].contains("continuity lost 3 times"),
        "{:?}",
        rows[2]
    );

    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/status-page.png");
    let _ = std::fs::remove_file(&shot);
    render(&chromium, &url, Some(&shot));
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    proxy.set_plan(Plan::healthy());
}

/// 10,000 databases, two of them failing: the page Chromium renders is
/// short, the two on top, the rest summed up in one row; `?all` lists all.
#[test]
fn ten_thousand_databases_render_short_with_the_problems_on_top() {
    let Some(chromium) = chromium() else {
        eprintln!("skipped: no Chromium");
        return;
    };
    let failing = [4_242, 9_999];
    let databases = (0..10_000)
        .map(|i| DbStatus {
            prefix: format!("tenants/{i:05}"),
            path: format!("/data/tenants/{i:05}.db"),
            state: if failing.contains(&i) {
                State::Failing
            } else {
                State::Closed
            },
            last_error: failing
                .contains(&i)
                .then(|| "storage refused: AccessDenied".into()),
            head: Some(40),
            last_sync_ms: Some(1_000),
            sync_interval_ms: 1_000,
            ..DbStatus::default()
        })
        .collect();
    let snapshot = Snapshot {
        started_ms: 0,
        now_ms: 2_000,
        databases,
        config: Default::default(),
    };
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("page.html");
    std::fs::write(&page, status_page(&snapshot, false)).unwrap();
    let dom = render(&chromium, &format!("file://{}", page.display()), None);
    let rows = rows(&dom);
    assert_eq!(rows.len(), 2 + 50 + 1);
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1[0].as_str()),
        ("bad", "tenants/04242")
    );
    assert_eq!(
        (rows[1].0.as_str(), rows[1].1[0].as_str()),
        ("bad", "tenants/09999")
    );
    let last = &rows[52];
    assert_eq!(last.0, "summary");
    assert!(
        last.1[0].contains("and 9948 more databases, all fine"),
        "{last:?}"
    );
    assert!(dom.contains("10000 databases: 2 with a problem (2 unhealthy, 0 degraded), 9998 fine"));
}
