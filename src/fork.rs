//! Forked chains: which branch restore follows when objects disagree.
//!
//! A chain forks when two objects claim one sequence number: an old walsync
//! whose keys named the kind (`8.snapshot` beside `8.wal`), a store that
//! ignored a conditional write, or objects copied in by hand. Every object
//! names its parent by hash, so from any object there is exactly one way
//! back; a fork is a place where two objects share a parent (or where one of
//! them starts afresh, as a snapshot may).
//!
//! The followed branch is the one that reaches the newest sequence number
//! from a snapshot (on a tie, the one whose last object was read latest).
//! Walking back from its end gives one straight chain, which restore then
//! plans over as if nothing had forked; the objects left off are reported by
//! key. Only objects at and around forks are read, and only their first and
//! last bytes; the whole of every object on the branch is verified when it is
//! downloaded, as always.

use std::collections::{BTreeSet, HashMap};

use crate::chain::{self, Link, ObjectRef};
use crate::segment::Kind;
use crate::storage::Storage;

/// A forked chain reduced to the branch restore follows.
#[derive(Debug, Clone, Default)]
pub struct Branch {
    /// The followed objects, one per sequence number, oldest first.
    pub objects: Vec<ObjectRef>,
    /// Objects from the first fork on that are not on the followed branch.
    pub left: Vec<ObjectRef>,
}

impl Branch {
    /// One line for logs and reports: what was followed, what was left.
    pub fn describe(&self) -> String {
        let head = self
            .objects
            .last()
            .map_or_else(|| "nothing".to_string(), |o| o.key.clone());
        let left: Vec<&str> = self.left.iter().map(|o| o.key.as_str()).collect();
        format!(
            "the chain forks (two writers on one prefix?); following the branch that ends at {head}, \
             not the objects {}",
            left.join(", ")
        )
    }
}

/// Picks the branch to follow through `objects` (sorted by sequence, as
/// [`chain::list`] returns them). Without a fork it is the chain itself.
pub async fn follow(storage: &dyn Storage, objects: Vec<ObjectRef>) -> chain::Result<Branch> {
    let forks: BTreeSet<u64> = chain::forks(&objects).iter().map(|(s, _)| *s).collect();
    if forks.is_empty() {
        return Ok(Branch {
            objects,
            left: Vec::new(),
        });
    }
    // Links are needed on both sides of every pair that touches a fork.
    let near = |seq: u64| {
        forks.contains(&seq)
            || seq.checked_add(1).is_some_and(|s| forks.contains(&s))
            || seq.checked_sub(1).is_some_and(|s| forks.contains(&s))
    };
    let mut links: Vec<Read> = Vec::with_capacity(objects.len());
    let mut unreadable = Vec::new();
    for object in &objects {
        links.push(if !near(object.seq) {
            Read::Skipped
        } else {
            match chain::read_link(storage, object).await {
                Ok(link) => Read::Link(Box::new(link)),
                // A claimant that does not hold up is on no branch; if the
                // chain needed it, it is what the refusal names.
                Err(
                    e @ (chain::Error::Segment { .. }
                    | chain::Error::SeqMismatch { .. }
                    | chain::Error::KindMismatch { .. }),
                ) if forks.contains(&object.seq) => {
                    unreadable.push(e);
                    Read::Unreadable
                }
                Err(e) => return Err(e),
            }
        });
    }
    let claimants: Vec<ObjectRef> = objects
        .iter()
        .filter(|o| forks.contains(&o.seq))
        .cloned()
        .collect();
    match choose(objects, &links) {
        Ok(branch) => Ok(branch),
        Err(unreachable) => {
            // Objects no snapshot reaches: the chain is broken, not forked.
            // Name the claimant that broke it if one does not verify.
            if let Some(e) = unreadable.into_iter().next() {
                return Err(e);
            }
            for claimant in &claimants {
                chain::read_verified(storage, claimant).await?;
            }
            Err(unreachable)
        }
    }
}

/// What was read of an object to place it (one per listed object: the
/// rare link is boxed so the common case stays small).
#[derive(Debug, Clone)]
enum Read {
    /// Not near a fork: placed by its sequence number alone.
    Skipped,
    Link(Box<Link>),
    /// At a fork, and its header or size does not hold up: on no branch.
    Unreadable,
}

impl Read {
    fn link(&self) -> Option<&Link> {
        match self {
            Read::Link(link) => Some(link),
            _ => None,
        }
    }
}

/// The choice itself, pure over the listing and what was read. Refuses a
/// chain in which an object newer than the followed branch's end cannot be
/// reached from any snapshot: that is a hole or a broken link, which a fork
/// must not turn into a quiet restore of an older state.
fn choose(objects: Vec<ObjectRef>, links: &[Read]) -> chain::Result<Branch> {
    let mut at_seq: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, object) in objects.iter().enumerate() {
        at_seq.entry(object.seq).or_default().push(i);
    }
    let is_snapshot = |i: usize| match &links[i] {
        Read::Link(link) => link.header.kind == Kind::Snapshot,
        Read::Skipped => objects[i].kind == Kind::Snapshot,
        Read::Unreadable => false,
    };
    // Each object's parent: the object before it that it links to. Where
    // neither side was read (no fork near), the single object before is
    // taken on trust here and its link checked when restore downloads it.
    let parent: Vec<Option<usize>> = (0..objects.len())
        .map(|i| {
            let before = at_seq.get(&objects[i].seq.checked_sub(1)?)?;
            match &links[i] {
                Read::Link(link) => before.iter().copied().find(|&p| match &links[p] {
                    Read::Link(l) => l.hash == link.header.prev_hash,
                    Read::Skipped => before.len() == 1,
                    Read::Unreadable => false,
                }),
                Read::Skipped if before.len() == 1 => Some(before[0]),
                Read::Skipped | Read::Unreadable => None,
            }
        })
        .collect();
    // Whether a snapshot lies on the way back, in sequence order so that
    // every parent is settled before its children. A snapshot starts a
    // branch only where it links to the object before it, or where there is
    // none: one that links to nothing listed belongs to another chain.
    let nothing_before = |i: usize| {
        objects[i]
            .seq
            .checked_sub(1)
            .is_none_or(|s| !at_seq.contains_key(&s))
    };
    let mut rooted = vec![false; objects.len()];
    for i in 0..objects.len() {
        rooted[i] = (is_snapshot(i) && (parent[i].is_some() || nothing_before(i)))
            || parent[i].is_some_and(|p| rooted[p]);
    }
    let newest_read = |i: usize| links[i].link().map_or(0, |l| l.header.timestamp_ms);
    let end = (0..objects.len()).filter(|&i| rooted[i]).max_by(|&a, &b| {
        (objects[a].seq, newest_read(a))
            .cmp(&(objects[b].seq, newest_read(b)))
            // Of two objects alike in both, the first key: deterministic.
            .then(objects[b].key.cmp(&objects[a].key))
    });
    let unreachable = |i: usize| {
        let object = &objects[i];
        let before = object.seq.saturating_sub(1);
        let why = if nothing_before(i) {
            format!("no object of sequence {before} is listed before it")
        } else {
            format!(
                "it does not link to any object of sequence {before}, nor do those reach a snapshot"
            )
        };
        chain::Error::Unreachable {
            key: object.key.clone(),
            why,
        }
    };
    let Some(end) = end else {
        return Err(unreachable(0));
    };
    if let Some(newer) = (0..objects.len()).find(|&i| objects[i].seq > objects[end].seq) {
        // Name where its branch breaks: back along its links to the object
        // whose own link leads nowhere.
        let mut broken = newer;
        while let Some(p) = parent[broken].filter(|&p| !rooted[p]) {
            broken = p;
        }
        return Err(unreachable(broken));
    }
    let mut on_branch = vec![false; objects.len()];
    let mut cursor = Some(end);
    while let Some(i) = cursor {
        on_branch[i] = true;
        cursor = parent[i];
    }
    let first_fork = chain::forks(&objects).first().map_or(u64::MAX, |(s, _)| *s);
    let (mut followed, mut left) = (Vec::new(), Vec::new());
    for (i, object) in objects.into_iter().enumerate() {
        if on_branch[i] {
            followed.push(object);
        } else if object.seq >= first_fork {
            left.push(object);
        }
    }
    Ok(Branch {
        objects: followed,
        left,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::{Header, WalRange};

    fn obj(seq: u64, key: &str, kind: Kind) -> ObjectRef {
        ObjectRef {
            key: key.to_string(),
            seq,
            kind,
            size: 200,
            mark: None,
        }
    }

    fn link(seq: u64, kind: Kind, prev: u8, own: u8, ms: u64) -> Read {
        Read::Link(Box::new(Link {
            header: Header {
                version: crate::segment::VERSION,
                state: None,
                kind,
                page_size: 4096,
                seq,
                db_pages: 1,
                page_count: 1,
                timestamp_ms: ms,
                wal: WalRange::default(),
                prev_hash: [prev; 32],
                sealed: None,
                run: None,
            },
            hash: [own; 32],
        }))
    }

    fn keys(objects: &[ObjectRef]) -> Vec<&str> {
        objects.iter().map(|o| o.key.as_str()).collect()
    }

    #[test]
    fn a_snapshot_beside_the_segment_the_chain_goes_on_from_is_left() {
        // 1 snapshot, 2, 3 = {3.snapshot (dead end), 3.wal}, 4 links to 3.wal.
        let objects = vec![
            obj(1, "1.snapshot", Kind::Snapshot),
            obj(2, "2.wal", Kind::Wal),
            obj(3, "3.snapshot", Kind::Snapshot),
            obj(3, "3.wal", Kind::Wal),
            obj(4, "4.seg", Kind::Wal),
        ];
        let links = vec![
            Read::Skipped,
            link(2, Kind::Wal, 1, 2, 20),
            link(3, Kind::Snapshot, 2, 30, 31),
            link(3, Kind::Wal, 2, 3, 30),
            link(4, Kind::Wal, 3, 4, 40),
        ];
        let branch = choose(objects, &links).unwrap();
        assert_eq!(
            keys(&branch.objects),
            ["1.snapshot", "2.wal", "3.wal", "4.seg"]
        );
        assert_eq!(keys(&branch.left), ["3.snapshot"]);
    }

    #[test]
    fn a_fork_at_the_head_follows_the_newest_read() {
        let objects = vec![
            obj(1, "1.snapshot", Kind::Snapshot),
            obj(2, "2.seg", Kind::Wal),
            obj(2, "2.wal", Kind::Wal),
        ];
        let links = vec![
            link(1, Kind::Snapshot, 0, 1, 10),
            link(2, Kind::Wal, 1, 2, 25),
            link(2, Kind::Wal, 1, 3, 20),
        ];
        let branch = choose(objects, &links).unwrap();
        assert_eq!(keys(&branch.objects), ["1.snapshot", "2.seg"]);
        assert_eq!(keys(&branch.left), ["2.wal"]);
    }

    #[test]
    fn a_longer_branch_wins_over_a_newer_snapshot_that_goes_nowhere() {
        // Two snapshots claim 2; the chain goes on from the older one's
        // neighbour only through the segment branch.
        let objects = vec![
            obj(1, "1.snapshot", Kind::Snapshot),
            obj(2, "2.seg", Kind::Snapshot),
            obj(2, "2.snapshot", Kind::Snapshot),
            obj(3, "3.seg", Kind::Wal),
            obj(4, "4.seg", Kind::Wal),
        ];
        let links = vec![
            link(1, Kind::Snapshot, 0, 1, 10),
            link(2, Kind::Snapshot, 1, 2, 20),
            link(2, Kind::Snapshot, 1, 9, 21),
            link(3, Kind::Wal, 2, 3, 30),
            Read::Skipped,
        ];
        let branch = choose(objects, &links).unwrap();
        assert_eq!(
            keys(&branch.objects),
            ["1.snapshot", "2.seg", "3.seg", "4.seg"]
        );
        assert_eq!(keys(&branch.left), ["2.snapshot"]);
    }

    #[test]
    fn a_break_past_the_fork_is_refused_not_restored_around() {
        // 3.wal links to nothing listed; 4.wal goes on from it. The snapshot
        // at 3 would be a quiet restore of an older state: refused, naming
        // where the chain breaks.
        let objects = vec![
            obj(1, "1.snapshot", Kind::Snapshot),
            obj(2, "2.wal", Kind::Wal),
            obj(3, "3.seg", Kind::Snapshot),
            obj(3, "3.wal", Kind::Wal),
            obj(4, "4.wal", Kind::Wal),
        ];
        let links = vec![
            Read::Skipped,
            link(2, Kind::Wal, 1, 2, 20),
            link(3, Kind::Snapshot, 2, 3, 30),
            link(3, Kind::Wal, 7, 8, 31),
            link(4, Kind::Wal, 8, 4, 40),
        ];
        match choose(objects, &links) {
            Err(chain::Error::Unreachable { key, .. }) => assert_eq!(key, "3.wal"),
            other => panic!("{other:?}"),
        }
        // A hole after a fork: 5 is missing, 6 cannot be reached.
        let objects = vec![
            obj(1, "1.snapshot", Kind::Snapshot),
            obj(2, "2.seg", Kind::Wal),
            obj(2, "2.wal", Kind::Wal),
            obj(3, "3.seg", Kind::Wal),
            obj(4, "4.seg", Kind::Wal),
            obj(6, "6.seg", Kind::Wal),
        ];
        let links = vec![
            link(1, Kind::Snapshot, 0, 1, 10),
            link(2, Kind::Wal, 1, 2, 20),
            link(2, Kind::Wal, 1, 9, 21),
            link(3, Kind::Wal, 2, 3, 30),
            Read::Skipped,
            Read::Skipped,
        ];
        match choose(objects, &links) {
            Err(chain::Error::Unreachable { key, why }) => {
                assert_eq!(key, "6.seg");
                assert!(why.contains("sequence 5"), "{why}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_snapshot_at_a_fork_that_links_to_nothing_is_not_a_start() {
        // Another database's snapshot planted beside the real 3, newer.
        let objects = vec![
            obj(1, "1.snapshot", Kind::Snapshot),
            obj(2, "2.wal", Kind::Wal),
            obj(3, "3.snapshot", Kind::Snapshot),
            obj(3, "3.wal", Kind::Wal),
        ];
        let links = vec![
            Read::Skipped,
            link(2, Kind::Wal, 1, 2, 20),
            link(3, Kind::Snapshot, 99, 98, 99),
            link(3, Kind::Wal, 2, 3, 30),
        ];
        let branch = choose(objects, &links).unwrap();
        assert_eq!(keys(&branch.objects), ["1.snapshot", "2.wal", "3.wal"]);
        assert_eq!(keys(&branch.left), ["3.snapshot"]);
    }

    #[test]
    fn an_unreadable_object_at_a_fork_is_on_no_branch() {
        let objects = vec![
            obj(1, "1.snapshot", Kind::Snapshot),
            obj(2, "2.seg", Kind::Wal),
            obj(2, "2.wal", Kind::Wal),
            obj(3, "3.seg", Kind::Wal),
        ];
        let links = vec![
            link(1, Kind::Snapshot, 0, 1, 10),
            Read::Unreadable,
            link(2, Kind::Wal, 1, 2, 20),
            link(3, Kind::Wal, 2, 3, 30),
        ];
        let branch = choose(objects, &links).unwrap();
        assert_eq!(keys(&branch.objects), ["1.snapshot", "2.wal", "3.seg"]);
        assert_eq!(keys(&branch.left), ["2.seg"]);
    }
}
