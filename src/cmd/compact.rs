//! `walsync compact`: stores the runs of chains `watch` does not compact.

use super::*;
use crate::compact;

pub(super) async fn compact(args: &CompactArgs) -> Result<()> {
    if let Some(prefix) = &args.prefix {
        config::validate_prefix(prefix)?;
    }
    let config = reading_config(
        args.config.as_ref(),
        &args.storage,
        config::Uses::STORAGE_AND_KEYS,
    )?;
    let storage = match &config {
        Some(config) => open_config_storage(config.store(args.from.as_deref())?).await?,
        None => {
            no_mirrors_without_config(args.from.as_deref())?;
            open_default_replica(&args.storage, Path::new(config::DEFAULT_REPLICA_DIR)).await?
        }
    };
    let keys = reading_keys(config.as_ref(), args.storage.encryption_key_file.as_deref())?;
    let prefixes = match &args.prefix {
        Some(prefix) => vec![prefix.clone()],
        None => {
            let found = chain::database_names(storage.as_ref())
                .await
                .with_context(|| format!("listing {}", storage.describe()))?;
            for (name, why) in &found.refused {
                eprintln!("skipped {name:?}: the name {why}");
            }
            found.found
        }
    };
    let scratch = std::env::temp_dir();
    for prefix in prefixes {
        let report = compact::compact_chain(
            storage.as_ref(),
            &prefix,
            &compact::LEVELS,
            keys.clone(),
            &scratch,
        )
        .await
        .with_context(|| format!("compacting {prefix} in {}", storage.describe()))?;
        sayln!(
            "{prefix}: {} runs stored, {} already there, {} objects read",
            report.built.len(),
            report.present,
            report.read
        );
    }
    Ok(())
}
