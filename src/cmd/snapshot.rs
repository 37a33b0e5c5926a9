//! `walsync snapshot`: ships a snapshot of one database now.

use super::*;

pub(super) async fn snapshot(args: SnapshotArgs) -> Result<()> {
    let prefix = match &args.prefix {
        Some(p) => {
            config::validate_prefix(p)?;
            p.clone()
        }
        None => config::default_prefix(&args.database)?,
    };
    check_database_path(&args.database)?;
    let storage = open_storage(
        &args.storage,
        &config::default_storage_beside(&args.database),
    )
    .await?;
    let opts = SyncOptions {
        encryption: cli_keys(args.storage.encryption_key_file.as_deref())?,
        ..SyncOptions::default()
    };
    let mut replica = Replica::open(&args.database, &prefix, storage.clone(), opts)
        .await
        .with_context(|| format!("opening {}", args.database.display()))?;
    let report = replica
        .force_snapshot(crate::reason::SnapshotReason::Requested(
            "requested with `walsync snapshot`",
        ))
        .await
        .with_context(|| format!("snapshot of {}", args.database.display()))?;
    let head = replica.head().map(|h| h.seq).unwrap_or(0);
    sayln!(
        "snapshot of {} shipped to {} as sequence {} ({} bytes)",
        args.database.display(),
        storage.describe(),
        head,
        report.bytes
    );
    Ok(())
}
