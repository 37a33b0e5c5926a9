//! One database in the fleet: its replica between jobs, what the loop knows
//! of it, and what a finished job tells the board, the compactor and
//! `walsync sync`.

use super::*;

pub(super) struct Slot {
    pub(super) spec: DbSpec,
    /// Where the watcher reports this database.
    pub(super) key: PathBuf,
    pub(super) replica: Option<Replica>,
    pub(super) last_sync: Option<Instant>,
    /// What the loop has under way for it.
    pub(super) job: Job,
    /// The WAL changed since the last sync started.
    pub(super) dirty: bool,
    pub(super) failures: u32,
    /// Set by the watcher callback, cleared by the loop: coalesces events.
    pub(super) queued: Arc<AtomicBool>,
    /// The replica holds its database open (as of the last finished job).
    pub(super) attached: bool,
    /// Size and modification time of the database and its WAL at the last
    /// poll (poll mode only).
    pub(super) seen: Option<[(u64, i64, i64); 2]>,
    /// Quick re-checks in a row for commits SQLite had not published yet.
    pub(super) rechecks: u32,
    /// When the first change that arrived during the running job did
    /// (Unix ms): what is left unshipped once the job is done.
    pub(super) changed_during_job: Option<u64>,
    /// Jobs (syncs and closes) started so far.
    pub(super) jobs_started: u64,
    /// `walsync sync` requests waiting for the job numbered `.0` to finish.
    pub(super) waiters: Vec<(u64, mpsc::UnboundedSender<control::Outcome>)>,
    /// Why its file could not be opened as a database at all (not SQLite,
    /// not a file): it is left alone until walsync restarts or the file is
    /// removed, instead of being retried and logged forever.
    pub(super) refused: Option<String>,
    /// When the log last said that this database's WAL outgrew
    /// `truncate_pages` while its syncs fail.
    pub(super) wal_warned: Option<Instant>,
    /// The head last reported to the compactor.
    pub(super) compaction_reported: u64,
    /// The WAL's size when the last sync started (or less, since it shrank):
    /// what it has grown by since tells a writer that outruns the interval.
    pub(super) wal_bytes_at_sync: u64,
}

/// What the loop has under way for a database: one thing at a time. Its
/// count in [`Holding`] changes with it (see `Holding::set_job`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Job {
    /// Nothing: it waits for a change or its time.
    #[default]
    Idle,
    /// In the queue of databases to close; the close has not started.
    CloseQueued,
    /// A sync runs; `opens` if it opens the database first (counted against
    /// the descriptor budget until it is done).
    Sync { opens: bool },
    /// A close runs.
    Close,
}

impl Job {
    /// A job of it is in flight (its replica is with the job).
    pub(super) fn running(self) -> bool {
        matches!(self, Job::Sync { .. } | Job::Close)
    }

    /// Queued to be closed, or being closed.
    pub(super) fn closing(self) -> bool {
        matches!(self, Job::CloseQueued | Job::Close)
    }

    /// Its running job opens it.
    pub(super) fn opening(self) -> bool {
        matches!(self, Job::Sync { opens: true })
    }
}

impl Slot {
    /// Whether this slot writes the file `key` or the prefix `prefix`.
    pub(super) fn shares(&self, key: &Path, prefix: &str) -> bool {
        self.key == key || self.spec.prefix == prefix
    }

    /// Why replication of this database stopped for good, if it did.
    pub(super) fn stopped(&self) -> Option<&str> {
        self.refused
            .as_deref()
            .or_else(|| self.replica.as_ref().and_then(Replica::stopped))
    }

    /// A sync of it would open the database (first open, or after a close).
    pub(super) fn needs_open(&self) -> bool {
        self.replica.as_ref().is_none_or(|r| !r.is_attached())
    }
}

/// How often the log repeats that a WAL keeps growing while storage fails.
const WAL_WARN_EVERY: Duration = Duration::from_secs(300);

/// While its syncs fail, a database's WAL is kept whole (nothing unshipped
/// is ever checkpointed away), so it grows with every commit. Past
/// `truncate_pages` the log says so loudly, then every few minutes: the disk
/// is what runs out next.
pub(super) fn warn_if_wal_outgrows(slot: &mut Slot, now: Instant) {
    // One failed sync is a blip; three in a row (fifteen failed requests)
    // is a store that is down.
    if slot.failures < 3
        || slot
            .wal_warned
            .is_some_and(|at| now.duration_since(at) < WAL_WARN_EVERY)
    {
        return;
    }
    let Some(bytes) = wal_bytes(&slot.spec.path) else {
        return;
    };
    if bytes > truncate_bytes(slot) {
        error!(
            db = %slot.spec.path.display(),
            prefix = %slot.spec.prefix,
            wal_bytes = bytes,
            failures = slot.failures,
            "storage keeps failing and this database's WAL has grown past truncate_pages; \
             it is kept whole (nothing unshipped is discarded) and shipped once storage \
             answers: watch the free disk space"
        );
        slot.wal_warned = Some(now);
    }
}

/// A writer that never pauses fills the WAL faster than syncs at the
/// interval can brake it (at 50,000 commits a second, `truncate_pages`'
/// default fills in a second). Once the WAL has grown by half of
/// `truncate_pages` since the last sync started, the next sync starts now:
/// it ships what grew, and at `truncate_pages` unsealed frames it truncates,
/// so the WAL stays under about twice `truncate_pages`. Syncs beyond the
/// interval are bounded by the data: one per half `truncate_pages` written.
pub(super) fn wal_outruns_interval(slot: &mut Slot) -> bool {
    let Some(bytes) = wal_bytes(&slot.spec.path) else {
        return false;
    };
    // Truncated since (or never seen): growth counts from here.
    slot.wal_bytes_at_sync = slot.wal_bytes_at_sync.min(bytes);
    bytes - slot.wal_bytes_at_sync >= (truncate_bytes(slot) / 2).max(1)
}

/// `truncate_pages` in bytes of this database's pages.
pub(super) fn truncate_bytes(slot: &Slot) -> u64 {
    let page_size = slot
        .replica
        .as_ref()
        .and_then(Replica::page_size)
        .unwrap_or(4096);
    u64::from(slot.spec.sync.truncate_pages) * u64::from(page_size)
}

pub(super) fn wal_bytes(db: &std::path::Path) -> Option<u64> {
    std::fs::metadata(crate::db::wal_path_of(db))
        .ok()
        .map(|m| m.len())
}

/// How long a database waits after its `failures`-th failed sync in a row.
/// Most failures pass (a store's bad minute, a busy write lock): 0.5 s
/// doubling to 5 s, so that a database ships again within seconds of its
/// store coming back, however long it was gone. A refusal that lasts until someone acts (no such bucket,
/// credentials refused) waits 2 s doubling to 60 s.
pub(super) fn sync_backoff(error: &replica::Error, failures: u32) -> Duration {
    let (first, cap) = if error.is_lasting() {
        (Duration::from_secs(2), Duration::from_secs(60))
    } else {
        (Duration::from_millis(500), Duration::from_secs(5))
    };
    first
        .saturating_mul(1 << failures.saturating_sub(1).min(10))
        .min(cap)
}

/// Posts the outcome of a finished job to the board.
pub(super) fn post(board: &Board, slot: &mut Slot, result: &replica::Result<SyncReport>) {
    let changed_during_job = slot.changed_during_job.take();
    let replica = slot.replica.as_ref();
    let degraded = board.update(&slot.spec.prefix, |d| {
        let mut became_degraded = None;
        d.head = replica.and_then(Replica::head).map(|h| h.seq).or(d.head);
        if let Some(replica) = replica {
            d.forked = replica.forked().map(str::to_string);
            d.stores = replica.store_problems();
        }
        match result {
            Ok(report) => {
                d.state = if replica.is_some_and(Replica::is_attached) {
                    State::Open
                } else {
                    State::Closed
                };
                d.last_sync_ms = Some(status::now_ms());
                d.pending_since_ms = changed_during_job;
                d.last_error = None;
                d.segments += u64::from(report.segments);
                d.deltas += u64::from(report.deltas);
                d.continuity_losses += report.continuity_losses.len() as u64;
                d.bytes += report.bytes;
                for reason in &report.snapshot_reasons {
                    *d.snapshots.entry((*reason).to_string()).or_default() += 1;
                }
                let now = status::now_ms();
                for why in &report.continuity_losses {
                    if d.record_continuity_loss(now, why) {
                        became_degraded = d.degraded_at(now);
                    }
                }
                for mode in &report.checkpoint_modes {
                    *d.checkpoints.entry((*mode).to_string()).or_default() += 1;
                }
            }
            Err(e) => {
                d.state = if e.is_fatal() {
                    State::Stopped
                } else {
                    State::Failing
                };
                d.pending_since_ms = match (d.pending_since_ms, changed_during_job) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                d.last_error = Some(e.to_string());
                *d.errors.entry(e.kind().to_string()).or_default() += 1;
            }
        }
        became_degraded
    });
    // Once per episode: every loss is logged where it happens, this says
    // that they keep coming and what usually causes that.
    if let Some(why) = degraded {
        warn!(
            db = %slot.spec.path.display(),
            prefix = %slot.spec.prefix,
            "database degraded: {why}; {}",
            status::DEGRADED_HINT
        );
    }
}

/// Tells the compactor about a chain that grew past a multiple of its
/// smallest level since the last report.
pub(super) fn report_compaction(compactor: &Compactor, slot: &mut Slot) {
    let levels = &slot.spec.sync.compaction;
    let (Some(&smallest), Some((head, snapshot))) = (
        levels.first(),
        slot.replica.as_ref().and_then(Replica::compaction_point),
    ) else {
        return;
    };
    if head / smallest <= slot.compaction_reported / smallest {
        return;
    }
    slot.compaction_reported = head;
    let stores = slot
        .replica
        .as_ref()
        .map(Replica::current_stores)
        .unwrap_or_default();
    for (store, storage) in stores {
        compactor.due(compactor::Due {
            prefix: slot.spec.prefix.clone(),
            store,
            storage,
            keys: slot.spec.sync.encryption.clone(),
            levels: levels.clone(),
            window: slot.spec.sync.exact_window,
            head,
            snapshot,
        });
    }
}

/// Tells the `walsync sync` requests that this job satisfies how it went.
pub(super) fn answer_waiters(slot: &mut Slot, result: &replica::Result<SyncReport>) {
    let done = slot.jobs_started;
    let head = slot.replica.as_ref().and_then(Replica::head).map(|h| h.seq);
    let prefix = &slot.spec.prefix;
    slot.waiters.retain(|(needs, waiter)| {
        if *needs > done {
            return true;
        }
        let outcome = match result {
            Ok(_) => Ok(head),
            Err(e) => Err(e.to_string()),
        };
        let _ = waiter.send((prefix.clone(), outcome));
        false
    });
}
