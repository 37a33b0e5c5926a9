//! The `walsync` binary: logging, runtime and signals, then [`walsync::cmd::run`].

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Libraries whose debug and trace lines carry request headers (credentials,
/// session tokens): kept at warn unless `WALSYNC_LOG` names them itself, and
/// masked by [`walsync::redact`] even then. `aws_config` is kept at error:
/// its warnings are each credential or region provider that found nothing
/// (the instance metadata service's, with a whole HTTP response, last),
/// which walsync's own error says in one line when it matters.
const QUIET_UNLESS_ASKED: &[&str] = &[
    "aws_config",
    "aws_runtime",
    "aws_sdk_s3",
    "aws_sigv4",
    "aws_smithy_http_client",
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "h2",
    "hyper",
    "hyper_util",
    "rustls",
];

/// The log filter from `WALSYNC_LOG` (default `info`).
fn log_filter(spec: Option<&str>) -> EnvFilter {
    let spec = spec.filter(|s| !s.trim().is_empty()).unwrap_or("info");
    let mut filter = EnvFilter::try_new(spec).unwrap_or_else(|e| {
        // Before logging is set up: said on stderr, once.
        eprintln!("warning: WALSYNC_LOG={spec:?} is not a log filter ({e}); logging at info");
        EnvFilter::new("info")
    });
    for target in QUIET_UNLESS_ASKED {
        let level = if *target == "aws_config" {
            "error"
        } else {
            "warn"
        };
        if !spec.contains(target)
            && let Ok(directive) = format!("{target}={level}").parse()
        {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

fn main() -> ExitCode {
    // glibc gives each thread that allocates its own arena; with tokio's
    // blocking pool that is many arenas of freed-but-kept memory. Two suffice.
    // SAFETY: called once before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let cli = walsync::cli::Cli::parse();
    walsync::redact::secrets_from_env();
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(std::env::var("WALSYNC_LOG").ok().as_deref()))
        .with_writer(walsync::redact::Stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    // Installed before any work starts: a SIGTERM from then on is a clean
    // stop, never the default death.
    match runtime.block_on(async { signals() }) {
        Some(signals) => {
            runtime.spawn(cancel_on_signal(signals, shutdown.clone()));
        }
        None => {
            eprintln!("error: cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    }
    let result = runtime.block_on(async {
        let result = walsync::cmd::run(cli, shutdown).await;
        // A put cut off above (by a signal, or the flush's deadline) left
        // its upload's parts in the bucket; its abort would die with the
        // runtime.
        walsync::storage::s3::abort_unfinished(std::time::Duration::from_secs(5)).await;
        result
    });
    // The final flush has its own deadline; work still queued after it must
    // not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(code) => ExitCode::from(code),
        // The shell's convention: 128 plus the signal's number.
        Err(e) if e.is::<walsync::cmd::Interrupted>() => {
            eprintln!("error: {}", one_line(&e));
            let signal = SIGNAL.load(std::sync::atomic::Ordering::Relaxed);
            ExitCode::from(u8::try_from(128 + signal).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            if walsync::cmd::is_usage(&e) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes on one line, each cause once: many messages
/// already include their source's text, which the chain would repeat.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

type Signals = (tokio::signal::unix::Signal, tokio::signal::unix::Signal);

fn signals() -> Option<Signals> {
    use tokio::signal::unix::{SignalKind, signal};
    Some((
        signal(SignalKind::terminate()).ok()?,
        signal(SignalKind::interrupt()).ok()?,
    ))
}

/// The first signal that stopped walsync (its number), for the exit code.
static SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

async fn cancel_on_signal((mut term, mut int): Signals, shutdown: CancellationToken) {
    let signal = tokio::select! {
        _ = term.recv() => libc::SIGTERM,
        _ = int.recv() => libc::SIGINT,
    };
    SIGNAL.store(signal, std::sync::atomic::Ordering::Relaxed);
    tracing::info!("signal received");
    shutdown.cancel();
    // A second Ctrl-C is someone at the terminal who will not wait for the
    // final sync. A second SIGTERM is not: supervisors repeat theirs, and
    // the flush has its own deadline.
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM again; still finishing (a second Ctrl-C stops at once)");
            }
            _ = int.recv() => {
                eprintln!("error: interrupted twice; stopped without finishing");
                std::process::exit(128 + libc::SIGINT);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_printed_once() {
        let inner = std::io::Error::other("disk full");
        let outer = anyhow::Error::new(inner).context("writing /data/x.db: disk full");
        assert_eq!(one_line(&outer), "writing /data/x.db: disk full");
        let outer =
            anyhow::Error::new(std::io::Error::other("disk full")).context("writing /data/x.db");
        assert_eq!(one_line(&outer), "writing /data/x.db: disk full");
    }
}
