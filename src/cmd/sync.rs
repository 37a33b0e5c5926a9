//! `walsync sync`: asks the running `watch` to ship now.

use super::*;

/// Asks the running `watch` to ship now, and with --wait, for the outcome.
pub(super) async fn sync(args: &SyncArgs) -> Result<()> {
    let path = required_config(args.config.clone())?;
    let socket = running_watch_settings(&path, config::Uses::CONTROL_SOCKET)?
        .control_socket
        .clone()
        .unwrap_or_else(|| control::default_socket(&path));
    let answer = tokio::time::timeout(
        args.timeout,
        control::request_sync(&socket, args.prefix.as_deref(), args.wait),
    )
    .await
    .with_context(|| {
        format!(
            "no answer within {:?} from {}",
            args.timeout,
            socket.display()
        )
    })??;
    let mut failed = Vec::new();
    let mut synced = 0;
    let mut expected = 0;
    for reply in answer {
        match reply {
            control::Reply::Failed(why) => {
                eprintln!("error: {why}");
                failed.push(why);
            }
            control::Reply::Synced { prefix, seq } => {
                sayln!("{prefix}: in storage up to sequence {seq}");
                synced += 1;
            }
            control::Reply::Accepted(n) => {
                expected = n;
                if !args.wait {
                    sayln!("sync requested for {n} database(s)");
                }
            }
        }
    }
    if !failed.is_empty() {
        bail!("{} database(s) could not be synced", failed.len());
    }
    if args.wait && synced != expected {
        bail!("only {synced} of {expected} database(s) confirmed in storage");
    }
    Ok(())
}
