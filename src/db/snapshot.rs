//! Reading the whole database: a snapshot (every page, as of a committed
//! state the pin holds), and after a lost continuity a delta (only the pages
//! that differ from the state record), each encoded as one object.

use super::*;

impl Database {
    /// Streams a snapshot of every page into a segment, as of a committed
    /// state that the WAL position recorded in it points to exactly.
    ///
    /// The write lock is held only long enough to read the WAL end and move
    /// the pin there; the pages are then read through that read transaction
    /// (`sqlite_dbpage`) while the app keeps writing.
    pub fn snapshot<E: Encode>(&mut self, encode: E) -> Result<Option<Encoded<E::Object>>> {
        self.guarded(|db| db.snapshot_pinned(encode))
    }

    fn snapshot_pinned<E: Encode>(&mut self, encode: E) -> Result<Option<Encoded<E::Object>>> {
        if self.identity_changed()? {
            self.reopen()?;
        }
        let Some((state, commits)) = self.pin_committed_end()? else {
            return Ok(None);
        };
        let encoded = self.encode_snapshot(encode, state, commits)?;
        Ok(Some(encoded))
    }

    /// Moves the pin to the committed end of the WAL, read under the write
    /// lock so that the pinned state is exactly that position; returns it and
    /// SQLite's commit counter there. `None` if the write lock could not be had.
    fn pin_committed_end(&mut self) -> Result<Option<(WalState, Option<u32>)>> {
        if !self.acquire_write_lock()? {
            return Ok(None);
        }
        let position = match self.snapshot_position() {
            Ok(position) => position,
            Err(e) => {
                let _ = self.release_write_lock();
                return Err(e);
            }
        };
        let repinned = self.unpin().and_then(|()| self.pin());
        self.release_write_lock()?;
        repinned?;
        Ok(Some(position))
    }

    /// The committed end of the WAL, and SQLite's commit counter there.
    /// Called under the write lock, so the two agree.
    pub(super) fn snapshot_position(&self) -> Result<(WalState, Option<u32>)> {
        let index = self.index();
        match self.open_wal()? {
            None => Ok((WalState::Empty, index.map(|i| i.commits))),
            Some((file, header)) => {
                let limit = index.and_then(|i| i.published(&header));
                let scan =
                    wal::scan_until(&file, &header, header.start(), limit.unwrap_or(u32::MAX))
                        .map_err(self.wal_err())?;
                let commits = index.and_then(|i| i.commits_at(scan.end));
                Ok((WalState::At(scan.end), commits))
            }
        }
    }

    fn encode_snapshot<E: Encode>(
        &mut self,
        encode: E,
        state: WalState,
        commits: Option<u32>,
    ) -> Result<Encoded<E::Object>> {
        let page_count = self.page_count()?;
        let mut out = self.begin(
            encode,
            Kind::Snapshot,
            page_count,
            page_count,
            state.to_range(0),
        )?;
        // A new record comes with every snapshot; without one (a directory
        // walsync cannot write to) the snapshot still ships.
        let mut builder = self.record_builder();
        self.for_each_page(page_count, |pgno, page| {
            out.add(pgno, page)?;
            if let Some(b) = &mut builder
                && b.push(page_hash(pgno, page)).is_err()
            {
                builder = None;
            }
            Ok(())
        })?;
        let digest = builder.as_ref().map(|b| b.sum().digest());
        let object = out.finish(digest)?;
        self.shrink_memory()?;
        // The pin moved under the write lock with no new frame, so a seal of
        // this very position still holds.
        if state != self.state {
            self.sealed = false;
        }
        Ok(Encoded {
            object,
            state,
            commits,
            transactions: 0,
            change: builder.map_or(StateChange::Unknown, |b| StateChange::Replace(Box::new(b))),
        })
    }

    /// After continuity was lost: the pages of the database that differ
    /// from the state record, as one object that brings the shipped state
    /// to the database's current one. Reads every page once to compare, and
    /// the differing ones once more to encode (all in one read transaction).
    pub fn delta<E: Encode>(&mut self, encode: E) -> Result<Option<Delta<E::Object>>> {
        self.guarded(|db| db.delta_pinned(encode))
    }

    fn delta_pinned<E: Encode>(&mut self, encode: E) -> Result<Option<Delta<E::Object>>> {
        if self.identity_changed()? {
            self.reopen()?;
        }
        let Some(record) = self.record.clone() else {
            let why = self
                .no_record
                .as_deref()
                .unwrap_or("there is no state record");
            return Ok(Some(Delta::Snapshot(format!("no delta: {why}"))));
        };
        if record.sum.page_size != self.page_size {
            return Ok(Some(Delta::Snapshot(format!(
                "the page size changed from {} to {}",
                record.sum.page_size, self.page_size
            ))));
        }
        let Some((state, commits)) = self.pin_committed_end()? else {
            return Ok(None);
        };

        let page_count = self.page_count()?;
        let Some(mut builder) = self.record_builder() else {
            return Ok(Some(Delta::Snapshot(
                "a new state record cannot be written".into(),
            )));
        };
        let mut old = match record.entries() {
            Ok(old) => old,
            Err(e) => {
                self.drop_record(&e.to_string());
                return Ok(Some(Delta::Snapshot(format!(
                    "no delta: the state record could not be used: {e}"
                ))));
            }
        };
        // The old entries are summed again as they are read: what is
        // compared against must be exactly the state that was checked.
        let mut old_sum = state::Sum {
            sum: 0,
            ..record.sum
        };
        let mut differing: Vec<u32> = Vec::new();
        let page_size = self.page_size;
        let mut failed: Option<io::Error> = None;
        let started = std::time::Instant::now();
        self.for_each_page(page_count, |pgno, page| {
            let hash = page_hash(pgno, page);
            if let Err(e) = builder.push(hash) {
                failed.get_or_insert(e);
            }
            // Pages past the old end are always shipped, zeros or not, so
            // that no reader has to make up pages the object does not hold.
            let was = match old.next() {
                Some(Ok(was)) => {
                    old_sum.add(was);
                    Some(was)
                }
                Some(Err(e)) => {
                    failed.get_or_insert(e);
                    None
                }
                None => None,
            };
            if was != Some(hash) {
                differing.push(pgno);
            }
            Ok(())
        })?;
        for was in old.by_ref() {
            match was {
                Ok(was) => old_sum.add(was),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            let why = e.to_string();
            self.drop_record(&why);
            return Ok(Some(Delta::Snapshot(format!(
                "no delta: the state record could not be read: {why}"
            ))));
        }
        tracing::info!(
            db = %self.path.display(),
            pages = page_count,
            differ = differing.len(),
            ms = started.elapsed().as_millis() as u64,
            "compared every page with the state record"
        );
        if old_sum != record.sum {
            self.drop_record("its pages changed since it was checked");
            return Ok(Some(Delta::Snapshot(
                "no delta: the state record changed since it was checked".into(),
            )));
        }
        if differing.is_empty() && page_count == record.sum.pages {
            self.shrink_memory()?;
            if state != self.state {
                self.sealed = false;
            }
            return Ok(Some(Delta::Same { state, commits }));
        }
        let mut out = self.begin(
            encode,
            Kind::Delta,
            page_count,
            differing.len() as u32,
            state.to_range(0),
        )?;
        let path = self.path.clone();
        {
            let mut stmt = self
                .conn
                .prepare("SELECT data FROM sqlite_dbpage('main') WHERE pgno = ?1")
                .map_err(self_sql(&path))?;
            let zeros = vec![0u8; page_size as usize];
            for pgno in differing {
                let data: Vec<u8> = stmt
                    .query_row([pgno], |r| r.get(0))
                    .map_err(self_sql(&path))?;
                // sqlite_dbpage returns no data for the lock-byte page.
                let page = if data.len() == page_size as usize {
                    &data
                } else {
                    &zeros
                };
                out.add(pgno, page)?;
            }
        }
        let object = out.finish(Some(builder.sum().digest()))?;
        self.shrink_memory()?;
        if state != self.state {
            self.sealed = false;
        }
        Ok(Some(Delta::Ship(Box::new(Encoded {
            object,
            state,
            commits,
            transactions: 0,
            change: StateChange::Replace(Box::new(builder)),
        }))))
    }

    fn page_count(&self) -> Result<u32> {
        self.conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .map_err(self.sql_err())
    }

    /// A builder for a new state record, or `None` (logged) if none can be
    /// written beside the database.
    fn record_builder(&self) -> Option<state::Builder> {
        let path = self.record_path.as_ref()?;
        state::Builder::new(path, self.page_size)
            .map_err(|e| {
                tracing::warn!(
                    db = %self.path.display(),
                    error = %e,
                    "cannot write a state record beside the database; \
                     a continuity loss will cost a full snapshot"
                );
            })
            .ok()
    }

    /// The pages just streamed need not stay cached for an idle database.
    fn shrink_memory(&self) -> Result<()> {
        self.conn
            .execute_batch("PRAGMA shrink_memory")
            .map_err(self.sql_err())
    }

    /// Calls `f` with every page from 1 to `page_count`, in order, as the
    /// pinned read transaction sees it.
    fn for_each_page(
        &self,
        page_count: u32,
        mut f: impl FnMut(u32, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let path = &self.path;
        let mut stmt = self
            .conn
            .prepare("SELECT pgno, data FROM sqlite_dbpage('main') ORDER BY pgno")
            .map_err(|e| match &e {
                rusqlite::Error::SqliteFailure(_, Some(msg)) if msg.contains("no such table") => {
                    Error::Unsupported {
                        path: path.clone(),
                        reason: "this SQLite build lacks sqlite_dbpage \
                                 (build with LIBSQLITE3_FLAGS=-DSQLITE_ENABLE_DBPAGE_VTAB)"
                            .into(),
                    }
                }
                _ => Error::Sqlite {
                    path: path.clone(),
                    source: e,
                },
            })?;
        let zeros = vec![0u8; self.page_size as usize];
        let mut rows = stmt.query([]).map_err(self_sql(path))?;
        let mut expected = 1u32;
        while let Some(row) = rows.next().map_err(self_sql(path))? {
            let pgno: u32 = row.get(0).map_err(self_sql(path))?;
            if pgno > page_count {
                break;
            }
            if pgno != expected {
                return Err(Error::Unsupported {
                    path: path.clone(),
                    reason: format!("sqlite_dbpage skipped from page {expected} to {pgno}"),
                });
            }
            expected += 1;
            let data = row.get_ref(1).map_err(self_sql(path))?;
            let bytes = data.as_blob().map_err(|e| Error::Sqlite {
                path: path.clone(),
                source: e.into(),
            })?;
            // sqlite_dbpage returns no data for the lock-byte page.
            if bytes.len() == self.page_size as usize {
                f(pgno, bytes)?;
            } else {
                f(pgno, &zeros)?;
            }
        }
        Ok(())
    }
}

fn self_sql(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |source| Error::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}
