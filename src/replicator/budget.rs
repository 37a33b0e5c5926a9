//! Open descriptors: how many databases may be held open at once, the
//! counts of those held, opening and closing, and shedding the least
//! recently synced when at the budget.

use super::*;

/// Raises the soft open-file limit to the hard limit: each replicated
/// database keeps a few descriptors open.
pub fn raise_open_file_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                debug!(
                    from = limit.rlim_cur,
                    to = limit.rlim_max,
                    "raised the open-file limit"
                );
            }
        }
    }
}

/// How many databases can be held open within the open-file limit: four
/// descriptors each (database, WAL, shared memory, and the database file of
/// the closed lock connection, which SQLite keeps for reuse while the pin
/// holds a lock), with room for syncs in flight, sockets, the watcher and a
/// sixteenth spare for what the estimate misses.
pub(super) fn descriptor_budget(parallelism: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    let soft = if ok { limit.rlim_cur as usize } else { 1024 };
    (soft.saturating_sub(256 + soft / 16 + 4 * parallelism) / 4).max(8)
}

/// How many databases hold their descriptors, are being opened by a running
/// job, or are queued or running to close: the budget's view of the slots'
/// `attached` flag and their [`Job`]s. Both change only through here, so
/// each count equals the number of slots it counts.
#[derive(Debug, Default)]
pub(super) struct Holding {
    pub(super) attached: usize,
    pub(super) opening: usize,
    pub(super) closing: usize,
}

impl Holding {
    /// Returns whether the flag changed.
    pub(super) fn set_attached(&mut self, slot: &mut Slot, to: bool) -> bool {
        flip(&mut slot.attached, &mut self.attached, to)
    }

    /// Moves a slot's job to `to`, its counts with it.
    pub(super) fn set_job(&mut self, job: &mut Job, to: Job) {
        self.opening = self.opening - usize::from(job.opening()) + usize::from(to.opening());
        self.closing = self.closing - usize::from(job.closing()) + usize::from(to.closing());
        *job = to;
    }

    /// A slot released: it no longer counts.
    pub(super) fn release(&mut self, slot: &Slot) {
        self.attached -= usize::from(slot.attached);
        self.opening -= usize::from(slot.job.opening());
        self.closing -= usize::from(slot.job.closing());
    }
}

fn flip(flag: &mut bool, count: &mut usize, to: bool) -> bool {
    if *flag == to {
        return false;
    }
    *flag = to;
    if to {
        *count += 1;
    } else {
        *count -= 1;
    }
    true
}

impl Fleet {
    /// Closes the least recently synced open databases at rest, down to 90 %
    /// of the budget, so that shedding happens in batches and not on every sync.
    pub(super) fn shed(&mut self) -> usize {
        let target = self.budget.saturating_sub((self.budget / 10).max(1));
        let mut candidates: Vec<(Option<Instant>, usize)> = self
            .slots
            .iter()
            // Any open database without unshipped changes may go (closing
            // seals it first); one merely scheduled for an idle look may too.
            .filter(|(_, s)| {
                s.attached
                    && s.job == Job::Idle
                    && !s.dirty
                    && s.failures == 0
                    && s.replica.as_ref().is_some_and(Replica::can_close)
            })
            .map(|(id, s)| (s.last_sync, *id))
            .collect();
        candidates.sort();
        let excess = self
            .holding
            .attached
            .saturating_sub(self.holding.closing + target);
        debug!(
            open = self.holding.attached,
            closing = self.holding.closing,
            candidates = candidates.len(),
            excess,
            "over the open-database budget: closing the least recently synced"
        );
        let mut queued = 0;
        for (_, id) in candidates.into_iter().take(excess) {
            if let Some(slot) = self.slots.get_mut(&id) {
                self.holding.set_job(&mut slot.job, Job::CloseQueued);
                self.to_close.push_back(id);
                queued += 1;
            }
        }
        queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flag set twice counts once, cleared twice uncounts once: a count
    /// cannot drift from its flags whatever order the loop meets them in.
    #[test]
    fn a_count_follows_its_flag_only_when_it_changes() {
        let (mut flag, mut count) = (false, 0);
        assert!(flip(&mut flag, &mut count, true));
        assert!(!flip(&mut flag, &mut count, true));
        assert_eq!((flag, count), (true, 1));
        assert!(flip(&mut flag, &mut count, false));
        assert!(!flip(&mut flag, &mut count, false));
        assert_eq!((flag, count), (false, 0));
    }

    /// Whatever order the loop moves jobs in, the counts equal the number
    /// of slots opening and closing.
    #[test]
    fn the_counts_follow_every_move_of_every_job() {
        let all = [
            Job::Idle,
            Job::CloseQueued,
            Job::Sync { opens: false },
            Job::Sync { opens: true },
            Job::Close,
        ];
        let mut holding = Holding::default();
        let mut jobs = [Job::Idle; 7];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let slot = (x % 7) as usize;
            let to = all[((x >> 8) % 5) as usize];
            holding.set_job(&mut jobs[slot], to);
            assert_eq!(holding.opening, jobs.iter().filter(|j| j.opening()).count());
            assert_eq!(holding.closing, jobs.iter().filter(|j| j.closing()).count());
        }
        assert_eq!(
            [Job::CloseQueued, Job::Close].map(Job::running),
            [false, true]
        );
        assert!(Job::Sync { opens: true }.running() && !Job::Sync { opens: true }.closing());
    }
}
