//! `walsync status`: asks the running `watch` how every database is doing.

use super::*;
use crate::status;

/// Asks the running process's listener for its status.
pub(super) async fn status(args: &StatusArgs) -> Result<()> {
    let addr = match args.listen {
        Some(addr) => addr,
        None => {
            let path = required_config(args.config.clone())
                .context("give --listen ADDR, or the walsync.toml whose [watch] listen to ask")?;
            running_watch_settings(&path, config::Uses::LISTEN)?.listen.with_context(|| {
                format!(
                    "{}: [watch] listen is not set, so the running walsync has no listener to ask",
                    path.display()
                )
            })?
        }
    };
    let addr = crate::listen::reachable(addr);
    let body = http::get(addr, "/status.json")
        .await
        .with_context(|| format!("asking the walsync listening on {addr} (is `watch` running?)"))?;
    if args.json {
        sayln!("{body}");
        return Ok(());
    }
    let snapshot: status::Snapshot =
        serde_json::from_str(&body).with_context(|| format!("reading the status from {addr}"))?;
    say!("{}", snapshot.table());
    // Degraded is reported, not failed: the data is safe, and a container
    // restarted by a failing health check would not remove the cause.
    let degraded = snapshot.degraded();
    if !degraded.is_empty() {
        eprintln!(
            "warning: {} database(s) degraded: {}",
            degraded.len(),
            status::DEGRADED_HINT
        );
    }
    for (prefix, why) in snapshot.forked() {
        eprintln!("warning: {prefix}: {why}");
    }
    let unhealthy = snapshot.unhealthy();
    if !unhealthy.is_empty() {
        bail!("{} database(s) unhealthy", unhealthy.len());
    }
    Ok(())
}
