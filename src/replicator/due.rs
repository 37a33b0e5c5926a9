//! When a database syncs next after a job: a pure function of what the job
//! left, so that every rule is tested without a clock, a file or a store.

use std::time::Duration;

use tokio::time::Instant;

/// Re-checks for a commit caught between its WAL write and its publication:
/// 2 ms doubling, at most this many in a row (an orphaned tail from a crashed
/// writer never gets published).
pub(super) const MAX_RECHECKS: u32 = 8;

/// Least wait before another attempt to close an idle database.
pub(super) const IDLE_RETRY: Duration = Duration::from_millis(250);

/// What a finished job left that decides when its database syncs next.
#[derive(Debug, Clone, Copy)]
pub(super) struct AfterJob {
    pub now: Instant,
    /// Its files changed since the job started.
    pub dirty: bool,
    /// Failed jobs in a row, this one counted (0: it succeeded).
    pub failures: u32,
    /// The wait this failure asks for (see `sync_backoff`).
    pub backoff: Option<Duration>,
    pub sync_interval: Duration,
    /// Quick looks already taken in a row for commits not yet published.
    pub rechecks: u32,
    /// The WAL holds commits SQLite has not published yet.
    pub wants_recheck: bool,
    /// When the database needs a sync although nothing changes (a
    /// checkpoint of shipped frames, a retried upload).
    pub wakeup: Option<Instant>,
    /// For an open database, when it last changed and how long it may stay
    /// idle before it is closed.
    pub idle: Option<(Instant, Duration)>,
    /// A `walsync sync` waits on this database.
    pub waited_on: bool,
}

/// When the database syncs next (`None`: only once its files change), and
/// the count of quick looks to keep.
pub(super) fn next_due(a: &AfterJob) -> (Option<Instant>, u32) {
    let now = a.now;
    let mut next = a.backoff.map(|b| now + b);
    let rechecks;
    if a.dirty && a.failures == 0 {
        rechecks = 0;
        let at = now + a.sync_interval;
        next = Some(next.map_or(at, |n| n.max(at)));
    } else if a.failures == 0 && a.rechecks < MAX_RECHECKS && a.wants_recheck {
        let at = now + Duration::from_millis(2 << a.rechecks);
        rechecks = a.rechecks + 1;
        next = Some(next.map_or(at, |n| n.min(at)));
    } else {
        rechecks = 0;
    }
    // A failing database waits out its backoff, whatever else is due.
    let wakeup = a.wakeup.filter(|_| a.failures == 0);
    let mut next = match (next, wakeup) {
        (Some(x), Some(y)) => Some(x.min(y).max(now)),
        (x, y) => x.or(y),
    };
    // An open database at rest gets one more look once it has been idle
    // long enough, which closes it (sealing its WAL first if needed). A
    // file written moments ago is not quiet yet: look again a bit later.
    if let Some((last_change, idle)) = a.idle.filter(|_| a.failures == 0) {
        let idle_at = (last_change + idle).max(now + IDLE_RETRY);
        next = Some(next.map_or(idle_at, |n| n.min(idle_at)));
    }
    if a.waited_on {
        // A `walsync sync` waits for the next job: now, whatever the interval.
        next = Some(now);
    }
    (next.map(|at| at.max(now)), rechecks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at_rest(now: Instant) -> AfterJob {
        AfterJob {
            now,
            dirty: false,
            failures: 0,
            backoff: None,
            sync_interval: Duration::from_secs(1),
            rechecks: 0,
            wants_recheck: false,
            wakeup: None,
            idle: None,
            waited_on: false,
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_database_at_rest_is_not_due() {
        let now = Instant::now();
        assert_eq!(next_due(&at_rest(now)), (None, 0));
    }

    #[test]
    fn a_change_during_the_job_waits_the_sync_interval() {
        let now = Instant::now();
        let dirty = AfterJob {
            dirty: true,
            rechecks: 5,
            ..at_rest(now)
        };
        assert_eq!(next_due(&dirty), (Some(now + 1000 * MS), 0));
        // A wakeup (a checkpoint) sooner than that comes first.
        let wakeup = AfterJob {
            wakeup: Some(now + 300 * MS),
            ..dirty
        };
        assert_eq!(next_due(&wakeup).0, Some(now + 300 * MS));
    }

    #[test]
    fn an_unpublished_commit_is_looked_at_again_soon_a_few_times() {
        let now = Instant::now();
        let mut job = AfterJob {
            wants_recheck: true,
            ..at_rest(now)
        };
        let mut waits = Vec::new();
        loop {
            let (due, rechecks) = next_due(&job);
            let Some(due) = due else { break };
            waits.push((due - now).as_millis());
            job.rechecks = rechecks;
        }
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 128, 256]);
        assert_eq!(job.rechecks, MAX_RECHECKS);
    }

    #[test]
    fn a_failure_waits_out_its_backoff_whatever_else_is_due() {
        let now = Instant::now();
        let failed = AfterJob {
            failures: 2,
            backoff: Some(Duration::from_secs(1)),
            dirty: true,
            wants_recheck: true,
            wakeup: Some(now + MS),
            idle: Some((now, Duration::ZERO)),
            ..at_rest(now)
        };
        assert_eq!(next_due(&failed), (Some(now + 1000 * MS), 0));
        // Except a `walsync sync` waiting on it: that is answered now.
        let waited = AfterJob {
            waited_on: true,
            ..failed
        };
        assert_eq!(next_due(&waited).0, Some(now));
    }

    /// On the loop's schedule, under paused time: a change during a job
    /// comes due one sync interval after it, not a millisecond before; a
    /// database at rest never does.
    #[tokio::test(start_paused = true)]
    async fn on_the_schedule_a_job_left_dirty_comes_due_after_one_interval() {
        let mut schedule = crate::replicator::schedule::Schedule::default();
        let now = Instant::now();
        let dirty = AfterJob {
            dirty: true,
            ..at_rest(now)
        };
        for (id, job) in [(1, dirty), (2, at_rest(now))] {
            if let (Some(at), _) = next_due(&job) {
                schedule.set(id, at);
            }
        }
        tokio::time::advance(999 * MS).await;
        assert_eq!(schedule.take_due(Instant::now()), Vec::<usize>::new());
        tokio::time::advance(MS).await;
        assert_eq!(schedule.take_due(Instant::now()), vec![1]);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(schedule.take_due(Instant::now()), Vec::<usize>::new());
    }

    #[test]
    fn an_open_database_at_rest_is_looked_at_once_idle_long_enough() {
        // Ahead of the clock, so that going back from it cannot pass the
        // monotonic clock's start on a machine booted seconds ago.
        let now = Instant::now() + Duration::from_secs(60);
        let idle = AfterJob {
            idle: Some((now - 10_000 * MS, Duration::from_secs(30))),
            ..at_rest(now)
        };
        assert_eq!(next_due(&idle).0, Some(now + 20_000 * MS));
        // Written moments before it would have closed: not before IDLE_RETRY.
        let just_idle = AfterJob {
            idle: Some((now - 30_000 * MS, Duration::from_secs(30))),
            ..at_rest(now)
        };
        assert_eq!(next_due(&just_idle).0, Some(now + IDLE_RETRY));
    }
}
