//! The optional HTTP listener (`--listen` / `[watch] listen`): `/metrics` in
//! Prometheus text format, `/health`, `/status.json`, and `/`, a status page
//! for a browser. It only reads the status board; it never touches a database.
//! [`get`] is the other end, with which `walsync status` asks it.

use std::convert::Infallible;
use std::fmt::Write;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::listen;
use crate::status::{Board, Snapshot};

/// Binds `addr`; the error names it.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// Serves until `shutdown`, within the limits of [`crate::listen`]: at most
/// [`listen::MAX_CONNECTIONS`] at once, each with [`listen::REQUEST_TIMEOUT`]
/// to send its headers and [`listen::CONNECTION_TIMEOUT`] in all.
pub async fn serve(listener: TcpListener, board: Board, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /metrics, /health and the status page");
    }
    let mut gate = listen::Gate::new("http");
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            permit = gate.slot() => permit,
        };
        let Some(permit) = permit else { return };
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    gate.failed(&e).await;
                    continue;
                }
            },
        };
        let board = board.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let board = board.clone();
                async move { Ok::<_, Infallible>(respond(&req, &board)) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(listen::REQUEST_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(listen::CONNECTION_TIMEOUT, connection).await;
        });
    }
}

fn respond(req: &Request<Incoming>, board: &Board) -> Response<Full<Bytes>> {
    let snapshot = board.snapshot();
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(&snapshot),
        ),
        "/health" => health(&snapshot),
        "/status.json" => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_string(&snapshot).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
        ),
        "/" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            crate::serve::page::status_page(
                &snapshot,
                req.uri()
                    .query()
                    .is_some_and(|q| q == "all" || q.starts_with("all=")),
            ),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /, /metrics, /health or /status.json\n".into(),
        ),
    }
}

/// `/health`: 503 while a database is unhealthy (one line each). A degraded
/// database (it keeps losing continuity) is listed too, under `degraded:`,
/// and a store behind or stopped under `store:`, but they leave the status
/// 200: the data is still safe, and a restart that a failing health check
/// may trigger would not remove the cause.
fn health(snapshot: &Snapshot) -> Response<Full<Bytes>> {
    let unhealthy = snapshot.unhealthy();
    let degraded = snapshot.degraded();
    let mut body = String::new();
    let status = if unhealthy.is_empty() {
        body.push_str("ok\n");
        StatusCode::OK
    } else {
        for (prefix, why) in &unhealthy {
            let _ = writeln!(body, "{prefix}: {why}");
        }
        StatusCode::SERVICE_UNAVAILABLE
    };
    for (prefix, why) in &degraded {
        let _ = writeln!(body, "degraded: {prefix}: {why}");
    }
    for (prefix, why) in &snapshot.forked() {
        let _ = writeln!(body, "forked: {prefix}: {why}");
    }
    // Like degraded: the other stores hold the data, and a restart would
    // not bring a store back.
    for d in &snapshot.databases {
        for line in &d.stores {
            let _ = writeln!(body, "store: {}: {line}", d.prefix);
        }
    }
    if let Some(why) = &snapshot.config.refused {
        let _ = writeln!(body, "config: edit refused: {why}");
    }
    if let Some(why) = &snapshot.config.restart_needed {
        let _ = writeln!(body, "config: {why}");
    }
    reply(status, "text/plain; charset=utf-8", body)
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Escapes a Prometheus label value.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of the board and the process.
pub fn metrics(s: &Snapshot) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let db = |d: &crate::status::DbStatus| format!("prefix=\"{}\"", label(&d.prefix));
    let per_db = |f: &dyn Fn(&crate::status::DbStatus) -> Option<f64>| {
        s.databases
            .iter()
            .filter_map(|d| f(d).map(|v| (format!("{{{}}}", db(d)), v)))
            .collect::<Vec<_>>()
    };
    family(
        "walsync_lag_seconds",
        "gauge",
        "How long the oldest change not yet in storage has waited (0 when caught up).",
        per_db(&|d| Some(d.lag_seconds(s.now_ms))),
    );
    family(
        "walsync_last_sync_timestamp_seconds",
        "gauge",
        "Unix time of the last successful sync.",
        per_db(&|d| d.last_sync_ms.map(|t| t as f64 / 1000.0)),
    );
    family(
        "walsync_head_sequence",
        "gauge",
        "Newest sequence number in storage.",
        per_db(&|d| d.head.map(|h| h as f64)),
    );
    family(
        "walsync_wal_bytes",
        "gauge",
        "Size of the database's WAL file now.",
        per_db(&|d| {
            let wal = crate::db::wal_path_of(std::path::Path::new(&d.path));
            Some(std::fs::metadata(wal).map_or(0, |m| m.len()) as f64)
        }),
    );
    family(
        "walsync_segments_shipped_total",
        "counter",
        "WAL segments shipped.",
        per_db(&|d| Some(d.segments as f64)),
    );
    family(
        "walsync_shipped_bytes_total",
        "counter",
        "Bytes shipped (segments and snapshots, compressed).",
        per_db(&|d| Some(d.bytes as f64)),
    );
    let by = |f: &dyn Fn(&crate::status::DbStatus) -> &std::collections::BTreeMap<String, u64>,
              key: &str| {
        let mut rows = Vec::new();
        for d in &s.databases {
            for (k, v) in f(d) {
                rows.push((format!("{{{},{key}=\"{}\"}}", db(d), label(k)), *v as f64));
            }
        }
        rows
    };
    family(
        "walsync_snapshots_total",
        "counter",
        "Snapshots shipped, by reason (initial, interval, requested, key, continuity, catch_up).",
        by(&|d| &d.snapshots, "reason"),
    );
    family(
        "walsync_continuity_losses_total",
        "counter",
        "Times the chain could not be continued and a snapshot had to start it again.",
        per_db(&|d| Some(d.continuity_losses as f64)),
    );
    family(
        "walsync_deltas_total",
        "counter",
        "Continuity losses shipped as only the pages that differed from what was shipped (or as nothing), instead of a snapshot.",
        per_db(&|d| Some(d.deltas as f64)),
    );
    family(
        "walsync_degraded",
        "gauge",
        "1 while the database keeps losing continuity (3 or more continuity snapshots within an hour), else 0.",
        per_db(&|d| Some(if d.is_degraded(s.now_ms) { 1.0 } else { 0.0 })),
    );
    family(
        "walsync_forked",
        "gauge",
        "1 when the chain in storage forks (two objects claim one sequence: two writers on one prefix), else 0.",
        per_db(&|d| Some(if d.forked.is_some() { 1.0 } else { 0.0 })),
    );
    family(
        "walsync_stores_behind",
        "gauge",
        "Stores of the database's chain ([storage] or a [[mirrors]] entry) that are behind or stopped while the others go on.",
        per_db(&|d| Some(d.stores.len() as f64)),
    );
    family(
        "walsync_runs_stored_total",
        "counter",
        "Runs stored by compaction (each stands for a stretch of the chain, so a restore reads fewer objects).",
        per_db(&|d| Some(d.runs_stored as f64)),
    );
    family(
        "walsync_runs_stored_bytes_total",
        "counter",
        "Bytes of the runs stored by compaction (compressed).",
        per_db(&|d| Some(d.runs_bytes as f64)),
    );
    family(
        "walsync_compaction_reads_total",
        "counter",
        "Objects and runs compaction read to build its runs.",
        per_db(&|d| Some(d.compaction_reads as f64)),
    );
    family(
        "walsync_compaction_failures_total",
        "counter",
        "Compaction passes that failed (tried again as the chain grows).",
        per_db(&|d| Some(d.compaction_failures as f64)),
    );
    family(
        "walsync_replaced_objects_deleted_total",
        "counter",
        "Objects deleted once older than the exact window (a stored run stands for them).",
        per_db(&|d| Some(d.replaced_deleted as f64)),
    );
    family(
        "walsync_checkpoints_total",
        "counter",
        "Checkpoints run, by mode.",
        by(&|d| &d.checkpoints, "mode"),
    );
    family(
        "walsync_errors_total",
        "counter",
        "Failed syncs, by kind of error.",
        by(&|d| &d.errors, "kind"),
    );
    let mut states = std::collections::BTreeMap::<String, u64>::new();
    for d in &s.databases {
        *states
            .entry(format!("{:?}", d.state).to_lowercase())
            .or_default() += 1;
    }
    family(
        "walsync_databases",
        "gauge",
        "Databases by state.",
        states
            .into_iter()
            .map(|(k, v)| (format!("{{state=\"{k}\"}}"), v as f64))
            .collect(),
    );
    family(
        "walsync_config_edits_refused_total",
        "counter",
        "Edits of the configuration file refused (the last file accepted stays in use).",
        vec![(String::new(), s.config.edits_refused as f64)],
    );
    family(
        "walsync_config_refused",
        "gauge",
        "1 while the configuration file as it stands is refused.",
        vec![(
            String::new(),
            f64::from(u8::from(s.config.refused.is_some())),
        )],
    );
    family(
        "walsync_config_restart_needed",
        "gauge",
        "1 while the configuration file names other stores than those in use \
         ([storage] and [[mirrors]] are read at start only).",
        vec![(
            String::new(),
            f64::from(u8::from(s.config.restart_needed.is_some())),
        )],
    );
    let process = process_stats();
    family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory.",
        vec![(String::new(), process.rss_bytes as f64)],
    );
    family(
        "process_open_fds",
        "gauge",
        "Open file descriptors.",
        vec![(String::new(), process.open_fds as f64)],
    );
    family(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time.",
        vec![(String::new(), process.cpu_seconds)],
    );
    family(
        "process_start_time_seconds",
        "gauge",
        "Unix time the process started.",
        vec![(String::new(), s.started_ms as f64 / 1000.0)],
    );
    out
}

struct ProcessStats {
    rss_bytes: u64,
    open_fds: u64,
    cpu_seconds: f64,
}

fn process_stats() -> ProcessStats {
    // SAFETY: getrusage only writes the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let cpu_seconds = if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0 {
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(usage.ru_utime) + t(usage.ru_stime)
    } else {
        0.0
    };
    // SAFETY: sysconf only reads a constant.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let rss_bytes = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page);
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    ProcessStats {
        rss_bytes,
        open_fds,
        cpu_seconds,
    }
}

/// The client side (`walsync status`): a GET of a running walsync's
/// listener. HTTP/1.0, so the body ends with the connection.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP response"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!("{}", head.lines().next().unwrap_or(head));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Board, State};

    #[test]
    fn metrics_are_well_formed_prometheus_text() {
        let board = Board::default();
        board.update("tenants/a\"b", |d| {
            d.state = State::Open;
            d.segments = 3;
            d.snapshots.insert("initial".into(), 1);
        });
        let text = metrics(&board.snapshot());
        assert!(
            text.contains("walsync_segments_shipped_total{prefix=\"tenants/a\\\"b\"} 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "walsync_snapshots_total{prefix=\"tenants/a\\\"b\",reason=\"initial\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("walsync_databases{state=\"open\"} 1"),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    async fn body(response: Response<Full<Bytes>>) -> (StatusCode, String) {
        use http_body_util::BodyExt;
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    /// A refused edit of the configuration file shows everywhere an
    /// operator looks, without failing health (the last file accepted is in
    /// use), and goes once the file is mended.
    #[tokio::test]
    async fn a_refused_config_edit_is_shown_until_mended() {
        let board = Board::default();
        board.update("a", |d| d.state = State::Open);
        let why = "/etc/walsync.toml: unknown field `paht` in databases[0]";
        board.config_refused(why.into());
        board.config_refused(why.into());
        assert_eq!(
            board.snapshot().config.edits_refused,
            1,
            "met again, counted once"
        );
        let (status, text) = body(health(&board.snapshot())).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            text.contains(&format!("config: edit refused: {why}")),
            "{text}"
        );
        let text = metrics(&board.snapshot());
        assert!(text.contains("walsync_config_refused 1"), "{text}");
        assert!(
            text.contains("walsync_config_edits_refused_total 1"),
            "{text}"
        );
        assert!(
            crate::serve::page::status_page(&board.snapshot(), false)
                .contains("Configuration edit refused")
        );
        assert!(
            board
                .snapshot()
                .table()
                .starts_with("configuration edit refused: ")
        );
        board.config_accepted();
        let (_, text) = body(health(&board.snapshot())).await;
        assert_eq!(text, "ok\n");
        let text = metrics(&board.snapshot());
        assert!(text.contains("walsync_config_refused 0"), "{text}");
        assert!(
            text.contains("walsync_config_edits_refused_total 1"),
            "{text}"
        );
    }

    /// Stores edited in are said everywhere until the file is back to the
    /// stores in use (or walsync restarts), without failing health.
    #[tokio::test]
    async fn stores_edited_in_are_shown_until_used() {
        let board = Board::default();
        board.update("a", |d| d.state = State::Open);
        board.config_restart_needed(Some("restart to use them".into()));
        let (status, text) = body(health(&board.snapshot())).await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains("config: restart to use them"), "{text}");
        let text = metrics(&board.snapshot());
        assert!(text.contains("walsync_config_restart_needed 1"), "{text}");
        assert!(
            crate::serve::page::status_page(&board.snapshot(), false)
                .contains("id=\"restart\">Configuration: restart to use them")
        );
        assert!(
            board
                .snapshot()
                .table()
                .starts_with("configuration: restart to use them\n")
        );
        board.config_restart_needed(None);
        let (_, text) = body(health(&board.snapshot())).await;
        assert_eq!(text, "ok\n");
        let text = metrics(&board.snapshot());
        assert!(text.contains("walsync_config_restart_needed 0"), "{text}");
    }

    #[tokio::test]
    async fn degraded_is_listed_by_health_and_metrics_without_failing_health() {
        let board = Board::default();
        let now = crate::status::now_ms();
        for prefix in ["calm", "churn"] {
            board.update(prefix, |d| {
                d.state = State::Open;
                d.sync_interval_ms = 1000;
            });
        }
        board.update("churn", |d| {
            for i in 0..3 {
                d.record_continuity_loss(now - 1000 + i, "the database file was replaced");
            }
        });
        let (status, text) = body(health(&board.snapshot())).await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.starts_with("ok\n"), "{text}");
        assert!(
            text.contains("degraded: churn: continuity lost 3 times"),
            "{text}"
        );
        assert!(!text.contains("calm"), "{text}");
        let metrics = metrics(&board.snapshot());
        assert!(
            metrics.contains("walsync_degraded{prefix=\"churn\"} 1"),
            "{metrics}"
        );
        assert!(
            metrics.contains("walsync_degraded{prefix=\"calm\"} 0"),
            "{metrics}"
        );
        let page = crate::serve::page::status_page(&board.snapshot(), false);
        assert!(
            page.find("<td>churn</td>").unwrap() < page.find("<td>calm</td>").unwrap(),
            "{page}"
        );

        // An unhealthy database fails it; the degraded one is still listed.
        board.update("calm", |d| {
            d.state = State::Failing;
            d.last_error = Some("storage down".into());
        });
        let (status, text) = body(health(&board.snapshot())).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(text.starts_with("calm: storage down\n"), "{text}");
        assert!(text.contains("degraded: churn: "), "{text}");
    }
}
