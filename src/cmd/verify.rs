//! `walsync verify`: checks a chain in storage end to end.

use super::*;
use crate::verify;

pub(super) async fn verify(args: &VerifyArgs) -> Result<()> {
    config::validate_prefix(&args.prefix)?;
    let config = reading_config(
        args.config.as_ref(),
        &args.storage,
        config::Uses::STORAGE_AND_KEYS,
    )?;
    let storage = match &config {
        Some(config) => open_config_storage(&config.storage).await?,
        None => open_default_replica(&args.storage, Path::new(config::DEFAULT_REPLICA_DIR)).await?,
    };
    let live = args.db.as_deref();
    let report = verify::verify(
        storage.as_ref(),
        &args.prefix,
        live,
        &verify::scratch_dir(live),
        reading_keys(config.as_ref(), args.storage.encryption_key_file.as_deref())?,
    )
    .await
    .with_context(|| format!("verifying {} in {}", args.prefix, storage.describe()))?;
    sayln!(
        "{}: {} objects ({} snapshots, {} bytes){}, head {}",
        args.prefix,
        report.objects,
        report.snapshots,
        report.bytes,
        if report.runs > 0 {
            format!(", {} runs", report.runs)
        } else {
            String::new()
        },
        report.head.map_or("-".into(), |h| h.to_string())
    );
    if report.restored {
        sayln!("  newest state restored and passed PRAGMA integrity_check");
    }
    if let Some(pages) = report.compared_pages {
        sayln!("  compared {pages} pages with the live database");
    }
    for problem in &report.problems {
        eprintln!("  problem: {problem}");
    }
    if !report.problems.is_empty() {
        bail!(
            "{}: {} problem(s) found",
            args.prefix,
            report.problems.len()
        );
    }
    sayln!("  ok");
    Ok(())
}
