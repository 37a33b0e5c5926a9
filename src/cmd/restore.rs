//! `walsync restore` (also `--follow`) and `walsync restore-all`.

use super::*;
use crate::{progress, restore};

fn target(txid: Option<u64>, timestamp: Option<u64>) -> Target {
    match (txid, timestamp) {
        (Some(seq), _) => Target::Seq(seq),
        (None, Some(ms)) => Target::Time(ms),
        (None, None) => Target::Latest,
    }
}

/// What a restore reads and writes, resolved from its arguments.
struct RestoreJob {
    prefix: String,
    output: PathBuf,
    storage: Arc<dyn Storage>,
    keys: Option<Arc<Keys>>,
}

/// Resolves `restore DB` (in place, its prefix from the configuration or its
/// file name) or `restore --prefix NAME -o FILE`, and opens the storage.
async fn restore_job(args: &RestoreArgs) -> Result<RestoreJob> {
    let config = reading_config(
        args.config.as_ref(),
        &args.storage,
        config::Uses::STORAGE_AND_KEYS,
    )?;
    let (prefix, output) = match (&args.database, &args.prefix, &args.output) {
        (Some(db), _, _) => {
            let prefix = match &config {
                Some(config) => config.prefix_for(db).with_context(|| {
                    format!(
                        "no database entry of {} matches {}; give --prefix NAME -o FILE",
                        config.source.display(),
                        db.display()
                    )
                })?,
                None => config::default_prefix(db)?,
            };
            (prefix, db.clone())
        }
        (None, Some(prefix), Some(output)) => (prefix.clone(), output.clone()),
        _ => bail!("give the database path DB, or --prefix NAME and -o FILE"),
    };
    config::validate_prefix(&prefix)?;
    let storage = match &config {
        Some(config) => open_config_storage(config.store(args.from.as_deref())?).await?,
        None => {
            no_mirrors_without_config(args.from.as_deref())?;
            open_default_replica(&args.storage, &config::default_storage_beside(&output)).await?
        }
    };
    let keys = reading_keys(config.as_ref(), args.storage.encryption_key_file.as_deref())?;
    Ok(RestoreJob {
        prefix,
        output,
        storage,
        keys,
    })
}

pub(super) async fn follow(args: RestoreArgs, shutdown: CancellationToken) -> Result<()> {
    let RestoreJob {
        prefix,
        output,
        storage,
        keys,
    } = restore_job(&args).await?;
    let opts = follow::FollowOptions {
        prefix: prefix.clone(),
        output: output.clone(),
        keys,
        interval: args.interval,
        force: args.force,
    };
    let report = follow::follow(storage.as_ref(), &opts, shutdown)
        .await
        .with_context(|| {
            format!(
                "following {prefix} from {} into {}",
                storage.describe(),
                output.display()
            )
        })?;
    match report.position {
        Some(pos) => sayln!(
            "followed {prefix} into {}: at sequence {} ({} objects applied{})",
            output.display(),
            pos.seq,
            report.applied,
            if report.restored {
                " after a full restore"
            } else {
                ""
            }
        ),
        None => sayln!("stopped before {prefix} had anything in storage"),
    }
    Ok(())
}

pub(super) async fn restore(args: RestoreArgs) -> Result<()> {
    let RestoreJob {
        prefix,
        output,
        storage,
        keys,
    } = restore_job(&args).await?;
    if args.if_db_not_exists && output.symlink_metadata().is_ok() {
        sayln!("skipped {prefix}: {} exists", output.display());
        return Ok(());
    }
    let target = target(args.txid, args.timestamp);
    progress::install_for_bytes(args.quiet || args.dry_run);
    if args.litestream {
        let done = from_litestream(&args, &prefix, &output, storage.as_ref(), target).await;
        progress::current().finish();
        return done;
    }
    if args.dry_run {
        let planning = || {
            format!(
                "planning the restore of {prefix} from {}",
                storage.describe()
            )
        };
        let plan = match restore::resolve(storage.as_ref(), &prefix, target).await {
            Err(restore::Error::NoReplica { .. }) if args.if_replica_exists => {
                sayln!("skipped {prefix}: nothing in {} yet", storage.describe());
                return Ok(());
            }
            other => other.with_context(planning)?,
        };
        // Restore itself reads the time from the verified object; only the
        // plan has to ask storage for it.
        let last = plan.objects.last().context("an empty plan")?;
        let as_of = chain::read_header(storage.as_ref(), last)
            .await
            .with_context(planning)?
            .timestamp_ms;
        sayln!(
            "would restore {prefix} to {}: sequence {}, as of {}, from {} objects ({} bytes):",
            output.display(),
            plan.seq,
            format_ms(as_of),
            plan.objects.len(),
            plan.bytes
        );
        for object in &plan.objects {
            sayln!("  {}  {} bytes", object.key, object.size);
        }
        if let Some(branch) = &plan.fork {
            sayln!("note: {}", branch.describe());
        }
        return Ok(());
    }
    let opts = RestoreOptions {
        prefix: prefix.clone(),
        output: output.clone(),
        target,
        force: args.force,
        keys,
        parallelism: args.parallelism,
    };
    let restored = restore::restore(storage.as_ref(), &opts).await;
    progress::current().finish();
    let report = match restored {
        Err(restore::Error::NoReplica { .. }) if args.if_replica_exists => {
            sayln!("skipped {prefix}: nothing in {} yet", storage.describe());
            return Ok(());
        }
        other => {
            other.with_context(|| format!("restoring {prefix} from {}", storage.describe()))?
        }
    };
    sayln!(
        "restored {prefix} to {}: sequence {} ({} objects, {} bytes downloaded), {} pages of {} bytes, as of {}",
        output.display(),
        report.seq,
        report.objects,
        report.bytes,
        report.db_pages,
        report.page_size,
        format_ms(report.timestamp_ms)
    );
    Ok(())
}

/// `restore-all --json`: what was restored, skipped and failed, and totals.
fn json_summary(
    restored: &[serde_json::Value],
    skipped: &[(String, String)],
    failed: &[(String, String)],
    seconds: f64,
) -> serde_json::Value {
    let named = |list: &[(String, String)], field: &str| -> Vec<serde_json::Value> {
        list.iter()
            .map(|(prefix, why)| serde_json::json!({ "prefix": prefix, field: why }))
            .collect()
    };
    let total = |field: &str| -> u64 { restored.iter().filter_map(|r| r[field].as_u64()).sum() };
    serde_json::json!({
        "restored": restored,
        "skipped": named(skipped, "why"),
        "failed": named(failed, "error"),
        "totals": {
            "restored": restored.len(),
            "skipped": skipped.len(),
            "failed": failed.len(),
            "objects": total("objects"),
            "bytes": total("bytes"),
            "seconds": seconds,
        },
    })
}

/// `restore --litestream`: the database from a Litestream 0.5 replica.
async fn from_litestream(
    args: &RestoreArgs,
    prefix: &str,
    output: &Path,
    storage: &dyn Storage,
    target: Target,
) -> Result<()> {
    let opts = RestoreOptions {
        prefix: prefix.to_string(),
        output: output.to_path_buf(),
        target,
        force: args.force,
        keys: None,
        parallelism: args.parallelism,
    };
    let report = match restore::restore_litestream(storage, &opts).await {
        Err(restore::Error::NoReplica { .. }) if args.if_replica_exists => {
            sayln!(
                "skipped {prefix}: no Litestream replica in {} yet",
                storage.describe()
            );
            return Ok(());
        }
        other => other.with_context(|| {
            format!(
                "restoring the Litestream replica {prefix} from {}",
                storage.describe()
            )
        })?,
    };
    sayln!(
        "restored {prefix} to {} from Litestream: transaction {:x} ({} files, {} bytes downloaded), {} pages of {} bytes, as of {}",
        output.display(),
        report.txid,
        report.files,
        report.bytes,
        report.pages,
        report.page_size,
        format_ms(report.timestamp_ms)
    );
    Ok(())
}

pub(super) async fn restore_all(args: RestoreAllArgs) -> Result<()> {
    let config_path = required_config(args.config.clone())?;
    let config = load_config(&config_path)?;
    let storage = open_config_storage(config.store(args.from.as_deref())?).await?;
    // Every database in storage, plus every configured one (which then fails
    // by name if storage has nothing for it, unless --if-replica-exists).
    let listed = chain::database_names(storage.as_ref())
        .await
        .with_context(|| format!("listing {}", storage.describe()))?;
    // A name from storage reaches a file name only if it is one walsync.toml
    // could hold; the others are named (escaped) and fail the run.
    let mut failed: Vec<(String, String)> = Vec::new();
    for (name, why) in &listed.refused {
        eprintln!("failed {name:?}: not a valid database name in storage (it {why}); not restored");
        // Escaped: a name from storage reaches a terminal only that way.
        failed.push((
            name.escape_debug().to_string(),
            format!("not a valid database name in storage (it {why})"),
        ));
    }
    let stored: Vec<String> = listed.found;
    let mut prefixes = stored.clone();
    let mut skipped: Vec<(String, &str)> = Vec::new();
    for target in config.discover()? {
        if stored.contains(&target.prefix) || prefixes.contains(&target.prefix) {
            continue;
        }
        if args.if_replica_exists {
            skipped.push((target.prefix, "nothing in storage yet"));
        } else {
            prefixes.push(target.prefix);
        }
    }
    prefixes.sort();
    if prefixes.is_empty() && skipped.is_empty() {
        if args.if_replica_exists {
            if args.json {
                sayln!("{:#}", json_summary(&[], &[], &[], 0.0));
            } else {
                sayln!(
                    "restore-all: nothing in {} yet; nothing to do",
                    storage.describe()
                );
            }
            return Ok(());
        }
        bail!("nothing to restore: no databases in {}", storage.describe());
    }
    let target = args.timestamp.map_or(Target::Latest, Target::Time);
    let keys = reading_keys(Some(&config), None)?;
    let mut jobs: Vec<RestoreOptions> = Vec::new();
    for prefix in prefixes {
        let output = match &args.output_dir {
            Some(dir) => restore::file_in_dir(dir, &prefix),
            None => match config.path_for(&prefix) {
                Some(path) => path,
                // Another app's database in the same bucket, say: not ours
                // to place, and no reason to fail the ones that are.
                None => {
                    skipped.push((
                        prefix,
                        "not configured: no database in the configuration maps to this prefix \
                         (restore it with --output-dir or `walsync restore --prefix`)",
                    ));
                    continue;
                }
            },
        };
        if args.if_db_not_exists && output.exists() {
            skipped.push((prefix, "the database file exists"));
            continue;
        }
        jobs.push(RestoreOptions {
            prefix,
            output,
            target,
            force: args.force,
            keys: keys.clone(),
            parallelism: restore::FETCH_PARALLELISM,
        });
    }
    // Two databases restored to one file would leave one of them there under
    // the other's name: refused before anything is written.
    let mut by_output: std::collections::HashMap<PathBuf, &str> = std::collections::HashMap::new();
    for job in &jobs {
        if let Some(other) = by_output.insert(same_file_key(&job.output), &job.prefix) {
            bail!(
                "{other} and {} would both be restored to {}; give one of them its own path in \
                 {} (or use --output-dir), nothing was restored",
                job.prefix,
                job.output.display(),
                config_path.display()
            );
        }
    }
    if !args.json {
        for (prefix, why) in &skipped {
            sayln!("skipped {prefix}: {why}");
        }
    }
    let started = std::time::Instant::now();
    progress::install_for_databases(args.quiet || args.json, jobs.len() as u64, "restore-all");
    let outcomes = restore::restore_all(storage.clone(), jobs, args.parallelism).await;
    progress::current().finish();
    let mut skipped: Vec<(String, String)> = skipped
        .into_iter()
        .map(|(prefix, why)| (prefix, why.to_string()))
        .collect();
    let mut restored = Vec::new();
    for outcome in &outcomes {
        match &outcome.result {
            Ok(report) => {
                if !args.json {
                    sayln!(
                        "restored {} to {} (sequence {}, {} pages, as of {})",
                        outcome.prefix,
                        outcome.output.display(),
                        report.seq,
                        report.db_pages,
                        format_ms(report.timestamp_ms)
                    );
                }
                restored.push(serde_json::json!({
                    "prefix": outcome.prefix,
                    "file": outcome.output.display().to_string(),
                    "sequence": report.seq,
                    "objects": report.objects,
                    "bytes": report.bytes,
                    "pages": report.db_pages,
                    "page_size": report.page_size,
                    "as_of": format_ms(report.timestamp_ms),
                }));
            }
            // Asked for a time before the database was first replicated:
            // there was nothing to restore, which is not a failure.
            Err(
                e @ restore::Error::BeforeEarliest {
                    not_yet_replicated: true,
                    ..
                },
            ) => {
                let why = format!("not replicated yet at that time ({e})");
                if !args.json {
                    sayln!("skipped {}: {why}", outcome.prefix);
                }
                skipped.push((outcome.prefix.clone(), why));
            }
            Err(e) => {
                eprintln!("failed {}: {e}", outcome.prefix);
                failed.push((outcome.prefix.clone(), e.to_string()));
            }
        }
    }
    if args.json {
        let seconds = started.elapsed().as_secs_f64();
        sayln!("{:#}", json_summary(&restored, &skipped, &failed, seconds));
    } else {
        sayln!(
            "restore-all: {} restored, {} skipped, {} failed",
            restored.len(),
            skipped.len(),
            failed.len()
        );
    }
    if !failed.is_empty() {
        let names: Vec<&str> = failed.iter().map(|(name, _)| name.as_str()).collect();
        bail!(
            "{} database(s) failed to restore: {}",
            failed.len(),
            names.join(", ")
        );
    }
    Ok(())
}
