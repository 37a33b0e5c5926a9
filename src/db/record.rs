//! The state record beside the database (see `state`): kept up to date as
//! objects become durable, checked against the chain's head before use, and
//! dropped (never trusted) when it cannot be.

use super::*;

impl Database {
    /// Brings the state record up to `head`, the object just made durable.
    /// A record that cannot be written is dropped (and the next snapshot
    /// makes a new one): it is a saving, never a reason to stop shipping.
    pub fn record_shipped(&mut self, change: StateChange, head: state::Head) {
        let Some(path) = self.record_path.clone() else {
            return;
        };
        let result = match (change, self.record.take()) {
            (StateChange::Replace(builder), _) => builder.place(&path, head).map(Some),
            (StateChange::Pages(change), Some(mut record)) => {
                let (sum, pages) = *change;
                record.apply(sum, &pages, head).map(|()| Some(record))
            }
            (StateChange::Pages(_) | StateChange::Unknown, None) => Ok(None),
            (StateChange::Unknown, Some(_)) => state::forget(&path).map(|()| None),
        };
        self.record = result.unwrap_or_else(|e| {
            tracing::warn!(
                db = %self.path.display(),
                error = %e,
                "could not update the state record; the next continuity loss takes a full snapshot"
            );
            let _ = state::forget(&path);
            None
        });
    }

    /// Uses the record beside the database if it describes `head`, whose
    /// state digest is `digest`; otherwise says why not.
    pub fn load_record(
        &mut self,
        head: state::Head,
        digest: Option<state::Digest>,
    ) -> std::result::Result<(), String> {
        let result = self.find_record(head, digest);
        self.no_record = result.as_ref().err().cloned();
        result
    }

    fn find_record(
        &mut self,
        head: state::Head,
        digest: Option<state::Digest>,
    ) -> std::result::Result<(), String> {
        self.record = None;
        let Some(digest) = digest else {
            return Err(
                "the chain head records no state digest (written by an older walsync, \
                        or without a state record)"
                    .into(),
            );
        };
        let Some(path) = self.record_path.clone() else {
            return Err("no state record is kept for this database".into());
        };
        let mut record = match Record::open(&path) {
            Ok(Some(record)) => record,
            Ok(None) => return Err(format!("there is no state record ({})", path.display())),
            Err(e) => {
                return Err(format!(
                    "the state record {} is unreadable: {e}",
                    path.display()
                ));
            }
        };
        if record.sum.page_size != self.page_size {
            return Err(format!(
                "the state record has page size {}, the database {}",
                record.sum.page_size, self.page_size
            ));
        }
        record.check(head, &digest)?;
        self.record = Some(record);
        Ok(())
    }

    /// Stops using the record (it cannot be read, or is not the one that was
    /// checked) and removes it: objects carry no digest until the next
    /// snapshot makes a new one.
    pub(super) fn drop_record(&mut self, why: &str) {
        if let Some(record) = self.record.take() {
            tracing::warn!(
                db = %self.path.display(),
                record = %record.path().display(),
                why,
                "stopped using the state record; the next continuity loss takes a full snapshot"
            );
            let _ = state::forget(record.path());
        }
        self.no_record = Some(format!("the state record could not be used: {why}"));
    }

    /// Whether a checked state record is at hand (a delta can be made).
    pub fn has_record(&self) -> bool {
        self.record.is_some()
    }

    /// Keeps the state record at `path` (see [`state::record_path`]).
    pub fn keep_record_at(&mut self, path: PathBuf) {
        self.record_path = Some(path);
    }

    /// Hands the checked record over while the database is closed (it is a
    /// few dozen bytes; checking it again on every reopen would read it whole).
    pub fn take_record(&mut self) -> Option<Record> {
        self.record.take()
    }

    pub fn restore_record(&mut self, record: Option<Record>) {
        self.record = record;
    }
}
