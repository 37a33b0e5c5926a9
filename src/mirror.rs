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
//! Catching up copies the objects the store lacks from a store that is
//! current, each checked against its content hash and linked to the one
//! before on the way, with a pause that grows between attempts (a cheap
//! listing of the store behind comes first, so a store that is down costs
//! one request per attempt). Where no current store has them any more
//! (compaction or retention deleted them while the store was down), the
//! next snapshot catches it up: the store gets that snapshot and what
//! follows, and restores from it on.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::Digest as _;
use tokio::io::AsyncReadExt;
use tracing::{error, info, warn};

use crate::chain::{self, ObjectRef};
use crate::segment::{self, Kind};
use crate::storage::{self, Payload, SpoolWriter, Storage};

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
/// Most objects (and bytes, past the first object) copied in one sync, so
/// that catching one store up never delays the next sync for long.
const COPY_OBJECTS: usize = 64;
const COPY_BYTES: u64 = 64 << 20;

/// How one store stands for one database.
#[derive(Debug)]
pub enum State {
    /// Holds the chain up to the head: every new object goes to it.
    Current,
    /// Lacks objects from `from` on.
    Behind(Behind),
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

    /// True while some store lacks objects (a database with a store behind
    /// stays open, so that it is caught up at rest too).
    pub fn any_behind(&self) -> bool {
        self.list
            .iter()
            .any(|s| matches!(s.state, State::Behind(_)))
    }

    /// When the next attempt to catch a store up is due.
    pub fn next_retry(&self) -> Option<Instant> {
        self.list
            .iter()
            .filter_map(|s| match &s.state {
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
                State::Stopped(why) => Some(format!("{} stopped: {why}", s.label())),
            })
            .collect()
    }

    /// Sets how each store stands after start-up listed them: `newest[i]`
    /// is store `i`'s newest sequence (`Err`: it could not be listed). The
    /// store with the newest is the lead the chain goes on from (`[storage]`
    /// on a tie); the others are current where they end at the same object
    /// (checked by `same_head`), else behind. `snapshot` is the lead's
    /// newest snapshot: a store whose listing failed is caught up from it.
    pub fn settle(
        &mut self,
        newest: &[Result<Option<u64>, String>],
        lead: usize,
        snapshot: Option<u64>,
        same_head: &[bool],
    ) {
        let lead_newest = newest.get(lead).and_then(|n| n.clone().ok()).flatten();
        let lead_label = self.list[lead].label().to_string();
        for (i, store) in self.list.iter_mut().enumerate() {
            if i == lead {
                continue;
            }
            store.state = match (&newest[i], lead_newest) {
                (Err(e), Some(_)) => State::Behind(Behind::new(snapshot.unwrap_or(1), e.clone())),
                (Ok(n), Some(head)) if *n == Some(head) => {
                    if same_head.get(i).copied().unwrap_or(true) {
                        State::Current
                    } else {
                        State::Stopped(format!(
                            "its object {head} differs from {lead_label}'s: another chain is \
                             stored under this prefix there"
                        ))
                    }
                }
                (Ok(n), Some(_)) => State::Behind(Behind::new(
                    n.map_or(1, |n| n + 1),
                    "it lacks objects the other stores have".into(),
                )),
                (_, None) => State::Current,
            };
        }
        self.list[lead].state = State::Current;
    }

    /// Writes one object (or mark) to every current store at once. A store
    /// that fails falls behind from `seq` when another has it; one that
    /// holds another object at `key` stops, unless `existing_is_ours` (a
    /// snapshot mark: empty, one per sequence, so any one found is ours).
    pub async fn put(
        &mut self,
        key: &str,
        body: &Payload,
        sha256: [u8; 32],
        seq: u64,
        prefix: &str,
        existing_is_ours: bool,
    ) -> Put {
        let targets: Vec<usize> = (0..self.list.len())
            .filter(|&i| matches!(self.list[i].state, State::Current))
            .collect();
        if targets.is_empty() {
            return Put::Stopped(self.stopped_reason());
        }
        let mut writes = Vec::with_capacity(targets.len());
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
            writes.push(async move { storage.put_new(key, body, sha256).await });
        }
        let results = futures_util::future::join_all(writes).await;
        let durable = results.iter().any(|r| match r {
            Ok(()) => true,
            Err(storage::Error::AlreadyExists { .. }) => existing_is_ours,
            Err(_) => false,
        });
        let mut first_error = None;
        let single = self.is_single();
        for (&i, result) in targets.iter().zip(results) {
            let store = &mut self.list[i];
            match result {
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

    /// One attempt, for each store behind whose pause is over, to copy what
    /// it lacks of the chain up to `head` from a current store. Returns why
    /// a snapshot must catch a store up, where one must: that store is then
    /// current again and the snapshot goes to it with the rest.
    pub async fn catch_up(&mut self, prefix: &str, head: u64) -> Option<String> {
        let now = Instant::now();
        let mut snapshot_for = None;
        for i in 0..self.list.len() {
            let from = match &self.list[i].state {
                State::Behind(b) if b.retry_at <= now => b.from,
                _ => continue,
            };
            let target = self.list[i].storage.clone();
            // A store that is still down costs one small listing per attempt.
            if let Err(e) = target.list(&segment::object_key(prefix, from)).await {
                if let State::Behind(b) = &mut self.list[i].state {
                    b.failed(e.to_string());
                }
                continue;
            }
            let sources: Vec<(String, Arc<dyn Storage>)> = self
                .current()
                .map(|s| (s.label().to_string(), s.storage.clone()))
                .collect();
            let mut outcome = Copy::Source("no store is current to copy from".into());
            for (label, source) in &sources {
                outcome = copy_chain(source.as_ref(), target.as_ref(), prefix, from, head).await;
                if let Copy::Gone(why) | Copy::Source(why) = &outcome {
                    warn!(prefix, from = %label, to = %self.list[i].label(), why, "cannot catch up from this store");
                    continue;
                }
                break;
            }
            let store = &mut self.list[i];
            match outcome {
                Copy::Done { copied, next } if next > head => {
                    info!(prefix, store = %store.label(), copied, "caught up");
                    store.state = State::Current;
                }
                Copy::Done { next, .. } => {
                    if let State::Behind(b) = &mut store.state {
                        b.from = next;
                        b.retry_at = Instant::now();
                        b.attempts = 0;
                    }
                }
                Copy::Gone(why) => {
                    warn!(prefix, store = %store.label(), why, "catching up with the next snapshot");
                    store.state = State::Current;
                    snapshot_for = Some(format!(
                        "{} fell behind and the objects it lacks are gone from the other \
                         stores ({why})",
                        store.label()
                    ));
                }
                Copy::Source(why) | Copy::Target(why) => {
                    if let State::Behind(b) = &mut store.state {
                        b.failed(why);
                    }
                }
                Copy::Taken(why) => {
                    error!(prefix, store = %store.label(), why, "another writer owns this prefix in this store; nothing more is written there");
                    store.state = State::Stopped(why);
                }
            }
        }
        snapshot_for
    }
}

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
    from: u64,
    head: u64,
) -> Copy {
    let listed = match chain::list(source, prefix).await {
        Ok(listed) => listed,
        Err(e) => return Copy::Source(e.to_string()),
    };
    if chain::forks(&listed).iter().any(|(seq, _)| *seq >= from) {
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
    let start = if wanted[lo].seq == from {
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
    let mut prev_hash = None;
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
        if header.seq != object.seq || prev_hash.is_some_and(|p| p != header.prev_hash) {
            return Copy::Gone(format!(
                "object {} does not continue the chain (sequence {}, or a broken link)",
                object.key, header.seq
            ));
        }
        prev_hash = Some(hash);
        bytes += payload.len();
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

/// Reads one object whole, checking its content hash as it streams.
async fn fetch(
    source: &dyn Storage,
    object: &ObjectRef,
) -> Result<(Payload, segment::Header, [u8; 32]), Copy> {
    let mut reader = match source.get(&object.key).await {
        Ok(r) => r,
        Err(storage::Error::NotFound { key }) => {
            return Err(Copy::Gone(format!("object {key} went while copying")));
        }
        Err(e) => return Err(Copy::Source(e.to_string())),
    };
    let mut check = segment::Check::default();
    let mut spool = SpoolWriter::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return Err(Copy::Source(format!("reading {}: {e}", object.key))),
        };
        check.update(&buf[..n]);
        if let Err(e) = std::io::Write::write_all(&mut spool, &buf[..n]) {
            return Err(Copy::Target(format!("spooling {}: {e}", object.key)));
        }
    }
    let (header, hash) = check.finish().map_err(|e| {
        error!(key = %object.key, error = %e, "an object in storage is damaged; run walsync verify");
        Copy::Gone(format!("object {} is damaged: {e}", object.key))
    })?;
    let payload = spool
        .finish()
        .map_err(|e| Copy::Target(format!("spooling {}: {e}", object.key)))?;
    Ok((payload, header, hash))
}
