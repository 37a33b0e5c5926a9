//! The commands: wires validated arguments to the modules that do the work.

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
use crate::replica::{Replica, SyncOptions};
use crate::replicator::{self, DbSpec, Plan};
use crate::restore::{self, RestoreOptions, Target, format_ms};
use crate::retention::Retention;
use crate::status::{self, Board};
use crate::storage::{self, S3Options, Storage};
use crate::{chain, compact, config, control, explain, follow, http, sidecar, verify};
use crate::{say, sayln};

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
    match cli.command {
        Command::Watch(args) => watch(args, shutdown).await,
        Command::Restore(args) if args.follow => follow(args, shutdown).await.map(|()| 0),
        Command::Restore(args) => restore(args).await.map(|()| 0),
        Command::RestoreAll(args) => restore_all(args).await.map(|()| 0),
        Command::List(args) => list(args).await.map(|()| 0),
        Command::Snapshot(args) => snapshot(args).await.map(|()| 0),
        Command::Init(args) => init(&args).map(|()| 0),
        Command::Status(args) => status(&args).await.map(|()| 0),
        Command::Sync(args) => sync(&args).await.map(|()| 0),
        Command::Verify(args) => verify(&args).await.map(|()| 0),
        Command::Compact(args) => compact(&args).await.map(|()| 0),
        Command::Explain(args) => {
            let path = required_config(args.config)?;
            say!("{}", explain::explain(&load_config(&path)?)?);
            Ok(0)
        }
    }
}

async fn compact(args: &CompactArgs) -> Result<()> {
    if let Some(prefix) = &args.prefix {
        config::validate_prefix(prefix)?;
    }
    let config = reading_config(
        args.config.as_ref(),
        &args.storage,
        config::Uses::STORAGE_AND_KEYS,
    )?;
    let storage = match &config {
        Some(config) => open_config_storage(&config.storage).await?,
        None => open_default_replica(&args.storage, Path::new(config::DEFAULT_REPLICA_DIR)).await?,
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

async fn verify(args: &VerifyArgs) -> Result<()> {
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

/// Asks the running `watch` to ship now, and with --wait, for the outcome.
async fn sync(args: &SyncArgs) -> Result<()> {
    let path = required_config(args.config.clone())?;
    let config = load_config_for(&path, config::Uses::CONTROL_SOCKET)?;
    let socket = config
        .watch
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
    for line in &answer {
        if let Some(rest) = line.strip_prefix("error ") {
            eprintln!("error: {rest}");
            failed.push(rest.to_string());
        } else if let Some(rest) = line.strip_prefix("ok ") {
            let mut words = rest.splitn(2, ' ');
            let (prefix, seq) = (words.next().unwrap_or(""), words.next().unwrap_or("-"));
            sayln!("{prefix}: in storage up to sequence {seq}");
            synced += 1;
        } else if let Some(n) = line.strip_prefix("accepted ") {
            expected = n.parse().unwrap_or(0);
            if !args.wait {
                sayln!("sync requested for {n} database(s)");
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

/// Asks the running process's listener for its status.
async fn status(args: &StatusArgs) -> Result<()> {
    let addr = match args.listen {
        Some(addr) => addr,
        None => {
            let path = required_config(args.config.clone())
                .context("give --listen ADDR, or the walsync.toml whose [watch] listen to ask")?;
            load_config_for(&path, config::Uses::LISTEN)?.watch.listen.with_context(|| {
                format!(
                    "{}: [watch] listen is not set, so the running walsync has no listener to ask",
                    path.display()
                )
            })?
        }
    };
    let addr = crate::listen::reachable(addr);
    let body = http_get(addr, "/status.json")
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

/// A GET of our own listener: HTTP/1.0, so the body ends with the connection.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("{}", head.lines().next().unwrap_or(head));
    }
    Ok(body.to_string())
}

/// The starter `walsync init` writes; a test checks that it loads.
pub const STARTER: &str = include_str!("starter.toml");

fn init(args: &InitArgs) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&args.output)
        .with_context(|| {
            format!(
                "creating {} (an existing file is never replaced)",
                args.output.display()
            )
        })?;
    file.write_all(STARTER.as_bytes())
        .with_context(|| format!("writing {}", args.output.display()))?;
    sayln!(
        "wrote {}; edit it, check it with `walsync explain --config {0}`, run it with `walsync watch --config {0}`",
        args.output.display()
    );
    Ok(())
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

fn sync_options(args: &WatchArgs) -> Result<SyncOptions> {
    Ok(SyncOptions {
        sync_interval: args.sync_interval,
        snapshot_interval: args.snapshot_interval,
        checkpoint_pages: args.checkpoint_pages,
        checkpoint_interval: args.checkpoint_interval,
        truncate_pages: args.truncate_pages,
        retention: Retention {
            age: args.retention,
            snapshots: args.retention_snapshots,
        },
        encryption: cli_keys(args.storage.encryption_key_file.as_deref())?,
        compaction: args.compaction.clone(),
        exact_window: args.exact_window.0,
    })
}

async fn watch(args: WatchArgs, shutdown: CancellationToken) -> Result<u8> {
    replicator::raise_open_file_limit();
    let app = args.exec.as_deref().map(sidecar::parse).transpose()?;
    let plan = plan(&args).await?;
    let board = Board::default();
    let listening = CancellationToken::new();
    if let Some(addr) = args.listen.or(plan.watch().listen) {
        let listener = http::bind(addr).await?;
        tokio::spawn(http::serve(listener, board.clone(), listening.clone()));
    }
    let _stop_listening = listening.drop_guard();
    // `walsync sync` finds the process by its configuration file.
    let control = plan.config_file().map(|path| {
        plan.watch()
            .control_socket
            .clone()
            .unwrap_or_else(|| control::default_socket(&path))
    });
    match app {
        None => {
            let hooks = replicator::Hooks {
                first_pass: None,
                board,
                control,
            };
            clean(replicator::run(plan, shutdown, hooks).await?)?;
            Ok(0)
        }
        Some(argv) => watch_with_app(plan, &argv, board, control, shutdown).await,
    }
}

/// Sidecar mode: replication runs on its own token, so that a signal reaches
/// the app first and replication ends only after the app's last write.
async fn watch_with_app(
    plan: Plan,
    argv: &[String],
    board: Board,
    control: Option<PathBuf>,
    shutdown: CancellationToken,
) -> Result<u8> {
    let forwarder = sidecar::Forwarder::install()?;
    let (first_pass, synced_once) = tokio::sync::oneshot::channel();
    let stop = CancellationToken::new();
    let hooks = replicator::Hooks {
        first_pass: Some(first_pass),
        board,
        control,
    };
    let mut replication = tokio::spawn(replicator::run(plan, stop.clone(), hooks));
    tokio::select! {
        _ = synced_once => {}
        ended = &mut replication => {
            ended??;
            bail!("replication ended before the app was started");
        }
        _ = shutdown.cancelled() => {
            info!("signal before the app was started: not starting it");
            stop.cancel();
            return clean(replication.await??).map(|()| 0);
        }
    }
    if shutdown.is_cancelled() {
        info!("signal before the app was started: not starting it");
        stop.cancel();
        return clean(replication.await??).map(|()| 0);
    }
    let app = sidecar::run(argv, forwarder).await;
    info!("final sync after the app");
    stop.cancel();
    let outcome = replication.await??;
    let status = app?;
    // The app's own failure is its status; a clean app whose last writes
    // were not all shipped is a failure of walsync's.
    if status == 0 {
        clean(outcome)?;
    } else if !outcome.is_clean() {
        tracing::error!("{outcome}");
    }
    Ok(status)
}

/// An error naming what was left undone, unless nothing was.
fn clean(outcome: replicator::Outcome) -> Result<()> {
    if !outcome.is_clean() {
        bail!("{outcome}");
    }
    Ok(())
}

async fn plan(args: &WatchArgs) -> Result<Plan> {
    let config_path = match &args.config {
        Some(path) => Some(path.clone()),
        None if args.databases.is_empty() => Some(config::locate().with_context(|| {
            format!(
                "nothing to watch: name the database files, or give --config FILE ({})",
                config::where_looked()
            )
        })?),
        None => None,
    };
    if let Some(path) = &config_path {
        let config = load_config(path)?;
        // A file the configuration names by path is checked like one named on
        // the command line; one a pattern finds later is stopped on its own.
        for entry in &config.entries {
            if let config::Source::File(db) = &entry.source
                && db.symlink_metadata().is_ok()
            {
                check_database_path(db)?;
            }
        }
        let storage = open_config_storage(&config.storage).await?;
        check_storage(
            storage.as_ref(),
            args.keep_retrying || config.watch.keep_retrying,
        )
        .await?;
        return Ok(Plan::Config { config, storage });
    }
    let dbs = config::databases(&args.databases, args.prefix.as_deref())?;
    for (path, _) in &dbs {
        check_database_path(path)?;
    }
    // One storage client for all databases; without --storage, one local
    // directory beside each database directory.
    let configured = match &args.storage.storage {
        Some(_) => Some(open_storage(&args.storage, Path::new(".")).await?),
        None => None,
    };
    if let Some(storage) = &configured {
        check_storage(storage.as_ref(), args.keep_retrying).await?;
    }
    let sync = sync_options(args)?;
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
    Ok(Plan::Fixed { specs, watch })
}

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
        Some(config) => open_config_storage(&config.storage).await?,
        None => {
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

async fn follow(args: RestoreArgs, shutdown: CancellationToken) -> Result<()> {
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

async fn restore(args: RestoreArgs) -> Result<()> {
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
    let report = match restore::restore(storage.as_ref(), &opts).await {
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

async fn restore_all(args: RestoreAllArgs) -> Result<()> {
    let config_path = required_config(args.config.clone())?;
    let config = load_config(&config_path)?;
    let storage = open_config_storage(&config.storage).await?;
    // Every database in storage, plus every configured one (which then fails
    // by name if storage has nothing for it, unless --if-replica-exists).
    let listed = chain::database_names(storage.as_ref())
        .await
        .with_context(|| format!("listing {}", storage.describe()))?;
    // A name from storage reaches a file name only if it is one walsync.toml
    // could hold; the others are named (escaped) and fail the run.
    let mut failed: Vec<String> = Vec::new();
    for (name, why) in &listed.refused {
        eprintln!("failed {name:?}: not a valid database name in storage (it {why}); not restored");
        failed.push(format!("{name:?}"));
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
            sayln!(
                "restore-all: nothing in {} yet; nothing to do",
                storage.describe()
            );
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
    for (prefix, why) in &skipped {
        sayln!("skipped {prefix}: {why}");
    }
    let outcomes = restore::restore_all(storage.clone(), jobs, args.parallelism).await;
    let mut restored = 0;
    let mut late = 0;
    for outcome in &outcomes {
        match &outcome.result {
            Ok(report) => {
                restored += 1;
                sayln!(
                    "restored {} to {} (sequence {}, {} pages, as of {})",
                    outcome.prefix,
                    outcome.output.display(),
                    report.seq,
                    report.db_pages,
                    format_ms(report.timestamp_ms)
                );
            }
            // Asked for a time before the database was first replicated:
            // there was nothing to restore, which is not a failure.
            Err(
                e @ restore::Error::BeforeEarliest {
                    not_yet_replicated: true,
                    ..
                },
            ) => {
                sayln!(
                    "skipped {}: not replicated yet at that time ({e})",
                    outcome.prefix
                );
                late += 1;
            }
            Err(e) => {
                eprintln!("failed {}: {e}", outcome.prefix);
                failed.push(outcome.prefix.clone());
            }
        }
    }
    sayln!(
        "restore-all: {restored} restored, {} skipped, {} failed",
        skipped.len() + late,
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

/// Listed once before anything starts, each storage shows whether it can
/// work at all: a bucket that does not exist or credentials the store
/// refuses fail `watch` now, in the store's own words, instead of being
/// retried forever. A fault that may pass (a timeout, a 503) is logged and
/// replication starts, retrying as always.
async fn check_storage(storage: &dyn Storage, keep_retrying: bool) -> Result<()> {
    /// A prefix no database is given: the listing is empty and cheap, yet
    /// needs the permission replication lists with (what it finds is unused).
    const NOTHING: &str = ".walsync-start-check/";
    match storage.list(NOTHING).await {
        Ok(_) => Ok(()),
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

async fn list(args: ListArgs) -> Result<()> {
    let storage = match reading_config(args.config.as_ref(), &args.storage, config::Uses::STORAGE)?
    {
        Some(config) => open_config_storage(&config.storage).await?,
        None => open_default_replica(&args.storage, Path::new(config::DEFAULT_REPLICA_DIR)).await?,
    };
    let mut under = String::new();
    if let Some(prefix) = &args.prefix {
        let name = prefix.strip_suffix('/').unwrap_or(prefix);
        config::validate_prefix(name)?;
        if !prefix.ends_with('/') {
            let (objects, runs) = chain::list_with_runs(storage.as_ref(), name)
                .await
                .with_context(|| format!("listing {name} in {}", storage.describe()))?;
            if !objects.is_empty() {
                return restore_points(storage.as_ref(), name, (objects, runs), args.all).await;
            }
        }
        under = format!("{name}/");
    }
    // Tips and counts only: the objects of a whole fleet's chains would not
    // fit a small machine's memory.
    let listed = crate::tips::list_tips_under(storage.as_ref(), &under)
        .await
        .with_context(|| format!("listing {under} in {}", storage.describe()))?;
    for (name, why) in &listed.refused {
        eprintln!("warning: ignoring {name:?} in storage: not a valid database name (it {why})");
    }
    let dbs = listed.found;
    if dbs.is_empty() {
        if !under.is_empty() {
            bail!(
                "no database {} (nor any below it) in {}",
                under.trim_end_matches('/'),
                storage.describe()
            );
        }
        sayln!("no databases in {}", storage.describe());
        return Ok(());
    }
    sayln!(
        "{:<32} {:>8} {:>10} {:>10} {:>14} {:>14}  LAST SYNC",
        "PREFIX",
        "OBJECTS",
        "HEAD SEQ",
        "SNAPSHOT",
        "STORED BYTES",
        "DB BYTES"
    );
    let mut attention = 0;
    for found in dbs {
        let prefix = found.name;
        // A chain the listing could not sum up (it forks) is listed whole,
        // to name its forks; its row then comes from that listing alone.
        let (objects, count, bytes) = match found.tips {
            Some(tips) => (tips, found.objects, found.bytes),
            None => {
                let all = chain::list(storage.as_ref(), &prefix)
                    .await
                    .with_context(|| format!("listing {prefix} in {}", storage.describe()))?;
                let (count, bytes) = (all.len() as u64, all.iter().map(|o| o.size).sum());
                (all, count, bytes)
            }
        };
        let Some(head) = objects.last() else { continue };
        let snapshot = objects
            .iter()
            .rev()
            .find(|o| o.kind == crate::segment::Kind::Snapshot)
            .map(|o| o.seq.to_string())
            .unwrap_or_else(|| "-".into());
        let (db_bytes, time) = match chain::read_header(storage.as_ref(), head).await {
            Ok(h) => (
                (u64::from(h.db_pages) * u64::from(h.page_size)).to_string(),
                format_ms(h.timestamp_ms),
            ),
            Err(e) => ("?".into(), format!("unreadable: {e}")),
        };
        sayln!(
            "{:<32} {:>8} {:>10} {:>10} {:>14} {:>14}  {}",
            prefix,
            count,
            head.seq,
            snapshot,
            bytes,
            db_bytes,
            time
        );
        if let Some(forked) = chain::describe_forks(&objects) {
            sayln!("  needs attention: {forked}");
            attention += 1;
        }
    }
    if attention > 0 {
        eprintln!(
            "warning: {attention} database(s) need attention; `walsync verify --prefix NAME` \
             shows which branch restore follows"
        );
    }
    Ok(())
}

/// One database's restore points: each snapshot starts one, and every
/// object after it up to the head is a state `restore` can reach; where
/// objects older than the exact window were deleted, the ends of the runs
/// that stand for them.
async fn restore_points(
    storage: &dyn Storage,
    prefix: &str,
    (mut objects, runs): (Vec<chain::ObjectRef>, Vec<(u64, chain::ObjectRef)>),
    all: bool,
) -> Result<()> {
    chain::find_unmarked_start(storage, &mut objects)
        .await
        .with_context(|| format!("reading the first object of {prefix}"))?;
    let (Some(first), Some(head)) = (
        objects
            .iter()
            .find(|o| o.kind == crate::segment::Kind::Snapshot),
        objects.last(),
    ) else {
        bail!(
            "no restorable replica of {prefix} in {}",
            storage.describe()
        );
    };
    let header = |o| async move {
        chain::read_header(storage, o)
            .await
            .with_context(|| format!("reading {}", o.key))
    };
    let earliest = header(first).await?;
    let latest = header(head).await?;
    sayln!("{prefix} in {}", storage.describe());
    sayln!(
        "  earliest  sequence {:>10}  {}",
        first.seq,
        format_ms(earliest.timestamp_ms)
    );
    sayln!(
        "  latest    sequence {:>10}  {}",
        head.seq,
        format_ms(latest.timestamp_ms)
    );
    sayln!(
        "  {} objects and {} runs, {} bytes stored",
        objects.len(),
        runs.len(),
        objects
            .iter()
            .chain(runs.iter().map(|(_, r)| r))
            .map(|o| o.size)
            .sum::<u64>()
    );
    let points = chain::restore_points(&objects, &runs, first.seq);
    // The newest hole: before it, only run ends remain.
    let exact_from = points
        .windows(2)
        .rposition(|w| w[1].seq != w[0].seq + 1)
        .map(|i| {
            (
                points[i + 1],
                points[..=i + 1]
                    .windows(2)
                    .map(|w| w[1].seq - w[0].seq)
                    .max()
                    .unwrap_or(1),
            )
        });
    match exact_from {
        None => sayln!("  every sequence from the earliest to the latest can be restored exactly"),
        Some((from, apart)) => {
            let h = header(from).await?;
            sayln!(
                "  exact     sequence {:>10}  {}  (every sequence from here on)",
                from.seq,
                format_ms(h.timestamp_ms)
            );
            sayln!(
                "  before it, the ends of runs (up to {apart} sequences apart): older objects \
                 were deleted once the exact window passed"
            );
        }
    }
    if all {
        // One header read per point: what --all asks for, and only then.
        let restorable = points.iter().copied();
        sayln!("  every restore point (restore --txid SEQ or --timestamp TIME):");
        for object in restorable {
            let h = header(object).await?;
            sayln!(
                "    sequence {:>10}  {}  {:<8}  {} bytes",
                object.seq,
                format_ms(h.timestamp_ms),
                format!("{:?}", h.kind).to_lowercase(),
                object.size
            );
        }
        if let Some(forked) = chain::describe_forks(&objects) {
            sayln!("  needs attention: {forked}");
        }
        return Ok(());
    }
    sayln!("  snapshots (each starts a restorable run up to the next):");
    for snapshot in objects
        .iter()
        .filter(|o| o.kind == crate::segment::Kind::Snapshot)
    {
        let h = header(snapshot).await?;
        sayln!(
            "    sequence {:>10}  {}  {} bytes",
            snapshot.seq,
            format_ms(h.timestamp_ms),
            snapshot.size
        );
    }
    if let Some(forked) = chain::describe_forks(&objects) {
        sayln!("  needs attention: {forked}");
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn watch_args(extra: &[&str]) -> Result<WatchArgs, clap::Error> {
        let args = ["walsync", "watch", "app.db"].iter().chain(extra);
        match crate::cli::Cli::try_parse_from(args)?.command {
            crate::cli::Command::Watch(args) => Ok(args),
            other => panic!("not watch: {other:?}"),
        }
    }

    /// The command line and walsync.toml start from the same settings
    /// (written in three places: clap's defaults, SyncOptions::default,
    /// and the file's base).
    #[test]
    fn the_command_line_and_the_file_default_alike() {
        let from_cli = sync_options(&watch_args(&[]).unwrap()).unwrap();
        assert_eq!(from_cli, SyncOptions::default());
        let file = Config::parse(
            "[storage]\nurl = \"/r\"\n[[databases]]\npath = \"/a.db\"\n",
            Path::new("/etc/walsync.toml"),
        )
        .unwrap();
        assert_eq!(file.entries[0].sync, SyncOptions::default());
    }

    /// What the file refuses, the command line refuses too, naming the flag
    /// (it used to raise the pages to 1 and take a zero retention as none).
    #[test]
    fn the_command_line_refuses_what_the_file_refuses() {
        for (flag, value) in [
            ("--checkpoint-pages", "0"),
            ("--truncate-pages", "0"),
            ("--retention", "0s"),
        ] {
            let err = watch_args(&[flag, value]).unwrap_err().to_string();
            assert!(err.contains(flag), "{flag}: {err}");
        }
    }
}
