//! The end of `watch`: every database flushed once within the deadline,
//! and what could not be.

use super::*;

/// What was left undone when replication ended: empty for a clean exit.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Databases whose final sync failed or did not finish in time.
    pub unflushed: Vec<String>,
    /// Databases whose replication stopped for good, with why.
    pub stopped: Vec<(PathBuf, String)>,
}

impl Outcome {
    pub fn is_clean(&self) -> bool {
        self.unflushed.is_empty() && self.stopped.is_empty()
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if !self.unflushed.is_empty() {
            parts.push(format!(
                "{} database(s) could not be flushed before exit: {}",
                self.unflushed.len(),
                self.unflushed.join(", ")
            ));
        }
        if !self.stopped.is_empty() {
            let names: Vec<String> = self
                .stopped
                .iter()
                .map(|(path, _)| path.display().to_string())
                .collect();
            parts.push(format!(
                "replication of {} database(s) stopped (see the log): {}",
                self.stopped.len(),
                names.join(", ")
            ));
        }
        f.write_str(&parts.join("; "))
    }
}

impl Fleet {
    /// Waits for syncs in flight, then flushes every database once, within the deadline.
    pub(super) async fn shutdown(mut self) -> Result<Outcome> {
        let watch = self.plan.watch().clone();
        let deadline = Instant::now() + watch.shutdown_timeout;
        info!("shutting down: final sync of every database");
        while !self.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, self.in_flight.join_next()).await {
                Ok(Some(Ok((id, replica, _)))) => {
                    if let Some(slot) = self.slots.get_mut(&id) {
                        slot.replica = replica;
                        self.holding.set_job(&mut slot.job, Job::Idle);
                    }
                }
                Ok(Some(Err(e))) => error!(error = %e, "a sync task failed"),
                Ok(None) | Err(_) => break,
            }
        }
        let mut unflushed: Vec<String> = self
            .slots
            .values()
            .filter(|s| s.job.running())
            .map(|s| s.spec.path.display().to_string())
            .collect();
        // Every database not synced yet (still waiting for its first open, or
        // for a retry) is opened now, so nothing committed is left behind.
        // A database closed at rest with no change since has nothing to flush.
        let mut queue: VecDeque<(DbSpec, Option<Replica>)> = self
            .slots
            .values_mut()
            .filter(|s| !s.job.running() && s.stopped().is_none())
            .filter(|s| s.dirty || s.replica.as_ref().is_none_or(Replica::is_attached))
            .map(|s| (s.spec.clone(), s.replica.take()))
            .collect();
        let mut flushes = JoinSet::new();
        loop {
            while flushes.len() < watch.parallelism.max(1) {
                let Some((spec, replica)) = queue.pop_front() else {
                    break;
                };
                flushes.spawn(async move {
                    let name = spec.path.display().to_string();
                    let mut replica = match replica {
                        Some(r) => r,
                        None if !spec.path.exists() => return (name, Ok(SyncReport::default())),
                        None => match spec.open(Vec::new()).await {
                            Ok(r) => r,
                            Err(e) => return (name, Err(e)),
                        },
                    };
                    (name, replica.flush().await)
                });
            }
            if flushes.is_empty() {
                break;
            }
            match tokio::time::timeout_at(deadline, flushes.join_next()).await {
                Ok(Some(Ok((_, Ok(_))))) => {}
                Ok(Some(Ok((path, Err(e))))) => {
                    error!(db = %path, error = %e, "final sync failed");
                    unflushed.push(path);
                }
                Ok(Some(Err(e))) => error!(error = %e, "a final sync task failed"),
                Ok(None) => break,
                Err(_) => {
                    unflushed.extend(queue.iter().map(|(s, _)| s.path.display().to_string()));
                    unflushed.push(format!("{} still in flight", flushes.len()));
                    break;
                }
            }
        }
        if unflushed.is_empty() {
            info!("every database flushed");
        } else {
            error!(
                count = unflushed.len(),
                databases = %unflushed.join(", "),
                "could not be flushed before exit"
            );
        }
        let mut stopped: Vec<(PathBuf, String)> = self
            .slots
            .values()
            .filter_map(|s| {
                s.stopped()
                    .map(|why| (s.spec.path.clone(), why.to_string()))
            })
            .collect();
        stopped.sort();
        Ok(Outcome { unflushed, stopped })
    }
}
