//! Why a chain starts again with a snapshot: one type, so that the metric
//! label, the log level and the text a user reads come from one place.

use std::fmt;

/// Why a database's chain starts again (a full snapshot, or after a lost
/// continuity the pages that differ).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotReason {
    /// Storage holds no replica of it yet.
    Initial,
    /// `snapshot_interval` elapsed since the last snapshot.
    Interval,
    /// The encryption key changed: every object after a snapshot is sealed
    /// with its key (restore refuses a mix).
    KeyChanged,
    /// Asked for, by what the text says (the `snapshot` command).
    Requested(&'static str),
    /// What was shipped can no longer be continued from the WAL: why.
    Continuity(String),
    /// A store that fell behind (a `[[mirrors]]` entry, or `[storage]`
    /// while a mirror carried on) cannot be caught up by copying: why.
    CatchUp(String),
}

impl SnapshotReason {
    /// The `reason` label of `walsync_snapshots_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Initial => "initial",
            Self::Interval => "interval",
            Self::KeyChanged => "key",
            Self::Requested(_) => "requested",
            Self::Continuity(_) => "continuity",
            Self::CatchUp(_) => "catch_up",
        }
    }

    /// A lost continuity is the one reason that asks something of the
    /// operator; the others are routine.
    pub fn is_continuity_loss(&self) -> bool {
        matches!(self, Self::Continuity(_))
    }

    /// The same reason with `more` said after it (why a delta gave way to a
    /// full snapshot).
    pub fn and(&self, more: &str) -> Self {
        match self {
            Self::Continuity(why) => Self::Continuity(format!("{why}; {more}")),
            other => other.clone(),
        }
    }
}

impl fmt::Display for SnapshotReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Initial => f.write_str("no replica in storage yet"),
            Self::Interval => f.write_str("the snapshot interval elapsed"),
            Self::KeyChanged => f.write_str("the encryption key changed"),
            Self::Requested(by) => f.write_str(by),
            Self::Continuity(why) => f.write_str(why),
            Self::CatchUp(why) => f.write_str(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_label_and_text() {
        let lost = SnapshotReason::Continuity("the WAL was reset".into());
        for (reason, label, text) in [
            (
                SnapshotReason::Initial,
                "initial",
                "no replica in storage yet",
            ),
            (
                SnapshotReason::Interval,
                "interval",
                "the snapshot interval elapsed",
            ),
            (
                SnapshotReason::KeyChanged,
                "key",
                "the encryption key changed",
            ),
            (
                SnapshotReason::Requested("requested with `walsync snapshot`"),
                "requested",
                "requested with `walsync snapshot`",
            ),
            (lost.clone(), "continuity", "the WAL was reset"),
            (
                SnapshotReason::CatchUp("store b missed objects".into()),
                "catch_up",
                "store b missed objects",
            ),
        ] {
            assert_eq!(reason.label(), label);
            assert_eq!(reason.to_string(), text);
            assert_eq!(reason.is_continuity_loss(), label == "continuity");
        }
        assert_eq!(
            lost.and("no delta: no state record").to_string(),
            "the WAL was reset; no delta: no state record"
        );
        assert_eq!(SnapshotReason::Interval.and("x"), SnapshotReason::Interval);
    }
}
