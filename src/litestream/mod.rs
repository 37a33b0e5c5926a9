//! Litestream 0.5 replicas, read so that users switching to walsync keep
//! their history: where a replica keeps its LTX files, and which of them a
//! restore reads. The files themselves are read by [`ltx`]; the restore is
//! `crate::restore::restore_litestream`.
//!
//! A replica is the path of one database. S3 and stores like it keep
//! `PATH/<level as 4 hex digits>/<min>-<max>.ltx`; a directory keeps
//! `PATH/ltx/<level in decimal>/<min>-<max>.ltx`, where min and max are the
//! first and last Litestream transaction (a sync, not a SQLite commit) in
//! 16 hex digits. Level 9 holds snapshots; levels 1 to 8 compactions of
//! level 0, which holds one file per sync.

pub mod ltx;

use crate::storage::{self, Storage};

/// One LTX file found in a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LtxFile {
    pub key: String,
    pub level: u8,
    pub min_txid: u64,
    pub max_txid: u64,
    pub size: u64,
}

/// The level Litestream keeps its snapshots at.
const SNAPSHOT_LEVEL: u8 = 9;

/// Every LTX file of the replica at `prefix`, in either layout; anything
/// else there (a lease file, a temp file being written) is left out.
pub async fn list(storage: &dyn Storage, prefix: &str) -> storage::Result<Vec<LtxFile>> {
    let under = format!("{}/", prefix.trim_end_matches('/'));
    let mut files = Vec::new();
    for meta in storage.list(&under).await? {
        let Some(rest) = meta.key.strip_prefix(&under) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let (level, name) = match parts.as_slice() {
            [level, name] if level.len() == 4 => (u8::from_str_radix(level, 16).ok(), *name),
            ["ltx", level, name] => (level.parse().ok(), *name),
            _ => continue,
        };
        let (Some(level @ 0..=SNAPSHOT_LEVEL), Some((min_txid, max_txid))) =
            (level, parse_name(name))
        else {
            continue;
        };
        files.push(LtxFile {
            key: meta.key,
            level,
            min_txid,
            max_txid,
            size: meta.size,
        });
    }
    Ok(files)
}

/// `0000000000000001-000000000000001d.ltx`: the transactions a file holds.
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let (min, max) = name.strip_suffix(".ltx")?.split_once('-')?;
    let hex = |s: &str| {
        let digits = s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        digits.then(|| u64::from_str_radix(s, 16).ok()).flatten()
    };
    let (min, max) = (hex(min)?, hex(max)?);
    (min >= 1 && max >= min).then_some((min, max))
}

/// Why no plan reaches the target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoPlan {
    #[error("no file holds the whole database (none starts at transaction 1)")]
    NoSnapshot,
    #[error("transaction {target:x} is before the earliest that can be restored, {earliest:x}")]
    BeforeEarliest { target: u64, earliest: u64 },
    #[error("the files reach transaction {reached:x}, not {target:x}")]
    Short { reached: u64, target: u64 },
    #[error(
        "the replica has a hole: the files reach transaction {reached:x}, and {next} starts later"
    )]
    Hole { reached: u64, next: String },
}

/// The newest snapshot at or before `target` (any file that starts at
/// transaction 1 holds the whole database), then, from any level below
/// snapshots, the file that reaches furthest from where the plan stands,
/// until it reaches `target` or, without one, as far as the files go. Files
/// may overlap what the plan holds: each holds its pages as they were at its
/// last transaction.
pub fn plan(files: &[LtxFile], target: Option<u64>) -> Result<Vec<LtxFile>, NoPlan> {
    let within = |f: &&LtxFile| target.is_none_or(|t| f.max_txid <= t);
    let earliest = files
        .iter()
        .filter(|f| f.min_txid == 1)
        .map(|f| f.max_txid)
        .min();
    let snapshot = files
        .iter()
        .filter(within)
        .filter(|f| f.min_txid == 1)
        .max_by_key(|f| (f.max_txid, f.level))
        .ok_or(match (earliest, target) {
            (Some(earliest), Some(target)) => NoPlan::BeforeEarliest { target, earliest },
            _ => NoPlan::NoSnapshot,
        })?;
    let mut planned = vec![snapshot.clone()];
    let mut reached = snapshot.max_txid;
    while target.is_none_or(|t| reached < t) {
        let next = files
            .iter()
            .filter(within)
            .filter(|f| {
                f.level < SNAPSHOT_LEVEL && f.min_txid <= reached + 1 && f.max_txid > reached
            })
            .max_by_key(|f| (f.max_txid, std::cmp::Reverse(f.min_txid), f.level));
        let Some(next) = next else { break };
        reached = next.max_txid;
        planned.push(next.clone());
    }
    match target {
        Some(target) if reached < target => Err(NoPlan::Short { reached, target }),
        Some(_) => Ok(planned),
        None => match files
            .iter()
            .filter(|f| f.min_txid > reached + 1)
            .min_by_key(|f| f.min_txid)
        {
            Some(beyond) => Err(NoPlan::Hole {
                reached,
                next: beyond.key.clone(),
            }),
            None => Ok(planned),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(level: u8, min: u64, max: u64) -> LtxFile {
        LtxFile {
            key: format!("db/{level:04x}/{min:016x}-{max:016x}.ltx"),
            level,
            min_txid: min,
            max_txid: max,
            size: 1,
        }
    }

    fn ranges(plan: Vec<LtxFile>) -> Vec<(u8, u64, u64)> {
        plan.into_iter()
            .map(|f| (f.level, f.min_txid, f.max_txid))
            .collect()
    }

    #[test]
    fn names_are_sixteen_hex_digits_each() {
        assert_eq!(
            parse_name("0000000000000001-000000000000001d.ltx"),
            Some((1, 29))
        );
        for bad in [
            "0000000000000001-000000000000001D.ltx",
            "1-2.ltx",
            "0000000000000001-000000000000001d.ltx.tmp",
            "0000000000000002-0000000000000001.ltx",
            "0000000000000000-0000000000000001.ltx",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_plan_takes_the_newest_snapshot_then_the_files_reaching_furthest() {
        // As a replica looks after a few minutes: level 0 per sync, level 1
        // and 2 compactions, level 9 snapshots; the compactions overlap.
        let mut files: Vec<LtxFile> = (1..=29).map(|t| file(0, t, t)).collect();
        files.extend([
            file(1, 1, 2),
            file(1, 3, 7),
            file(1, 8, 13),
            file(1, 14, 19),
        ]);
        files.extend([
            file(2, 1, 13),
            file(2, 14, 29),
            file(9, 1, 16),
            file(9, 1, 2),
        ]);
        assert_eq!(
            ranges(plan(&files, None).unwrap()),
            [(9, 1, 16), (2, 14, 29)]
        );
        assert_eq!(
            ranges(plan(&files, Some(19)).unwrap()),
            [(9, 1, 16), (1, 14, 19)]
        );
        assert_eq!(
            ranges(plan(&files, Some(5)).unwrap()),
            [(9, 1, 2), (0, 3, 3), (0, 4, 4), (0, 5, 5)]
        );
        // Without snapshots, a compaction from the first transaction is one.
        files.retain(|f| f.level != 9);
        assert_eq!(
            ranges(plan(&files, None).unwrap()),
            [(2, 1, 13), (2, 14, 29)]
        );
    }

    #[test]
    fn holes_and_unreachable_targets_are_refused() {
        let files = [file(9, 1, 4), file(0, 5, 5), file(0, 7, 7)];
        assert_eq!(
            plan(&files, None),
            Err(NoPlan::Hole {
                reached: 5,
                next: files[2].key.clone()
            })
        );
        assert_eq!(
            plan(&files, Some(7)),
            Err(NoPlan::Short {
                reached: 5,
                target: 7
            })
        );
        assert_eq!(plan(&files[1..], None), Err(NoPlan::NoSnapshot));
        assert_eq!(
            plan(&files, Some(3)),
            Err(NoPlan::BeforeEarliest {
                target: 3,
                earliest: 4
            })
        );
    }
}
