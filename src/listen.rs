//! Limits shared by everything walsync serves to others (the HTTP listener
//! and the control socket): a client, careless or hostile, may cost a few
//! descriptors and a little time, never the descriptors, CPU or log that
//! replication needs.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections served at once; more wait in the kernel's backlog, costing
/// walsync nothing.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request (headers, or the control line).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest an HTTP connection is kept, however busy.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Wait after a failed `accept` (out of descriptors, say) before the next.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(250);
/// Failed accepts are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// Admits connections up to [`MAX_CONNECTIONS`] and paces failed accepts.
#[derive(Debug, Clone)]
pub struct Gate {
    what: &'static str,
    permits: Arc<Semaphore>,
    last_logged: Option<Instant>,
    failed_since_log: u64,
}

impl Gate {
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            last_logged: None,
            failed_since_log: 0,
        }
    }

    /// A slot for one connection; waits while all are taken (call it before
    /// `accept`, so that a full house leaves clients in the backlog). `None`
    /// only if the gate was closed, which nothing does.
    pub async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().acquire_owned().await.ok()
    }

    /// After a failed accept: a log line now and then, and a pause, so that a
    /// persistent failure (no descriptors left) neither spins nor floods the log.
    pub async fn failed(&mut self, error: &io::Error) {
        self.failed_since_log += 1;
        if self.last_logged.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
            tracing::warn!(
                listener = self.what,
                %error,
                failures = self.failed_since_log,
                "accept failed; pausing before the next"
            );
            self.last_logged = Some(Instant::now());
            self.failed_since_log = 0;
        }
        tokio::time::sleep(ACCEPT_PAUSE).await;
    }
}
