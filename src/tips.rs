//! The tips of every database's chain, from one listing of a whole store.
//!
//! A writer going on from a chain needs only its head, its newest snapshot
//! and to know that nothing forks (see `Replica::load_head`); `walsync list`
//! shows little more. A fleet starting up lists its store once instead of
//! once per database, so that listing is read a page at a time and each
//! database keeps only a summary: a bit per sequence number (to notice two
//! objects claiming one), its snapshot marks, two objects and counts. Held
//! whole, the listing of 1,000 databases with a day's chain each (9.5
//! million objects) took about a gigabyte.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::chain::{self, ObjectRef};
use crate::segment::{self, Kind};
use crate::storage::Storage;

/// What one listing of a store says of each database in it.
#[derive(Debug, Default)]
pub struct Tips {
    /// Each valid name, sorted.
    pub found: Vec<Found>,
    /// Names that fail [`chain::name_problem`], with why (print with `{:?}`).
    pub refused: Vec<(String, &'static str)>,
}

/// One database of [`Tips`].
#[derive(Debug)]
pub struct Found {
    pub name: String,
    /// Its objects, as [`chain::list`] counts them (runs and marks aside).
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The objects a writer reads to go on from its chain: the newest
    /// snapshot (if older than the head) and the head, in sequence order, as
    /// [`chain::list`] would list them. `None` where this listing cannot say
    /// (the chain forks, or a mark came in a later batch than its object):
    /// list that prefix on its own.
    pub tips: Option<Vec<ObjectRef>>,
}

/// Lists the whole store once, a page at a time, keeping per database only
/// what [`Tips`] holds.
pub async fn list_tips(storage: &dyn Storage) -> chain::Result<Tips> {
    list_tips_under(storage, "").await
}

/// [`list_tips`] for the databases whose names start with `under`.
pub async fn list_tips_under(storage: &dyn Storage, under: &str) -> chain::Result<Tips> {
    list_tips_counted(storage, under, &std::sync::atomic::AtomicU64::new(0)).await
}

/// [`list_tips_under`], counting in `pages` the pages (S3) or directories
/// read so far: a caller can tell a slow listing from one that has stopped
/// answering.
pub async fn list_tips_counted(
    storage: &dyn Storage,
    under: &str,
    pages: &std::sync::atomic::AtomicU64,
) -> chain::Result<Tips> {
    let mut tips: BTreeMap<String, Tip> = BTreeMap::new();
    storage
        .list_each(under, &mut |page| {
            pages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Marks first: then a mark listed with its object (a page is
            // sorted by key, a directory is one batch) is known when the
            // object is seen.
            for meta in &page {
                if let Some((end, segment::Name::SnapshotMark(seq))) = parse(&meta.key)
                    && let Some(tip) = tip_of(&mut tips, &meta.key[..end])
                {
                    tip.marks.insert(seq);
                }
            }
            for meta in page {
                let (end, seq, kind) = match parse(&meta.key) {
                    Some((end, segment::Name::Object(seq))) => (end, seq, Kind::Wal),
                    Some((end, segment::Name::Legacy(seq, kind))) => (end, seq, kind),
                    _ => continue,
                };
                let Some(tip) = tip_of(&mut tips, &meta.key[..end]) else {
                    continue;
                };
                tip.object(ObjectRef {
                    key: meta.key,
                    seq,
                    kind,
                    size: meta.size,
                    mark: None,
                });
            }
        })
        .await?;
    let mut out = Tips::default();
    for (prefix, tip) in tips {
        if let Some(why) = chain::name_problem(&prefix) {
            out.refused.push((prefix, why));
            continue;
        }
        let (objects, bytes) = (tip.objects, tip.bytes);
        if let Some(tips) = tip.finish(&prefix) {
            out.found.push(Found {
                name: prefix,
                objects,
                bytes,
                tips,
            });
        }
    }
    Ok(out)
}

/// Where a key's database prefix ends, and its object name, if it names a
/// walsync object.
fn parse(key: &str) -> Option<(usize, segment::Name)> {
    let end = key.rfind('/')?;
    Some((end, segment::parse_object_name(&key[end + 1..])?))
}

/// The summary of `prefix`, made on first sight: the name is copied once
/// per database, not once per object (a listing holds millions). Always
/// `Some`.
fn tip_of<'a>(tips: &'a mut BTreeMap<String, Tip>, prefix: &str) -> Option<&'a mut Tip> {
    if !tips.contains_key(prefix) {
        tips.insert(prefix.to_string(), Tip::default());
    }
    tips.get_mut(prefix)
}

/// One database's summary while its store is listed.
#[derive(Debug, Default)]
struct Tip {
    /// Every object's sequence: one claimed twice is a fork.
    seen: SeqSet,
    /// The sequences of objects in the first layout, whose kind is in their
    /// key: a mark never makes one a snapshot.
    legacy: SeqSet,
    forked: bool,
    head: Option<ObjectRef>,
    /// The sequences of the snapshot marks (one per snapshot kept: few).
    marks: BTreeSet<u64>,
    /// The newest object known to be a snapshot when it was seen.
    snapshot: Option<ObjectRef>,
    objects: u64,
    bytes: u64,
}

impl Tip {
    fn object(&mut self, object: ObjectRef) {
        self.objects += 1;
        self.bytes += object.size;
        if !self.seen.insert(object.seq) {
            self.forked = true;
        }
        if object.is_legacy() {
            self.legacy.insert(object.seq);
        }
        let snapshot = object.kind == Kind::Snapshot
            || (!object.is_legacy() && self.marks.contains(&object.seq));
        if snapshot && self.snapshot.as_ref().is_none_or(|s| s.seq < object.seq) {
            self.snapshot = Some(object.clone());
        }
        if self.head.as_ref().is_none_or(|h| h.seq < object.seq) {
            self.head = Some(object);
        }
    }

    /// The entry of [`Tips::found`], or `None` for a prefix holding only
    /// marks (their objects gone): no database.
    fn finish(self, prefix: &str) -> Option<Option<Vec<ObjectRef>>> {
        let head = self.head?;
        if self.forked {
            return Some(None);
        }
        // A mark listed after its object in another batch left the object
        // unrecognised as a snapshot: only a listing of the prefix can say.
        let newest_mark = self
            .marks
            .iter()
            .rev()
            .find(|s| self.seen.contains(**s) && !self.legacy.contains(**s));
        if newest_mark.copied() > self.snapshot.as_ref().map(|s| s.seq) {
            return Some(None);
        }
        let fold = |mut object: ObjectRef| {
            if !object.is_legacy() && self.marks.contains(&object.seq) {
                object.kind = Kind::Snapshot;
                object.mark = Some(segment::snapshot_mark_key(prefix, object.seq));
            }
            object
        };
        let mut objects = Vec::with_capacity(2);
        if let Some(snapshot) = self.snapshot.clone().filter(|s| s.seq < head.seq) {
            objects.push(fold(snapshot));
        }
        objects.push(fold(head));
        Some(Some(objects))
    }
}

/// A set of sequence numbers, a bit each in blocks of 4,096: a chain's are
/// dense, so a day's 86,400 take about 11 KB.
#[derive(Debug, Default)]
struct SeqSet(HashMap<u64, Box<[u64; 64]>>);

impl SeqSet {
    /// Adds `seq`; false if it was there already.
    fn insert(&mut self, seq: u64) -> bool {
        let block = self.0.entry(seq >> 12).or_insert_with(|| Box::new([0; 64]));
        let (word, bit) = (((seq >> 6) & 63) as usize, 1u64 << (seq & 63));
        let new = block[word] & bit == 0;
        block[word] |= bit;
        new
    }

    fn contains(&self, seq: u64) -> bool {
        self.0
            .get(&(seq >> 12))
            .is_some_and(|block| block[((seq >> 6) & 63) as usize] & (1u64 << (seq & 63)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(prefix: &str, seq: u64) -> ObjectRef {
        ObjectRef {
            key: segment::object_key(prefix, seq),
            seq,
            kind: Kind::Wal,
            size: 100 + seq,
            mark: None,
        }
    }

    fn snapshot(prefix: &str, seq: u64) -> ObjectRef {
        ObjectRef {
            kind: Kind::Snapshot,
            mark: Some(segment::snapshot_mark_key(prefix, seq)),
            ..object(prefix, seq)
        }
    }

    #[test]
    fn a_set_of_sequences_notices_each_one_twice() {
        let mut set = SeqSet::default();
        for seq in [0, 1, 63, 64, 4095, 4096, u64::MAX, 86_399] {
            assert!(!set.contains(seq));
            assert!(set.insert(seq), "{seq} is new");
            assert!(!set.insert(seq), "{seq} is there");
            assert!(set.contains(seq));
        }
        assert!(!set.contains(2) && !set.contains(4097) && !set.contains(u64::MAX - 1));
    }

    #[test]
    fn a_mark_listed_after_its_object_in_another_batch_leaves_the_prefix_unknown() {
        let mut tip = Tip::default();
        tip.object(object("db", 7));
        tip.object(object("db", 8));
        tip.marks.insert(7);
        assert_eq!(tip.finish("db"), Some(None));
    }

    #[test]
    fn a_mark_listed_first_makes_its_object_the_snapshot() {
        let mut tip = Tip::default();
        tip.marks.insert(7);
        for seq in [8, 7, 9, 6] {
            tip.object(object("db", seq));
        }
        assert_eq!(
            tip.finish("db"),
            Some(Some(vec![snapshot("db", 7), object("db", 9)]))
        );
    }

    #[test]
    fn a_mark_beside_a_legacy_object_is_no_snapshot_as_in_a_listing_of_the_prefix() {
        let mut tip = Tip::default();
        let mut legacy = object("db", 5);
        legacy.key = "db/0000000000000005.wal".into();
        tip.object(object("db", 4));
        tip.object(legacy.clone());
        tip.marks.insert(5);
        assert_eq!(tip.finish("db"), Some(Some(vec![legacy])));
    }

    #[test]
    fn a_late_mark_older_than_the_known_snapshot_changes_nothing() {
        let mut tip = Tip::default();
        tip.marks.insert(6);
        for seq in [2, 6, 7] {
            tip.object(object("db", seq));
        }
        tip.marks.insert(2);
        assert_eq!(
            tip.finish("db"),
            Some(Some(vec![snapshot("db", 6), object("db", 7)]))
        );
    }

    #[test]
    fn two_objects_of_one_sequence_leave_the_prefix_unknown_and_marks_alone_are_no_database() {
        let mut tip = Tip::default();
        tip.object(object("db", 3));
        let mut legacy = object("db", 3);
        legacy.key = "db/0000000000000003.wal".into();
        tip.object(legacy);
        assert_eq!(tip.finish("db"), Some(None));
        let mut marks_only = Tip::default();
        marks_only.marks.insert(3);
        assert_eq!(marks_only.finish("db"), None);
    }
}
