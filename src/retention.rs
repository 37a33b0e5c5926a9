//! Retention: deleting the objects of a chain that no retained restore point
//! needs.
//!
//! Every object from a snapshot on is a restore point, and restoring to it
//! needs that snapshot and every object after it up to the point. So objects
//! can only go as a prefix of the chain, up to (not including) a snapshot:
//! the "keep-from" snapshot. Each rule names the oldest snapshot it wants
//! kept, and the oldest of those wins (an object goes only when every rule
//! lets it go):
//!
//! * by age (`retention = "72h"`): the newest snapshot at or before
//!   now - 72h, so that every state of the last 72 hours stays restorable;
//! * by count (`retention_snapshots = 3`): the third-newest snapshot.
//!
//! The newest snapshot and everything after it are never deleted, whatever
//! the rules say, so the chain that reaches the head always stays whole.
//! Objects are deleted oldest first: an interrupted run leaves a chain that
//! starts later but has no holes.

use std::time::Duration;

use tracing::info;

use crate::chain::{self, ObjectRef};
use crate::fork;
use crate::segment::Kind;
use crate::storage::Storage;

/// Which restore points to keep. Both `None`: keep everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep every state of at least this long ago.
    pub age: Option<Duration>,
    /// Keep at least this many snapshots (and everything after the oldest).
    pub snapshots: Option<u32>,
}

impl Retention {
    pub fn is_off(&self) -> bool {
        self.age.is_none() && self.snapshots.is_none()
    }
}

/// What a retention pass removed (or, in a dry run, would remove).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pruned {
    pub objects: Vec<ObjectRef>,
    pub bytes: u64,
    /// The first sequence kept.
    pub keep_from: Option<u64>,
}

/// The objects of `prefix` that `rules` let go, as of `now_ms`. Reads the
/// listing and the headers of a few snapshots; deletes nothing.
pub async fn plan(
    storage: &dyn Storage,
    prefix: &str,
    rules: Retention,
    now_ms: u64,
) -> chain::Result<Pruned> {
    if rules.is_off() {
        return Ok(Pruned::default());
    }
    // Only the branch restore follows decides what is kept: a snapshot on a
    // forked-off branch restores nothing after it. What lies off the branch
    // goes with everything else before the kept snapshot.
    let (mut listed, runs) = chain::list_with_runs(storage, prefix).await?;
    chain::find_unmarked_start(storage, &mut listed).await?;
    let all = listed.clone();
    let objects = fork::follow(storage, listed).await?.objects;
    let snapshots: Vec<&ObjectRef> = objects
        .iter()
        .filter(|o| o.kind == Kind::Snapshot)
        .collect();
    let Some(newest) = snapshots.last() else {
        return Ok(Pruned::default());
    };
    let mut keep_from = newest.seq;
    if let Some(n) = rules.snapshots {
        let n = (n.max(1) as usize).min(snapshots.len());
        keep_from = keep_from.min(snapshots[snapshots.len() - n].seq);
    }
    if let Some(age) = rules.age {
        let cutoff = now_ms.saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
        // The newest snapshot taken at or before the cutoff covers every
        // state after it; with none that old, everything is younger: keep all.
        let mut covering = snapshots[0].seq;
        for snapshot in snapshots.iter().rev() {
            if chain::read_header(storage, snapshot).await?.timestamp_ms <= cutoff {
                covering = snapshot.seq;
                break;
            }
        }
        keep_from = keep_from.min(covering);
    }
    // A run starting before the kept snapshot stands for objects that go:
    // no restore could start where it does.
    let doomed: Vec<ObjectRef> = all
        .into_iter()
        .filter(|o| o.seq < keep_from)
        .chain(
            runs.into_iter()
                .filter(|(first, _)| *first < keep_from)
                .map(|(_, run)| run),
        )
        .collect();
    Ok(Pruned {
        bytes: doomed.iter().map(|o| o.size).sum(),
        objects: doomed,
        keep_from: Some(keep_from),
    })
}

/// Deletes what [`plan`] finds, oldest first.
pub async fn apply(
    storage: &dyn Storage,
    prefix: &str,
    rules: Retention,
    now_ms: u64,
) -> chain::Result<Pruned> {
    let pruned = plan(storage, prefix, rules, now_ms).await?;
    // A thousand at a time (one request to S3), oldest first. The marks go
    // after their snapshots: a mark left by an interrupted run names nothing
    // and is ignored; a snapshot left unmarked would not be.
    for chunk in pruned.objects.chunks(1000) {
        let keys: Vec<String> = chunk.iter().map(|o| o.key.clone()).collect();
        storage.delete_many(&keys).await?;
        let marks: Vec<String> = chunk.iter().filter_map(|o| o.mark.clone()).collect();
        storage.delete_many(&marks).await?;
    }
    if !pruned.objects.is_empty() {
        info!(
            prefix,
            deleted = pruned.objects.len(),
            bytes = pruned.bytes,
            keep_from = pruned.keep_from,
            "retention removed objects no kept restore point needs"
        );
    }
    Ok(pruned)
}
