//! Which objects reach the point asked for: the chain listed, a time or
//! transaction resolved to a sequence, and the fewest objects and runs that
//! lead there from a snapshot. Reads keys and a few headers, nothing whole.

use super::*;

/// Which state of the database to rebuild.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// The newest state in storage.
    #[default]
    Latest,
    /// The state as of this sequence number.
    Seq(u64),
    /// The newest state walsync had read from the WAL at or before this
    /// instant (milliseconds since the Unix epoch), by the time recorded in
    /// each object's header, not the storage's upload time.
    Time(u64),
}

/// What a restore will download: `objects` applied in order reach `seq`.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub objects: Vec<ObjectRef>,
    /// The object before the first one, if storage still holds it: the
    /// first must link to it.
    pub before: Option<ObjectRef>,
    pub seq: u64,
    pub bytes: u64,
    /// Where the chain forks, the branch followed and the objects left off.
    pub fork: Option<Branch>,
}

/// How many listings one plan may take: an object deleted between a
/// listing and a header read (a time target reads a few; the exact window
/// moved past it) sends the plan back to a fresh listing, where a run
/// stands for it.
const PLANS: u32 = 3;

/// Lists the chain and picks the objects that reach `target` (a time target
/// reads a few object headers; a fork, the ends of the objects around it).
/// Nothing is downloaded whole or written. An object that went meanwhile
/// sends it back to a fresh listing.
pub async fn resolve(storage: &dyn Storage, prefix: &str, target: Target) -> Result<Resolved> {
    let mut plans = 1;
    loop {
        match resolve_once(storage, prefix, target).await {
            Err(e) if is_gone(&e) && plans < PLANS => {
                tracing::info!(prefix, error = %e, "an object went while the restore was planned; listing again");
                // A deletion under way (retention deletes whole stretches) is let finish.
                tokio::time::sleep(std::time::Duration::from_millis(100 * u64::from(plans))).await;
                plans += 1;
            }
            other => return other,
        }
    }
}

/// One listing's plan (see [`resolve`]).
async fn resolve_once(storage: &dyn Storage, prefix: &str, target: Target) -> Result<Resolved> {
    let (mut listed, runs) = chain::list_with_runs(storage, prefix).await?;
    chain::find_unmarked_start(storage, &mut listed).await?;
    let forked = !chain::forks(&listed).is_empty();
    let branch = fork::follow(storage, listed).await?;
    let objects = branch.objects.clone();
    let fork = forked.then_some(branch);
    if objects.is_empty() {
        return Err(Error::NoReplica {
            prefix: prefix.to_string(),
            storage: storage.describe(),
        });
    }
    // Through a fork the branch is chosen object by object: no runs there.
    let runs = if fork.is_none() { runs } else { Vec::new() };
    let seq = match target {
        Target::Latest => None,
        Target::Seq(seq) => Some(seq),
        Target::Time(ms) => Some(seq_at(storage, prefix, &objects, &runs, ms).await?),
    };
    let planned = plan(prefix, &objects, &runs, seq)?;
    let Some(last) = planned.last() else {
        return Err(Error::NoReplica {
            prefix: prefix.to_string(),
            storage: storage.describe(),
        });
    };
    let before = objects
        .iter()
        .find(|o| o.seq + 1 == planned[0].seq)
        .cloned();
    Ok(Resolved {
        before,
        seq: last.seq,
        bytes: planned.iter().map(|o| o.size).sum(),
        objects: planned,
        fork,
    })
}

/// The newest sequence recorded at or before `ms`. Object times rise along
/// the chain, so a binary search over headers finds it in a few reads; only
/// the ends of objects and runs from the first snapshot on can be restored
/// at all (where objects older than the exact window are gone, the ends of
/// the runs that stood for them are the points left).
async fn seq_at(
    storage: &dyn Storage,
    prefix: &str,
    objects: &[ObjectRef],
    runs: &[(u64, ObjectRef)],
    ms: u64,
) -> Result<u64> {
    let first = objects
        .iter()
        .find(|o| o.kind == Kind::Snapshot)
        .ok_or_else(|| Error::NoSnapshot {
            prefix: prefix.to_string(),
            target: objects.last().map_or(0, |o| o.seq),
        })?
        .seq;
    let usable = chain::restore_points(objects, runs, first);
    let earliest = chain::read_header(storage, usable[0]).await?.timestamp_ms;
    if earliest > ms {
        return Err(Error::BeforeEarliest {
            prefix: prefix.to_string(),
            at: format_ms(ms),
            earliest: format!("{} (sequence {})", format_ms(earliest), usable[0].seq),
            not_yet_replicated: usable[0].seq == 1,
        });
    }
    // Invariant: usable[lo] is at or before `ms`; everything from `hi` on is after it.
    let (mut lo, mut hi) = (0, usable.len());
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if chain::read_header(storage, usable[mid]).await?.timestamp_ms <= ms {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(usable[lo].seq)
}

/// The objects a restore to `target` needs, snapshot first, then the way
/// from it through `runs` and `objects` (see [`chain::cover`]): a few runs
/// for a long chain. Checks only keys.
pub fn plan(
    prefix: &str,
    objects: &[ObjectRef],
    runs: &[(u64, ObjectRef)],
    target: Option<u64>,
) -> Result<Vec<ObjectRef>> {
    let Some(head) = objects.last() else {
        return Err(Error::NoReplica {
            prefix: prefix.to_string(),
            storage: String::new(),
        });
    };
    // The newest object is never deleted (a writer links to it), so no run
    // ends past it.
    let target = target.unwrap_or(head.seq);
    if target > head.seq {
        return Err(Error::BeyondHead {
            prefix: prefix.to_string(),
            target,
            head: head.seq,
        });
    }
    let start = objects
        .iter()
        .rposition(|o| o.kind == Kind::Snapshot && o.seq <= target)
        .ok_or_else(|| Error::NoSnapshot {
            prefix: prefix.to_string(),
            target,
        })?;
    let snapshot = &objects[start];
    let ends: Vec<u64> = chain::restore_points(objects, runs, snapshot.seq)
        .iter()
        .map(|o| o.seq)
        .collect();
    let compacted = runs.iter().any(|(f, r)| (*f..=r.seq).contains(&target));
    if let (Err(at), true) = (ends.binary_search(&target), compacted) {
        let name = |seq: Option<&u64>| seq.map_or_else(|| "none".to_string(), u64::to_string);
        return Err(Error::NotExact {
            prefix: prefix.to_string(),
            target,
            before: name(at.checked_sub(1).and_then(|i| ends.get(i))),
            after: name(ends.get(at)),
        });
    }
    match chain::cover(&objects[start + 1..], runs, snapshot.seq + 1, target) {
        Ok(rest) => Ok(std::iter::once(snapshot.clone()).chain(rest).collect()),
        Err(missing) => {
            let before = objects
                .iter()
                .rev()
                .find(|o| o.seq < missing)
                .map_or_else(|| snapshot.key.clone(), |o| o.key.clone());
            let after = objects
                .iter()
                .find(|o| o.seq > missing && o.seq <= target)
                .map_or_else(|| "the requested sequence".to_string(), |o| o.key.clone());
            Err(Error::Missing {
                key: key_like(prefix, snapshot, missing),
                before,
                after,
            })
        }
    }
}

/// The key object `seq` would have in the layout of `neighbour`.
pub(super) fn key_like(prefix: &str, neighbour: &ObjectRef, seq: u64) -> String {
    if neighbour.is_legacy() {
        segment::legacy_object_key(prefix, seq, Kind::Wal)
    } else {
        segment::object_key(prefix, seq)
    }
}
