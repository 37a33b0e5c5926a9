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
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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
/// walsync.toml says otherwise: in the temp directory, named after the
/// configuration file's full path, so `sync` finds it from the same file.
pub fn default_socket(config: &Path) -> PathBuf {
    let full = config
        .canonicalize()
        .unwrap_or_else(|_| config.to_path_buf());
    let digest = Sha256::digest(full.as_os_str().as_encoded_bytes());
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    std::env::temp_dir().join(format!("walsync-{name}.sock"))
}

/// Listens on `path` until `shutdown`, passing requests to `requests`.
pub async fn serve(
    path: PathBuf,
    requests: mpsc::UnboundedSender<SyncRequest>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    // A socket left by a walsync that died is replaced; a live one is not.
    if UnixStream::connect(&path).await.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: another walsync is listening there", path.display()),
        ));
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    info!(socket = %path.display(), "control socket ready (walsync sync)");
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "control socket: accept failed");
                    continue;
                }
            },
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, requests).await {
                warn!(error = %e, "control socket: request failed");
            }
        });
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn answer(
    stream: UnixStream,
    requests: mpsc::UnboundedSender<SyncRequest>,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
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

/// The client side: asks the `watch` at `socket` to sync and returns the
/// answer's lines, up to `done` (when `wait`) or `accepted`, or the refusal.
pub async fn request_sync(
    socket: &Path,
    prefix: Option<&str>,
    wait: bool,
) -> io::Result<Vec<String>> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "{}: {e} (is `walsync watch` running with this configuration?)",
                socket.display()
            ),
        )
    })?;
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
        answer.push(line);
        if end {
            return Ok(answer);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the running walsync closed the connection early",
    ))
}
