//! The control socket: a Unix socket on which a running `watch` takes
//! `walsync sync` requests ("ship now"), and answers once the data is in
//! storage. Local only, by file permissions: the socket is created 0600.
//!
//! Protocol, one line each way: the client sends `sync` or `sync PREFIX`;
//! the server answers `accepted N` (N databases), then one line per database,
//! `ok PREFIX SEQ` or `error PREFIX MESSAGE`, then `done`. `error MESSAGE`
//! alone refuses the request.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::listen;

/// A database's answer to a sync request: its head after the sync, or why not.
pub type Outcome = (String, Result<Option<u64>, String>);

/// A request handed to the replication loop.
#[derive(Debug)]
pub struct SyncRequest {
    /// One database, or all of them.
    pub prefix: Option<String>,
    /// Told how many databases the request covers (0 with an error: refused).
    pub accepted: oneshot::Sender<Result<usize, String>>,
    /// Told each database's outcome, as each finishes.
    pub outcomes: mpsc::UnboundedSender<Outcome>,
}

/// Where the control socket of the `watch` using `config` lives unless
/// walsync.toml says otherwise: in a directory only this user can enter
/// (`$XDG_RUNTIME_DIR/walsync`, else `walsync-UID` in the temp directory),
/// named after the configuration file's full path, so `sync` finds it from
/// the same file and no other user can put a socket there first. The file's
/// own link is not resolved: a Kubernetes ConfigMap's file is a link whose
/// target moves at every update, and `sync` must still find the socket the
/// running `watch` made.
pub fn default_socket(config: &Path) -> PathBuf {
    let full = crate::replicator::in_canonical_dir(config);
    let digest = Sha256::digest(full.as_os_str().as_encoded_bytes());
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    private_dir().join(format!("walsync-{name}.sock"))
}

fn private_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("walsync"),
        None => std::env::temp_dir().join(format!("walsync-{}", my_uid())),
    }
}

fn my_uid() -> u32 {
    // SAFETY: geteuid(2) cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes sure the directory of `socket` exists, belongs to this user and
/// is closed to everyone else; refuses otherwise, naming the owner.
fn secure_dir(socket: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.is_dir() && meta.uid() == my_uid() && meta.mode() & 0o077 != 0 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    if !meta.is_dir() || meta.uid() != my_uid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: belongs to uid {}, not to this user ({}); refusing to put the control socket there",
                dir.display(),
                meta.uid(),
                my_uid()
            ),
        ));
    }
    Ok(())
}

/// Refuses a peer that is another user: requests (and answers) only ever
/// pass between processes of the same user.
fn check_peer(stream: &UnixStream) -> io::Result<()> {
    let peer = stream.peer_cred()?.uid();
    if peer != my_uid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the other end of the control socket is uid {peer}, not this user ({})",
                my_uid()
            ),
        ));
    }
    Ok(())
}

/// Binds the control socket at `path`, refusing (with the reason) a path
/// another user holds or a live walsync serves: `watch` does not start
/// without the socket it promised.
pub async fn bind(path: &Path) -> io::Result<UnixListener> {
    // Only in a directory of our own: no other user can have made it first.
    if path.starts_with(private_dir()) {
        secure_dir(path)?;
    }
    // A socket of another user is never replaced nor talked to.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::MetadataExt;
        if meta.uid() != my_uid() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{}: belongs to uid {}, not to this user; refusing to use it",
                    path.display(),
                    meta.uid()
                ),
            ));
        }
    }
    // A socket left by a walsync that died is replaced; a live one is not.
    if UnixStream::connect(path).await.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: another walsync is listening there", path.display()),
        ));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    info!(socket = %path.display(), "control socket ready (walsync sync)");
    Ok(listener)
}

/// Serves `listener` (bound at `path`) until `shutdown`, passing requests to
/// `requests`, then removes the socket.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    requests: mpsc::UnboundedSender<SyncRequest>,
    shutdown: CancellationToken,
) {
    // Removed however this ends: after the loop, or when the runtime drops
    // the task at exit before it got that far.
    let _unlink = Unlink(path);
    let mut gate = listen::Gate::new("control socket");
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = gate.slot() => permit,
        };
        let Some(permit) = permit else { break };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    gate.failed(&e).await;
                    continue;
                }
            },
        };
        if let Err(e) = check_peer(&stream) {
            warn!(error = %e, "control socket: refused a connection");
            continue;
        }
        let requests = requests.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match answer(stream, requests).await {
                Ok(()) => {}
                // A `walsync sync` without --wait does not read the answer.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    tracing::debug!(error = %e, "control socket: the client left before the answer");
                }
                Err(e) => warn!(error = %e, "control socket: request failed"),
            }
        });
    }
}

/// Removes the socket file when dropped.
struct Unlink(PathBuf);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn answer(
    stream: UnixStream,
    requests: mpsc::UnboundedSender<SyncRequest>,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // A client that sends nothing (or no end of line) holds a slot only so long.
    let mut limited = BufReader::new(read).take(1024);
    tokio::time::timeout(listen::REQUEST_TIMEOUT, limited.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request line in time"))??;
    let mut words = line.split_whitespace();
    let prefix = match (words.next(), words.next(), words.next()) {
        (Some("sync"), prefix, None) => prefix.map(str::to_string),
        _ => {
            let reply = format!(
                "error unknown request {:?}; expected: sync [PREFIX]\n",
                line.trim()
            );
            return write.write_all(reply.as_bytes()).await;
        }
    };
    let (accepted, accepted_rx) = oneshot::channel();
    let (outcomes, mut outcomes_rx) = mpsc::unbounded_channel();
    let gone = || io::Error::other("the replication loop has stopped");
    requests
        .send(SyncRequest {
            prefix,
            accepted,
            outcomes,
        })
        .map_err(|_| gone())?;
    let count = match accepted_rx.await.map_err(|_| gone())? {
        Ok(count) => count,
        Err(message) => {
            return write
                .write_all(format!("error {message}\n").as_bytes())
                .await;
        }
    };
    write
        .write_all(format!("accepted {count}\n").as_bytes())
        .await?;
    let mut answered = 0;
    while answered < count {
        let Some((prefix, result)) = outcomes_rx.recv().await else {
            break;
        };
        answered += 1;
        let line = match result {
            Ok(seq) => format!(
                "ok {prefix} {}\n",
                seq.map_or("-".into(), |s| s.to_string())
            ),
            Err(message) => format!("error {prefix} {}\n", message.replace('\n', " ")),
        };
        write.write_all(line.as_bytes()).await?;
    }
    // Databases released or left behind at shutdown before their sync.
    for _ in answered..count {
        write
            .write_all(b"error - walsync stopped before this database was synced\n")
            .await?;
    }
    write.write_all(b"done\n").await
}

/// One line of the answer to a sync request, as the client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The request covers this many databases.
    Accepted(usize),
    /// A database is in storage up to this sequence (`-`: nothing yet).
    Synced { prefix: String, seq: String },
    /// The request, or one database's sync, failed: the server's words.
    Failed(String),
}

impl Reply {
    fn parse(line: &str) -> Option<Self> {
        if let Some(rest) = line.strip_prefix("error ") {
            Some(Self::Failed(rest.to_string()))
        } else if let Some(rest) = line.strip_prefix("ok ") {
            let mut words = rest.splitn(2, ' ');
            let prefix = words.next().unwrap_or("").to_string();
            let seq = words.next().unwrap_or("-").to_string();
            Some(Self::Synced { prefix, seq })
        } else {
            line.strip_prefix("accepted ")
                .map(|n| Self::Accepted(n.parse().unwrap_or(0)))
        }
    }
}

/// The client side: asks the `watch` at `socket` to sync and returns the
/// answer, up to `done` (when `wait`) or `accepted`, or the refusal.
pub async fn request_sync(
    socket: &Path,
    prefix: Option<&str>,
    wait: bool,
) -> io::Result<Vec<Reply>> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "{}: {e} (is `walsync watch` running with this configuration?)",
                socket.display()
            ),
        )
    })?;
    // An answer from another user's process would say nothing of our data.
    check_peer(&stream)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", socket.display())))?;
    let (read, mut write) = stream.into_split();
    let request = match prefix {
        Some(p) => format!("sync {p}\n"),
        None => "sync\n".to_string(),
    };
    write.write_all(request.as_bytes()).await?;
    let mut lines = BufReader::new(read).lines();
    let mut answer = Vec::new();
    while let Some(line) = lines.next_line().await? {
        let accepted = line.starts_with("accepted ");
        let end = line == "done" || (answer.is_empty() && !accepted) || (accepted && !wait);
        answer.extend(Reply::parse(&line));
        if end {
            return Ok(answer);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the running walsync closed the connection early",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client reads each line the server writes (see `answer`) as one
    /// reply; `done` ends the answer and is no reply.
    #[test]
    fn every_answer_line_reads_as_its_reply() {
        let synced = |prefix: &str, seq: &str| Reply::Synced {
            prefix: prefix.into(),
            seq: seq.into(),
        };
        for (line, reply) in [
            ("accepted 3", Some(Reply::Accepted(3))),
            ("ok tenants/a 42", Some(synced("tenants/a", "42"))),
            ("ok b -", Some(synced("b", "-"))),
            (
                "error b storage down: 503",
                Some(Reply::Failed("b storage down: 503".into())),
            ),
            ("done", None),
        ] {
            assert_eq!(Reply::parse(line), reply, "{line}");
        }
    }
}
