//! The commands: wires validated arguments to the modules that do the work,
//! one file per command; what several share is here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::cli::{
    Cli, Command, CompactArgs, InitArgs, ListArgs, RestoreAllArgs, RestoreArgs, SnapshotArgs,
    StatusArgs, StorageArgs, SyncArgs, VerifyArgs, WatchArgs,
};
use crate::config::{Config, StorageConfig, WatchSettings};
use crate::encryption::{Key, Keys};
use crate::mirror::Mirror;
use crate::replica::{Replica, SyncOptions};
use crate::replicator::{self, DbSpec, Plan};
use crate::restore::{RestoreOptions, Target, format_ms};
use crate::retention::Retention;
use crate::status::Board;
use crate::storage::{self, S3Options, Storage};
use crate::{chain, config, control, explain, follow, http, sidecar};
use crate::{say, sayln};

mod compact;
mod init;
mod list;
mod restore;
mod snapshot;
mod status;
mod sync;
mod verify;
mod watch;

pub use init::STARTER;

/// Holds the encryption key when no file names it.
const KEY_ENV: &str = "WALSYNC_ENCRYPTION_KEY";

/// Runs a command; returns the exit code (non-zero only from a sidecar app,
/// errors are returned as such).
pub async fn run(cli: Cli, shutdown: CancellationToken) -> Result<u8> {
    // Nothing retries a reading command after it gives up: it tries harder.
    if matches!(
        cli.command,
        Command::Restore(_)
            | Command::RestoreAll(_)
            | Command::Verify(_)
            | Command::List(_)
            | Command::Compact(_)
    ) {
        storage::retry::be_patient();
    }
    let stop = &shutdown;
    match cli.command {
        Command::Watch(args) => watch::watch(args, shutdown).await,
        Command::Restore(args) if args.follow => restore::follow(args, shutdown).await.map(|()| 0),
        Command::Restore(args) => until_signal(stop, restore::restore(args)).await,
        Command::RestoreAll(args) => until_signal(stop, restore::restore_all(args)).await,
        Command::List(args) => until_signal(stop, list::list(args)).await,
        Command::Snapshot(args) => until_signal(stop, snapshot::snapshot(args)).await,
        Command::Init(args) => init::init(&args).map(|()| 0),
        Command::Status(args) => until_signal(stop, status::status(&args)).await,
        Command::Sync(args) => until_signal(stop, sync::sync(&args)).await,
        Command::Verify(args) => until_signal(stop, verify::verify(&args)).await,
        Command::Compact(args) => until_signal(stop, compact::compact(&args)).await,
        Command::Explain(args) => {
            let path = required_config(args.config)?;
            say!("{}", explain::explain(&load_config(&path)?)?);
            Ok(0)
        }
    }
}

/// A command line that asks for nothing walsync can do (no database to
/// watch, `--prefix` for several): exit 2, as for what clap refuses.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// Whether `e` is a mistake on the command line rather than a failure.
pub fn is_usage(e: &anyhow::Error) -> bool {
    e.is::<Usage>()
        || matches!(
            e.downcast_ref::<config::Error>(),
            Some(config::Error::PrefixWithMany(_))
        )
}

/// A command stopped by SIGINT or SIGTERM before it finished.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by a signal before finishing; nothing half-written was put in place")]
pub struct Interrupted;

/// Runs a command that ends on its own, unless SIGINT or SIGTERM comes
/// first, however long a store takes to answer: then it is dropped, which
/// removes its scratch files, and what it had not put in place is not.
async fn until_signal(
    shutdown: &CancellationToken,
    command: impl Future<Output = Result<()>>,
) -> Result<u8> {
    tokio::select! {
        done = command => done.map(|()| 0),
        () = shutdown.cancelled() => Err(Interrupted.into()),
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

/// Like [`load_config`], for a command that reads only what `uses` names.
fn load_config_for(path: &Path, uses: config::Uses) -> Result<Config> {
    Ok(Config::load_for(path, uses)?)
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

/// The key named on the command line: `--encryption-key-file`, else
/// WALSYNC_ENCRYPTION_KEY (empty counts as unset).
fn cli_keys(key_file: Option<&Path>) -> Result<Option<Arc<Keys>>> {
    let key = match key_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the encryption key file {}", path.display()))?;
            Key::from_hex(&text)
                .with_context(|| format!("encryption key file {}", path.display()))?
        }
        None => match std::env::var(KEY_ENV) {
            Ok(text) if !text.trim().is_empty() => {
                Key::from_hex(&text).with_context(|| KEY_ENV.to_string())?
            }
            Ok(_) | Err(std::env::VarError::NotPresent) => return Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => bail!("{KEY_ENV} is not valid UTF-8"),
        },
    };
    Ok(Some(Arc::new(Keys::new(Some(key), Vec::new()))))
}

/// Keys that open objects: every key of the configuration and the command line.
fn reading_keys(config: Option<&Config>, key_file: Option<&Path>) -> Result<Option<Arc<Keys>>> {
    let from_cli = cli_keys(key_file)?;
    let from_config = config.and_then(|c| c.keys.clone());
    Ok(match (from_config, from_cli) {
        (Some(a), Some(b)) => Keys::union([a.as_ref(), b.as_ref()]).map(Arc::new),
        (a, b) => a.or(b),
    })
}

/// Listed once before anything starts, and one key written to it twice,
/// each storage shows whether it can work at all: a bucket that does not exist or credentials the store
/// refuses fail `watch` now, in the store's own words, instead of being
/// retried forever. A fault that may pass (a timeout, a 503) is logged and
/// replication starts, retrying as always. A store that overwrites what it
/// was told to create only is said once (see [`storage::probe`]).
async fn check_storage(storage: &dyn Storage, keep_retrying: bool) -> Result<()> {
    match tokio::time::timeout(START_CHECK, check_storage_now(storage, keep_retrying)).await {
        Ok(checked) => checked,
        Err(_) => {
            tracing::warn!(
                storage = %storage.describe(),
                "storage did not answer the start-up check within {START_CHECK:?}; \
                 replication starts and retries until it answers"
            );
            Ok(())
        }
    }
}

/// How long `watch` waits at start for a store to answer its check. A store
/// that refuses (no such bucket, no permission) answers at once; one that
/// hangs is replicated to once it answers, like one that fails later.
const START_CHECK: std::time::Duration = std::time::Duration::from_secs(10);

async fn check_storage_now(storage: &dyn Storage, keep_retrying: bool) -> Result<()> {
    // A prefix no database is given: the listing is empty and cheap, yet
    // needs the permission replication lists with (what it finds is unused).
    // Only the listing decides whether watch starts: a store whose policy
    // allows writes under the databases' prefixes alone refuses the probe.
    let checked = match storage.list(storage::probe::DIR).await {
        Ok(_) => match storage::probe::refuses_overwrite(storage).await {
            Err(e) => {
                tracing::warn!(
                    storage = %storage.describe(),
                    error = %e,
                    "could not learn whether this store refuses to overwrite (a key under {} \
                     was not written); replication goes on",
                    storage::probe::DIR
                );
                Ok(true)
            }
            probed => probed,
        },
        Err(e) => Err(e),
    };
    match checked {
        Ok(true) => Ok(()),
        Ok(false) => {
            tracing::warn!(
                storage = %storage.describe(),
                "this store overwrote an object written with If-None-Match: *, so a second \
                 walsync writing the same prefix cannot be detected here: keep to one writer \
                 per database (docs/operations.md, \"Stores\")"
            );
            Ok(())
        }
        Err(e) if e.is_lasting() && !keep_retrying => bail!(
            "storage {} cannot be used: {e}. Fix the bucket, credentials or permissions, \
             or pass --keep-retrying ([watch] keep_retrying = true) to start anyway and retry",
            storage.describe()
        ),
        Err(e) => {
            tracing::warn!(
                storage = %storage.describe(),
                error = %e,
                "storage failed the start-up check; replication retries until it answers"
            );
            Ok(())
        }
    }
}

/// The `[watch]` settings that reach the running `watch` of `path`. While
/// the file holds an edit that watch refused, it runs the last file it
/// accepted and still answers: then the `[watch]` section alone is read,
/// with a warning (a durability barrier must not fail because someone is
/// editing the file).
fn running_watch_settings(path: &Path, uses: config::Uses) -> Result<WatchSettings> {
    match Config::load_for(path, uses) {
        Ok(config) => Ok(config.watch),
        Err(refused) => match Config::watch_section_of(path) {
            Ok(watch) => {
                eprintln!(
                    "warning: {refused}; reaching the running walsync through the file's \
                     [watch] section alone"
                );
                Ok(watch)
            }
            // Not even TOML: the running watch kept its set, and its
            // socket is most likely the one named after this file.
            Err(_) if uses == config::Uses::CONTROL_SOCKET && path.is_file() => {
                eprintln!(
                    "warning: {refused}; trying the control socket named after the file \
                     (one set in its [watch] section cannot be read now)"
                );
                Ok(WatchSettings::default())
            }
            Err(_) => Err(refused.into()),
        },
    }
}

/// The configuration a command that needs one reads: `--config`, else the
/// one [`config::locate`] finds.
fn required_config(explicit: Option<PathBuf>) -> Result<PathBuf> {
    match explicit.or_else(config::locate) {
        Some(path) => Ok(path),
        None => bail!(
            "no configuration: give --config FILE ({})",
            config::where_looked()
        ),
    }
}

/// The configuration a command that can also work from `--storage` reads:
/// `--config`, else (without --storage) the one [`config::locate`] finds.
fn reading_config(
    explicit: Option<&PathBuf>,
    storage: &StorageArgs,
    uses: config::Uses,
) -> Result<Option<Config>> {
    let path = match explicit {
        Some(path) => Some(path.clone()),
        None if storage.storage.is_none() => config::locate(),
        None => None,
    };
    path.map(|p| load_config_for(&p, uses)).transpose()
}

/// `--from NAME` names a `[[mirrors]]` entry, so it needs a configuration.
fn no_mirrors_without_config(from: Option<&str>) -> Result<()> {
    if let Some(name) = from {
        bail!(
            "--from {name} names a [[mirrors]] entry of walsync.toml, and no configuration was \
             found: give --config FILE ({})",
            config::where_looked()
        );
    }
    Ok(())
}

/// The storage a reading command uses without a configuration: `--storage`,
/// else the default replica directory, which must exist (a missing one is
/// said, with where it was looked for, instead of listing nothing).
async fn open_default_replica(args: &StorageArgs, default: &Path) -> Result<Arc<dyn Storage>> {
    if args.storage.is_none() && !default.is_dir() {
        bail!(
            "no storage given and no replica at {}: give --storage URL or --config FILE ({}); \
             `watch DB` keeps its replica beside each database, e.g. --storage data/{}",
            default.display(),
            config::where_looked(),
            config::DEFAULT_REPLICA_DIR
        );
    }
    open_storage(args, default).await
}

/// A database named on the command line must be a file: say what is wrong
/// with it (missing, a directory, a FIFO) before anything starts.
fn check_database_path(path: &Path) -> Result<()> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "database {} does not exist (create it first, or fix the path)",
            path.display()
        ),
        Err(e) => bail!("database {}: {e}", path.display()),
    };
    match crate::db::not_a_file(&meta) {
        Some(what) => bail!("database {} is {what}, not a file", path.display()),
        None => check_sqlite_header(path),
    }
}

/// A file that is not SQLite (or cannot be read) fails here, once and
/// clearly, instead of being retried. An empty file is a new database.
/// (Its descriptor is closed before any connection to it exists in this
/// process, so no SQLite lock can go with it: DESIGN.md 2a.)
fn check_sqlite_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut head = Vec::with_capacity(16);
    std::fs::File::open(path)
        .and_then(|f| f.take(16).read_to_end(&mut head))
        .with_context(|| format!("database {} cannot be read", path.display()))?;
    if !head.is_empty() && head != b"SQLite format 3\0" {
        bail!(
            "database {} is not a SQLite database (it does not start with the SQLite header)",
            path.display()
        );
    }
    Ok(())
}

/// A path as the filesystem sees it: the real directory (links resolved,
/// where it exists) joined with the file name, so that two spellings of one
/// file compare equal.
fn same_file_key(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => dir
            .canonicalize()
            .map_or_else(|_| absolute.clone(), |dir| dir.join(name)),
        _ => absolute,
    }
}
