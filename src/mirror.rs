//! One database's chain in more than one store (`[[mirrors]]`).
//!
//! Each object is encoded once and written, byte for byte, to every store
//! that holds the chain up to its head: the chains are identical, so each
//! store restores on its own and either gives the same file. A store that
//! fails a write falls *behind* instead of holding the others back: the
//! object counts as durable once one store has it (then the WAL may be
//! checkpointed), and nothing more goes to the store behind until it is
//! caught up, so that its chain never has a hole an object links across.
//!
//! A slow store is not waited for either: once one store has an object,
//! the others get [`GRACE`] to answer, and one still writing after that
//! goes on in the background and counts as behind until it is done.
//!
//! Catching up runs in the background too (a task per store behind, only
//! while it is behind; the sync looks at it, never waits on it): it copies
//! the objects the store lacks from a store that is current, each checked
//! against its content hash and linked to the one before on the way, with a
//! pause that grows between attempts (a cheap listing of the store behind
//! comes first, so a store that is down costs one request per attempt).
//! Where no current store has them any more (compaction or retention
//! deleted them while the store was down), the next snapshot catches it up:
//! the store gets that snapshot and what follows, and restores from it on.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use sha2::Digest as _;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::chain::{self, ObjectRef};
use crate::segment::{self, Kind};
use crate::state::Head;
use crate::storage::{self, Payload, Storage};

/// Another store every object of every database also goes to.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// Its `name` in walsync.toml (`restore --from NAME`).
    pub name: String,
    pub storage: Arc<dyn Storage>,
}

impl PartialEq for Mirror {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.storage.describe() == other.storage.describe()
    }
}

impl Eq for Mirror {}

/// The first pause after a failed attempt to catch a store up; it doubles
/// up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// Most objects (and bytes, past the first object) one catch-up task
/// copies (each task lists the source once); the next starts where it
/// stopped, from the head then, at the next sync or look.
const COPY_OBJECTS: usize = 1000;
const COPY_BYTES: u64 = 64 << 20;
/// How long the other stores may take once one store has an object; one
/// still writing after that is behind, its write left to finish meanwhile.
pub const GRACE: Duration = Duration::from_secs(2);
/// How often a database whose store is being caught up looks at the work.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// `Behind::from` of a store whose end is unknown (not listed at start).
const UNLISTED: u64 = 0;
/// Catch-up tasks that work at once in the whole process: after an outage
/// of a store a fleet shares, its databases are caught up a few at a time,
/// beside the syncs of the stores that stayed up.
const CATCH_UP_AT_ONCE: usize = 4;
static CATCHING_UP: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(CATCH_UP_AT_ONCE);

/// How one store stands for one database.
#[derive(Debug)]
pub enum State {
    /// Holds the chain up to the head: every new object goes to it.
    Current,
    /// Lacks objects from `from` on.
    Behind(Behind),
    /// Lacks objects no store has any more: the next snapshot goes to it
    /// (then it is current), nothing before that.
    AwaitingSnapshot,
    /// An object of another chain sits where this chain's goes (another
    /// writer): nothing more is written there.
    Stopped(String),
}

#[derive(Debug)]
pub struct Behind {
    /// The first object it may lack.
    pub from: u64,
    /// When it fell behind.
    pub since: Instant,
    retry_at: Instant,
    attempts: u32,
    /// Why, the last time an attempt failed.
    pub error: String,
    /// A write or a catch-up running for it in the background.
    work: Option<Work>,
    /// Objects copied to it since it fell behind.
    copied: usize,
}

/// Background work for a store behind.
#[derive(Debug)]
enum Work {
    /// A write that outlasted [`GRACE`]: object `seq` (or its mark).
    Write {
        seq: u64,
        existing_is_ours: bool,
        task: JoinHandle<storage::Result<()>>,
    },
    /// Copying objects from a current store.
    Copy(JoinHandle<Copy>),
}

impl Work {
    fn is_finished(&self) -> bool {
        match self {
            Work::Write { task, .. } => task.is_finished(),
            Work::Copy(task) => task.is_finished(),
        }
    }
}

impl Behind {
    fn new(from: u64, error: String) -> Self {
        let now = Instant::now();
        Self {
            from,
            since: now,
            retry_at: now + RETRY_FIRST,
            attempts: 0,
            error,
            work: None,
            copied: 0,
        }
    }

    fn failed(&mut self, error: String) {
        self.attempts = self.attempts.saturating_add(1);
        let wait = RETRY_FIRST
            .saturating_mul(1u32 << self.attempts.min(16))
            .min(RETRY_MAX);
        self.retry_at = Instant::now() + wait;
        self.error = error;
    }

    /// Went on: the next attempt may start at once.
    fn advanced(&mut self, next: u64) {
        self.from = next;
        self.attempts = 0;
        self.retry_at = Instant::now();
    }
}

/// One store of one database.
#[derive(Debug)]
pub struct Store {
    /// `None` for `[storage]`.
    pub name: Option<String>,
    pub storage: Arc<dyn Storage>,
    pub state: State,
}

impl Store {
    /// How logs and the status page name it.
    pub fn label(&self) -> Label<'_> {
        Label(self.name.as_deref())
    }
}

/// `[storage]` or `mirror NAME`.
pub struct Label<'a>(Option<&'a str>);

impl<'a> Label<'a> {
    /// The label of the mirror `name`, or of `[storage]` for `None`.
    pub fn of(name: Option<&'a str>) -> Self {
        Self(name)
    }
}

impl fmt::Display for Label<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("[storage]"),
            Some(name) => write!(f, "mirror {name}"),
        }
    }
}

/// One object (or mark) to write to every store that takes it.
pub struct Object<'a> {
    pub key: &'a str,
    pub body: &'a Payload,
    /// Its content hash.
    pub sha256: [u8; 32],
    pub seq: u64,
    /// A snapshot mark: empty, one per sequence, so any one found is ours.
    pub existing_is_ours: bool,
    /// A snapshot: stores awaiting one take it too.
    pub is_snapshot: bool,
}

/// The writes of one object, aborted if the caller stops waiting for them
/// (the bounded upload under the write lock): the object is then retried
/// byte for byte, never written twice at once.
struct Writes(Vec<(usize, Option<JoinHandle<storage::Result<()>>>)>);

impl Drop for Writes {
    fn drop(&mut self) {
        for task in self.0.iter().filter_map(|(_, t)| t.as_ref()) {
            task.abort();
        }
    }
}

/// What a write to every current store came to.
pub enum Put {
    /// At least one store has it.
    Durable,
    /// No store has it; the first error. Retried byte for byte.
    Failed(storage::Error),
    /// Every store holds another writer's object there (or was stopped before).
    Stopped(String),
}

/// The stores of one database: `[storage]` first, then its mirrors.
#[derive(Debug)]
pub struct Stores {
    list: Vec<Store>,
}

impl Stores {
    pub fn new(primary: Arc<dyn Storage>, mirrors: &[Mirror]) -> Self {
        let mut list = vec![Store {
            name: None,
            storage: primary,
            state: State::Current,
        }];
        list.extend(mirrors.iter().map(|m| Store {
            name: Some(m.name.clone()),
            storage: m.storage.clone(),
            state: State::Current,
        }));
        Self { list }
    }

    /// Store `i`'s storage (`0`: `[storage]`).
    pub fn storage(&self, i: usize) -> Arc<dyn Storage> {
        self.list.get(i).unwrap_or(&self.list[0]).storage.clone()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Store> {
        self.list.iter()
    }

    /// True with no mirrors: everything behaves as with one store.
    pub fn is_single(&self) -> bool {
        self.list.len() == 1
    }

    /// The stores that hold the chain up to its head.
    pub fn current(&self) -> impl Iterator<Item = &Store> {
        self.list
            .iter()
            .filter(|s| matches!(s.state, State::Current))
    }

    /// True while some store lacks objects.
    pub fn any_behind(&self) -> bool {
        self.list
            .iter()
            .any(|s| matches!(s.state, State::Behind(_) | State::AwaitingSnapshot))
    }

    /// When [`Stores::tend`] has something to do: an attempt to catch a
    /// store up is due, or background work is to be looked at.
    pub fn next_retry(&self) -> Option<Instant> {
        self.list
            .iter()
            .filter_map(|s| match &s.state {
                State::Behind(b) if b.work.is_some() => Some(Instant::now() + LOOK_EVERY),
                State::Behind(b) => Some(b.retry_at),
                _ => None,
            })
            .min()
    }

    /// What is wrong with the stores, one line each, for the status page.
    pub fn problems(&self) -> Vec<String> {
        self.list
            .iter()
            .filter_map(|s| match &s.state {
                State::Current => None,
                State::Behind(b) => Some(format!(
                    "{} behind from object {} for {} s: {}",
                    s.label(),
                    b.from,
                    b.since.elapsed().as_secs(),
                    b.error
                )),
                State::AwaitingSnapshot => Some(format!(
                    "{} waits for the next snapshot (what it lacks is gone from the other stores)",
                    s.label()
                )),
                State::Stopped(why) => Some(format!("{} stopped: {why}", s.label())),
            })
            .collect()
    }

    /// Sets how each store stands after start-up listed them: `newest[i]`
    /// is store `i`'s newest sequence (`Err`: it could not be listed). The
    /// store with the newest is the lead the chain goes on from (`[storage]`
    /// on a tie); the others are current where they end at the same object
    /// (checked by `same_head`), else behind (one not listed: from where a
    /// listing finds it once it answers).
    pub fn settle(
        &mut self,
        newest: &[Result<Option<u64>, String>],
        lead: usize,
        same_head: &[Option<bool>],
    ) {
        let lead_newest = newest.get(lead).and_then(|n| n.clone().ok()).flatten();
        let lead_label = self.list[lead].label().to_string();
        for (i, store) in self.list.iter_mut().enumerate() {
            if i == lead {
                continue;
            }
            store.state = match (&newest[i], lead_newest) {
                // Where it stands is learnt by listing it again, once it
                // answers (also where the lead has nothing: it may hold a
                // chain that must not be mixed with a new one).
                (Err(e), _) => State::Behind(Behind::new(UNLISTED, e.clone())),
                (Ok(n), Some(head)) if *n == Some(head) => match same_head.get(i).copied() {
                    Some(Some(true)) => State::Current,
                    Some(Some(false)) => State::Stopped(format!(
                        "its object {head} differs from {lead_label}'s: another chain is stored \
                         under this prefix there"
                    )),
                    _ => State::Behind(Behind::new(
                        UNLISTED,
                        format!("its object {head} could not be read to compare"),
                    )),
                },
                (Ok(n), Some(_)) => State::Behind(Behind::new(
                    n.map_or(1, |n| n + 1),
                    "it lacks objects the other stores have".into(),
                )),
                (Ok(_), None) => State::Current,
            };
        }
        self.list[lead].state = State::Current;
    }

    /// Writes one object (or mark) to every current store at once. A store
    /// that fails falls behind from `seq` when another has it; one still
    /// writing [`GRACE`] after another has it falls behind with its write
    /// going on; one that holds another object at `key` stops, unless
    /// `existing_is_ours` (a snapshot mark: empty, one per sequence, so any
    /// one found is ours). A snapshot also goes to the stores awaiting one.
    pub async fn put(&mut self, object: Object<'_>, prefix: &str) -> Put {
        let Object {
            key,
            body,
            sha256,
            seq,
            existing_is_ours,
            is_snapshot,
        } = object;
        let targets: Vec<usize> = (0..self.list.len())
            .filter(|&i| match self.list[i].state {
                State::Current => true,
                // A mark of an older snapshot is harmless there (a mark
                // without its object lists as nothing).
                State::AwaitingSnapshot => is_snapshot || existing_is_ours,
                _ => false,
            })
            .collect();
        if targets.is_empty() {
            if self.any_behind() {
                // `tend` makes the stores behind current with a snapshot.
                return Put::Failed(storage::Error::Io {
                    key: key.to_string(),
                    source: std::io::Error::other(
                        "no store holds the chain up to its head; a snapshot catches them up",
                    ),
                });
            }
            return Put::Stopped(self.stopped_reason());
        }
        let mut writes = Writes(Vec::with_capacity(targets.len()));
        for &i in &targets {
            let body = match body.try_clone() {
                Ok(body) => body,
                Err(source) => {
                    return Put::Failed(storage::Error::Io {
                        key: key.to_string(),
                        source,
                    });
                }
            };
            let storage = self.list[i].storage.clone();
            let key = key.to_string();
            let task = tokio::spawn(async move { storage.put_new(&key, body, sha256).await });
            writes.0.push((i, Some(task)));
        }
        let mut results = Vec::with_capacity(writes.0.len());
        let mut grace_until = None;
        loop {
            let running: Vec<usize> = (0..writes.0.len())
                .filter(|&w| writes.0[w].1.is_some())
                .collect();
            if running.is_empty() {
                break;
            }
            let next = futures_util::future::select_all(
                writes.0.iter_mut().filter_map(|(_, task)| task.as_mut()),
            );
            let (joined, at, _) = match grace_until {
                Some(until) => match tokio::time::timeout_at(until, next).await {
                    Ok(done) => done,
                    Err(_) => break,
                },
                None => next.await,
            };
            let w = running[at];
            writes.0[w].1 = None;
            let result = joined.unwrap_or_else(|e| {
                Err(storage::Error::Io {
                    key: key.to_string(),
                    source: std::io::Error::other(format!("the write task failed: {e}")),
                })
            });
            let landed = match &result {
                Ok(()) => true,
                Err(storage::Error::AlreadyExists { .. }) => existing_is_ours,
                Err(_) => false,
            };
            if landed && grace_until.is_none() {
                grace_until = Some(tokio::time::Instant::now() + GRACE);
            }
            results.push((writes.0[w].0, result));
        }
        let durable = grace_until.is_some();
        let single = self.is_single();
        // Stores still writing: behind, their write left to finish.
        for (i, task) in std::mem::take(&mut writes.0) {
            let Some(task) = task else { continue };
            let store = &mut self.list[i];
            warn!(
                prefix,
                store = %store.label(),
                seq,
                "a store is slow; the others go on and it is caught up once its write is done"
            );
            let mut behind = Behind::new(seq, format!("still writing object {seq}"));
            behind.work = Some(Work::Write {
                seq,
                existing_is_ours,
                task,
            });
            store.state = State::Behind(behind);
        }
        let mut first_error = None;
        for (i, result) in results {
            let store = &mut self.list[i];
            match result {
                Ok(()) if is_snapshot => store.state = State::Current,
                Ok(()) => {}
                Err(storage::Error::AlreadyExists { .. }) if existing_is_ours => {}
                Err(storage::Error::AlreadyExists { key }) => {
                    let why = format!("object {key} already exists");
                    // With one store, the replica's own error says it.
                    if !single {
                        error!(
                            prefix,
                            store = %store.label(),
                            %key,
                            "another writer owns this prefix in this store; nothing more is written there"
                        );
                    }
                    store.state = State::Stopped(why);
                }
                Err(e) if durable => {
                    warn!(
                        prefix,
                        store = %store.label(),
                        seq,
                        error = %e,
                        "a store failed; the others go on and it is caught up later"
                    );
                    store.state = State::Behind(Behind::new(seq, e.to_string()));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if durable {
            return Put::Durable;
        }
        match first_error {
            Some(e) => Put::Failed(e),
            // Every store written holds another writer's object; the stores
            // behind (`tend` makes them await a snapshot) go on.
            None if self.any_behind() => Put::Failed(storage::Error::Io {
                key: key.to_string(),
                source: std::io::Error::other(format!(
                    "{}; the stores behind start again from a snapshot",
                    self.stopped_reason()
                )),
            }),
            None => Put::Stopped(self.stopped_reason()),
        }
    }

    fn stopped_reason(&self) -> String {
        let reasons: Vec<String> = self
            .list
            .iter()
            .filter_map(|s| match &s.state {
                State::Stopped(why) if self.is_single() => Some(why.clone()),
                State::Stopped(why) => Some(format!("{}: {why}", s.label())),
                _ => None,
            })
            .collect();
        if reasons.is_empty() {
            "no store holds the chain up to its head".into()
        } else {
            reasons.join("; ")
        }
    }

    /// Looks after the stores behind, without waiting on anything: takes
    /// in background work that is done, marks a store that has every
    /// object up to `head` current again, and starts a catch-up for one
    /// whose pause is over. Returns why a snapshot must catch a store up,
    /// where one must: that store is then current again, so the snapshot
    /// goes to it with the rest.
    pub fn tend(&mut self, prefix: &str, head: Head) -> Option<String> {
        let sources: Vec<Arc<dyn Storage>> = self.current().map(|s| s.storage.clone()).collect();
        let mut snapshot_for = None;
        if sources.is_empty() {
            // The only current store stopped (another writer) while the
            // others were behind: nothing to copy from, so they start again
            // from a snapshot.
            let mut promoted = Vec::new();
            for store in &mut self.list {
                if let State::Behind(b) = &store.state
                    && b.work.is_none()
                {
                    promoted.push(store.label().to_string());
                    store.state = State::AwaitingSnapshot;
                }
            }
            let awaiting = self
                .list
                .iter()
                .any(|s| matches!(s.state, State::AwaitingSnapshot));
            if awaiting {
                return Some(format!(
                    "no store holds the chain up to its head; {} start again from a snapshot",
                    if promoted.is_empty() {
                        "the stores behind".to_string()
                    } else {
                        promoted.join(" and ")
                    }
                ));
            }
        }
        for store in &mut self.list {
            let label = store.label().to_string();
            let State::Behind(b) = &mut store.state else {
                continue;
            };
            if b.work.as_ref().is_some_and(Work::is_finished) {
                match b.work.take() {
                    Some(Work::Write {
                        seq,
                        existing_is_ours,
                        task,
                    }) => match task.now_or_never() {
                        Some(Ok(Ok(()))) => b.advanced(seq + 1),
                        Some(Ok(Err(storage::Error::AlreadyExists { .. }))) if existing_is_ours => {
                            b.advanced(seq + 1)
                        }
                        Some(Ok(Err(storage::Error::AlreadyExists { key }))) => {
                            let why = format!("object {key} already exists");
                            error!(prefix, store = %label, why, "another writer owns this prefix in this store; nothing more is written there");
                            store.state = State::Stopped(why);
                            continue;
                        }
                        Some(Ok(Err(e))) => b.failed(e.to_string()),
                        Some(Err(e)) => b.failed(format!("the write task failed: {e}")),
                        None => b.failed("the write task vanished".into()),
                    },
                    Some(Work::Copy(task)) => match task.now_or_never() {
                        Some(Ok(Copy::Done { next, copied })) => {
                            b.copied += copied;
                            b.advanced(next);
                        }
                        Some(Ok(Copy::Gone(why))) => {
                            warn!(prefix, store = %label, why, "catching up with the next snapshot");
                            snapshot_for = Some(format!(
                                "{label} fell behind and the objects it lacks are gone from \
                                 the other stores ({why})"
                            ));
                            store.state = State::AwaitingSnapshot;
                            continue;
                        }
                        Some(Ok(Copy::Source(why) | Copy::Target(why))) => b.failed(why),
                        Some(Ok(Copy::Taken(why))) => {
                            error!(prefix, store = %label, why, "another writer owns this prefix in this store; nothing more is written there");
                            store.state = State::Stopped(why);
                            continue;
                        }
                        Some(Err(e)) => b.failed(format!("the catch-up task failed: {e}")),
                        None => b.failed("the catch-up task vanished".into()),
                    },
                    None => {}
                }
            }
            if b.work.is_some() {
                continue;
            }
            if b.from > head.seq {
                info!(
                    prefix,
                    store = %label,
                    copied = b.copied,
                    behind_for_s = b.since.elapsed().as_secs(),
                    "caught up"
                );
                store.state = State::Current;
                continue;
            }
            if b.retry_at > Instant::now() {
                continue;
            }
            let (target, sources) = (store.storage.clone(), sources.clone());
            let (prefix, from) = (prefix.to_string(), b.from);
            b.work = Some(Work::Copy(tokio::spawn(async move {
                catch_up(target, sources, prefix, from, head).await
            })));
        }
        snapshot_for
    }
}

/// One attempt to copy what `target` lacks of the chain, `from..=head`, from
/// the first of `sources` that has it (`from` [`UNLISTED`]: from after the
/// newest object a listing of `target` finds).
async fn catch_up(
    target: Arc<dyn Storage>,
    sources: Vec<Arc<dyn Storage>>,
    prefix: String,
    from: u64,
    head: Head,
) -> Copy {
    let (head, head_hash) = (head.seq, head.hash);
    let Ok(_turn) = CATCHING_UP.acquire().await else {
        return Copy::Source("walsync is stopping".into());
    };
    let from = if from == UNLISTED {
        match chain::list(target.as_ref(), &prefix).await {
            Err(e) => return Copy::Target(e.to_string()),
            Ok(listed) => match listed.last().map(|o| o.seq) {
                Some(newest) if newest > head => {
                    return Copy::Taken(format!(
                        "it holds objects up to {newest}, past the head {head} the other \
                         stores reach: another chain is stored under this prefix there"
                    ));
                }
                Some(newest) => newest + 1,
                None => 1,
            },
        }
    } else {
        from
    };
    // A store that is still down costs one small listing per attempt; the
    // same listing finds the object the copy must link to.
    let join = match join_hash(target.as_ref(), &prefix, from).await {
        Ok(join) => join,
        Err(e) => return Copy::Target(e.to_string()),
    };
    if from > head {
        // Listed, it ends at the head: current if that object is the head.
        return if join == Some(head_hash) {
            Copy::Done {
                copied: 0,
                next: from,
            }
        } else {
            Copy::Taken(format!(
                "its object {head} is not the chain's head: another chain is stored under this \
                 prefix there"
            ))
        };
    }
    let mut outcome = Copy::Source("no store is current to copy from".into());
    for source in &sources {
        outcome = copy_chain(
            source.as_ref(),
            target.as_ref(),
            &prefix,
            (from, join),
            (head, head_hash),
        )
        .await;
        match &outcome {
            Copy::Gone(why) | Copy::Source(why) => {
                warn!(prefix, from = %source.describe(), why, "cannot catch up from this store");
            }
            _ => break,
        }
    }
    outcome
}

/// The content hash of `target`'s object `from - 1`, which the first object
/// copied must link to; `None` where it has none (or `from` is 1).
async fn join_hash(
    target: &dyn Storage,
    prefix: &str,
    from: u64,
) -> storage::Result<Option<[u8; 32]>> {
    let before = from.saturating_sub(1);
    let key = segment::object_key(prefix, before.max(1));
    let listed = target.list(&key).await?;
    let Some(meta) = listed.iter().find(|m| m.key == key).filter(|_| before > 0) else {
        return Ok(None);
    };
    let trailer = target
        .get_range(&key, meta.size.saturating_sub(32), 32)
        .await?;
    Ok(<[u8; 32]>::try_from(trailer.as_slice()).ok())
}

#[derive(Debug)]
enum Copy {
    /// Copied `copied` objects; `next` is the first not copied yet.
    Done { copied: usize, next: u64 },
    /// The source lacks what the store needs (deleted, or damaged).
    Gone(String),
    /// Reading the source failed: try again later.
    Source(String),
    /// Writing the store failed: try again later.
    Target(String),
    /// The store holds another object at one of the keys.
    Taken(String),
}

/// Copies the objects `from..=head` of `prefix` (or, where the source no
/// longer holds them all, those from the first snapshot after its gap) from
/// `source` to `target`, a bounded amount per call.
async fn copy_chain(
    source: &dyn Storage,
    target: &dyn Storage,
    prefix: &str,
    (from, join): (u64, Option<[u8; 32]>),
    (head, head_hash): (u64, [u8; 32]),
) -> Copy {
    let listed = match chain::list(source, prefix).await {
        Ok(listed) => listed,
        Err(e) => return Copy::Source(e.to_string()),
    };
    if chain::forks(&listed)
        .iter()
        .any(|(seq, _)| *seq + 1 >= from)
    {
        return Copy::Gone("its chain forks after the object the store lacks".into());
    }
    let wanted: Vec<&ObjectRef> = listed
        .iter()
        .filter(|o| o.seq >= from && o.seq <= head)
        .collect();
    if wanted.last().map(|o| o.seq) != Some(head) {
        return Copy::Source(format!("it does not list object {head} (yet)"));
    }
    // The stretch that reaches the head without a hole, and where in it to start.
    let mut lo = wanted.len() - 1;
    while lo > 0 && wanted[lo - 1].seq + 1 == wanted[lo].seq {
        lo -= 1;
    }
    // Going on from `from` needs the object before it in the store (or
    // nothing before: the chain's start); else the store starts again at a
    // snapshot, whose restore needs nothing older.
    let start = if wanted[lo].seq == from && (from == 1 || join.is_some()) {
        lo
    } else {
        match (lo..wanted.len()).find(|&i| wanted[i].kind == Kind::Snapshot) {
            Some(i) => i,
            None => {
                return Copy::Gone(format!(
                    "object {} is no longer stored and no snapshot follows it",
                    segment::object_key(prefix, from)
                ));
            }
        }
    };
    let mut copied = 0;
    let mut bytes = 0;
    let mut prev_hash = if wanted[start].seq == from {
        join
    } else {
        None
    };
    for object in &wanted[start..] {
        if copied >= COPY_OBJECTS || (copied > 0 && bytes >= COPY_BYTES) {
            return Copy::Done {
                copied,
                next: object.seq,
            };
        }
        let (payload, header, hash) = match fetch(source, object).await {
            Ok(got) => got,
            Err(e) => return e,
        };
        if copied == 0 && prev_hash.is_some_and(|p| p != header.prev_hash) {
            return Copy::Taken(format!(
                "its object {} is not the one object {} links to: another chain is stored \
                 under this prefix there",
                object.seq.saturating_sub(1),
                object.seq
            ));
        }
        if header.seq != object.seq || prev_hash.is_some_and(|p| p != header.prev_hash) {
            return Copy::Gone(format!(
                "object {} does not continue the chain (sequence {}, or a broken link)",
                object.key, header.seq
            ));
        }
        if object.seq == head && hash != head_hash {
            return Copy::Gone(format!("object {} is not the chain's head", object.key));
        }
        prev_hash = Some(hash);
        bytes += payload.len();
        // A store answers a put of the object it holds already as written
        // (S3 by the hash beside it, a directory by its bytes).
        match target.put_new(&object.key, payload, hash).await {
            Ok(()) => {}
            Err(storage::Error::AlreadyExists { key }) => {
                return Copy::Taken(format!("object {key} already exists with other content"));
            }
            Err(e) => return Copy::Target(e.to_string()),
        }
        if let Some(mark) = &object.mark {
            let empty: [u8; 32] = sha2::Sha256::digest([]).into();
            match target
                .put_new(mark, Payload::Bytes(Vec::new()), empty)
                .await
            {
                Ok(()) | Err(storage::Error::AlreadyExists { .. }) => {}
                Err(e) => return Copy::Target(e.to_string()),
            }
        }
        copied += 1;
    }
    Copy::Done {
        copied,
        next: head + 1,
    }
}

/// Reads one object whole into a temp file, checking its content hash as
/// it streams.
async fn fetch(
    source: &dyn Storage,
    object: &ObjectRef,
) -> Result<(Payload, segment::Header, [u8; 32]), Copy> {
    let (file, (header, hash)) = match chain::spool_object(source, &object.key, None).await {
        Ok(spooled) => spooled,
        Err(e) if e.is_not_found() => {
            return Err(Copy::Gone(format!(
                "object {} went while copying",
                object.key
            )));
        }
        Err(e @ chain::Error::Segment { .. }) => {
            error!(key = %object.key, error = %e, "an object in storage is damaged; run walsync verify");
            return Err(Copy::Gone(e.to_string()));
        }
        Err(e @ chain::Error::Local { .. }) => return Err(Copy::Target(e.to_string())),
        Err(e) => return Err(Copy::Source(e.to_string())),
    };
    let len = file
        .metadata()
        .map_err(|e| Copy::Target(format!("spooling {}: {e}", object.key)))?
        .len();
    Ok((Payload::File { file, len }, header, hash))
}
