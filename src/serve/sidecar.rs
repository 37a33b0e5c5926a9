//! Sidecar mode (`watch --exec`): the app runs as walsync's child. walsync
//! starts it once every database has been synced once, passes on the signals
//! a supervisor sends (so `docker stop` reaches the app), and when the app
//! exits, ships what it wrote last and exits with the app's status.

use std::process::ExitStatus;

use tokio::process::Command;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--exec {command:?}: {reason}")]
    BadCommand { command: String, reason: String },
    #[error("--exec: cannot start {program:?}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--exec: waiting for the app: {0}")]
    Wait(#[source] std::io::Error),
    #[error("--exec: cannot listen for signals: {0}")]
    Signals(#[source] std::io::Error),
}

/// Splits the command the way a POSIX shell would (quotes and escapes; no
/// expansion), so the app becomes walsync's direct child and gets its signals.
pub fn parse(command: &str) -> Result<Vec<String>, Error> {
    let bad = |reason: String| Error::BadCommand {
        command: command.to_string(),
        reason,
    };
    let argv = shell_words::split(command).map_err(|e| bad(e.to_string()))?;
    if argv.is_empty() {
        return Err(bad("empty command".into()));
    }
    Ok(argv)
}

/// Signals passed on to the app. SIGINT and SIGTERM also make it exit; the
/// others are the app's business (reload, log rotation).
const FORWARDED: [(SignalKind, &str); 5] = [
    (SignalKind::interrupt(), "SIGINT"),
    (SignalKind::terminate(), "SIGTERM"),
    (SignalKind::hangup(), "SIGHUP"),
    (SignalKind::user_defined1(), "SIGUSR1"),
    (SignalKind::user_defined2(), "SIGUSR2"),
];

type Streams = Vec<(tokio::signal::unix::Signal, SignalKind, &'static str)>;

/// The signals to pass on, listened for from before replication starts: a
/// SIGHUP or SIGUSR1 meant for the app must not kill walsync while it syncs
/// before starting the app.
pub struct Forwarder {
    streams: Streams,
}

impl Forwarder {
    pub fn install() -> Result<Self, Error> {
        let mut streams = Vec::with_capacity(FORWARDED.len());
        for (kind, name) in FORWARDED {
            streams.push((signal(kind).map_err(Error::Signals)?, kind, name));
        }
        Ok(Self { streams })
    }
}

/// Runs the app until it exits, forwarding signals, and returns the exit
/// code walsync should exit with: the app's, or 128 + the signal that ended it.
pub async fn run(argv: &[String], forwarder: Forwarder) -> Result<u8, Error> {
    let (program, args) = argv.split_first().ok_or_else(|| Error::BadCommand {
        command: String::new(),
        reason: "empty command".into(),
    })?;
    let mut streams = forwarder.streams;
    // Signals that came while walsync synced before starting the app were
    // caught so they would not kill walsync; the app did not exist yet, and
    // must not get them the instant it starts, before it can set handlers.
    drop_pending(&mut streams);
    let parent = std::process::id();
    let mut command = Command::new(program);
    command.args(args);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // The app dies with walsync: an app running on, unreplicated,
            // after walsync was killed would lose what it writes.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Killed already, between fork and prctl: do not run at all.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| Error::Spawn {
        program: program.clone(),
        source,
    })?;
    let pid = child.id();
    info!(pid, command = %argv.join(" "), "started the app");
    let status = loop {
        let signalled = next_signal(&mut streams);
        tokio::select! {
            status = child.wait() => break status.map_err(Error::Wait)?,
            (kind, name) = signalled => {
                if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                    info!(signal = name, pid, "passing the signal on to the app");
                    // SAFETY: kill only sends a signal to the child's pid,
                    // which cannot be reused before we reap it in wait().
                    if unsafe { libc::kill(pid, kind.as_raw_value()) } != 0 {
                        warn!(signal = name, error = %std::io::Error::last_os_error(), "could not signal the app");
                    }
                }
            }
        }
    };
    let code = exit_code(status);
    info!(%status, code, "the app exited");
    Ok(code)
}

/// Discards every signal already caught, logging which.
fn drop_pending(streams: &mut Streams) {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    for (stream, _, name) in streams.iter_mut() {
        while let std::task::Poll::Ready(Some(())) = stream.poll_recv(&mut cx) {
            info!(
                signal = *name,
                "dropping a signal that came before the app started"
            );
        }
    }
}

/// The first signal to arrive on any of the streams.
async fn next_signal(streams: &mut Streams) -> (SignalKind, &'static str) {
    std::future::poll_fn(|cx| {
        for (stream, kind, name) in streams.iter_mut() {
            if stream.poll_recv(cx).is_ready() {
                return std::task::Poll::Ready((*kind, *name));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(255),
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_split_like_a_shell_without_expansion() {
        assert_eq!(
            parse(r#"python3 app.py --name "my app" 'a b' $HOME"#).unwrap(),
            vec!["python3", "app.py", "--name", "my app", "a b", "$HOME"]
        );
        assert!(parse("   ").is_err());
        assert!(parse("echo 'unclosed").is_err());
    }
}
