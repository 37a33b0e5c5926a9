//! The app in another process: `tests/app/sqlite_app.py` (Python's stdlib
//! `sqlite3`) driven over a line protocol.
//!
//! SQLite keeps its WAL locks as POSIX advisory locks, and those never
//! conflict between connections of one process: an app that is a connection
//! inside the test process cannot show a pin walsync lost, or a write lock
//! walsync only believes it holds (DESIGN.md invariant 2a). Every test of
//! checkpoint ownership runs its app through this wrapper.
//!
//! Each command gets exactly one reply line, `ok ...` or `err ...`. A long
//! command (a loop) can be started with [`AppProcess::start`] and its reply
//! read later with [`AppProcess::finish`]; two processes (say a writer and a
//! checkpointer) run concurrently. The child is killed when the wrapper drops.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

/// The helper script.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/app/sqlite_app.py");

/// Longest wait for any single reply (loops included): a hung app fails the
/// test instead of hanging it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(600);

/// How the app opens its database. `Default` is SQLite's own defaults
/// (`wal_autocheckpoint` 1000, `synchronous` FULL) with a 10 s busy timeout.
#[derive(Debug, Clone, Default)]
pub struct AppOptions {
    /// `PRAGMA wal_autocheckpoint` (0 turns it off).
    pub autocheckpoint: Option<u32>,
    /// `PRAGMA synchronous`, e.g. `"NORMAL"`.
    pub synchronous: Option<&'static str>,
    /// `PRAGMA page_size`, before the database switches to WAL mode.
    pub page_size: Option<u32>,
    /// The connection's busy timeout (default 10 s).
    pub busy_timeout_ms: Option<u64>,
}

impl AppOptions {
    pub fn page_size(page_size: u32) -> Self {
        Self {
            page_size: Some(page_size),
            ..Self::default()
        }
    }

    fn open_line(&self, db: &Path) -> String {
        let path = db.to_str().expect("a UTF-8 database path");
        assert!(
            !path.contains(char::is_whitespace),
            "path with spaces: {path}"
        );
        let mut line = format!("open {path}");
        if let Some(n) = self.autocheckpoint {
            line += &format!(" autocheckpoint={n}");
        }
        if let Some(s) = self.synchronous {
            line += &format!(" synchronous={s}");
        }
        if let Some(n) = self.page_size {
            line += &format!(" page_size={n}");
        }
        if let Some(ms) = self.busy_timeout_ms {
            line += &format!(" busy_timeout={ms}");
        }
        line
    }
}

/// What `PRAGMA wal_checkpoint(MODE)` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// 1 if the checkpoint could not finish (a reader or writer was in the way).
    pub busy: i64,
    /// Frames in the WAL (-1 if the checkpoint did not run).
    pub log: i64,
    /// Frames checkpointed (-1 if the checkpoint did not run).
    pub checkpointed: i64,
}

/// The counts of a `checkpoint_loop`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointLoop {
    pub calls: u64,
    pub busy: u64,
    pub errors: u64,
    /// Per mode (upper case): (calls, busy).
    pub modes: Vec<(String, u64, u64)>,
    pub first_error: Option<String>,
}

impl CheckpointLoop {
    /// Parses the reply of `checkpoint_loop` (the text after "ok").
    pub fn parse_reply(reply: &str) -> Self {
        let mut out = CheckpointLoop::default();
        for field in reply.split_whitespace() {
            let (k, v) = field
                .split_once('=')
                .unwrap_or_else(|| panic!("checkpoint_loop reply {reply:?}"));
            let num = |v: &str| v.parse::<u64>().unwrap_or_else(|_| panic!("{reply:?}"));
            match k {
                "calls" => out.calls = num(v),
                "busy" => out.busy = num(v),
                "errors" => out.errors = num(v),
                "first_error" => out.first_error = Some(v.replace('_', " ")),
                mode => {
                    let (n, b) = v.split_once('/').unwrap_or_else(|| panic!("{reply:?}"));
                    out.modes.push((mode.to_string(), num(n), num(b)));
                }
            }
        }
        out
    }

    /// (calls, busy) of one mode.
    pub fn mode(&self, mode: &str) -> (u64, u64) {
        self.modes
            .iter()
            .find(|(m, _, _)| m.eq_ignore_ascii_case(mode))
            .map_or((0, 0), |(_, n, b)| (*n, *b))
    }
}

/// One app process with one connection to one database.
pub struct AppProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    /// In a mutex only so that the wrapper is `Sync` (held across awaits by reference).
    replies: Mutex<Receiver<String>>,
    /// Commands sent whose reply was not read yet.
    pending: Vec<String>,
    label: String,
}

impl std::fmt::Debug for AppProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppProcess")
            .field("pid", &self.child.id())
            .field("label", &self.label)
            .field("pending", &self.pending)
            .finish()
    }
}

/// The Python interpreter: `WALSYNC_TEST_PYTHON`, or `python3`.
fn python() -> String {
    std::env::var("WALSYNC_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

impl AppProcess {
    /// Starts the app and opens `db` (creating it and table `t` as needed) in WAL mode.
    pub fn spawn(db: &Path, opts: AppOptions) -> Self {
        let mut app = Self::spawn_unopened(db.display().to_string());
        app.ok(&opts.open_line(db));
        app
    }

    /// [`AppProcess::spawn`] with SQLite's defaults.
    pub fn open(db: &Path) -> Self {
        Self::spawn(db, AppOptions::default())
    }

    fn spawn_unopened(label: String) -> Self {
        let mut child = Command::new(python())
            .arg(SCRIPT)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} {SCRIPT}: {e}", python()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            stdin: child.stdin.take(),
            child,
            replies: Mutex::new(replies),
            pending: Vec::new(),
            label,
        }
    }

    /// Sends a command without waiting for its reply (read it with [`AppProcess::finish`]).
    pub fn start(&mut self, command: &str) {
        assert!(!command.contains('\n'), "one line per command: {command:?}");
        let stdin = self.stdin.as_mut().expect("app stdin open");
        writeln!(stdin, "{command}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("app {}: sending {command:?}: {e}", self.label));
        self.pending.push(command.to_string());
    }

    /// The reply to the oldest command sent: `Ok(text after "ok")` or
    /// `Err(text after "err")`.
    pub fn finish(&mut self) -> Result<String, String> {
        self.wait_reply(REPLY_TIMEOUT)
            .unwrap_or_else(|| panic!("app {}: no reply to {:?}", self.label, self.pending))
    }

    /// Like [`AppProcess::finish`], but `None` if no reply came within `timeout`
    /// (the command is then still pending).
    pub fn try_finish(&mut self, timeout: Duration) -> Option<Result<String, String>> {
        self.wait_reply(timeout)
    }

    fn wait_reply(&mut self, timeout: Duration) -> Option<Result<String, String>> {
        assert!(
            !self.pending.is_empty(),
            "app {}: nothing pending",
            self.label
        );
        let received = self
            .replies
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .recv_timeout(timeout);
        let line = match received {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => return None,
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().ok();
                panic!(
                    "app {} exited ({status:?}) before replying to {:?}",
                    self.label, self.pending
                )
            }
        };
        let command = self.pending.remove(0);
        Some(if let Some(rest) = line.strip_prefix("ok") {
            Ok(rest.trim_start().to_string())
        } else if let Some(rest) = line.strip_prefix("err") {
            Err(rest.trim_start().to_string())
        } else {
            panic!(
                "app {}: unexpected reply {line:?} to {command:?}",
                self.label
            )
        })
    }

    /// Sends a command and waits for its reply.
    pub fn call(&mut self, command: &str) -> Result<String, String> {
        assert!(
            self.pending.is_empty(),
            "app {}: {:?} still pending",
            self.label,
            self.pending
        );
        self.start(command);
        self.finish()
    }

    /// [`AppProcess::call`] that must succeed.
    pub fn ok(&mut self, command: &str) -> String {
        self.call(command)
            .unwrap_or_else(|e| panic!("app {}: {command:?} failed: {e}", self.label))
    }

    fn ok_num(&mut self, command: &str) -> i64 {
        let reply = self.ok(command);
        reply
            .parse()
            .unwrap_or_else(|_| panic!("app {}: {command:?} replied {reply:?}", self.label))
    }

    /// `n` rows of `size` random bytes in one transaction; the highest id.
    pub fn insert(&mut self, n: usize, size: usize) -> i64 {
        self.ok_num(&format!("insert {n} {size}"))
    }

    /// `n` rows of `size` random bytes, one commit each; the highest id.
    pub fn insert_each(&mut self, n: usize, size: usize) -> i64 {
        self.ok_num(&format!("insert_each {n} {size}"))
    }

    /// `PRAGMA wal_checkpoint(MODE)`.
    pub fn checkpoint(&mut self, mode: &str) -> Checkpoint {
        let reply = self.ok(&format!("checkpoint {mode}"));
        let v: Vec<i64> = reply
            .split_whitespace()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(v.len(), 3, "checkpoint reply {reply:?}");
        Checkpoint {
            busy: v[0],
            log: v[1],
            checkpointed: v[2],
        }
    }

    /// Starts `loop_insert` (read the count with [`AppProcess::finish_count`]).
    pub fn start_loop_insert(&mut self, seconds: f64, size: usize) {
        self.start(&format!("loop_insert {seconds} {size}"));
    }

    /// Starts `blob_loop`: one blob of `size` per commit, keeping the newest `keep` rows.
    pub fn start_blob_loop(&mut self, seconds: f64, size: usize, keep: usize) {
        self.start(&format!("blob_loop {seconds} {size} {keep}"));
    }

    /// Starts `rate_insert`: single-row commits at `per_sec` for `seconds`.
    pub fn start_rate_insert(&mut self, per_sec: u32, seconds: f64, size: usize) {
        self.start(&format!("rate_insert {per_sec} {seconds} {size}"));
    }

    /// The count a started loop replies with.
    pub fn finish_count(&mut self) -> u64 {
        let reply = self
            .finish()
            .unwrap_or_else(|e| panic!("app {}: loop failed: {e}", self.label));
        reply.parse().unwrap_or_else(|_| panic!("{reply:?}"))
    }

    /// Starts `checkpoint_loop` over `modes` (e.g. `["PASSIVE", "TRUNCATE"]`).
    pub fn start_checkpoint_loop(&mut self, modes: &[&str], interval_ms: u64, seconds: f64) {
        self.start(&format!(
            "checkpoint_loop {} {interval_ms} {seconds}",
            modes.join(",")
        ));
    }

    /// `BEGIN IMMEDIATE` with a busy timeout of `busy_timeout_ms` for this call.
    pub fn begin_write(&mut self, busy_timeout_ms: u64) -> Result<(), String> {
        self.call(&format!("begin_write {busy_timeout_ms}"))
            .map(|_| ())
    }

    pub fn begin(&mut self) {
        self.ok("begin");
    }

    pub fn commit(&mut self) {
        self.ok("commit");
    }

    pub fn rollback(&mut self) {
        self.ok("rollback");
    }

    /// One SQL statement; the rows it changed.
    pub fn exec(&mut self, sql: &str) -> i64 {
        self.ok_num(&format!("exec {sql}"))
    }

    /// `PRAGMA NAME` or `PRAGMA NAME=VALUE`: the first value it returns.
    pub fn pragma(&mut self, pragma: &str) -> String {
        self.ok(&format!("pragma {pragma}"))
    }

    /// Rows in `t`.
    pub fn count(&mut self) -> i64 {
        self.ok_num("count")
    }

    /// `PRAGMA integrity_check` through the app's connection: `"ok"` or the problems.
    pub fn integrity_check(&mut self) -> String {
        self.ok("integrity_check")
    }

    /// Asks the app to exit and waits for it.
    pub fn quit(mut self) {
        self.ok("quit");
        self.stdin = None;
        let _ = self.child.wait();
    }
}

impl Drop for AppProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
