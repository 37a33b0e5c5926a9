//! The watch loop: one file watcher for every database, a schedule of which
//! database to sync when, and a bounded pool of syncs in flight.
//!
//! A database at rest costs its [`Replica`] and a few words here: no task, no
//! timer. A WAL change event (or a retry or checkpoint that is due) puts it on
//! the schedule, at most once per sync interval; a sync then runs on the
//! shared runtime and hands the replica back. On shutdown every database gets
//! a final flush within a deadline, and those that could not be flushed are named.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::db::wal_path_of;
use crate::replica::{self, Replica, SyncOptions, SyncReport};
use crate::storage::Storage;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: replica::Error,
    },
    #[error("watching {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("{0} database(s) could not be flushed before the shutdown deadline: {1}")]
    Unflushed(usize, String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One database to replicate.
#[derive(Debug, Clone)]
pub struct DbSpec {
    pub path: PathBuf,
    pub prefix: String,
    pub storage: Arc<dyn Storage>,
}

/// How the loop runs, beyond each database's sync options.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub sync: SyncOptions,
    /// Syncs in flight at once.
    pub parallelism: usize,
    /// Time allowed for the final flush after a shutdown request.
    pub shutdown_timeout: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            sync: SyncOptions::default(),
            parallelism: 8,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

struct Slot {
    replica: Option<Replica>,
    path: PathBuf,
    prefix: String,
    last_sync: Option<Instant>,
    /// When this database is scheduled; `None` if not.
    due: Option<Instant>,
    running: bool,
    /// The WAL changed since the last sync started.
    dirty: bool,
    failures: u32,
    /// Set by the watcher callback, cleared by the loop: coalesces events.
    queued: Arc<AtomicBool>,
}

/// Opens every database, then syncs them as their WALs change until `shutdown`.
pub async fn run(specs: Vec<DbSpec>, opts: RunOptions, shutdown: CancellationToken) -> Result<()> {
    let mut slots = Vec::with_capacity(specs.len());
    for spec in &specs {
        let replica = Replica::open(
            &spec.path,
            &spec.prefix,
            spec.storage.clone(),
            opts.sync.clone(),
        )
        .await
        .map_err(|source| Error::Open {
            path: spec.path.clone(),
            source,
        })?;
        info!(
            db = %spec.path.display(),
            prefix = %spec.prefix,
            storage = %spec.storage.describe(),
            "watching"
        );
        slots.push(Slot {
            replica: Some(replica),
            path: spec.path.clone(),
            prefix: spec.prefix.clone(),
            last_sync: None,
            due: None,
            running: false,
            dirty: true,
            failures: 0,
            queued: Arc::new(AtomicBool::new(false)),
        });
    }

    let (tx, rx) = mpsc::unbounded_channel::<usize>();
    let _watcher = watch(&slots, tx)?;
    let mut looped = Loop {
        slots,
        schedule: BinaryHeap::new(),
        ready: VecDeque::new(),
        in_flight: JoinSet::new(),
        opts,
    };
    let now = Instant::now();
    for i in 0..looped.slots.len() {
        looped.schedule_at(i, now);
    }
    looped.run(rx, shutdown).await;
    looped.shutdown().await
}

/// Starts the one watcher over the distinct parent directories.
fn watch(slots: &[Slot], tx: mpsc::UnboundedSender<usize>) -> Result<notify::RecommendedWatcher> {
    let mut targets: HashMap<PathBuf, (usize, Arc<AtomicBool>)> = HashMap::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (i, slot) in slots.iter().enumerate() {
        let db = slot
            .path
            .canonicalize()
            .unwrap_or_else(|_| slot.path.clone());
        let dir = db
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
        targets.insert(wal_path_of(&db), (i, slot.queued.clone()));
        targets.insert(db, (i, slot.queued.clone()));
    }
    let handler = move |event: notify::Result<notify::Event>| {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "file watcher error");
                return;
            }
        };
        let relevant = matches!(
            event.kind,
            EventKind::Create(_) | EventKind::Remove(_) | EventKind::Any | EventKind::Other
        ) || matches!(event.kind, EventKind::Modify(kind) if !matches!(kind, notify::event::ModifyKind::Metadata(_)));
        if !relevant {
            return;
        }
        for path in &event.paths {
            if let Some((i, queued)) = targets.get(path)
                && !queued.swap(true, Ordering::AcqRel)
            {
                let _ = tx.send(*i);
            }
        }
    };
    let mut watcher = notify::recommended_watcher(handler).map_err(|source| Error::Watch {
        path: PathBuf::from("."),
        source,
    })?;
    for dir in dirs {
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|source| Error::Watch { path: dir, source })?;
    }
    Ok(watcher)
}

type Done = (usize, Replica, replica::Result<SyncReport>);

struct Loop {
    slots: Vec<Slot>,
    schedule: BinaryHeap<Reverse<(Instant, usize)>>,
    ready: VecDeque<usize>,
    in_flight: JoinSet<Done>,
    opts: RunOptions,
}

impl Loop {
    async fn run(&mut self, mut rx: mpsc::UnboundedReceiver<usize>, shutdown: CancellationToken) {
        loop {
            let next = self.schedule.peek().map(|Reverse((t, _))| *t);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                Some(done) = self.in_flight.join_next(), if !self.in_flight.is_empty() => {
                    match done {
                        Ok(done) => self.finished(done),
                        Err(e) => error!(error = %e, "a sync task failed"),
                    }
                }
                Some(i) = rx.recv() => {
                    self.slots[i].queued.store(false, Ordering::Release);
                    self.changed(i);
                }
                _ = sleep_until(next), if next.is_some() => self.pop_due(),
            }
        }
    }

    fn changed(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.dirty = true;
        if slot.running || slot.replica.as_ref().is_some_and(|r| r.stopped().is_some()) {
            return;
        }
        let at = match slot.last_sync {
            Some(t) => (t + self.opts.sync.sync_interval).max(Instant::now()),
            None => Instant::now(),
        };
        if slot.due.is_none_or(|d| d > at) {
            self.schedule_at(i, at);
        }
    }

    fn schedule_at(&mut self, i: usize, at: Instant) {
        self.slots[i].due = Some(at);
        self.schedule.push(Reverse((at, i)));
    }

    fn pop_due(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, i))) = self.schedule.peek().copied() {
            if at > now {
                break;
            }
            self.schedule.pop();
            // Entries superseded by a later reschedule are skipped.
            if self.slots[i].due != Some(at) {
                continue;
            }
            self.slots[i].due = None;
            self.ready.push_back(i);
        }
        self.start_ready();
    }

    fn start_ready(&mut self) {
        while self.in_flight.len() < self.opts.parallelism.max(1) {
            let Some(i) = self.ready.pop_front() else {
                return;
            };
            let slot = &mut self.slots[i];
            let Some(mut replica) = slot.replica.take() else {
                continue;
            };
            slot.running = true;
            slot.dirty = false;
            self.in_flight.spawn(async move {
                let result = replica.sync().await;
                (i, replica, result)
            });
        }
    }

    fn finished(&mut self, (i, replica, result): Done) {
        let now = Instant::now();
        let slot = &mut self.slots[i];
        slot.running = false;
        slot.last_sync = Some(now);
        let wakeup = replica.next_wakeup().map(Instant::from_std);
        let mut next = None;
        match result {
            Ok(report) => {
                slot.failures = 0;
                debug!(db = %slot.path.display(), ?report, "synced");
            }
            Err(e) if e.is_fatal() => {
                error!(db = %slot.path.display(), prefix = %slot.prefix, error = %e, "replication stopped");
                slot.replica = Some(replica);
                self.start_ready();
                return;
            }
            Err(e) => {
                slot.failures += 1;
                let backoff =
                    Duration::from_secs(1 << slot.failures.min(6)).min(Duration::from_secs(60));
                warn!(
                    db = %slot.path.display(),
                    prefix = %slot.prefix,
                    error = %e,
                    retry_in = ?backoff,
                    "sync failed"
                );
                next = Some(now + backoff);
            }
        }
        slot.replica = Some(replica);
        if slot.dirty {
            let at = now + self.opts.sync.sync_interval;
            next = Some(next.map_or(at, |n: Instant| n.max(at)));
        }
        let next = match (next, wakeup) {
            (Some(a), Some(b)) => Some(a.min(b).max(now)),
            (a, b) => a.or(b),
        };
        if let Some(at) = next {
            self.schedule_at(i, at);
        }
        self.start_ready();
    }

    /// Waits for syncs in flight, then flushes every database once, within the deadline.
    async fn shutdown(mut self) -> Result<()> {
        let deadline = Instant::now() + self.opts.shutdown_timeout;
        info!("shutting down: final sync of every database");
        while !self.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, self.in_flight.join_next()).await {
                Ok(Some(Ok((i, replica, _)))) => {
                    self.slots[i].replica = Some(replica);
                    self.slots[i].running = false;
                }
                Ok(Some(Err(e))) => error!(error = %e, "a sync task failed"),
                Ok(None) => break,
                Err(_) => break,
            }
        }
        let mut flushes = JoinSet::new();
        let limit = self.opts.parallelism.max(1);
        let mut unflushed: Vec<String> = self
            .slots
            .iter()
            .filter(|s| s.replica.is_none())
            .map(|s| s.path.display().to_string())
            .collect();
        let mut queue: VecDeque<Replica> = self
            .slots
            .iter_mut()
            .filter_map(|s| s.replica.take())
            .filter(|r| r.stopped().is_none())
            .collect();
        loop {
            while flushes.len() < limit {
                let Some(mut replica) = queue.pop_front() else {
                    break;
                };
                flushes.spawn(async move {
                    let result = replica.flush().await;
                    (replica.path().display().to_string(), result)
                });
            }
            if flushes.is_empty() {
                break;
            }
            match tokio::time::timeout_at(deadline, flushes.join_next()).await {
                Ok(Some(Ok((_, Ok(_))))) => {}
                Ok(Some(Ok((path, Err(e))))) => {
                    error!(db = %path, error = %e, "final sync failed");
                    unflushed.push(path);
                }
                Ok(Some(Err(e))) => error!(error = %e, "a final sync task failed"),
                Ok(None) => break,
                Err(_) => {
                    unflushed.extend(queue.iter().map(|r| r.path().display().to_string()));
                    unflushed.push(format!("{} still in flight", flushes.len()));
                    break;
                }
            }
        }
        if unflushed.is_empty() {
            info!("every database flushed");
            Ok(())
        } else {
            Err(Error::Unflushed(unflushed.len(), unflushed.join(", ")))
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
