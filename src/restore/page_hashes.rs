//! Page hashes on a second core. Applying an object decodes its pages,
//! writes them and hashes each one for the state digest ([`state::page_hash`]);
//! the hashing was half of a large restore's time. Pages go in batches of
//! consecutive slots: the applying thread fills and writes one batch while
//! a helper thread hashes the one before, and the hashes come back in the
//! order the pages were read, so the state record is built as before.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use crate::state;

/// Bytes per batch (at least one page): few enough hand-offs to cost
/// nothing, small enough to keep memory flat (a few batches are alive).
const BATCH_BYTES: usize = 1 << 20;

/// Batches handed over and not yet given back: one being hashed while the
/// next is filled.
const IN_FLIGHT: usize = 2;

/// Pages in the order they were read, with their hashes once hashed.
pub struct Batch {
    page_size: usize,
    data: Vec<u8>,
    pgnos: Vec<u32>,
    hashes: Vec<u128>,
}

impl Batch {
    pub fn new(page_size: usize) -> Self {
        let pages = (BATCH_BYTES / page_size.max(1)).max(1);
        Self {
            page_size,
            data: vec![0; page_size * pages],
            pgnos: Vec::with_capacity(pages),
            hashes: Vec::with_capacity(pages),
        }
    }

    /// Where the next page goes; [`Batch::keep`] it once filled.
    pub fn slot(&mut self) -> &mut [u8] {
        let at = self.pgnos.len() * self.page_size;
        &mut self.data[at..at + self.page_size]
    }

    /// Keeps the page just read into [`Batch::slot`] as page `pgno`.
    pub fn keep(&mut self, pgno: u32) {
        self.pgnos.push(pgno);
    }

    pub fn is_full(&self) -> bool {
        (self.pgnos.len() + 1) * self.page_size > self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pgnos.is_empty()
    }

    /// The pages kept, as stretches of consecutive page numbers (a
    /// snapshot's batch is one stretch), to be written in few calls.
    pub fn stretches(&self) -> impl Iterator<Item = (u32, &[u8])> {
        let mut start = 0;
        std::iter::from_fn(move || {
            if start == self.pgnos.len() {
                return None;
            }
            let first = self.pgnos[start];
            let mut end = start + 1;
            while end < self.pgnos.len()
                && u64::from(self.pgnos[end]) == u64::from(first) + (end - start) as u64
            {
                end += 1;
            }
            let bytes = &self.data[start * self.page_size..end * self.page_size];
            start = end;
            Some((first, bytes))
        })
    }

    /// Each page's number and hash, in the order read (after hashing).
    pub fn hashed(&self) -> impl Iterator<Item = (u32, u128)> + '_ {
        self.pgnos.iter().copied().zip(self.hashes.iter().copied())
    }

    fn hash(&mut self) {
        self.hashes.clear();
        for (i, pgno) in self.pgnos.iter().enumerate() {
            let page = &self.data[i * self.page_size..(i + 1) * self.page_size];
            self.hashes.push(state::page_hash(*pgno, page));
        }
    }

    pub fn clear(&mut self) {
        self.pgnos.clear();
        self.hashes.clear();
    }
}

/// The helper thread's two ends, within a [`std::thread::scope`].
pub struct Hasher {
    /// Dropped with the `Hasher`, which ends the helper's loop, so the
    /// scope can join it.
    to: SyncSender<Batch>,
    from: Receiver<Batch>,
    in_flight: usize,
    spare: Vec<Batch>,
}

/// The helper thread is gone (it panicked): the scope reports the panic.
#[derive(Debug, thiserror::Error)]
#[error("the page-hashing thread stopped")]
pub struct Stopped;

impl Hasher {
    pub fn spawn<'scope>(scope: &'scope std::thread::Scope<'scope, '_>) -> Self {
        let (to, work) = sync_channel::<Batch>(IN_FLIGHT);
        let (done, from) = sync_channel::<Batch>(IN_FLIGHT);
        scope.spawn(move || {
            for mut batch in work {
                batch.hash();
                if done.send(batch).is_err() {
                    return;
                }
            }
        });
        Self {
            to,
            from,
            in_flight: 0,
            spare: Vec::new(),
        }
    }

    /// An empty batch for pages of `page_size` bytes.
    pub fn batch(&mut self, page_size: usize) -> Batch {
        match self.spare.pop() {
            Some(mut b) if b.page_size == page_size => {
                b.clear();
                b
            }
            _ => Batch::new(page_size),
        }
    }

    /// Hands `batch` over to be hashed; once enough are under way, waits
    /// for the oldest and returns it hashed.
    pub fn send(&mut self, batch: Batch) -> Result<Option<Batch>, Stopped> {
        self.to.send(batch).map_err(|_| Stopped)?;
        self.in_flight += 1;
        if self.in_flight < IN_FLIGHT {
            return Ok(None);
        }
        self.receive().map(Some)
    }

    /// The oldest batch under way, hashed; `None` when none is.
    pub fn next_hashed(&mut self) -> Result<Option<Batch>, Stopped> {
        if self.in_flight == 0 {
            return Ok(None);
        }
        self.receive().map(Some)
    }

    /// Gives a batch whose hashes were used back for reuse.
    pub fn recycle(&mut self, batch: Batch) {
        self.spare.push(batch);
    }

    fn receive(&mut self) -> Result<Batch, Stopped> {
        let batch = self.from.recv().map_err(|_| Stopped)?;
        self.in_flight -= 1;
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_come_back_in_order_and_stretches_split_at_gaps() {
        // 4 KiB pages: 256 to a batch, so 600 pages make three.
        let page_size = 4096;
        let pgnos: Vec<u32> = (1..=600).filter(|p| p % 97 != 0).collect();
        let page = |pgno: u32| vec![(pgno % 251) as u8; page_size];
        let mut got = Vec::new();
        let mut stretches = Vec::new();
        std::thread::scope(|scope| {
            let mut hasher = Hasher::spawn(scope);
            let mut batch = hasher.batch(page_size);
            let mut take = |b: Batch, hasher: &mut Hasher| {
                got.extend(b.hashed());
                hasher.recycle(b);
            };
            for &pgno in &pgnos {
                batch.slot().copy_from_slice(&page(pgno));
                batch.keep(pgno);
                if batch.is_full() {
                    stretches.extend(batch.stretches().map(|(first, bytes)| (first, bytes.len())));
                    let next = hasher.batch(page_size);
                    if let Some(done) = hasher.send(std::mem::replace(&mut batch, next)).unwrap() {
                        take(done, &mut hasher);
                    }
                }
            }
            stretches.extend(batch.stretches().map(|(first, bytes)| (first, bytes.len())));
            if !batch.is_empty() {
                if let Some(done) = hasher.send(batch).unwrap() {
                    take(done, &mut hasher);
                }
            }
            while let Some(done) = hasher.next_hashed().unwrap() {
                take(done, &mut hasher);
            }
        });
        let expected: Vec<(u32, u128)> = pgnos
            .iter()
            .map(|&p| (p, state::page_hash(p, &page(p))))
            .collect();
        assert_eq!(got, expected);
        // Gaps at 97, 194, ... and batch ends split the stretches; together
        // they cover every page once.
        assert_eq!(
            stretches
                .iter()
                .map(|(_, len)| len / page_size)
                .sum::<usize>(),
            pgnos.len()
        );
        assert!(stretches.contains(&(98, 96 * page_size)), "{stretches:?}");
    }
}
