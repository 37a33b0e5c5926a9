//! Command-line arguments, as the user typed them. Opens no files, makes no requests.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::WatchSettings;
use crate::replica::SyncOptions;

const ABOUT: &str = "\
Continuously replicate SQLite databases (their WAL) to S3-compatible storage or a local directory.

walsync ships every committed transaction of each watched database as a verified,
hash-chained object, and can rebuild any database as of any shipped transaction.";

const STORAGE_HELP: &str = "\
Where replicas live: s3://BUCKET[/PREFIX], file:///PATH or a plain directory path. \
Default: a directory named walsync-replica beside each database (for restore: beside the output file)";

#[derive(Debug, Parser)]
#[command(name = "walsync", version, about = ABOUT, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replicate databases continuously until SIGINT/SIGTERM, then flush and exit.
    ///
    /// Each database is switched to WAL mode if needed. walsync holds a read
    /// transaction on it and runs its checkpoints itself, so that no committed
    /// transaction is checkpointed away before it is in storage. Leave
    /// checkpoints to it: the app's auto-checkpoint is harmless, but an app's
    /// own wal_checkpoint(FULL|RESTART|TRUNCATE) waits on that read
    /// transaction for up to its busy timeout, holding the app's writers.
    ///
    /// Exit status: 0 when every database was flushed at exit; 1 when walsync
    /// could not start, a database could not be flushed before exit, or the
    /// replication of one stopped for good (another writer on its prefix, a
    /// file that is not SQLite); 2 for a command-line mistake. With --exec,
    /// the app's status, or 1 if the app exited 0 but walsync failed.
    Watch(WatchArgs),
    /// Rebuild every database in storage, in place or into a directory, in parallel.
    ///
    /// Restores each database that walsync.toml names or that storage holds under
    /// its root, to its configured path (or DIR/PREFIX.db with --output-dir), each
    /// one atomically. A failure does not stop the others; the summary names them
    /// and the exit status is non-zero. A container start script is one line:
    /// `walsync restore-all -c walsync.toml --if-db-not-exists --if-replica-exists`.
    /// Each file gets its state record beside it (DB-walsync-state-ID), so the
    /// `watch` that follows ships nothing until the app writes.
    RestoreAll(RestoreAllArgs),
    /// Rebuild one database from storage into a new file.
    ///
    /// Every object is verified (content hash, chain link, sequence) before a page
    /// is written, and the state of the database after each object is checked
    /// against the digest its writer recorded; the file is written beside FILE,
    /// checked with PRAGMA integrity_check and then renamed into place, with its
    /// state record (FILE-walsync-state-ID) beside it. Where two writers forked the
    /// chain, the branch that reaches the newest state is restored and the
    /// objects left off are named.
    Restore(RestoreArgs),
    /// List the databases in storage with their chain heads.
    List(ListArgs),
    /// Take a snapshot of a database now and ship it (stop a `watch` of it
    /// first, or ask that one with `walsync sync`; refused while the watch
    /// has the database open).
    Snapshot(SnapshotArgs),
    /// Check a database's whole chain in storage (or every database's): every
    /// object's hash, key and link, no holes; restore the newest state to a
    /// scratch file and check it; with --db, compare it page by page with the
    /// live database. With --chain-only, a cheap scrub that reads only each
    /// object's header and trailer.
    Verify(VerifyArgs),
    /// Store runs: objects that each stand for a stretch of a database's
    /// chain (16, 256 and 4,096 objects), so that a restore reads a few dozen
    /// objects instead of every one since the snapshot. Each run is built
    /// from the objects it stands for, verified as a restore verifies them;
    /// nothing is deleted. Safe to run again and beside `watch`.
    Compact(CompactArgs),
    /// Write a commented starter walsync.toml (a local directory as the
    /// replica, one database) into the current directory.
    Init(InitArgs),
    /// Ask the running `watch` to ship every change now (over its control
    /// socket); with --wait, return once it is in storage.
    Sync(SyncArgs),
    /// Show what the running `watch` is doing: every database's state, lag,
    /// head and last error (from its listener, [watch] listen or --listen).
    ///
    /// Problems come first. It exits non-zero while a database is unhealthy
    /// (its sync fails, replication stopped, or changes wait too long). A
    /// degraded database, one that lost continuity 3 or more times within
    /// an hour and so keeps costing full snapshots, is shown as `degraded`
    /// with a warning but does not make it fail: its data is safe.
    Status(StatusArgs),
    /// Print the configuration as walsync resolves it: storage, settings, and
    /// the databases it finds now with their prefixes. Secrets are masked.
    Explain(ExplainArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Where to write it.
    #[arg(long, short = 'o', value_name = "FILE", default_value = "walsync.toml")]
    pub output: PathBuf,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The database's prefix in storage; default: every database there (the
    /// exit status is non-zero if any has a problem).
    #[arg(long)]
    pub prefix: Option<String>,
    /// The live database to compare with the newest state in storage.
    #[arg(
        long,
        value_name = "PATH",
        requires = "prefix",
        conflicts_with = "chain_only"
    )]
    pub db: Option<PathBuf>,
    /// Read only each object's header and trailer (two small ranged reads;
    /// the newest object whole) and check keys, links, runs and holes against
    /// what the trailers claim: no restore, no key needed. A nightly scrub; it
    /// cannot see a bit changed inside a body, which the full check finds.
    #[arg(long)]
    pub chain_only: bool,
    /// No progress bar (it is drawn only on a terminal anyway).
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Take the storage settings from this walsync.toml. Without it and
    /// without --storage: the file WALSYNC_CONFIG names, else ./walsync.toml
    /// if it exists, else the directory walsync-replica here.
    #[arg(long, short = 'c', value_name = "FILE", conflicts_with = "storage")]
    pub config: Option<PathBuf>,
    /// Read from the configuration's [[mirrors]] entry NAME instead of
    /// [storage]: every mirror holds the same chain, so it restores alike.
    #[arg(long, value_name = "NAME", conflicts_with = "storage")]
    pub from: Option<String>,
    #[command(flatten)]
    pub storage: StorageArgs,
}

#[derive(Debug, Args)]
pub struct CompactArgs {
    /// The database's prefix in storage; default: every database there.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Take the storage settings from this walsync.toml. Without it and
    /// without --storage: the file WALSYNC_CONFIG names, else ./walsync.toml
    /// if it exists, else the directory walsync-replica here.
    #[arg(long, short = 'c', value_name = "FILE", conflicts_with = "storage")]
    pub config: Option<PathBuf>,
    /// Read from the configuration's [[mirrors]] entry NAME instead of
    /// [storage]: every mirror holds the same chain, so it restores alike.
    #[arg(long, value_name = "NAME", conflicts_with = "storage")]
    pub from: Option<String>,
    #[command(flatten)]
    pub storage: StorageArgs,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// The walsync.toml of the running `watch`. Default: the file
    /// WALSYNC_CONFIG names, else ./walsync.toml.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Only this database (default: all of them).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Return only once every change committed before the request is in
    /// storage (and say up to which sequence); exit non-zero if one failed.
    /// With [[mirrors]], in at least one store (the others catch up).
    #[arg(long)]
    pub wait: bool,
    /// Give up after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The walsync.toml of the running process (its [watch] listen is
    /// asked). Default: the file WALSYNC_CONFIG names, else ./walsync.toml.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The running process's listener address (instead of --config):
    /// 127.0.0.1:9090, localhost:9090 or :9090.
    #[arg(long, value_name = "ADDR", conflicts_with = "config", value_parser = crate::listen::parse_addr)]
    pub listen: Option<std::net::SocketAddr>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The walsync.toml to explain. Default: the file WALSYNC_CONFIG names,
    /// else ./walsync.toml.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args, Clone)]
pub struct StorageArgs {
    #[arg(long, env = "WALSYNC_STORAGE", value_name = "URL", help = STORAGE_HELP)]
    pub storage: Option<String>,
    /// Endpoint of an S3-compatible store (MinIO, Tigris, R2, ...). The SDK's
    /// AWS_ENDPOINT_URL_S3 works too. Path-style addressing is used when an endpoint is set.
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// S3 region (default: from the AWS configuration, else us-east-1).
    #[arg(long)]
    pub region: Option<String>,
    /// Force path-style (true) or virtual-hosted-style (false) S3 addressing.
    #[arg(long, value_name = "BOOL")]
    pub path_style: Option<bool>,
    /// The key in this file (64 hex digits, e.g. from `openssl rand -hex 32`;
    /// WALSYNC_ENCRYPTION_KEY can hold it instead): `watch` and `snapshot`
    /// encrypt new objects with it (AES-256-GCM, so storage never sees a
    /// page); `restore`, `verify` and `compact` open encrypted objects (`list`
    /// reads no object body) with it, and with the configuration's keys when
    /// --config is given too.
    #[arg(long, value_name = "FILE")]
    pub encryption_key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The database files to replicate (or use --config).
    #[arg(value_name = "DB", conflicts_with = "config")]
    pub databases: Vec<PathBuf>,
    /// Read databases, storage and settings from this walsync.toml; edits to it
    /// are picked up while running (an invalid edit is refused and logged).
    /// Without it and without DB: the file WALSYNC_CONFIG names, else
    /// ./walsync.toml.
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        conflicts_with_all = [
            "storage", "endpoint", "region", "path_style", "prefix", "sync_interval",
            "snapshot_interval", "checkpoint_pages", "checkpoint_interval", "truncate_pages",
            "shutdown_timeout", "parallelism", "retention", "retention_snapshots",
            "encryption_key_file", "compaction", "exact_window"
        ]
    )]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Key prefix of the database in storage (default: its file name without
    /// extension). Only with a single database.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Least time between two syncs of a database; 0 ships as soon as the WAL changes.
    #[arg(long, default_value = shown(SyncOptions::default().sync_interval), value_parser = parse_duration)]
    pub sync_interval: Duration,
    /// Take a fresh snapshot when the newest one is older than this.
    #[arg(long, default_value = shown(SyncOptions::default().snapshot_interval), value_parser = parse_duration)]
    pub snapshot_interval: Duration,
    /// Run a PASSIVE checkpoint once this many shipped pages are in the WAL.
    #[arg(long, default_value_t = SyncOptions::default().checkpoint_pages, value_parser = clap::value_parser!(u32).range(1..))]
    pub checkpoint_pages: u32,
    /// Run a PASSIVE checkpoint once shipped pages have waited this long.
    #[arg(long, default_value = shown(SyncOptions::default().checkpoint_interval), value_parser = parse_duration)]
    pub checkpoint_interval: Duration,
    /// Run a TRUNCATE checkpoint (waits for readers, briefly blocks writers)
    /// once the WAL holds this many pages. A WAL that grows by half of this
    /// between syncs starts the next sync at once, whatever --sync-interval.
    #[arg(long, default_value_t = SyncOptions::default().truncate_pages, value_parser = clap::value_parser!(u32).range(1..))]
    pub truncate_pages: u32,
    /// After each snapshot, delete objects no restore point of this last
    /// period needs (e.g. 72h). Default: keep every snapshot (--exact-window
    /// decides what goes of the objects runs stand for).
    #[arg(long, value_name = "DURATION", value_parser = parse_retention)]
    pub retention: Option<Duration>,
    /// After each snapshot, delete objects older than the Nth-newest snapshot.
    /// With --retention too, an object goes only when both allow it.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub retention_snapshots: Option<u32>,
    /// Store runs of this many objects as the chain grows (each a multiple of
    /// the one before), so a restore to the head reads a few dozen objects
    /// whatever the age of the snapshot; "off" stores none.
    #[arg(long, value_name = "N,N,..", default_value = shown_levels(&SyncOptions::default().compaction), value_parser = parse_levels)]
    pub compaction: std::sync::Arc<[u64]>,
    /// Keep every transaction of this last period restorable exactly (by
    /// --txid or --timestamp); objects older than this that a run stands for
    /// are deleted, so older points restore at the smallest run's
    /// granularity and a restore lists and reads little. "off" keeps them.
    #[arg(long, value_name = "DURATION", default_value = shown_window(SyncOptions::default().exact_window), value_parser = parse_window)]
    pub exact_window: Window,
    /// Time allowed for the final sync after SIGINT/SIGTERM.
    #[arg(long, default_value = shown(WatchSettings::default().shutdown_timeout), value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Databases synced at the same time.
    #[arg(long, default_value_t = WatchSettings::default().parallelism)]
    pub parallelism: usize,
    /// Serve /metrics (Prometheus), /health, /status.json and a status page
    /// on this address: 127.0.0.1:9090, localhost:9090, or :9090 for every
    /// interface (overrides [watch] listen).
    #[arg(long, value_name = "ADDR", value_parser = crate::listen::parse_addr)]
    pub listen: Option<std::net::SocketAddr>,
    /// Start even when storage refuses the start-up check for good (no such
    /// bucket, credentials or permissions refused) and keep retrying, for a
    /// bucket or credentials that appear later. Without it such a refusal
    /// fails `watch` at once. Same as [watch] keep_retrying = true.
    #[arg(long)]
    pub keep_retrying: bool,
    /// Sidecar mode: run this command (split like a shell would, without
    /// expansion) as a child once every database has been synced once; pass
    /// SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 on to it; when it exits,
    /// ship what it wrote last and exit with its status.
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Restore this database in place: its prefix comes from the
    /// configuration (path, glob or dir entry), or without one is its file
    /// name, and its replica the walsync-replica directory beside it, as
    /// `watch DB` made it. Instead of --prefix and -o.
    #[arg(value_name = "DB", conflicts_with_all = ["prefix", "output"])]
    pub database: Option<PathBuf>,
    /// The database's prefix in storage (see `walsync list`).
    #[arg(long, required_unless_present = "database")]
    pub prefix: Option<String>,
    /// The file to create.
    #[arg(
        short = 'o',
        long = "output",
        value_name = "FILE",
        required_unless_present = "database"
    )]
    pub output: Option<PathBuf>,
    /// Do nothing (and succeed) when the file to create exists: restore only
    /// what the disk lost, in a start script.
    #[arg(long, conflicts_with = "force")]
    pub if_db_not_exists: bool,
    /// Succeed without restoring when storage holds nothing for the database
    /// yet (a first deployment).
    #[arg(long)]
    pub if_replica_exists: bool,
    /// Restore the state as of this sequence number (decimal, or hex with 0x);
    /// default: the newest.
    #[arg(long, value_name = "SEQ", value_parser = parse_seq)]
    pub txid: Option<u64>,
    /// Restore the newest state at or before this time (RFC 3339, e.g.
    /// 2026-11-21T09:30:00Z or 2026-11-21T10:30:00+01:00), by the time walsync
    /// recorded in each object when it read the transaction from the WAL, to
    /// the millisecond (a point recorded in the millisecond asked for is included).
    #[arg(long, value_name = "TIME", value_parser = parse_timestamp, conflicts_with = "txid")]
    pub timestamp: Option<u64>,
    /// Print the objects and bytes the restore would download, and the state
    /// it would reach, without downloading or writing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Replace FILE if it exists (its -wal is folded in first, then it and
    /// -shm are removed). Refused while an app has FILE open (in WAL mode).
    #[arg(long)]
    pub force: bool,
    /// Keep FILE up to date until SIGINT/SIGTERM: restore the newest state
    /// (waiting for storage to have one), then apply each new object as it
    /// appears, each in one SQLite transaction, so readers of FILE always see
    /// a whole committed state. The position is kept in FILE.walsync-follow;
    /// started again, it goes on from there. Readers must only read FILE.
    #[arg(long, conflicts_with_all = ["txid", "timestamp", "dry_run"])]
    pub follow: bool,
    /// Read PREFIX as a Litestream 0.5 replica (the path of its replica URL:
    /// `s3://bucket/backups/app.db` is --storage s3://bucket/backups --prefix
    /// app.db; a file replica's directory likewise) and restore from its LTX
    /// files, each file's checksum checked. --txid names a Litestream
    /// transaction (its files' names give them in hex: 0x1d); --timestamp
    /// goes by when Litestream wrote each file. Then `watch` the restored
    /// file to start walsync's own chain from it.
    #[arg(long, conflicts_with_all = ["follow", "dry_run"])]
    pub litestream: bool,
    /// No progress bar (it is drawn only on a terminal anyway).
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// With --follow: time between two looks at storage once caught up.
    #[arg(long, default_value = "1s", value_parser = parse_duration, requires = "follow")]
    pub interval: Duration,
    /// Objects downloaded at the same time; each is still checked against
    /// the one before it and applied in order. (From S3, an object of 32 MiB
    /// or more whose stream is slow also comes in parts, four at once.)
    #[arg(
        long,
        value_name = "N",
        default_value_t = crate::restore::FETCH_PARALLELISM,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256)
    )]
    pub parallelism: usize,
    /// Take the storage settings from this walsync.toml. Without it and
    /// without --storage: the file WALSYNC_CONFIG names, else ./walsync.toml
    /// if it exists, else the directory walsync-replica beside the output file.
    #[arg(long, short = 'c', value_name = "FILE", conflicts_with = "storage")]
    pub config: Option<PathBuf>,
    /// Read from the configuration's [[mirrors]] entry NAME instead of
    /// [storage]: every mirror holds the same chain, so it restores alike.
    #[arg(long, value_name = "NAME", conflicts_with = "storage")]
    pub from: Option<String>,
    #[command(flatten)]
    pub storage: StorageArgs,
}

#[derive(Debug, Args)]
pub struct RestoreAllArgs {
    /// The walsync.toml whose storage (and databases) to restore. Default:
    /// the file WALSYNC_CONFIG names, else ./walsync.toml.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Restore from the configuration's [[mirrors]] entry NAME instead of
    /// [storage] (each mirror holds the same chains).
    #[arg(long, value_name = "NAME")]
    pub from: Option<String>,
    /// Where to write the databases, as DIR/PREFIX.db. Without it each
    /// database is restored in place, at the path walsync.toml gives it.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Databases restored at the same time.
    #[arg(long, default_value_t = 4)]
    pub parallelism: usize,
    /// Replace files that exist (each refused while an app has it open in WAL mode).
    #[arg(long, conflicts_with = "if_db_not_exists")]
    pub force: bool,
    /// Skip databases whose output file exists (for start-up scripts: restore
    /// only what the disk lost).
    #[arg(long)]
    pub if_db_not_exists: bool,
    /// Succeed when storage holds nothing yet (a first deployment); configured
    /// databases missing from storage are skipped instead of failing.
    #[arg(long)]
    pub if_replica_exists: bool,
    /// Restore every database as of this time (RFC 3339); see `restore --timestamp`.
    #[arg(long, value_name = "TIME", value_parser = parse_timestamp)]
    pub timestamp: Option<u64>,
    /// No progress bar (it is drawn only on a terminal anyway).
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Print one JSON summary on stdout instead of a line per database:
    /// what was restored (prefix, file, sequence, objects, bytes, pages,
    /// page_size, as_of),
    /// skipped and failed (with why), and the totals. Failures still exit
    /// non-zero.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Show one database's restore points (its snapshots, and the earliest
    /// and latest state it can be restored to) instead of every database.
    /// Ending in `/` (`tenants/`), or naming no database but some below it:
    /// the databases below it.
    #[arg(long)]
    pub prefix: Option<String>,
    /// With --prefix NAME: every state it can be restored to (one per
    /// object), with its sequence, time and size, not only the snapshots.
    #[arg(long, requires = "prefix")]
    pub all: bool,
    /// Take the storage settings from this walsync.toml. Without it and
    /// without --storage: the file WALSYNC_CONFIG names, else ./walsync.toml
    /// if it exists, else the directory walsync-replica here.
    #[arg(long, short = 'c', value_name = "FILE", conflicts_with = "storage")]
    pub config: Option<PathBuf>,
    /// Read from the configuration's [[mirrors]] entry NAME instead of
    /// [storage]: every mirror holds the same chain, so it restores alike.
    #[arg(long, value_name = "NAME", conflicts_with = "storage")]
    pub from: Option<String>,
    #[command(flatten)]
    pub storage: StorageArgs,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The database file.
    #[arg(value_name = "DB")]
    pub database: PathBuf,
    /// Key prefix in storage (default: the file name without extension).
    #[arg(long)]
    pub prefix: Option<String>,
    #[command(flatten)]
    pub storage: StorageArgs,
}

/// Compaction levels: `16,256,4096`, or `off` for none.
pub fn parse_levels(s: &str) -> Result<std::sync::Arc<[u64]>, String> {
    if s.trim() == "off" {
        return Ok(std::sync::Arc::from([]));
    }
    let levels = s
        .split(',')
        .map(|n| {
            n.trim()
                .parse::<u64>()
                .map_err(|_| format!("{n:?} is not a number of objects"))
        })
        .collect::<Result<Vec<u64>, String>>()?;
    match crate::compact::levels_problem(&levels) {
        Some(problem) => Err(problem),
        None => Ok(levels.into()),
    }
}

/// `--exact-window`: a duration, or `off` (keep every object a run stands for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window(pub Option<Duration>);

pub fn parse_window(s: &str) -> Result<Window, String> {
    if s.trim() == "off" {
        return Ok(Window(None));
    }
    parse_duration(s).map(|d| Window(Some(d)))
}

/// A retention period: a duration, but not zero, which would keep nothing
/// (the configuration file refuses it the same way).
pub fn parse_retention(s: &str) -> Result<Duration, String> {
    let age = parse_duration(s)?;
    if age.is_zero() {
        return Err("0 would keep nothing; give a duration, or leave retention out".into());
    }
    Ok(age)
}

// The defaults shown in --help are the settings' own (`SyncOptions` and
// `WatchSettings`, which walsync.toml starts from too), written as a user
// would type them.

/// `24h`, `1m`, `30s`, `250ms`: the largest whole unit.
fn shown(d: Duration) -> String {
    let (secs, ms) = (d.as_secs(), d.subsec_millis());
    match secs {
        _ if ms != 0 || secs == 0 => format!("{}ms", d.as_millis()),
        _ if secs % 3600 == 0 => format!("{}h", secs / 3600),
        _ if secs % 60 == 0 => format!("{}m", secs / 60),
        _ => format!("{secs}s"),
    }
}

fn shown_levels(levels: &[u64]) -> String {
    match levels {
        [] => "off".into(),
        _ => levels
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(","),
    }
}

fn shown_window(window: Option<Duration>) -> String {
    window.map_or_else(|| "off".into(), shown)
}

/// `1s`, `250ms`, `24h`, or a plain number of seconds (`0`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 0, 500ms, 1s, 24h)"))
}

/// An RFC 3339 time (`Z` or a `±HH:MM` offset; fractional seconds allowed)
/// as milliseconds since the Unix epoch.
pub fn parse_timestamp(s: &str) -> Result<u64, String> {
    let bad =
        |why: &str| format!("{s:?} is not an RFC 3339 time ({why}; example: 2026-11-21T09:30:00Z)");
    let (local, offset_secs) = match s.strip_suffix(['Z', 'z']) {
        Some(local) => (local, 0i64),
        None => {
            let split = s.len().checked_sub(6).filter(|&i| s.is_char_boundary(i));
            let Some((local, offset)) = split.map(|i| s.split_at(i)) else {
                return Err(bad("no time zone"));
            };
            let sign = match offset.as_bytes().first() {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => return Err(bad("no time zone: end it with Z or an offset like +01:00")),
            };
            let (h, m) = offset[1..]
                .split_once(':')
                .and_then(|(h, m)| Some((h.parse::<i64>().ok()?, m.parse::<i64>().ok()?)))
                .ok_or_else(|| bad("bad offset"))?;
            (local, sign * (h * 3600 + m * 60))
        }
    };
    let utc = humantime::parse_rfc3339_weak(local).map_err(|e| bad(&e.to_string()))?;
    let ms = utc
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| bad("before 1970"))?
        .as_millis() as i64
        - offset_secs * 1000;
    u64::try_from(ms).map_err(|_| bad("before 1970"))
}

/// A sequence number in decimal or `0x`-prefixed hex (as in object keys).
pub fn parse_seq(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse::<u64>(),
    };
    parsed.map_err(|e| format!("{s:?} is not a sequence number: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_compaction_levels() {
        assert_eq!(&*parse_levels("16,256,4096").unwrap(), &[16, 256, 4096]);
        assert_eq!(&*parse_levels("10, 100").unwrap(), &[10, 100]);
        assert!(parse_levels("off").unwrap().is_empty());
        assert!(parse_levels("16,100").unwrap_err().contains("100"));
        assert!(parse_levels("16,x").unwrap_err().contains("\"x\""));
    }

    /// The defaults --help shows are typed back as the settings they came
    /// from.
    #[test]
    fn shown_defaults_parse_back() {
        for secs in [0, 1, 30, 60, 90, 3600, 86_400] {
            let d = Duration::from_secs(secs);
            assert_eq!(parse_duration(&shown(d)), Ok(d), "{secs} s");
        }
        let d = Duration::from_millis(250);
        assert_eq!(parse_duration(&shown(d)), Ok(d));
        assert_eq!(shown(Duration::from_secs(86_400)), "24h");
        let sync = SyncOptions::default();
        assert_eq!(
            parse_levels(&shown_levels(&sync.compaction)),
            Ok(sync.compaction.clone())
        );
        assert_eq!(
            parse_levels(&shown_levels(&[])),
            Ok(std::sync::Arc::from(Vec::new()))
        );
        assert_eq!(
            parse_window(&shown_window(sync.exact_window)),
            Ok(Window(sync.exact_window))
        );
        assert_eq!(parse_window(&shown_window(None)), Ok(Window(None)));
    }

    #[test]
    fn parses_durations_and_sequences() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_seq("17").unwrap(), 17);
        assert_eq!(parse_seq("0x11").unwrap(), 17);
        assert!(parse_seq("x").is_err());
    }

    #[test]
    fn parses_rfc3339_times_with_offsets() {
        let utc = parse_timestamp("2026-11-21T09:30:00Z").unwrap();
        assert_eq!(utc, 1_795_253_400_000);
        assert_eq!(parse_timestamp("2026-11-21T10:30:00+01:00").unwrap(), utc);
        assert_eq!(parse_timestamp("2026-11-21T04:00:00-05:30").unwrap(), utc);
        assert_eq!(
            parse_timestamp("2026-11-21T09:30:00.250Z").unwrap(),
            utc + 250
        );
        assert!(parse_timestamp("2026-11-21T09:30:00").is_err());
        assert!(parse_timestamp("yesterday").is_err());
    }
}
