//! The commands: wires validated arguments to the modules that do the work.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use tokio_util::sync::CancellationToken;

use crate::cli::{
    Cli, Command, ListArgs, RestoreAllArgs, RestoreArgs, SnapshotArgs, StorageArgs, WatchArgs,
};
use crate::config::{Config, StorageConfig, WatchSettings};
use crate::replica::{Replica, SyncOptions};
use crate::replicator::{self, DbSpec, Plan};
use crate::restore::{self, RestoreOptions};
use crate::storage::{self, S3Options, Storage};
use crate::{chain, config};

pub async fn run(cli: Cli, shutdown: CancellationToken) -> Result<()> {
    match cli.command {
        Command::Watch(args) => watch(args, shutdown).await,
        Command::Restore(args) => restore(args).await,
        Command::RestoreAll(args) => restore_all(args).await,
        Command::List(args) => list(args).await,
        Command::Snapshot(args) => snapshot(args).await,
    }
}

fn s3_options(args: &StorageArgs) -> S3Options {
    S3Options {
        endpoint: args.endpoint.clone(),
        region: args.region.clone(),
        force_path_style: args.path_style,
        credentials: None,
    }
}

fn load_config(path: &Path) -> Result<Config> {
    Ok(Config::load(path)?)
}

async fn open_config_storage(storage: &StorageConfig) -> Result<Arc<dyn Storage>> {
    storage::open(&storage.url, &storage.s3)
        .await
        .with_context(|| format!("opening storage {}", storage.url))
}

/// Opens the configured storage, or the local default directory `default_dir`.
async fn open_storage(args: &StorageArgs, default_dir: &Path) -> Result<Arc<dyn Storage>> {
    let url = match &args.storage {
        Some(url) => url.clone(),
        None => default_dir.display().to_string(),
    };
    storage::open(&url, &s3_options(args))
        .await
        .with_context(|| format!("opening storage {url}"))
}

fn sync_options(args: &WatchArgs) -> SyncOptions {
    SyncOptions {
        sync_interval: args.sync_interval,
        snapshot_interval: args.snapshot_interval,
        checkpoint_pages: args.checkpoint_pages.max(1),
        checkpoint_interval: args.checkpoint_interval,
        truncate_pages: args.truncate_pages.max(1),
    }
}

async fn watch(args: WatchArgs, shutdown: CancellationToken) -> Result<()> {
    replicator::raise_open_file_limit();
    if let Some(path) = &args.config {
        let config = load_config(path)?;
        let storage = open_config_storage(&config.storage).await?;
        return Ok(replicator::run(Plan::Config { config, storage }, shutdown).await?);
    }
    let dbs = config::databases(&args.databases, args.prefix.as_deref())?;
    for (path, _) in &dbs {
        if !path.is_file() {
            bail!(
                "database {} does not exist (create it first, or fix the path)",
                path.display()
            );
        }
    }
    // One storage client for all databases; without --storage, one local
    // directory beside each database directory.
    let configured = match &args.storage.storage {
        Some(_) => Some(open_storage(&args.storage, Path::new(".")).await?),
        None => None,
    };
    let sync = sync_options(&args);
    let mut by_dir: HashMap<PathBuf, Arc<dyn Storage>> = HashMap::new();
    let mut specs = Vec::with_capacity(dbs.len());
    for (path, prefix) in dbs {
        let storage = match &configured {
            Some(s) => s.clone(),
            None => {
                let dir = config::default_storage_beside(&path);
                match by_dir.get(&dir) {
                    Some(s) => s.clone(),
                    None => {
                        let s = open_storage(&args.storage, &dir).await?;
                        by_dir.insert(dir, s.clone());
                        s
                    }
                }
            }
        };
        specs.push(DbSpec {
            path,
            prefix,
            storage,
            sync: sync.clone(),
        });
    }
    let watch = WatchSettings {
        parallelism: args.parallelism.max(1),
        shutdown_timeout: args.shutdown_timeout,
        ..WatchSettings::default()
    };
    replicator::run(Plan::Fixed { specs, watch }, shutdown).await?;
    Ok(())
}

async fn restore(args: RestoreArgs) -> Result<()> {
    config::validate_prefix(&args.prefix)?;
    let storage =
        open_storage(&args.storage, &config::default_storage_beside(&args.output)).await?;
    let opts = RestoreOptions {
        prefix: args.prefix.clone(),
        output: args.output.clone(),
        txid: args.txid,
        force: args.force,
    };
    let report = restore::restore(storage.as_ref(), &opts)
        .await
        .with_context(|| format!("restoring {} from {}", args.prefix, storage.describe()))?;
    println!(
        "restored {} to {}: sequence {} ({} objects, {} bytes downloaded), {} pages of {} bytes, as of {}",
        args.prefix,
        args.output.display(),
        report.seq,
        report.objects,
        report.bytes,
        report.db_pages,
        report.page_size,
        format_ms(report.timestamp_ms)
    );
    Ok(())
}

async fn restore_all(args: RestoreAllArgs) -> Result<()> {
    let config = load_config(&args.config)?;
    let storage = open_config_storage(&config.storage).await?;
    // Every database in storage, plus every configured one (which then fails
    // by name if storage has nothing for it).
    let mut prefixes: Vec<String> = chain::list_databases(storage.as_ref())
        .await
        .with_context(|| format!("listing {}", storage.describe()))?
        .into_iter()
        .map(|(prefix, _)| prefix)
        .collect();
    for target in config.discover()? {
        if !prefixes.contains(&target.prefix) {
            prefixes.push(target.prefix);
        }
    }
    prefixes.sort();
    if prefixes.is_empty() {
        bail!("nothing to restore: no databases in {}", storage.describe());
    }
    std::fs::create_dir_all(&args.output_dir)
        .with_context(|| format!("creating {}", args.output_dir.display()))?;
    let outcomes = restore::restore_all(
        storage.clone(),
        prefixes,
        &args.output_dir,
        args.parallelism,
        args.force,
    )
    .await;
    let mut failed = Vec::new();
    for outcome in &outcomes {
        match &outcome.result {
            Ok(report) => println!(
                "restored {} to {} (sequence {}, {} pages)",
                outcome.prefix,
                outcome.output.display(),
                report.seq,
                report.db_pages
            ),
            Err(e) => {
                eprintln!("failed {}: {e}", outcome.prefix);
                failed.push(outcome.prefix.clone());
            }
        }
    }
    println!(
        "restore-all: {} restored, {} failed",
        outcomes.len() - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        bail!(
            "{} database(s) failed to restore: {}",
            failed.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

async fn list(args: ListArgs) -> Result<()> {
    let storage = match &args.config {
        Some(path) => open_config_storage(&load_config(path)?.storage).await?,
        None => open_storage(&args.storage, Path::new(config::DEFAULT_REPLICA_DIR)).await?,
    };
    let dbs = chain::list_databases(storage.as_ref())
        .await
        .with_context(|| format!("listing {}", storage.describe()))?;
    if dbs.is_empty() {
        println!("no databases in {}", storage.describe());
        return Ok(());
    }
    println!(
        "{:<32} {:>8} {:>10} {:>10} {:>14} {:>14}  LAST SYNC",
        "PREFIX", "OBJECTS", "HEAD SEQ", "SNAPSHOT", "STORED BYTES", "DB BYTES"
    );
    for (prefix, objects) in dbs {
        let Some(head) = objects.last() else { continue };
        let snapshot = objects
            .iter()
            .rev()
            .find(|o| o.kind == crate::segment::Kind::Snapshot)
            .map(|o| o.seq.to_string())
            .unwrap_or_else(|| "-".into());
        let bytes: u64 = objects.iter().map(|o| o.size).sum();
        let (db_bytes, time) = match chain::read_header(storage.as_ref(), head).await {
            Ok(h) => (
                (u64::from(h.db_pages) * u64::from(h.page_size)).to_string(),
                format_ms(h.timestamp_ms),
            ),
            Err(e) => ("?".into(), format!("unreadable: {e}")),
        };
        println!(
            "{:<32} {:>8} {:>10} {:>10} {:>14} {:>14}  {}",
            prefix,
            objects.len(),
            head.seq,
            snapshot,
            bytes,
            db_bytes,
            time
        );
    }
    Ok(())
}

async fn snapshot(args: SnapshotArgs) -> Result<()> {
    let prefix = match &args.prefix {
        Some(p) => {
            config::validate_prefix(p)?;
            p.clone()
        }
        None => config::default_prefix(&args.database)?,
    };
    if !args.database.is_file() {
        bail!("database {} does not exist", args.database.display());
    }
    let storage = open_storage(
        &args.storage,
        &config::default_storage_beside(&args.database),
    )
    .await?;
    let mut replica = Replica::open(
        &args.database,
        &prefix,
        storage.clone(),
        SyncOptions::default(),
    )
    .await
    .with_context(|| format!("opening {}", args.database.display()))?;
    let report = replica
        .force_snapshot("requested with `walsync snapshot`")
        .await
        .with_context(|| format!("snapshot of {}", args.database.display()))?;
    let head = replica.head().map(|h| h.seq).unwrap_or(0);
    println!(
        "snapshot of {} shipped to {} as sequence {} ({} bytes)",
        args.database.display(),
        storage.describe(),
        head,
        report.bytes
    );
    Ok(())
}

fn format_ms(ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}
