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

/// The forms of a listen address users type: `127.0.0.1:9090`, `[::1]:9090`,
/// `localhost:9090` (any host name), and Litestream's `:9090` (every
/// interface).
pub fn parse_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
    let bad = |why: &str| {
        format!(
            "{text:?} is not a listen address ({why}); use HOST:PORT, e.g. 127.0.0.1:9090, \
             localhost:9090, or :9090 for every interface"
        )
    };
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(bad("no port"));
    };
    let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
    if host.is_empty() {
        return Ok(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)));
    }
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    (host, port)
        .to_socket_addrs()
        .map_err(|e| bad(&format!("cannot resolve {host}: {e}")))?
        .next()
        .ok_or_else(|| bad(&format!("{host} has no address")))
}

/// Where a client reaches a listener bound to `addr`: a listener on every
/// interface is asked on loopback.
pub fn reachable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

#[cfg(test)]
mod addr_tests {
    use super::*;

    #[test]
    fn listen_addresses_in_the_forms_users_type() {
        assert_eq!(
            parse_addr("127.0.0.1:9090").unwrap().to_string(),
            "127.0.0.1:9090"
        );
        assert_eq!(parse_addr(":9090").unwrap().to_string(), "0.0.0.0:9090");
        assert_eq!(
            parse_addr("localhost:9090").unwrap().to_string(),
            "127.0.0.1:9090"
        );
        assert_eq!(parse_addr("[::1]:9090").unwrap().to_string(), "[::1]:9090");
        for bad in ["9090", "localhost", ":http", "host:99999"] {
            let e = parse_addr(bad).unwrap_err();
            assert!(e.contains(bad) && e.contains(":9090"), "{e}");
        }
        assert_eq!(
            reachable(parse_addr(":9090").unwrap()).to_string(),
            "127.0.0.1:9090"
        );
    }
}
