//! Which database is looked at when: one time per database at most, the
//! latest set replacing any before it.
//!
//! A heap of `(time, database)` with the live time of each database beside
//! it: replacing a time pushes a new entry and leaves the old one to be
//! skipped when it comes up, so every change is O(log n) and no entry is
//! ever searched for.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use tokio::time::Instant;

#[derive(Debug, Default)]
pub(super) struct Schedule {
    heap: BinaryHeap<Reverse<(Instant, usize)>>,
    due: HashMap<usize, Instant>,
}

impl Schedule {
    /// When `id` is due, if it is scheduled.
    pub fn due(&self, id: usize) -> Option<Instant> {
        self.due.get(&id).copied()
    }

    /// Schedules `id` at `at`, replacing the time it had, earlier or later.
    pub fn set(&mut self, id: usize, at: Instant) {
        self.due.insert(id, at);
        self.heap.push(Reverse((at, id)));
    }

    /// `id` is no longer scheduled.
    pub fn remove(&mut self, id: usize) {
        self.due.remove(&id);
    }

    /// When to wake next: the earliest entry, which may be one replaced
    /// since (the wake-up then finds nothing due and sleeps again).
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// The databases due at `now`, earliest first; none of them is
    /// scheduled any more.
    pub fn take_due(&mut self, now: Instant) -> Vec<usize> {
        let mut due = Vec::new();
        while let Some(Reverse((at, id))) = self.heap.peek().copied() {
            if at > now {
                break;
            }
            self.heap.pop();
            if self.due.get(&id) == Some(&at) {
                self.due.remove(&id);
                due.push(id);
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn databases_come_due_in_time_order_once_their_time_has_come() {
        let mut s = Schedule::default();
        let t0 = Instant::now();
        s.set(1, t0 + 30 * MS);
        s.set(2, t0 + 10 * MS);
        s.set(3, t0 + 20 * MS);
        assert_eq!(s.next(), Some(t0 + 10 * MS));
        assert_eq!(s.take_due(Instant::now()), Vec::<usize>::new());
        tokio::time::advance(20 * MS).await;
        assert_eq!(s.take_due(Instant::now()), vec![2, 3]);
        assert_eq!((s.due(2), s.due(3)), (None, None));
        assert_eq!(s.due(1), Some(t0 + 30 * MS));
        tokio::time::advance(10 * MS).await;
        assert_eq!(s.take_due(Instant::now()), vec![1]);
        assert_eq!(s.next(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_time_replaces_the_old_one_earlier_or_later() {
        let mut s = Schedule::default();
        let t0 = Instant::now();
        s.set(1, t0 + 50 * MS);
        s.set(1, t0 + 10 * MS);
        s.set(2, t0 + 10 * MS);
        s.set(2, t0 + 40 * MS);
        tokio::time::advance(10 * MS).await;
        // 2's old entry comes up and is skipped; 1 is due once.
        assert_eq!(s.take_due(Instant::now()), vec![1]);
        tokio::time::advance(40 * MS).await;
        // 1's old entry at 50 ms is gone with it.
        assert_eq!(s.take_due(Instant::now()), vec![2]);
        assert_eq!(s.take_due(Instant::now()), Vec::<usize>::new());
    }

    #[tokio::test(start_paused = true)]
    async fn a_removed_database_never_comes_due() {
        let mut s = Schedule::default();
        let t0 = Instant::now();
        s.set(1, t0 + MS);
        s.set(2, t0 + MS);
        s.remove(1);
        tokio::time::advance(MS).await;
        assert_eq!(s.take_due(Instant::now()), vec![2]);
        // Scheduled again after its removal, it counts again.
        s.set(1, t0 + 5 * MS);
        tokio::time::advance(5 * MS).await;
        assert_eq!(s.take_due(Instant::now()), vec![1]);
    }
}
