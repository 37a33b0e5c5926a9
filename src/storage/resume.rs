//! An object body that survives a broken connection: where the stream
//! fails (a reset, a body cut short), the rest is asked for again from the
//! byte where it stopped, so that restoring a large snapshot over a flaky
//! network does not start over, or fail, at 90%.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, ReadBuf};

use super::ObjectReader;
use super::retry::attempts;

/// Opens the object again from a byte offset; the second argument counts
/// the resumptions so far (for the backoff).
pub type Reopen = Box<
    dyn Fn(u64, u32) -> Pin<Box<dyn Future<Output = io::Result<ObjectReader>> + Send>>
        + Send
        + Sync,
>;

pub struct Resuming {
    inner: ObjectReader,
    reopen: Reopen,
    pending: Option<Pin<Box<dyn Future<Output = io::Result<ObjectReader>> + Send>>>,
    /// Bytes delivered so far.
    pos: u64,
    /// The object's length, when the store said it: an end before it is a
    /// cut, not the end.
    len: Option<u64>,
    /// Resumptions in a row that have not delivered a byte yet: a store
    /// that keeps giving pieces is followed to the end, one that gives
    /// nothing is given up on.
    resumed: u32,
    /// All resumptions, for the message.
    total: u32,
}

impl Resuming {
    pub fn new(inner: ObjectReader, len: Option<u64>, reopen: Reopen) -> Self {
        Self {
            inner,
            reopen,
            pending: None,
            pos: 0,
            len,
            resumed: 0,
            total: 0,
        }
    }

    /// Starts asking for the rest, or gives up with `error`.
    fn resume(&mut self, error: io::Error) -> io::Result<()> {
        if self.resumed + 1 >= attempts() {
            return Err(io::Error::new(
                error.kind(),
                format!(
                    "{error} (at byte {}, after {} attempts to resume)",
                    self.pos, self.total
                ),
            ));
        }
        self.resumed += 1;
        self.total += 1;
        tracing::debug!(at = self.pos, resumed = self.resumed, error = %error, "object body broke off; asking for the rest");
        self.pending = Some((self.reopen)(self.pos, self.resumed));
        Ok(())
    }
}

impl AsyncRead for Resuming {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if let Some(pending) = self.pending.as_mut() {
                let reopened = ready!(pending.as_mut().poll(cx));
                self.pending = None;
                match reopened {
                    Ok(inner) => self.inner = inner,
                    Err(e) => {
                        self.resume(e)?;
                        continue;
                    }
                }
            }
            let before = buf.filled().len();
            match ready!(Pin::new(&mut self.inner).poll_read(cx, buf)) {
                Ok(()) => {
                    let got = (buf.filled().len() - before) as u64;
                    if got == 0 && self.len.is_some_and(|len| self.pos < len) {
                        let cut = io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the object body ended early",
                        );
                        self.resume(cut)?;
                        continue;
                    }
                    self.pos += got;
                    if got > 0 {
                        self.resumed = 0;
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) => {
                    // Bytes this call already placed stay delivered.
                    let got = (buf.filled().len() - before) as u64;
                    self.pos += got;
                    if got > 0 {
                        self.resumed = 0;
                    }
                    self.resume(e)?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::io::AsyncReadExt;

    /// A body that gives `data[from..]`, breaking off after `cut` bytes.
    struct Flaky {
        data: Arc<Vec<u8>>,
        at: usize,
        stop: usize,
    }

    impl AsyncRead for Flaky {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.at >= self.stop {
                if self.stop < self.data.len() {
                    return Poll::Ready(Err(io::Error::other("connection reset")));
                }
                return Poll::Ready(Ok(()));
            }
            let n = buf.remaining().min(self.stop - self.at).min(7);
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    fn reader(data: &Arc<Vec<u8>>, from: usize, cut: usize) -> ObjectReader {
        Box::new(Flaky {
            data: data.clone(),
            at: from,
            stop: (from + cut).min(data.len()),
        })
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_is_resumed_where_it_stopped() {
        let data = Arc::new((0..10_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let opened = Arc::new(AtomicU32::new(0));
        let (d, o) = (data.clone(), opened.clone());
        let reopen: Reopen = Box::new(move |offset, _| {
            o.fetch_add(1, Ordering::Relaxed);
            let r = reader(&d, offset as usize, 3000);
            Box::pin(async move { Ok(r) })
        });
        let mut body = Resuming::new(reader(&data, 0, 3000), Some(10_000), reopen);
        let mut out = Vec::new();
        body.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, *data);
        assert_eq!(opened.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn pieces_are_followed_to_the_end_and_nothing_is_given_up_on() {
        let data = Arc::new((0..10_000u32).map(|i| (i % 13) as u8).collect::<Vec<_>>());
        // Ten bytes at a time: a thousand breaks, each one progress.
        let d = data.clone();
        let reopen: Reopen = Box::new(move |offset, _| {
            let r = reader(&d, offset as usize, 10);
            Box::pin(async move { Ok(r) })
        });
        let mut body = Resuming::new(reader(&data, 0, 10), Some(10_000), reopen);
        let mut out = Vec::new();
        body.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, *data);

        // A store that gives nothing more is given up on, saying where.
        let d = data.clone();
        let reopen: Reopen = Box::new(move |offset, _| {
            let r = reader(&d, offset as usize, 0);
            Box::pin(async move { Ok(r) })
        });
        let mut body = Resuming::new(reader(&data, 0, 10), Some(10_000), reopen);
        let mut out = Vec::new();
        let e = body.read_to_end(&mut out).await.unwrap_err();
        assert!(e.to_string().contains("at byte 10"), "{e}");
    }
}
