//! One database's replication: its chain head in storage, what is waiting to
//! be uploaded, and when to snapshot and checkpoint.
//!
//! A [`Replica`] is plain data between syncs: no task or thread of its own.
//! The replicator calls [`Replica::sync`] when the database's WAL changed (or
//! a checkpoint or retry is due); SQLite work runs in `spawn_blocking`.
//!
//! Why this file is long: one database's replication is one state machine
//! (sync, snapshot, delta, checkpoint, retention, the head and pending object
//! they all move); split by step, each part would carry the whole state.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::chain;
use crate::db::{
    self, Changes, CheckpointMode, CheckpointOutcome, Database, Delta, Detached, Encoded, WalState,
};
use crate::encryption::{Key, KeyId, Keys};
use crate::fork;
use crate::mirror::{self, Mirror, Put, Stores};
use crate::object::{self, Link, Object};
use crate::reason::SnapshotReason;
use crate::retention::{self, Retention};
use crate::segment::{self, Kind, now_ms};
use crate::state;
use crate::storage::{self, Storage};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Db(#[from] db::Error),
    #[error(transparent)]
    Storage(#[from] storage::Error),
    #[error(transparent)]
    Chain(#[from] chain::Error),
    #[error(
        "replication of {prefix} stopped: {reason}. Another walsync (or another database) \
         writes to this prefix; stop the other writer or choose another prefix, then restart"
    )]
    Stopped { prefix: String, reason: String },
    #[error(
        "{path}: could not take the write lock in time (a long write transaction?); will retry"
    )]
    Busy { path: PathBuf },
    /// The first object since the chain was listed found its sequence
    /// taken: the listing may predate an upload the store finished late.
    /// Handled inside [`Replica::sync`], which lists the chain again.
    #[error("replication of {prefix} found {key} written since the chain was listed: {reason}")]
    TakenSinceListing {
        prefix: String,
        seq: u64,
        key: String,
        reason: String,
    },
    #[error("{path}: the blocking worker failed: {message}")]
    Worker { path: PathBuf, message: String },
    #[error(
        "{prefix}: the chain in storage is encrypted (key {key_id}) and no encryption key is set; \
         nothing is shipped in plaintext. Set the key (encryption_key, WALSYNC_ENCRYPTION_KEY or \
         --encryption-key-file), or set encryption_key = \"off\" to stop encrypting on purpose"
    )]
    KeyMissing { prefix: String, key_id: KeyId },
}

impl Error {
    /// True when retrying cannot help: replication of this database stops.
    pub fn is_fatal(&self) -> bool {
        match self {
            Error::Stopped { .. } => true,
            Error::Db(e) => e.is_permanent(),
            _ => false,
        }
    }

    /// True when storage refused for a reason that lasts until someone
    /// fixes the bucket, the credentials or the permissions.
    pub fn is_lasting(&self) -> bool {
        match self {
            Error::Storage(e) | Error::Chain(chain::Error::Storage(e)) => e.is_lasting(),
            _ => false,
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Db(_) => "database",
            // A chain that could not be read because storage failed is a
            // storage error (a missing bucket, bad credentials).
            Error::Storage(_) | Error::Chain(chain::Error::Storage(_)) => "storage",
            Error::Chain(_) => "chain",
            Error::Stopped { .. } | Error::TakenSinceListing { .. } => "stopped",
            Error::Busy { .. } => "busy",
            Error::Worker { .. } => "worker",
            Error::KeyMissing { .. } => "key",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Lock-free catch-up rounds before a checkpoint ships the tail under the write lock.
const CATCH_UP_ATTEMPTS: u32 = 3;
/// Longest time the app's writers wait on an upload made under the write lock.
const UPLOAD_UNDER_LOCK: Duration = Duration::from_secs(5);
/// Longest a store's retention run may take after a snapshot.
const RETENTION_TIME: Duration = Duration::from_secs(120);
/// Longest wait for one store's listing at start when there are mirrors.
const LIST_AT_OPEN: Duration = Duration::from_secs(10);
/// Longest the sweep of unfinished uploads may hold up a database's open.
const SWEEP_AT_OPEN: Duration = Duration::from_secs(10);
/// Pause after a checkpoint that could not complete (app readers, a busy write lock).
const CHECKPOINT_RETRY: Duration = Duration::from_secs(1);

/// When to ship, snapshot and checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncOptions {
    /// Least time between two syncs of one database (0 = as soon as the WAL changes).
    pub sync_interval: Duration,
    /// A new snapshot once the newest one is this old (checked when the database changes).
    pub snapshot_interval: Duration,
    /// PASSIVE checkpoint once this many shipped frames are in the WAL.
    pub checkpoint_pages: u32,
    /// PASSIVE checkpoint once shipped frames have waited this long.
    pub checkpoint_interval: Duration,
    /// TRUNCATE checkpoint (blocks writers briefly) once the WAL holds this many frames.
    pub truncate_pages: u32,
    /// Which restore points to keep; applied after each snapshot.
    pub retention: Retention,
    /// Encrypts new objects with the current key; opens older ones.
    pub encryption: Option<Arc<Keys>>,
    /// The run lengths `watch` compacts the chain into (see
    /// [`crate::compact::levels_problem`]); empty: no compaction.
    pub compaction: Arc<[u64]>,
    /// Objects a run stands for are deleted once they are this old, so every
    /// transaction of this last period stays restorable exactly and older
    /// ones at the smallest level's granularity; `None` keeps them all.
    pub exact_window: Option<Duration>,
    /// Other stores every object also goes to (`[[mirrors]]`), each with
    /// an identical chain under the same prefix.
    pub mirrors: Arc<[Mirror]>,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self {
            sync_interval: Duration::from_secs(1),
            snapshot_interval: Duration::from_secs(24 * 3600),
            checkpoint_pages: 1000,
            checkpoint_interval: Duration::from_secs(60),
            truncate_pages: 50_000,
            retention: Retention::default(),
            encryption: None,
            compaction: Arc::from(crate::compact::LEVELS),
            exact_window: Some(crate::compact::EXACT_WINDOW),
            mirrors: Arc::from([]),
        }
    }
}

/// The newest durable object of this database: the one type for a chain's
/// head, also what a state record names.
pub use crate::state::Head;

/// What one sync did.
#[derive(Debug, Default, Clone)]
pub struct SyncReport {
    pub segments: u32,
    pub snapshots: u32,
    /// Continuity losses shipped as only the pages that differed (or as
    /// nothing, where none did) instead of a snapshot.
    pub deltas: u32,
    pub bytes: u64,
    pub checkpointed: bool,
    /// Why each snapshot was taken: `initial`, `interval`, `requested` or
    /// `continuity` (the chain could not be continued).
    pub snapshot_reasons: Vec<&'static str>,
    /// Why the chain could not be continued, for each `continuity` snapshot.
    pub continuity_losses: Vec<String>,
    /// The mode of each checkpoint run: `passive` or `truncate`.
    pub checkpoint_modes: Vec<&'static str>,
}

#[derive(Debug)]
pub struct Replica {
    prefix: String,
    path: PathBuf,
    storage: Arc<dyn Storage>,
    db: Option<Database>,
    /// Set while the database is closed to save descriptors (see [`Replica::detach`]).
    detached: Option<Detached>,
    head: Option<Head>,
    /// The key the head object was sealed with.
    head_key: Option<KeyId>,
    last_snapshot_ms: Option<u64>,
    /// The sequence of the newest snapshot in the chain, where known.
    newest_snapshot: Option<u64>,
    /// Why the next sync must start with a snapshot.
    need_snapshot: Option<SnapshotReason>,
    /// The continuity loss found when the database was opened, while it is
    /// the one `need_snapshot` holds. If every page then equals what was
    /// shipped, nothing was lost (the file was restored, or the app
    /// checkpointed while walsync was stopped): it is not counted, so a
    /// restore-then-watch start does not count towards a degraded database.
    /// Gone once anything ships, so it never excuses a later loss.
    loss_at_open: Option<SnapshotReason>,
    /// Encoded but not yet durable: retried byte for byte.
    pending: Option<Encoded<Object>>,
    last_checkpoint: Instant,
    /// When something was last shipped (or the database opened).
    last_change: Instant,
    /// No checkpoint attempt before this, after one that could not complete.
    checkpoint_retry_at: Option<Instant>,
    opts: SyncOptions,
    stopped: Option<String>,
    /// A snapshot in storage whose mark is not written yet.
    unmarked: Option<u64>,
    /// What is wrong with the chain as listed at start: it forks.
    forked: Option<String>,
    /// The state digest the head object records, if it does.
    head_state: Option<state::Digest>,
    /// The checked state record, kept while the database is closed.
    parked_record: Option<state::Record>,
    /// `storage` and the mirrors, each current or behind.
    stores: Stores,
    /// Why a store behind must be caught up by a full snapshot (never a
    /// delta: the store lacks what a delta builds on).
    catch_up: Option<String>,
    /// Whether an object has landed since the chain was listed. Until one
    /// has, a sequence number found taken may be an object that landed after
    /// the listing: an upload of a walsync killed just before this one
    /// started, which the store finished late.
    shipped_since_listing: bool,
    /// Whether the chain was listed again after such a find (once only).
    listed_again: bool,
    /// Whether the head object names WAL frames (salts, position, checksum)
    /// that a local WAL can be checked against: one that does not (read
    /// with no WAL) cannot be told from another database's.
    head_in_wal: bool,
}

/// Ends, in every store, the uploads of this prefix that a walsync
/// stopped mid-way left unfinished (see [`Storage::sweep_unfinished`]):
/// before the chain is listed, so that a completion still on its way fails
/// instead of landing after the listing. Only `[storage]`'s sweep is waited
/// for: a mirror that does not answer never holds back an open.
async fn sweep_unfinished(prefix: String, stores: Vec<(String, Arc<dyn Storage>)>) {
    let mut sweeps = stores.into_iter().map(|(label, storage)| {
        let prefix = prefix.clone();
        async move {
            let ours = |rest: &str| !rest.contains('/') && segment::is_walsync_name(rest);
            sweep_store(storage.as_ref(), &label, &prefix, &ours, SWEEP_AT_OPEN).await;
        }
    });
    let primary = sweeps.next();
    for mirror in sweeps {
        tokio::spawn(mirror);
    }
    if let Some(primary) = primary {
        primary.await;
    }
}

/// Sweeps one store under `prefix` (empty: the whole store) within `limit`
/// and says what came of it. Bounded, and only warned about where it fails:
/// it saves cost, and the first write after the listing deals with a late
/// landing anyway.
pub(crate) async fn sweep_store(
    storage: &dyn Storage,
    label: &str,
    prefix: &str,
    ours: &(dyn for<'k> Fn(&'k str) -> bool + Sync),
    limit: Duration,
) {
    let why = match tokio::time::timeout(limit, storage.sweep_unfinished(prefix, ours)).await {
        Ok(Ok(keys)) if keys.is_empty() => return,
        Ok(Ok(keys)) => {
            info!(
                prefix,
                store = label,
                count = keys.len(),
                keys = %keys.join(", "),
                "ended what a walsync stopped mid-way left unfinished (multipart uploads, temp files)"
            );
            return;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer in time".to_string(),
    };
    // Once per store and process: a store without the permission would
    // say so for every database.
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let described = storage.describe();
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if said.contains(&described) {
        debug!(
            prefix,
            store = label,
            why,
            "could not end unfinished uploads"
        );
        return;
    }
    said.push(described);
    warn!(
        prefix,
        store = label,
        why,
        "could not end what a stopped walsync left unfinished (tried again at the next start; \
         on S3 listing and aborting them takes s3:ListBucketMultipartUploads and \
         s3:AbortMultipartUpload, and a lifecycle rule removes what is left, see \
         docs/operations.md)"
    );
}

/// Runs SQLite or file work of the database at `path` on the blocking pool.
async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Worker {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// What a fleet's start-up listing says of one store, for one database.
#[derive(Debug, Clone, Default)]
pub enum Listed {
    /// The prefix's objects (the tips a writer goes on from).
    Objects(Vec<chain::ObjectRef>),
    /// Not known: list the prefix here.
    #[default]
    Here,
    /// The store did not answer the fleet's listing: not waited for now,
    /// like a store whose listing here timed out (listed again once it
    /// answers). A thousand databases each waiting for it would hold back
    /// the start for minutes.
    Unanswered,
}

impl Replica {
    /// Opens the database and finds where its chain in storage stands.
    pub async fn open(
        path: &Path,
        prefix: &str,
        storage: Arc<dyn Storage>,
        opts: SyncOptions,
    ) -> Result<Self> {
        Self::open_listed(path, prefix, storage, opts, Vec::new()).await
    }

    /// Like [`Replica::open`], with the prefix's objects already listed (a
    /// fleet lists each of its stores once at start instead of once per
    /// database): `listed[i]` for store `i` (`0`: `[storage]`, then the
    /// mirrors); a store missing from it is listed here.
    pub async fn open_listed(
        path: &Path,
        prefix: &str,
        storage: Arc<dyn Storage>,
        opts: SyncOptions,
        listed: Vec<Listed>,
    ) -> Result<Self> {
        let owned = path.to_path_buf();
        let record_path =
            state::record_path(path, &state::destination(&storage.describe(), prefix));
        let db = blocking(path, move || {
            Database::open(&owned).map(|mut db| {
                // Claimed: no other walsync here builds this record now.
                state::remove_stale_build(&record_path);
                db.keep_record_at(record_path);
                db
            })
        })
        .await??;
        let mut replica = Self::unlisted(db, path, prefix, storage, opts);
        replica.load_head(listed).await?;
        Ok(replica)
    }

    /// A replica of the opened `db` that has not listed its chain yet.
    fn unlisted(
        db: Database,
        path: &Path,
        prefix: &str,
        storage: Arc<dyn Storage>,
        opts: SyncOptions,
    ) -> Self {
        let stores = Stores::new(storage.clone(), &opts.mirrors);
        Self {
            prefix: prefix.to_string(),
            path: path.to_path_buf(),
            storage,
            db: Some(db),
            detached: None,
            head: None,
            head_key: None,
            last_snapshot_ms: None,
            newest_snapshot: None,
            need_snapshot: None,
            loss_at_open: None,
            pending: None,
            last_checkpoint: Instant::now(),
            last_change: Instant::now(),
            checkpoint_retry_at: None,
            opts,
            stopped: None,
            unmarked: None,
            forked: None,
            head_state: None,
            parked_record: None,
            stores,
            catch_up: None,
            shipped_since_listing: false,
            listed_again: false,
            head_in_wal: false,
        }
    }

    async fn load_head(&mut self, listed: Vec<Listed>) -> Result<()> {
        // A fleet's start-up listing came after one sweep of the whole store.
        if listed.is_empty() {
            let stores = self
                .stores
                .iter()
                .map(|store| (store.label().to_string(), store.storage.clone()))
                .collect();
            sweep_unfinished(self.prefix.clone(), stores).await;
        }
        let (objects, lead) = if self.stores.is_single() {
            match listed.into_iter().next() {
                Some(Listed::Objects(objects)) => (objects, 0),
                _ => (chain::list(self.storage.as_ref(), &self.prefix).await?, 0),
            }
        } else {
            self.list_stores(listed).await?
        };
        let storage = self.stores.storage(lead);
        let Some(newest) = objects.last().map(|o| o.seq) else {
            self.need_snapshot = Some(SnapshotReason::Initial);
            return Ok(());
        };
        // Where two objects claim the newest sequence, the one restore
        // follows is the head to link to, and a snapshot starts afresh from
        // it: which of them this database's WAL goes on from is unknowable.
        self.forked = chain::describe_forks(&objects);
        let head_forked = chain::forks(&objects)
            .last()
            .is_some_and(|(seq, _)| *seq == newest);
        let last = if head_forked {
            let branch = fork::follow(storage.as_ref(), objects.clone()).await?;
            branch
                .objects
                .last()
                .filter(|o| o.seq == newest)
                .or_else(|| objects.last())
                .cloned()
        } else {
            objects.last().cloned()
        };
        let Some(last) = last else {
            self.need_snapshot = Some(SnapshotReason::Initial);
            return Ok(());
        };
        // The head's two ends say all a writer needs (what it links to, its
        // WAL position, its state digest); reading a large snapshot whole at
        // every start would cost the database's size. Restore and verify
        // check it whole, and a claim that is false fails there, by name.
        let chain::Link { header, hash } = chain::read_link(storage.as_ref(), &last).await?;
        if header.kind == Kind::Snapshot && !last.is_legacy() && last.mark.is_none() {
            self.unmarked = Some(header.seq);
        }
        self.head = Some(Head {
            seq: header.seq,
            hash,
        });
        self.head_key = header.sealed.map(|s| s.key_id);
        let newest_listed = objects.iter().rev().find(|o| o.kind == Kind::Snapshot);
        self.newest_snapshot = if header.kind == Kind::Snapshot {
            Some(header.seq)
        } else {
            newest_listed.map(|o| o.seq)
        };
        self.last_snapshot_ms = match newest_listed {
            _ if header.kind == Kind::Snapshot => Some(header.timestamp_ms),
            Some(s) => Some(chain::read_header(storage.as_ref(), s).await?.timestamp_ms),
            None => None,
        };
        self.head_state = header.state;
        let state = WalState::from_range(&header.wal);
        self.head_in_wal = state != WalState::Empty;
        let page_size = header.page_size;
        let head_ms = header.timestamp_ms;
        let record_head = Head {
            seq: header.seq,
            hash,
        };
        let digest = header.state;
        let (verdict, record) = self
            .with_db(move |db| {
                let verdict = db.resume(state, page_size, head_ms);
                (verdict, db.load_record(record_head, digest))
            })
            .await?;
        let verdict = verdict?;
        if let Err(why) = record {
            debug!(db = %self.path.display(), prefix = %self.prefix, why, "no state record to use");
        }
        match verdict {
            Ok(()) => info!(
                db = %self.path.display(),
                prefix = %self.prefix,
                seq = header.seq,
                "continuing the chain in storage"
            ),
            Err(reason) => {
                let reason = SnapshotReason::Continuity(reason);
                self.need_snapshot = Some(reason.clone());
                self.loss_at_open = Some(reason);
            }
        }
        if head_forked && self.need_snapshot.is_none() {
            self.need_snapshot = Some(SnapshotReason::Continuity(format!(
                "two objects claim the newest sequence {newest}, so which one this database \
                 continues is unknown"
            )));
        }
        if let Some(forked) = &self.forked {
            warn!(
                db = %self.path.display(),
                prefix = %self.prefix,
                "{forked}; restore follows the branch that reaches furthest from a snapshot"
            );
        }
        Ok(())
    }

    /// Lists every store (`primary` is `[storage]`'s listing) and settles
    /// how each stands: the one whose chain reaches furthest leads, and its
    /// listing is returned with its index.
    async fn list_stores(&mut self, listed: Vec<Listed>) -> Result<(Vec<chain::ObjectRef>, usize)> {
        // All at once, each bounded: a store that does not answer is listed
        // again once it does (it is behind meanwhile), so it never holds
        // back the start of the others.
        let lists = self.stores.iter().enumerate().map(|(i, store)| {
            let storage = store.storage.clone();
            let prefix = self.prefix.clone();
            let listed = listed.get(i).cloned().unwrap_or_default();
            async move {
                let timed_out = |why: String| {
                    Err(chain::Error::Storage(storage::Error::Io {
                        key: format!("{prefix}/"),
                        source: std::io::Error::new(std::io::ErrorKind::TimedOut, why),
                    }))
                };
                match listed {
                    Listed::Objects(objects) => return Ok(objects),
                    Listed::Unanswered => {
                        return timed_out("no answer to the start-up listing".into());
                    }
                    Listed::Here => {}
                }
                match tokio::time::timeout(LIST_AT_OPEN, chain::list(storage.as_ref(), &prefix))
                    .await
                {
                    Ok(listing) => listing,
                    Err(_) => timed_out(format!("no answer to a listing within {LIST_AT_OPEN:?}")),
                }
            }
        });
        let mut listings = futures_util::future::join_all(lists).await;
        let newest = |l: &Result<Vec<chain::ObjectRef>, chain::Error>| {
            l.as_ref().ok().map(|o| o.last().map_or(0, |o| o.seq))
        };
        let mut lead = None;
        for (i, listing) in listings.iter().enumerate() {
            if let Some(n) = newest(listing)
                && lead.is_none_or(|(_, best)| n > best)
            {
                lead = Some((i, n));
            }
        }
        let Some((lead, _)) = lead else {
            // No store could be listed: fail like a single store would.
            return Err(listings.swap_remove(0).err().map_or_else(
                || Error::Worker {
                    path: self.path.clone(),
                    message: "no store listed".into(),
                },
                Error::from,
            ));
        };
        let lead_head = match listings[lead].as_ref().ok().and_then(|o| o.last()) {
            Some(last) => Some(
                chain::read_link(self.stores.storage(lead).as_ref(), last)
                    .await?
                    .hash,
            ),
            None => None,
        };
        // `None`: its newest object could not be read to compare.
        let mut same_head = vec![Some(true); listings.len()];
        for (i, listing) in listings.iter().enumerate() {
            let (Ok(objects), Some(lead_hash)) = (listing, lead_head) else {
                continue;
            };
            let Some(last) = objects.last() else {
                continue;
            };
            if i != lead && Some(last.seq) == newest(&listings[lead]) {
                let hash = chain::read_link(self.stores.storage(i).as_ref(), last).await;
                same_head[i] = hash.ok().map(|l| l.hash == lead_hash);
            }
        }
        let newest: Vec<Result<Option<u64>, String>> = listings
            .iter()
            .map(|l| match l {
                Ok(o) => Ok(o.last().map(|o| o.seq)),
                Err(e) => Err(e.to_string()),
            })
            .collect();
        // A store not listed may be the one that reaches furthest (walsync
        // shipped there last): going on from a shorter lead would fork the
        // chain. The state record beside the database says how far it got.
        let lead_seq = newest[lead].clone().ok().flatten().unwrap_or(0);
        if let Some(i) = newest.iter().position(Result::is_err)
            && state::Record::open(&self.record_path())
                .ok()
                .flatten()
                .is_some_and(|r| r.head.seq > lead_seq)
        {
            return Err(listings.swap_remove(i).err().map_or_else(
                || Error::Worker {
                    path: self.path.clone(),
                    message: "a store could not be listed".into(),
                },
                Error::from,
            ));
        }
        let objects = listings.swap_remove(lead).unwrap_or_default();
        self.stores.settle(&newest, lead, &same_head);
        for problem in self.stores.problems() {
            warn!(db = %self.path.display(), prefix = %self.prefix, "{problem}");
        }
        Ok((objects, lead))
    }

    /// What is wrong with the stores (one behind, one stopped), one line each.
    pub fn store_problems(&self) -> Vec<String> {
        self.stores.problems()
    }

    /// The stores whose chain is complete, for compaction: `None` names
    /// `[storage]`, else the mirror.
    pub fn current_stores(&self) -> Vec<(Option<String>, Arc<dyn Storage>)> {
        self.stores
            .current()
            .map(|s| (s.name.clone(), s.storage.clone()))
            .collect()
    }

    /// Why the chain in storage needs attention (it forks), as found at start.
    pub fn forked(&self) -> Option<&str> {
        self.forked.as_deref()
    }

    /// Writes the mark of the newest snapshot, which makes it findable from a
    /// listing. The snapshot is durable without it: a failure here is retried
    /// by the next sync, and restore finds an unmarked snapshot by reading it.
    async fn mark_snapshot(&mut self) -> Result<()> {
        let Some(seq) = self.unmarked else {
            return Ok(());
        };
        let key = segment::snapshot_mark_key(&self.prefix, seq);
        let empty: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest([]).into();
        let body = storage::Payload::Bytes(Vec::new());
        // A mark found already is this one, written by an attempt whose answer was lost.
        let mark = mirror::Object {
            key: &key,
            body: &body,
            sha256: empty,
            seq,
            existing_is_ours: true,
            is_snapshot: false,
        };
        match self.stores.put(mark, &self.prefix).await {
            Put::Durable => {
                self.unmarked = None;
                Ok(())
            }
            Put::Failed(e) => Err(e.into()),
            Put::Stopped(reason) => Err(self.stop(reason)),
        }
    }

    /// A new key (or none where there was one) starts with a snapshot, so that
    /// one restore never mixes keys. Checked before anything is encoded, so
    /// it holds after a key change, a reload, or a pending upload sealed with
    /// the old key. An encrypted chain is never continued in plaintext unless
    /// the configuration says so (`encryption_key = "off"`): a key that went
    /// missing is an error, not a reason to upload the data in the clear.
    fn check_key(&mut self) -> Result<()> {
        let current = self.sealing_key().as_ref().map(Key::id);
        if let (Some(head_key), None) = (self.head_key, &self.opts.encryption) {
            return Err(Error::KeyMissing {
                prefix: self.prefix.clone(),
                key_id: head_key,
            });
        }
        if self.head.is_some() && self.head_key != current && self.need_snapshot.is_none() {
            self.need_snapshot = Some(SnapshotReason::KeyChanged);
        }
        Ok(())
    }

    /// When the database last changed (something was shipped), or was opened.
    pub fn last_change(&self) -> Instant {
        self.last_change
    }

    /// True while the database is open (holding its descriptors and its pin).
    /// The database's page size, while it is open.
    pub fn page_size(&self) -> Option<u32> {
        self.db.as_ref().map(Database::page_size)
    }

    pub fn is_attached(&self) -> bool {
        self.db.is_some()
    }

    /// Open, with nothing left to ship or retry: closing it would succeed
    /// once its files are quiet.
    pub fn can_close(&self) -> bool {
        self.db.is_some()
            && self.pending.is_none()
            && self.need_snapshot.is_none()
            && self.stopped.is_none()
    }

    /// Closes a database at rest to save file descriptors: only once every
    /// shipped frame is sealed by walsync's own checkpoint (taking one if
    /// needed), so that re-attaching can prove continuity. `Ok(false)` if it
    /// must stay open.
    pub async fn detach(&mut self) -> Result<bool> {
        if self.db.is_none() {
            return Ok(self.detached.is_some());
        }
        if self.pending.is_some() || self.need_snapshot.is_some() || self.stopped.is_some() {
            return Ok(false);
        }
        // Ship what was committed since the last sync first: a closed database
        // must hold no unshipped frames (a seal covers only what it saw).
        self.flush().await?;
        if self.pending.is_some() || self.need_snapshot.is_some() {
            return Ok(false);
        }
        if self.db.as_ref().is_some_and(|d| d.unsealed_frames() > 0) {
            let mut report = SyncReport::default();
            match self.checkpoint(CheckpointMode::Passive, &mut report).await {
                // A commit slipped in and its tail found its key taken.
                Err(Error::TakenSinceListing {
                    seq, key, reason, ..
                }) => {
                    self.list_again(seq, &key, reason).await?;
                    return Ok(false);
                }
                done => done?,
            }
            if self.db.as_ref().is_none_or(|d| d.unsealed_frames() > 0) {
                return Ok(false);
            }
        }
        let Some(db) = self.db.take() else {
            return Ok(false);
        };
        let detached = blocking(&self.path, move || {
            let mut db = db;
            let record = db.take_record();
            match db.detach() {
                Ok(token) => Ok((token, record)),
                Err(mut db) => {
                    db.restore_record(record);
                    Err(db)
                }
            }
        })
        .await?;
        match detached {
            Ok((token, record)) => {
                self.detached = Some(token);
                self.parked_record = record;
                debug!(db = %self.path.display(), "closed until its next change");
                Ok(true)
            }
            Err(db) => {
                self.db = Some(*db);
                Ok(false)
            }
        }
    }

    /// Whether the state record parked with the closed database is still
    /// the file beside it (true when none is parked: nothing to tell by).
    async fn parked_record_current(&mut self) -> Result<bool> {
        let Some(record) = self.parked_record.take() else {
            return Ok(true);
        };
        let (current, record) = blocking(&self.path, move || (record.is_current(), record)).await?;
        self.parked_record = Some(record);
        Ok(current)
    }

    /// Opens a detached database again before any other work.
    async fn ensure_attached(&mut self) -> Result<()> {
        let Some(token) = self.detached else {
            return Ok(());
        };
        let path = self.path.clone();
        let record = self.parked_record.take();
        let record_path = self.record_path();
        let head = self.head;
        let digest = self.head_state;
        let (db, verdict) = blocking(&self.path, move || {
            Database::reattach(&path, token).map(|(mut db, verdict)| {
                db.keep_record_at(record_path);
                db.restore_record(record);
                // Whatever replaced or rewrote the file while it was closed
                // may have replaced the record too: check it again now that
                // it is about to be used.
                if let (Err(_), Some(head)) = (&verdict, head) {
                    let _ = db.load_record(head, digest);
                }
                (db, verdict)
            })
        })
        .await??;
        self.db = Some(db);
        self.detached = None;
        debug!(db = %self.path.display(), ok = verdict.is_ok(), "reopened");
        if let Err(reason) = verdict {
            self.need_snapshot = Some(SnapshotReason::Continuity(reason));
        }
        Ok(())
    }

    /// New sync settings from an edited configuration, used from the next sync on.
    pub fn set_options(&mut self, opts: SyncOptions) {
        self.opts = opts;
    }

    pub fn options(&self) -> &SyncOptions {
        &self.opts
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn head(&self) -> Option<Head> {
        self.head
    }

    /// The head's sequence and the newest snapshot's, for compaction: `None`
    /// where either is unknown or the chain forks (a forked chain is left
    /// as it is).
    pub fn compaction_point(&self) -> Option<(u64, u64)> {
        if self.forked.is_some() || self.stopped.is_some() {
            return None;
        }
        Some((self.head?.seq, self.newest_snapshot?))
    }

    /// Why replication stopped for good, if it did.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    /// True if the last sync saw commits SQLite was still publishing: sync
    /// again in a moment rather than waiting for the next file event.
    pub fn wants_recheck(&self) -> bool {
        self.db
            .as_ref()
            .is_some_and(Database::has_unpublished_commits)
    }

    /// When this database needs a sync although its WAL has not changed:
    /// a retry of a failed upload or a checkpoint of shipped frames. `None`
    /// for a database at rest.
    pub fn next_wakeup(&self) -> Option<Instant> {
        if self.stopped.is_some() {
            return None;
        }
        let unsealed = self.db.as_ref().map(|d| d.unsealed_frames()).unwrap_or(0);
        let checkpoint =
            (unsealed > 0).then(|| self.last_checkpoint + self.opts.checkpoint_interval);
        match (checkpoint, self.stores.next_retry()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    async fn with_db<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Database) -> T + Send + 'static,
    ) -> Result<T> {
        let Some(mut db) = self.db.take() else {
            // A previous worker died holding it. Reopen, and start over from a
            // snapshot: frames read from a fresh position could skip some.
            let path = self.path.clone();
            let record_path = self.record_path();
            let head = self.head;
            let digest = self.head_state;
            let db = blocking(&self.path, move || {
                Database::open(&path).map(|mut db| {
                    db.keep_record_at(record_path);
                    if let Some(head) = head {
                        let _ = db.load_record(head, digest);
                    }
                    db
                })
            })
            .await??;
            self.db = Some(db);
            self.need_snapshot = Some(SnapshotReason::Continuity(
                "walsync reopened the database after a failure".into(),
            ));
            return Err(Error::Worker {
                path: self.path.clone(),
                message: "reopened after a failure; a snapshot follows".into(),
            });
        };
        let (db, out) = blocking(&self.path, move || {
            let out = f(&mut db);
            (db, out)
        })
        .await?;
        self.db = Some(db);
        Ok(out)
    }

    /// Where this database's state record for this destination is kept.
    fn record_path(&self) -> PathBuf {
        state::record_path(
            &self.path,
            &state::destination(&self.storage.describe(), &self.prefix),
        )
    }

    fn sealing_key(&self) -> Option<Key> {
        self.opts
            .encryption
            .as_ref()
            .and_then(|k| k.current().cloned())
    }

    /// The object that comes next in the chain.
    fn next_object(&self) -> object::New {
        object::New(self.next_link())
    }

    fn next_link(&self) -> Link {
        match self.head {
            Some(h) => Link {
                seq: h.seq + 1,
                prev_hash: h.hash,
                key: self.sealing_key(),
            },
            None => Link {
                seq: 1,
                prev_hash: [0; 32],
                key: self.sealing_key(),
            },
        }
    }

    /// Ships whatever is new, snapshots or checkpoints when due.
    pub async fn sync(&mut self) -> Result<SyncReport> {
        self.sync_inner(true).await
    }

    /// The final sync before exit: ships what is committed, no checkpoint.
    pub async fn flush(&mut self) -> Result<SyncReport> {
        self.sync_inner(false).await
    }

    async fn sync_inner(&mut self, maintain: bool) -> Result<SyncReport> {
        match self.sync_step(maintain).await {
            Err(Error::TakenSinceListing {
                seq, key, reason, ..
            }) => {
                self.list_again(seq, &key, reason).await?;
                self.sync_step(maintain).await
            }
            done => done,
        }
    }

    /// After the first object since the chain was listed found sequence
    /// `seq` taken: lists the chain again and goes on after the object there.
    /// Where it was read from this very WAL (the local WAL still holds the
    /// frames it ends with, salts and checksum), it was an upload of a
    /// walsync killed here just before this one started, which the store
    /// carried out late: the chain goes on from it. Anything else (another
    /// database's object, or one that names no WAL frames to check) is
    /// never built on: a full snapshot follows it. An object that cannot be
    /// read as walsync's stops replication, with `reason`.
    async fn list_again(&mut self, seq: u64, key: &str, reason: String) -> Result<()> {
        let Some(db) = self.db.take() else {
            return Err(self.stop(reason));
        };
        let mut again = Self::unlisted(
            db,
            &self.path,
            &self.prefix,
            self.storage.clone(),
            self.opts.clone(),
        );
        again.listed_again = true;
        let refused = match again.load_head(Vec::new()).await {
            Ok(()) if again.head.is_some_and(|h| h.seq >= seq) => None,
            // Listed again at the next sync: the store's listing lags, or
            // it failed.
            Ok(()) => Some(Error::Storage(storage::Error::Io {
                key: key.to_string(),
                source: std::io::Error::other(
                    "the object was there at the write but not yet in a listing",
                ),
            })),
            Err(e) if !matches!(e, Error::Chain(_)) || e.kind() == "storage" => Some(e),
            Err(_) => Some(self.stop(reason)),
        };
        if let Some(e) = refused {
            self.db = again.db.take();
            return Err(e);
        }
        let from_this_wal = again.need_snapshot.is_none()
            && again.head_in_wal
            && again.head.is_some_and(|h| h.seq == seq);
        if from_this_wal {
            info!(
                db = %self.path.display(),
                prefix = %self.prefix,
                %key,
                "an object read from this database's WAL landed after the chain was listed \
                 (an upload of a walsync stopped just before this one, carried out late by \
                 the store); going on from it"
            );
        } else {
            warn!(
                db = %self.path.display(),
                prefix = %self.prefix,
                %key,
                "an object landed after the chain was listed that this database's WAL does not \
                 show it wrote (a walsync killed here while its WAL was checkpointed, or another \
                 writer on this prefix); a full snapshot follows it"
            );
            again.need_snapshot = Some(SnapshotReason::Continuity(format!(
                "object {key} landed after the chain was listed and this WAL does not hold it"
            )));
        }
        *self = again;
        Ok(())
    }

    async fn sync_step(&mut self, maintain: bool) -> Result<SyncReport> {
        if let Some(reason) = &self.stopped {
            return Err(Error::Stopped {
                prefix: self.prefix.clone(),
                reason: reason.clone(),
            });
        }
        let mut report = SyncReport::default();
        if let Some(head) = self.head
            && self.stores.any_behind()
            && let Some(why) = self.stores.tend(&self.prefix, head)
        {
            // With no store current, the pending object can go nowhere: the
            // full snapshot that follows holds what it held. (Where a store
            // is current, it may have landed there: it is shipped first.)
            if self.stores.current().next().is_none() {
                self.pending = None;
            }
            self.need_snapshot
                .get_or_insert(SnapshotReason::CatchUp(why.clone()));
            self.catch_up = Some(why);
        }
        if let Some(mut token) = self.detached
            && self.need_snapshot.is_none()
        {
            let path = self.path.clone();
            let (unchanged, token) =
                blocking(&self.path, move || (token.unchanged_on_disk(&path), token)).await?;
            self.detached = Some(token);
            if unchanged {
                return Ok(report);
            }
        }
        if self.detached.is_some() && !self.parked_record_current().await? {
            // Only a process on this machine writes the record beside this
            // file, and only when it ships this file to this destination: a
            // `walsync snapshot` (or a second watch) ran while the database
            // was closed here, unclaimed. Its objects are this database's;
            // go on from them as a restart would, instead of finding their
            // sequence numbers taken and stopping as for a second writer.
            info!(
                db = %self.path.display(),
                prefix = %self.prefix,
                "another walsync process shipped this database while it was closed here \
                 (its state record changed); resuming from storage"
            );
            let (path, prefix) = (self.path.clone(), self.prefix.clone());
            *self = Replica::open(&path, &prefix, self.storage.clone(), self.opts.clone()).await?;
        }
        self.ensure_attached().await?;
        if let Some(pending) = self.pending.take() {
            self.upload(pending, &mut report).await?;
        }
        self.mark_snapshot().await?;
        self.check_key()?;
        if let Some(reason) = self.need_snapshot.clone() {
            self.snapshot(&reason, &mut report).await?;
            return Ok(report);
        }
        let link = self.next_object();
        match self.with_db(move |db| db.read_changes(link)).await?? {
            Changes::Nothing => {}
            Changes::Segment(enc) => self.upload(*enc, &mut report).await?,
            Changes::Lost(reason) => {
                self.snapshot(&SnapshotReason::Continuity(reason), &mut report)
                    .await?;
                return Ok(report);
            }
        }
        if !maintain {
            return Ok(report);
        }
        if let Some(mode) = self.checkpoint_due() {
            self.checkpoint(mode, &mut report).await?;
        }
        if report.segments > 0 && self.snapshot_due() {
            self.snapshot(&SnapshotReason::Interval, &mut report)
                .await?;
        }
        Ok(report)
    }

    fn snapshot_due(&self) -> bool {
        match self.last_snapshot_ms {
            None => true,
            Some(ms) => {
                now_ms().saturating_sub(ms) >= self.opts.snapshot_interval.as_millis() as u64
            }
        }
    }

    fn checkpoint_due(&self) -> Option<CheckpointMode> {
        let frames = self.db.as_ref()?.unsealed_frames();
        if frames == 0 || self.checkpoint_retry_at.is_some_and(|t| Instant::now() < t) {
            None
        } else if frames >= self.opts.truncate_pages {
            Some(CheckpointMode::Truncate)
        } else if frames >= self.opts.checkpoint_pages
            || self.last_checkpoint.elapsed() >= self.opts.checkpoint_interval
        {
            Some(CheckpointMode::Passive)
        } else {
            None
        }
    }

    /// Forces a snapshot now (the `snapshot` command).
    pub async fn force_snapshot(&mut self, reason: SnapshotReason) -> Result<SyncReport> {
        self.ensure_attached().await?;
        let mut report = SyncReport::default();
        if let Some(pending) = self.pending.take() {
            self.upload(pending, &mut report).await?;
        }
        match self.full_snapshot(&reason, &mut report).await {
            // A snapshot builds on nothing: after an object that landed
            // since the chain was listed (a killed watch's upload, carried
            // out late), it goes after it, as `watch` does.
            Err(Error::TakenSinceListing {
                seq,
                key,
                reason: why,
                ..
            }) => {
                self.list_again(seq, &key, why).await?;
                self.full_snapshot(&reason, &mut report).await?;
                Ok(report)
            }
            done => done.map(|()| report),
        }
    }

    /// Starts the chain again for `reason`: after a continuity loss with only
    /// the pages that differ where the state record allows, else (and for
    /// every other reason) with a full snapshot.
    async fn snapshot(&mut self, reason: &SnapshotReason, report: &mut SyncReport) -> Result<()> {
        if !reason.is_continuity_loss() || self.catch_up.is_some() {
            return self.full_snapshot(reason, report).await;
        }
        // Remembered until something ships: a delta that fails part-way
        // (busy, an error) must not let the loss be forgotten.
        self.need_snapshot = Some(reason.clone());
        match self.delta(reason, report).await? {
            None => Ok(()),
            Some(why) => self.full_snapshot(&reason.and(&why), report).await,
        }
    }

    async fn full_snapshot(
        &mut self,
        reason: &SnapshotReason,
        report: &mut SyncReport,
    ) -> Result<()> {
        if reason.is_continuity_loss() {
            warn!(db = %self.path.display(), prefix = %self.prefix, reason = reason.to_string().as_str(), "taking a snapshot");
        } else {
            info!(db = %self.path.display(), prefix = %self.prefix, reason = reason.to_string().as_str(), "taking a snapshot");
        }
        self.need_snapshot = Some(reason.clone());
        let link = self.next_object();
        let encoded = self.with_db(move |db| db.snapshot(link)).await??;
        let Some(encoded) = encoded else {
            return Err(Error::Busy {
                path: self.path.clone(),
            });
        };
        // Its reason (and the loss it answers) counts in `upload`, once it
        // is durable: now, or from `pending` after a failed attempt.
        self.upload(encoded, report).await?;
        // A new snapshot is what lets older objects go. Retention is
        // housekeeping: a failure is logged and tried after the next snapshot.
        self.catch_up = None;
        if !self.opts.retention.is_off() {
            // Every store at once, each bounded: an interrupted run deletes
            // oldest first, so it leaves a shorter chain without holes.
            let (prefix, rule, now) = (&self.prefix, self.opts.retention, now_ms());
            let runs = self.current_stores().into_iter().map(|(name, storage)| async move {
                let run = retention::apply(storage.as_ref(), prefix, rule, now);
                let error = match tokio::time::timeout(RETENTION_TIME, run).await {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("not done within {RETENTION_TIME:?}"),
                };
                let store = mirror::Label::of(name.as_deref());
                warn!(%prefix, %store, error, "retention failed; tried again after the next snapshot");
            });
            futures_util::future::join_all(runs).await;
        }
        Ok(())
    }

    /// After a continuity loss, ships only the pages that differ from the
    /// state shipped (`state`), or nothing if none do. `Ok(None)` when done;
    /// `Ok(Some(why))` when a snapshot must be taken instead.
    async fn delta(
        &mut self,
        reason: &SnapshotReason,
        report: &mut SyncReport,
    ) -> Result<Option<String>> {
        let current = self.sealing_key().as_ref().map(Key::id);
        if self.head.is_none() || self.head_key != current {
            return Ok(Some("the chain head was sealed with another key".into()));
        }
        let link = self.next_object();
        let delta = self.with_db(move |db| db.delta(link)).await??;
        let Some(delta) = delta else {
            return Err(Error::Busy {
                path: self.path.clone(),
            });
        };
        match delta {
            Delta::Snapshot(why) => return Ok(Some(why)),
            Delta::Ship(encoded) => {
                warn!(
                    db = %self.path.display(),
                    prefix = %self.prefix,
                    reason = reason.to_string().as_str(),
                    pages = encoded.object.header.page_count,
                    of = encoded.object.header.db_pages,
                    "continuity lost; shipping only the pages that differ from what was shipped"
                );
                // The loss counts in `upload`, once the delta is durable.
                self.upload(*encoded, report).await?;
            }
            Delta::Same { state, commits } => {
                // Not a warning: every page was compared and matches what was
                // shipped, so the chain goes on exactly (this is also how the
                // first watch after a restore meets the restored file). Still
                // counted once the database is open: repeated, it shows
                // another process checkpointing.
                info!(
                    db = %self.path.display(),
                    prefix = %self.prefix,
                    reason = reason.to_string().as_str(),
                    "the database is exactly what was shipped (every page compared); nothing to upload"
                );
                self.with_db(move |db| db.shipped(state, commits)).await?;
                self.need_snapshot = None;
                report.deltas += 1;
                if self.loss_at_open.take().as_ref() != Some(reason) {
                    report.continuity_losses.push(reason.to_string());
                }
            }
        }
        Ok(None)
    }

    async fn checkpoint(&mut self, mode: CheckpointMode, report: &mut SyncReport) -> Result<()> {
        self.last_checkpoint = Instant::now();
        // Until proven complete, the next attempt waits a little.
        self.checkpoint_retry_at = Some(Instant::now() + CHECKPOINT_RETRY);
        // Sealing needs the WAL end read under the app's write lock. Frames
        // that arrived since the last read are shipped *without* the lock and
        // the lock is tried again, so that normally no network request is made
        // while the app cannot write; only the last attempt ships under the
        // lock, and then within a bounded time.
        for attempt in 1..=CATCH_UP_ATTEMPTS {
            let link = self.next_object();
            let tail = self
                .with_db(move |db| db.lock_and_read_tail(link))
                .await??;
            let Some(tail) = tail else {
                // The app holds the write lock; the checkpoint waits for another sync.
                return Ok(());
            };
            match tail {
                Changes::Nothing => break,
                Changes::Lost(reason) => {
                    self.with_db(|db| db.release_write_lock()).await??;
                    return self
                        .snapshot(&SnapshotReason::Continuity(reason), report)
                        .await;
                }
                Changes::Segment(enc) if attempt < CATCH_UP_ATTEMPTS => {
                    self.with_db(|db| db.release_write_lock()).await??;
                    self.upload(*enc, report).await?;
                }
                Changes::Segment(enc) => {
                    let shipped =
                        tokio::time::timeout(UPLOAD_UNDER_LOCK, self.upload(*enc, report)).await;
                    if !matches!(shipped, Ok(Ok(()))) {
                        self.with_db(|db| db.release_write_lock()).await??;
                        // A timed-out upload is still pending and retried byte for byte.
                        return match shipped {
                            Ok(result) => result,
                            Err(_) => Ok(()),
                        };
                    }
                }
            }
        }
        let outcome = self.with_db(move |db| db.checkpoint(mode)).await??;
        match outcome {
            CheckpointOutcome::Busy => {}
            CheckpointOutcome::Done { complete, frames } => {
                report.checkpointed = true;
                report.checkpoint_modes.push(match mode {
                    CheckpointMode::Passive => "passive",
                    CheckpointMode::Truncate => "truncate",
                });
                if complete {
                    self.checkpoint_retry_at = None;
                }
                tracing::debug!(
                    db = %self.path.display(),
                    ?mode,
                    complete,
                    frames,
                    "checkpointed"
                );
            }
            CheckpointOutcome::Lost(reason) => {
                self.snapshot(&SnapshotReason::Continuity(reason.to_string()), report)
                    .await?;
            }
        }
        Ok(())
    }

    /// Stops replication of this database for good: every store holds
    /// another writer's object where this chain's goes.
    fn stop(&mut self, reason: String) -> Error {
        tracing::error!(
            db = %self.path.display(),
            prefix = %self.prefix,
            reason = reason.as_str(),
            "another writer owns this prefix; replication of this database stops"
        );
        self.stopped = Some(reason.clone());
        Error::Stopped {
            prefix: self.prefix.clone(),
            reason,
        }
    }

    async fn upload(&mut self, encoded: Encoded<Object>, report: &mut SyncReport) -> Result<()> {
        let seq = encoded.object.header.seq;
        let key = segment::object_key(&self.prefix, seq);
        let bytes = encoded.object.payload.len();
        // Pending until a store has it: an upload cut short (the bounded wait
        // under the write lock drops it) is retried byte for byte.
        let pending = self.pending.insert(encoded);
        let object = mirror::Object {
            key: &key,
            body: &pending.object.payload,
            sha256: pending.object.hash,
            seq,
            existing_is_ours: false,
            is_snapshot: pending.object.header.kind == Kind::Snapshot,
        };
        let put = self.stores.put(object, &self.prefix).await;
        match put {
            Put::Durable => self.shipped_since_listing = true,
            Put::Stopped(reason) if !self.shipped_since_listing && !self.listed_again => {
                self.pending = None;
                return Err(Error::TakenSinceListing {
                    prefix: self.prefix.clone(),
                    seq,
                    key,
                    reason,
                });
            }
            Put::Stopped(reason) => {
                self.pending = None;
                return Err(self.stop(reason));
            }
            Put::Failed(e) => return Err(e.into()),
        }
        let Some(encoded) = self.pending.take() else {
            return Ok(());
        };
        let head = Head {
            seq: encoded.object.header.seq,
            hash: encoded.object.hash,
        };
        self.head = Some(head);
        self.head_key = encoded.object.header.sealed.map(|s| s.key_id);
        self.last_change = Instant::now();
        self.head_state = encoded.object.header.state;
        let (state, commits) = (encoded.state, encoded.commits);
        let change = encoded.change;
        self.with_db(move |db| {
            db.shipped(state, commits);
            db.record_shipped(change, head);
        })
        .await?;
        report.bytes += bytes;
        match encoded.object.header.kind {
            Kind::Wal => {
                report.segments += 1;
                info!(
                    db = %self.path.display(),
                    prefix = %self.prefix,
                    seq = encoded.object.header.seq,
                    bytes,
                    pages = encoded.object.header.page_count,
                    transactions = encoded.transactions,
                    "shipped segment"
                );
            }
            Kind::Delta => {
                report.deltas += 1;
                // The loss it answers counts now that it is durable, also
                // when it went up from `pending` after a failed attempt.
                if let Some(reason) = self.need_snapshot.take()
                    && reason.is_continuity_loss()
                {
                    report.continuity_losses.push(reason.to_string());
                }
                self.loss_at_open = None;
                info!(
                    db = %self.path.display(),
                    prefix = %self.prefix,
                    seq = encoded.object.header.seq,
                    bytes,
                    pages = encoded.object.header.page_count,
                    db_pages = encoded.object.header.db_pages,
                    "shipped the pages that differ from what was shipped"
                );
            }
            // Runs are written by compaction, never shipped from the WAL.
            Kind::Run => {}
            Kind::Snapshot => {
                report.snapshots += 1;
                // Its reason counts now that it is durable, also when it
                // went up from `pending` after a failed attempt.
                if let Some(reason) = self.need_snapshot.take() {
                    report.snapshot_reasons.push(reason.label());
                    if reason.is_continuity_loss() {
                        report.continuity_losses.push(reason.to_string());
                    }
                }
                self.loss_at_open = None;
                self.catch_up = None;
                self.last_snapshot_ms = Some(encoded.object.header.timestamp_ms);
                self.newest_snapshot = Some(encoded.object.header.seq);
                self.unmarked = Some(encoded.object.header.seq);
                if let Err(e) = self.mark_snapshot().await {
                    warn!(
                        db = %self.path.display(),
                        prefix = %self.prefix,
                        seq = encoded.object.header.seq,
                        error = %e,
                        "could not mark the snapshot; will retry"
                    );
                }
                info!(
                    db = %self.path.display(),
                    prefix = %self.prefix,
                    seq = encoded.object.header.seq,
                    bytes,
                    pages = encoded.object.header.page_count,
                    "shipped snapshot"
                );
            }
        }
        Ok(())
    }
}
