//! Turns what the user wrote (command line or `walsync.toml`) into validated
//! settings, naming the file and key that is wrong. Starts nothing, prints no
//! secrets.
//!
//! A configuration has one storage, sync defaults, watch settings, and
//! database entries. An entry is a single file, a glob (`/data/t/*.db`), or a
//! directory with a pattern; globs and directories name their databases with a
//! prefix template (`tenants/{name}`, `{relpath}`). [`Config::discover`] turns
//! entries into the current set of databases and refuses duplicates.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::encryption::{Key, Keys};
use crate::replica::SyncOptions;
use crate::storage::S3Options;

/// The directory used as storage when none is configured: beside the database.
pub const DEFAULT_REPLICA_DIR: &str = "walsync-replica";
/// Names the configuration of every command given none.
pub const CONFIG_ENV: &str = "WALSYNC_CONFIG";
/// The configuration a command reads in its directory when given none.
pub const DEFAULT_CONFIG_FILE: &str = "walsync.toml";

/// The configuration a command given none reads: the file `WALSYNC_CONFIG`
/// names, else `./walsync.toml` if it exists.
pub fn locate() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let here = Path::new(DEFAULT_CONFIG_FILE);
    here.is_file().then(|| here.to_path_buf())
}

/// What [`locate`] looked for, for an error that found nothing.
pub fn where_looked() -> String {
    format!("{CONFIG_ENV} is not set and there is no ./{DEFAULT_CONFIG_FILE}")
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    #[error("prefix {prefix:?}: {reason}")]
    BadPrefix {
        prefix: String,
        reason: &'static str,
    },
    #[error("{path}: cannot derive a prefix from this file name; set a prefix")]
    NoPrefix { path: PathBuf },
    #[error("--prefix can only be used with a single database (got {0})")]
    PrefixWithMany(usize),
    #[error("databases {a} and {b} would share the prefix {prefix:?}")]
    DuplicatePrefix {
        prefix: String,
        a: PathBuf,
        b: PathBuf,
    },
    #[error("database {0} is listed twice")]
    DuplicatePath(PathBuf),
    #[error("{file}: {message}")]
    Invalid { file: PathBuf, message: String },
    #[error("{file}: {key}: environment variable {var} is not set")]
    Unset {
        file: PathBuf,
        key: String,
        var: String,
    },
    #[error("{file}: cannot read it: {message}")]
    Read { file: PathBuf, message: String },
    #[error("cannot scan {path} for databases: {message}")]
    Scan { path: PathBuf, message: String },
}

/// The parts of walsync.toml a command reads. A `${VAR}` left unset
/// elsewhere in the file is no error for it: `list` needs no encryption key,
/// `status` no credentials. Every other mistake is an error for every command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uses {
    pub storage: bool,
    pub keys: bool,
    pub databases: bool,
    pub control_socket: bool,
}

impl Uses {
    /// `watch`, `restore-all`, `explain`.
    pub const ALL: Uses = Uses {
        storage: true,
        keys: true,
        databases: true,
        control_socket: true,
    };
    /// `list`: where storage is.
    pub const STORAGE: Uses = Uses {
        storage: true,
        keys: false,
        databases: false,
        control_socket: false,
    };
    /// `restore`, `verify`: storage and the keys that open it.
    pub const STORAGE_AND_KEYS: Uses = Uses {
        keys: true,
        ..Uses::STORAGE
    };
    /// `status`: only `[watch] listen`, which takes no variables.
    pub const LISTEN: Uses = Uses {
        storage: false,
        ..Uses::STORAGE
    };
    /// `sync`: the control socket.
    pub const CONTROL_SOCKET: Uses = Uses {
        control_socket: true,
        ..Uses::LISTEN
    };
}

/// Validated settings from `walsync.toml`.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub source: PathBuf,
    pub storage: StorageConfig,
    pub watch: WatchSettings,
    pub entries: Vec<Entry>,
    /// Every encryption key the file names: restore opens any object with them.
    pub keys: Option<Arc<Keys>>,
}

/// Where replicas go: a URL plus S3 settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageConfig {
    pub url: String,
    pub s3: S3Options,
}

/// How the watch loop runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchSettings {
    pub parallelism: usize,
    /// Poll the files every `poll_interval` instead of using file events
    /// (for filesystems without inotify events, e.g. some network mounts).
    pub poll: bool,
    pub poll_interval: Duration,
    pub shutdown_timeout: Duration,
    /// Databases kept open (pinned) at once; the least recently active
    /// beyond it are closed until their next change. `None`: derived from
    /// the open-file limit.
    pub max_open: Option<usize>,
    /// Close a database (releasing its descriptors and memory) once it has
    /// not changed for this long; `None` keeps databases open.
    pub close_idle_after: Option<Duration>,
    /// Serve /metrics, /health and the status page here (off by default).
    pub listen: Option<std::net::SocketAddr>,
    /// The control socket for `walsync sync`; default: derived from the
    /// configuration file's path, in the temp directory.
    pub control_socket: Option<PathBuf>,
    /// Start even when storage refuses the start-up check for good (no such
    /// bucket, credentials refused), and keep retrying.
    pub keep_retrying: bool,
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            parallelism: 8,
            poll: false,
            poll_interval: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(30),
            max_open: None,
            close_idle_after: Some(Duration::from_secs(30)),
            listen: None,
            control_socket: None,
            keep_retrying: false,
        }
    }
}

/// One `[[databases]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub source: Source,
    pub prefix: PrefixRule,
    pub sync: SyncOptions,
}

/// What an entry matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    /// Files matching a glob; `base` is the directory above the first wildcard.
    Glob {
        pattern: String,
        base: PathBuf,
    },
    Dir {
        dir: PathBuf,
        pattern: String,
        recursive: bool,
    },
}

impl Source {
    /// The directories to watch for databases appearing and disappearing, and
    /// whether below them too.
    pub fn watch_roots(&self) -> (PathBuf, bool) {
        match self {
            Source::File(path) => (parent_of(path), false),
            Source::Glob { pattern, base } => (base.clone(), pattern.contains("**")),
            Source::Dir { dir, recursive, .. } => (dir.clone(), *recursive),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefixRule {
    Fixed(String),
    /// Contains `{name}` (file stem) and/or `{relpath}` (path below the base,
    /// without the extension).
    Template(String),
}

/// A database the configuration names right now.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub path: PathBuf,
    pub prefix: String,
    pub sync: SyncOptions,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    storage: Option<RawStorage>,
    sync: Option<RawSync>,
    watch: Option<RawWatch>,
    #[serde(default)]
    databases: Vec<RawDatabase>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    url: Option<String>,
    bucket: Option<String>,
    prefix: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
    path_style: Option<bool>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    session_token: Option<String>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawSync {
    sync_interval: Option<String>,
    snapshot_interval: Option<String>,
    checkpoint_pages: Option<u32>,
    checkpoint_interval: Option<String>,
    truncate_pages: Option<u32>,
    retention: Option<String>,
    retention_snapshots: Option<u32>,
    encryption_key: Option<String>,
    previous_encryption_keys: Option<Vec<String>>,
    compaction: Option<toml::Value>,
    exact_window: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWatch {
    parallelism: Option<usize>,
    watcher: Option<String>,
    poll_interval: Option<String>,
    shutdown_timeout: Option<String>,
    max_open: Option<usize>,
    close_idle_after: Option<String>,
    listen: Option<String>,
    control_socket: Option<String>,
    keep_retrying: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    path: Option<String>,
    dir: Option<String>,
    pattern: Option<String>,
    recursive: Option<bool>,
    prefix: Option<String>,
    sync_interval: Option<String>,
    snapshot_interval: Option<String>,
    checkpoint_pages: Option<u32>,
    checkpoint_interval: Option<String>,
    truncate_pages: Option<u32>,
    retention: Option<String>,
    retention_snapshots: Option<u32>,
    encryption_key: Option<String>,
    previous_encryption_keys: Option<Vec<String>>,
    compaction: Option<toml::Value>,
    exact_window: Option<String>,
}

/// Collects errors against one file.
struct Checker<'a> {
    file: &'a Path,
    uses: Uses,
}

impl Checker<'_> {
    /// `Ok(None)` for a part the command does not read that names an unset
    /// variable; the part is then left out.
    fn unless_unused<T>(&self, used: bool, result: Result<T, Error>) -> Result<Option<T>, Error> {
        match result {
            Err(Error::Unset { .. }) if !used => Ok(None),
            other => other.map(Some),
        }
    }

    fn err(&self, message: impl fmt::Display) -> Error {
        Error::Invalid {
            file: self.file.to_path_buf(),
            message: message.to_string(),
        }
    }

    fn duration(&self, key: &str, value: &Option<String>) -> Result<Option<Duration>, Error> {
        value
            .as_deref()
            .map(|v| {
                crate::cli::parse_duration(v).map_err(|e| self.err(format!("{key} = {v:?}: {e}")))
            })
            .transpose()
    }

    /// Expands `${VAR}` from the environment; `$$` is a literal `$`.
    fn expand(&self, key: &str, value: &str) -> Result<String, Error> {
        let mut out = String::with_capacity(value.len());
        let mut rest = value;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            if let Some(stripped) = after.strip_prefix('$') {
                out.push('$');
                rest = stripped;
            } else if let Some(body) = after.strip_prefix('{') {
                let end = body
                    .find('}')
                    .ok_or_else(|| self.err(format!("{key}: unclosed ${{ (no closing }})")))?;
                let name = &body[..end];
                let var = std::env::var(name).map_err(|_| Error::Unset {
                    file: self.file.to_path_buf(),
                    key: key.to_string(),
                    var: name.to_string(),
                })?;
                out.push_str(&var);
                rest = &body[end + 1..];
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
        Ok(out)
    }

    fn sync(&self, base: &SyncOptions, raw: &RawSync, section: &str) -> Result<SyncOptions, Error> {
        let key = |k: &str| format!("{section}.{k}");
        let mut sync = base.clone();
        if let Some(d) = self.duration(&key("sync_interval"), &raw.sync_interval)? {
            sync.sync_interval = d;
        }
        if let Some(d) = self.duration(&key("snapshot_interval"), &raw.snapshot_interval)? {
            sync.snapshot_interval = d;
        }
        if let Some(d) = self.duration(&key("checkpoint_interval"), &raw.checkpoint_interval)? {
            sync.checkpoint_interval = d;
        }
        if let Some(n) = raw.checkpoint_pages {
            if n == 0 {
                return Err(self.err(format!("{} must be at least 1", key("checkpoint_pages"))));
            }
            sync.checkpoint_pages = n;
        }
        if let Some(n) = raw.truncate_pages {
            if n == 0 {
                return Err(self.err(format!("{} must be at least 1", key("truncate_pages"))));
            }
            sync.truncate_pages = n;
        }
        match raw.retention.as_deref() {
            None => {}
            Some("off") => sync.retention.age = None,
            Some(_) => {
                let age = self.duration(&key("retention"), &raw.retention)?;
                if age.is_some_and(|d| d.is_zero()) {
                    return Err(self.err(format!(
                        "{} = \"0s\" would keep nothing; give a duration or \"off\"",
                        key("retention")
                    )));
                }
                sync.retention.age = age;
            }
        }
        if let Some(value) = &raw.compaction {
            sync.compaction = self.levels(&key("compaction"), value)?;
        }
        match raw.exact_window.as_deref() {
            None => {}
            Some("off") => sync.exact_window = None,
            Some(_) => {
                sync.exact_window = self.duration(&key("exact_window"), &raw.exact_window)?
            }
        }
        match raw.retention_snapshots {
            None => {}
            Some(0) => sync.retention.snapshots = None,
            Some(n) => sync.retention.snapshots = Some(n),
        }
        if raw.encryption_key.is_some() || raw.previous_encryption_keys.is_some() {
            let keys = self.keys(&sync, raw, &key);
            if let Some(keys) = self.unless_unused(self.uses.keys, keys)? {
                sync.encryption = Some(keys);
            }
        }
        Ok(sync)
    }

    /// Compaction levels: a list of run lengths, or `"off"`.
    fn levels(&self, key: &str, value: &toml::Value) -> Result<Arc<[u64]>, Error> {
        let refuse = |why: &str| self.err(format!("{key}: {why}"));
        match value {
            toml::Value::String(s) if s == "off" => Ok(Arc::from([])),
            toml::Value::Array(items) => {
                let levels = items
                    .iter()
                    .map(|v| {
                        v.as_integer()
                            .and_then(|n| u64::try_from(n).ok())
                            .ok_or_else(|| refuse(&format!("{v} is not a number of objects")))
                    })
                    .collect::<Result<Vec<u64>, Error>>()?;
                match crate::compact::levels_problem(&levels) {
                    Some(problem) => Err(refuse(&problem)),
                    None => Ok(levels.into()),
                }
            }
            other => Err(refuse(&format!(
                "expected a list of run lengths such as [16, 256, 4096], or \"off\"; found {other}"
            ))),
        }
    }

    /// The keys `raw` gives, on top of those `sync` inherits.
    fn keys(
        &self,
        sync: &SyncOptions,
        raw: &RawSync,
        key: &dyn Fn(&str) -> String,
    ) -> Result<Arc<Keys>, Error> {
        {
            // What is not given here is inherited; "off" keeps the older keys
            // for reading and says that stopping encryption is intended.
            let base = sync.encryption.as_deref();
            let current = match raw.encryption_key.as_deref() {
                None => base.and_then(|k| k.current().cloned()),
                Some("off") => None,
                Some(value) => Some(self.key(&key("encryption_key"), value)?),
            };
            let previous = match &raw.previous_encryption_keys {
                // A key replaced here (or turned off) still opens what it sealed.
                None => base
                    .into_iter()
                    .flat_map(Keys::all)
                    .filter(|k| Some(*k) != current.as_ref())
                    .cloned()
                    .collect(),
                Some(list) => list
                    .iter()
                    .enumerate()
                    .map(|(i, k)| self.key(&format!("{}[{i}]", key("previous_encryption_keys")), k))
                    .collect::<Result<Vec<_>, _>>()?,
            };
            Ok(Arc::new(Keys::new(current, previous)))
        }
    }

    /// A key from 64 hex digits or `${VAR}`; errors never show the value.
    fn key(&self, name: &str, value: &str) -> Result<Key, Error> {
        let text = self.expand(name, value)?;
        Key::from_hex(&text).map_err(|e| self.err(format!("{name}: {e}")))
    }
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::load_for(path, Uses::ALL)
    }

    /// Reads and validates `path` for a command that reads only what `uses`
    /// names: an unset variable elsewhere leaves that part out.
    pub fn load_for(path: &Path, uses: Uses) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read {
            file: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::parse_for(&text, path, uses)
    }

    /// Validates a configuration text as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, Error> {
        Self::parse_for(text, path, Uses::ALL)
    }

    fn parse_for(text: &str, path: &Path, uses: Uses) -> Result<Self, Error> {
        let check = Checker { file: path, uses };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // Counted by line breaks before the span: a span that starts a
            // line (an unknown key) is on the line after the last break.
            let line = e.span().map(|s| {
                let before = &text.as_bytes()[..s.start.min(text.len())];
                before.iter().filter(|&&b| b == b'\n').count() + 1
            });
            // The parser quotes the value it choked on; a value may be a secret.
            let message = without_quoted(e.message().trim()).replace('\n', " ");
            match line {
                Some(line) => check.err(format!("line {line}: {message}")),
                None => check.err(message),
            }
        })?;
        // Absolute, so that paths and `{relpath}` do not depend on the
        // directory walsync was started from.
        let base_dir = std::path::absolute(parent_of(path)).unwrap_or_else(|_| parent_of(path));
        let storage = Self::storage(&check, raw.storage.unwrap_or_default());
        let mut storage = check
            .unless_unused(uses.storage, storage)?
            .unwrap_or_default();
        // A local directory is relative to this file, like database paths.
        if !storage.url.contains("://") && Path::new(&storage.url).is_relative() {
            storage.url = base_dir.join(&storage.url).display().to_string();
        }
        let sync = check.sync(
            &SyncOptions::default(),
            &raw.sync.unwrap_or_default(),
            "sync",
        )?;
        let watch = Self::watch(&check, raw.watch.unwrap_or_default())?;
        if raw.databases.is_empty() {
            return Err(check.err("no [[databases]] entries"));
        }
        let mut entries = Vec::with_capacity(raw.databases.len());
        for (i, db) in raw.databases.iter().enumerate() {
            let entry = Self::entry(&check, &base_dir, i, db, &sync);
            entries.extend(check.unless_unused(uses.databases, entry)?);
        }
        let keys = Keys::union(
            std::iter::once(&sync)
                .chain(entries.iter().map(|e| &e.sync))
                .filter_map(|s| s.encryption.as_deref()),
        )
        .map(Arc::new);
        let config = Self {
            source: path.to_path_buf(),
            storage,
            watch,
            entries,
            keys,
        };
        // Duplicates among the databases that exist now are refused up front.
        config.discover().map_err(|e| match e {
            Error::Invalid { .. } => e,
            other => check.err(other),
        })?;
        Ok(config)
    }

    fn storage(check: &Checker<'_>, raw: RawStorage) -> Result<StorageConfig, Error> {
        let expand = |key: &str, v: &Option<String>| -> Result<Option<String>, Error> {
            v.as_deref().map(|v| check.expand(key, v)).transpose()
        };
        let url = match (
            expand("storage.url", &raw.url)?,
            expand("storage.bucket", &raw.bucket)?,
        ) {
            (Some(_), Some(_)) => {
                return Err(check.err("storage: give either url or bucket, not both"));
            }
            (Some(url), None) => {
                if raw.prefix.is_some() {
                    return Err(check.err("storage.prefix goes with bucket; put it in the url"));
                }
                // An empty value (an unset-but-empty ${VAR}, say) would be read
                // as a relative path, the config's own directory.
                if url.trim().is_empty() {
                    return Err(
                        check.err("storage.url is empty (give s3://bucket/prefix or a directory)")
                    );
                }
                url
            }
            (None, Some(bucket)) if bucket.trim().is_empty() => {
                return Err(check.err("storage.bucket is empty"));
            }
            (None, Some(bucket)) => match expand("storage.prefix", &raw.prefix)? {
                Some(prefix) => format!("s3://{bucket}/{}", prefix.trim_matches('/')),
                None => format!("s3://{bucket}"),
            },
            (None, None) => {
                return Err(
                    check.err("storage: set url (s3://bucket/prefix or a directory) or bucket")
                );
            }
        };
        if let Some(prefix) = url.strip_prefix("s3://").and_then(|r| r.split_once('/'))
            && !prefix.1.is_empty()
        {
            validate_prefix(prefix.1.trim_end_matches('/'))
                .map_err(|e| check.err(format!("storage.url: {e}")))?;
        }
        let access_key = expand("storage.access_key_id", &raw.access_key_id)?;
        let secret = expand("storage.secret_access_key", &raw.secret_access_key)?;
        let token = expand("storage.session_token", &raw.session_token)?;
        let credentials = match (access_key, secret) {
            (Some(id), Some(secret)) => {
                Some(crate::storage::StaticCredentials::new(id, secret, token))
            }
            (None, None) => None,
            _ => {
                return Err(check.err("storage: access_key_id and secret_access_key go together"));
            }
        };
        Ok(StorageConfig {
            url,
            s3: S3Options {
                endpoint: expand("storage.endpoint", &raw.endpoint)?,
                region: expand("storage.region", &raw.region)?,
                force_path_style: raw.path_style,
                credentials,
            },
        })
    }

    fn watch(check: &Checker<'_>, raw: RawWatch) -> Result<WatchSettings, Error> {
        let mut watch = WatchSettings::default();
        if let Some(n) = raw.parallelism {
            if n == 0 {
                return Err(check.err("watch.parallelism must be at least 1"));
            }
            watch.parallelism = n;
        }
        match raw.watcher.as_deref() {
            None | Some("events") => {}
            Some("poll") => watch.poll = true,
            Some(other) => {
                return Err(check.err(format!(
                    "watch.watcher = {other:?}: use \"events\" or \"poll\""
                )));
            }
        }
        if let Some(d) = check.duration("watch.poll_interval", &raw.poll_interval)? {
            if d.is_zero() {
                return Err(check.err("watch.poll_interval must be more than 0"));
            }
            watch.poll_interval = d;
        }
        if let Some(d) = check.duration("watch.shutdown_timeout", &raw.shutdown_timeout)? {
            watch.shutdown_timeout = d;
        }
        if let Some(d) = check.duration("watch.close_idle_after", &raw.close_idle_after)? {
            // 0 turns closing off.
            watch.close_idle_after = (!d.is_zero()).then_some(d);
        }
        if let Some(n) = raw.max_open {
            if n == 0 {
                return Err(check.err("watch.max_open must be at least 1"));
            }
            watch.max_open = Some(n);
        }
        watch.keep_retrying = raw.keep_retrying.unwrap_or(false);
        if let Some(addr) = &raw.listen {
            let parsed = crate::listen::parse_addr(addr)
                .map_err(|e| check.err(format!("watch.listen: {e}")))?;
            watch.listen = Some(parsed);
        }
        if let Some(path) = &raw.control_socket {
            let path = check.expand("watch.control_socket", path);
            watch.control_socket = check
                .unless_unused(check.uses.control_socket, path)?
                .map(PathBuf::from);
        }
        Ok(watch)
    }

    fn entry(
        check: &Checker<'_>,
        base_dir: &Path,
        index: usize,
        raw: &RawDatabase,
        defaults: &SyncOptions,
    ) -> Result<Entry, Error> {
        let at = format!("databases[{index}]");
        let resolve = |p: &str| -> Result<PathBuf, Error> {
            let p = check.expand(&at, p)?;
            let p = PathBuf::from(p);
            Ok(if p.is_absolute() { p } else { base_dir.join(p) })
        };
        let source = match (&raw.path, &raw.dir) {
            (Some(_), Some(_)) => {
                return Err(check.err(format!("{at}: give either path or dir, not both")));
            }
            (None, None) => return Err(check.err(format!("{at}: set path or dir"))),
            (Some(path), None) => {
                if raw.pattern.is_some() || raw.recursive.is_some() {
                    return Err(
                        check.err(format!("{at}: pattern and recursive go with dir, not path"))
                    );
                }
                let path = resolve(path)?;
                let text = path.to_string_lossy().to_string();
                if text.contains(['*', '?', '[']) {
                    glob::Pattern::new(&text)
                        .map_err(|e| check.err(format!("{at}.path: bad glob: {e}")))?;
                    let base = glob_base(&path);
                    Source::Glob {
                        pattern: text,
                        base,
                    }
                } else {
                    Source::File(path)
                }
            }
            (None, Some(dir)) => {
                let pattern = raw.pattern.clone().unwrap_or_else(|| "*.db".to_string());
                glob::Pattern::new(&pattern)
                    .map_err(|e| check.err(format!("{at}.pattern: bad glob: {e}")))?;
                if pattern.contains('/') {
                    return Err(check.err(format!(
                        "{at}.pattern matches file names; use recursive = true for subdirectories"
                    )));
                }
                Source::Dir {
                    dir: resolve(dir)?,
                    pattern,
                    recursive: raw.recursive.unwrap_or(false),
                }
            }
        };
        let prefix = match (&source, &raw.prefix) {
            (Source::File(path), None) => PrefixRule::Fixed(
                default_prefix(path).map_err(|e| check.err(format!("{at}: {e}")))?,
            ),
            (Source::File(_), Some(p)) if !p.contains('{') => {
                validate_prefix(p).map_err(|e| check.err(format!("{at}.prefix: {e}")))?;
                PrefixRule::Fixed(p.clone())
            }
            (_, None) => PrefixRule::Template("{relpath}".to_string()),
            (_, Some(p)) => {
                check_template(p)
                    .map_err(|reason| check.err(format!("{at}.prefix = {p:?}: {reason}")))?;
                if matches!(
                    source,
                    Source::Dir {
                        recursive: true,
                        ..
                    } | Source::Glob { .. }
                ) && !p.contains("{relpath}")
                    && !matches!(&source, Source::Glob { pattern, .. } if !pattern.contains("**"))
                {
                    return Err(check.err(format!(
                        "{at}.prefix = {p:?} does not make prefixes unique: \
                         files in different subdirectories can share a name; use {{relpath}}"
                    )));
                }
                PrefixRule::Template(p.clone())
            }
        };
        let overrides = RawSync {
            sync_interval: raw.sync_interval.clone(),
            snapshot_interval: raw.snapshot_interval.clone(),
            checkpoint_pages: raw.checkpoint_pages,
            checkpoint_interval: raw.checkpoint_interval.clone(),
            truncate_pages: raw.truncate_pages,
            retention: raw.retention.clone(),
            retention_snapshots: raw.retention_snapshots,
            encryption_key: raw.encryption_key.clone(),
            previous_encryption_keys: raw.previous_encryption_keys.clone(),
            compaction: raw.compaction.clone(),
            exact_window: raw.exact_window.clone(),
        };
        let sync = check.sync(defaults, &overrides, &at)?;
        Ok(Entry {
            source,
            prefix,
            sync,
        })
    }

    /// The databases the entries name right now, each with its prefix.
    /// A single-file entry is listed even if the file does not exist yet.
    pub fn discover(&self) -> Result<Vec<Target>, Error> {
        let check = Checker {
            file: &self.source,
            uses: Uses::ALL,
        };
        let mut targets: Vec<Target> = Vec::new();
        let mut by_prefix: HashMap<String, usize> = HashMap::new();
        let mut seen_paths: HashSet<PathBuf> = HashSet::new();
        for (index, entry) in self.entries.iter().enumerate() {
            for (path, rel) in entry.matches()? {
                let prefix = match &entry.prefix {
                    PrefixRule::Fixed(p) => p.clone(),
                    PrefixRule::Template(t) => render(t, &path, &rel),
                };
                validate_prefix(&prefix).map_err(|e| {
                    check.err(format!("databases[{index}]: {} gives {e}", path.display()))
                })?;
                let key = path.canonicalize().unwrap_or_else(|_| path.clone());
                if !seen_paths.insert(key) {
                    return Err(Error::DuplicatePath(path));
                }
                if let Some(&other) = by_prefix.get(&prefix) {
                    return Err(Error::DuplicatePrefix {
                        prefix,
                        a: targets[other].path.clone(),
                        b: path,
                    });
                }
                by_prefix.insert(prefix.clone(), targets.len());
                targets.push(Target {
                    path,
                    prefix,
                    sync: entry.sync.clone(),
                });
            }
        }
        Ok(targets)
    }
}

impl Config {
    /// Where the database stored under `prefix` lives by this configuration,
    /// whether or not the file exists (restoring in place after a lost disk):
    /// a `path` entry's file, or for a glob or `dir` entry whose template has
    /// one placeholder and whose pattern is `*.EXT`, the file the template
    /// would have turned into `prefix` (`tenants/{name}` + `*.db`:
    /// `tenants/acme` is `DIR/acme.db`).
    pub fn path_for(&self, prefix: &str) -> Option<PathBuf> {
        self.entries.iter().find_map(|entry| entry.path_for(prefix))
    }

    /// The prefix of the database at `path` by this configuration, whether
    /// or not the file exists (restoring in place): the first entry that
    /// names or matches it. A relative `path` is relative to the working
    /// directory, as on any command line.
    pub fn prefix_for(&self, path: &Path) -> Option<String> {
        let path = lexical(&std::path::absolute(path).ok()?);
        self.entries
            .iter()
            .find_map(|entry| entry.prefix_for(&path))
    }
}

impl Entry {
    /// The prefix this entry gives `path` (absolute), whether or not the
    /// file exists: the reverse of [`Entry::path_for`].
    fn prefix_for(&self, path: &Path) -> Option<String> {
        let rule = |rel: &str| match &self.prefix {
            PrefixRule::Fixed(p) => p.clone(),
            PrefixRule::Template(t) => render(t, path, rel),
        };
        match &self.source {
            Source::File(file) => (lexical(file) == path).then(|| rule(&stem_of(path))),
            Source::Glob { pattern, base } => {
                let (pattern, base) = (lexical(Path::new(pattern)), lexical(base));
                let options = glob::MatchOptions {
                    require_literal_separator: true,
                    ..glob::MatchOptions::new()
                };
                glob::Pattern::new(&pattern.to_string_lossy())
                    .is_ok_and(|p| p.matches_path_with(path, options))
                    .then(|| rule(&relpath(&base, path)))
            }
            Source::Dir {
                dir,
                pattern,
                recursive,
            } => {
                let dir = lexical(dir);
                let rel = path.strip_prefix(&dir).ok()?;
                let name = rel.file_name()?.to_str()?;
                let fits = (*recursive || rel.components().count() == 1)
                    && glob::Pattern::new(pattern).is_ok_and(|p| p.matches(name));
                fits.then(|| rule(&relpath(&dir, path)))
            }
        }
    }

    fn path_for(&self, prefix: &str) -> Option<PathBuf> {
        let template = match (&self.source, &self.prefix) {
            (Source::File(path), PrefixRule::Fixed(p)) => {
                return (p == prefix).then(|| path.clone());
            }
            (Source::File(path), PrefixRule::Template(t)) => {
                return (render(t, path, &stem_of(path)) == prefix).then(|| path.clone());
            }
            (_, PrefixRule::Fixed(_)) => return None,
            (_, PrefixRule::Template(t)) => t,
        };
        let (placeholder, at) = ["{name}", "{relpath}"]
            .iter()
            .find_map(|p| template.find(p).map(|at| (*p, at)))?;
        let (before, after) = (&template[..at], &template[at + placeholder.len()..]);
        if before.contains('{') || after.contains('{') {
            return None;
        }
        let middle = prefix.strip_prefix(before)?.strip_suffix(after)?;
        if middle.is_empty() || (placeholder == "{name}" && middle.contains('/')) {
            return None;
        }
        let (base, file_pattern) = match &self.source {
            Source::Glob { pattern, base } => (base, Path::new(pattern).file_name()?.to_str()?),
            Source::Dir { dir, pattern, .. } => (dir, pattern.as_str()),
            Source::File(_) => return None,
        };
        let ext = file_pattern
            .strip_prefix('*')
            .filter(|ext| !ext.contains(['*', '?', '[']))?;
        let path = base.join(format!("{middle}{ext}"));
        let fits = match &self.source {
            Source::Glob { pattern, .. } => {
                let options = glob::MatchOptions {
                    require_literal_separator: true,
                    ..glob::MatchOptions::new()
                };
                glob::Pattern::new(pattern).is_ok_and(|p| p.matches_path_with(&path, options))
            }
            Source::Dir { recursive, .. } => *recursive || !middle.contains('/'),
            Source::File(_) => false,
        };
        fits.then_some(path)
    }

    /// Files this entry matches now, each with its path relative to the base
    /// (without extension), for `{relpath}`. A directory that does not exist
    /// holds no databases; one that cannot be read (permissions, out of file
    /// descriptors) is an error, never an empty set, so that a failed scan
    /// does not release databases that are still there.
    fn matches(&self) -> Result<Vec<(PathBuf, String)>, Error> {
        let scan_err = |path: &Path, e: io::Error| Error::Scan {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        match &self.source {
            Source::File(path) => Ok(vec![(path.clone(), stem_of(path))]),
            Source::Glob { pattern, base } => {
                let Ok(paths) = glob::glob(pattern) else {
                    return Ok(Vec::new());
                };
                let mut found = Vec::new();
                for p in paths {
                    match p {
                        // Only regular files: a directory or FIFO a glob
                        // happens to match holds no database.
                        Ok(p)
                            if is_database_file(&p)
                                && std::fs::metadata(&p).is_ok_and(|m| m.is_file()) =>
                        {
                            let rel = relpath(base, &p);
                            found.push((p, rel));
                        }
                        Ok(_) => {}
                        Err(e) if e.error().kind() == io::ErrorKind::NotFound => {}
                        Err(e) => {
                            let path = e.path().to_path_buf();
                            return Err(scan_err(&path, e.into()));
                        }
                    }
                }
                found.sort();
                Ok(found)
            }
            Source::Dir {
                dir,
                pattern,
                recursive,
            } => {
                let Ok(pattern) = glob::Pattern::new(pattern) else {
                    return Ok(Vec::new());
                };
                let mut found = Vec::new();
                let mut stack = vec![dir.clone()];
                while let Some(d) = stack.pop() {
                    let read = match std::fs::read_dir(&d) {
                        Ok(read) => read,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(scan_err(&d, e)),
                    };
                    for entry in read {
                        let entry = entry.map_err(|e| scan_err(&d, e))?;
                        let path = entry.path();
                        let kind = match entry.file_type() {
                            Ok(kind) => kind,
                            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                            Err(e) => return Err(scan_err(&path, e)),
                        };
                        if kind.is_dir() {
                            if *recursive {
                                stack.push(path);
                            }
                        } else if kind.is_file()
                            && entry
                                .file_name()
                                .to_str()
                                .is_some_and(|n| pattern.matches(n))
                            && is_database_file(&path)
                        {
                            let rel = relpath(dir, &path);
                            found.push((path, rel));
                        }
                    }
                }
                found.sort();
                Ok(found)
            }
        }
    }
}

/// SQLite's side files are never databases of their own.
fn is_database_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !(name.ends_with("-wal")
        || name.ends_with("-shm")
        || name.ends_with("-journal")
        || name.contains(".walsync-tmp")
        || name.contains("-walsync-state-")
        || name.starts_with(".walsync-state-"))
}

/// `text` with whatever stands between double quotes replaced by `…`.
fn without_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for c in text.chars() {
        if c == '"' {
            if !inside {
                out.push_str("\"…");
            } else {
                out.push('"');
            }
            inside = !inside;
        } else if !inside {
            out.push(c);
        }
    }
    out
}

fn check_template(template: &str) -> Result<(), String> {
    let mut rest = template;
    let mut has_placeholder = false;
    while let Some(start) = rest.find('{') {
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| "unclosed '{'".to_string())?;
        match &rest[start + 1..start + end] {
            "name" | "relpath" => has_placeholder = true,
            other => {
                return Err(format!(
                    "unknown placeholder {{{other}}} (use {{name}} or {{relpath}})"
                ));
            }
        }
        rest = &rest[start + end + 1..];
    }
    if !has_placeholder {
        return Err("does not make prefixes unique: it needs {name} or {relpath}".into());
    }
    let sample = template.replace("{name}", "x").replace("{relpath}", "x");
    validate_prefix(&sample).map_err(|e| e.to_string())
}

fn render(template: &str, path: &Path, relpath: &str) -> String {
    template
        .replace("{name}", &stem_of(path))
        .replace("{relpath}", relpath)
}

fn stem_of(path: &Path) -> String {
    path.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string()
}

/// `base/a/b/c.db` → `a/b/c`.
fn relpath(base: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(base).unwrap_or(path);
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().to_string())
        .collect();
    if let Some(last) = parts.last_mut() {
        *last = stem_of(Path::new(last.as_str()));
    }
    parts.join("/")
}

/// The directory above the first path component holding a wildcard.
fn glob_base(pattern: &Path) -> PathBuf {
    let mut base = PathBuf::new();
    for component in pattern.components() {
        if component
            .as_os_str()
            .to_string_lossy()
            .contains(['*', '?', '['])
        {
            break;
        }
        base.push(component);
    }
    base
}

/// `path` with `.` and `a/..` taken out by their spelling alone, so that two
/// spellings of one path compare equal.
fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Checks that a database prefix stays inside the storage root.
pub fn validate_prefix(prefix: &str) -> Result<(), Error> {
    match crate::chain::name_problem(prefix) {
        Some(reason) => Err(Error::BadPrefix {
            prefix: prefix.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The default prefix of a database: its file name without extension.
pub fn default_prefix(path: &Path) -> Result<String, Error> {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Error::NoPrefix {
            path: path.to_path_buf(),
        })?;
    validate_prefix(stem)?;
    Ok(stem.to_string())
}

/// The default storage for a database or restore target: `walsync-replica` beside it.
pub fn default_storage_beside(file: &Path) -> PathBuf {
    parent_of(file).join(DEFAULT_REPLICA_DIR)
}

/// Pairs each database named on the command line with its prefix, rejecting duplicates.
pub fn databases(paths: &[PathBuf], prefix: Option<&str>) -> Result<Vec<(PathBuf, String)>, Error> {
    if prefix.is_some() && paths.len() != 1 {
        return Err(Error::PrefixWithMany(paths.len()));
    }
    let mut out: Vec<(PathBuf, String)> = Vec::with_capacity(paths.len());
    for path in paths {
        let prefix = match prefix {
            Some(p) => {
                validate_prefix(p)?;
                p.to_string()
            }
            None => default_prefix(path)?,
        };
        let canonical = path.canonicalize().unwrap_or_else(|_| path.clone());
        for (other, other_prefix) in &out {
            if other.canonicalize().unwrap_or_else(|_| other.clone()) == canonical {
                return Err(Error::DuplicatePath(path.clone()));
            }
            if *other_prefix == prefix {
                return Err(Error::DuplicatePrefix {
                    prefix,
                    a: other.clone(),
                    b: path.clone(),
                });
            }
        }
        out.push((path.clone(), prefix));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_must_stay_inside_the_root() {
        assert!(validate_prefix("tenants/acme").is_ok());
        for bad in ["", "/abs", "a//b", "a/../b", "..", "a/", "a\\b"] {
            assert!(validate_prefix(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn default_prefix_is_the_file_stem_and_duplicates_are_refused() {
        assert_eq!(default_prefix(Path::new("/data/app.db")).unwrap(), "app");
        let err = databases(&["/a/app.db".into(), "/b/app.db".into()], None).unwrap_err();
        assert!(matches!(err, Error::DuplicatePrefix { .. }));
        let err = databases(&["/a/x.db".into(), "/a/x.db".into()], None).unwrap_err();
        assert!(matches!(err, Error::DuplicatePath(_)));
        assert!(matches!(
            databases(&["/a/x.db".into(), "/a/y.db".into()], Some("p")),
            Err(Error::PrefixWithMany(2))
        ));
    }

    #[test]
    fn templates_and_relpaths() {
        assert!(check_template("tenants/{name}").is_ok());
        assert!(check_template("tenants").is_err());
        assert!(check_template("t/{nme}").is_err());
        assert!(check_template("../{name}").is_err());
        assert_eq!(relpath(Path::new("/d"), Path::new("/d/a/b.db")), "a/b");
        assert_eq!(
            glob_base(Path::new("/data/t/*.db")),
            PathBuf::from("/data/t")
        );
    }

    #[test]
    fn config_errors_name_the_key_never_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walsync.toml");
        for bad in [
            "[sync]\nprevious_encryption_keys = \"SECRET-KEY-VALUE\"\n",
            "[sync]\nencryption_key = 5\n[storage]\nsecret_access_key = [\"SECRET-KEY-VALUE\"]\n",
            "[storage]\nsecret_access_key = \"${SECRET-KEY-VALUE\"\n",
        ] {
            std::fs::write(
                &path,
                format!("{bad}[[databases]]\npath = \"/data/app.db\"\n[storage]\nurl = \"/r\"\n"),
            )
            .unwrap();
            let err = Config::load(&path).unwrap_err().to_string();
            assert!(!err.contains("SECRET-KEY-VALUE"), "{bad}: {err}");
        }
    }

    #[test]
    fn an_empty_storage_url_is_an_error_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walsync.toml");
        // SAFETY: set before anything else in this test reads the environment.
        unsafe { std::env::set_var("WALSYNC_TEST_EMPTY_URL", "") };
        for storage in [
            "url = \"${WALSYNC_TEST_EMPTY_URL}\"",
            "url = \"\"",
            "bucket = \"\"",
        ] {
            std::fs::write(
                &path,
                format!("[storage]\n{storage}\n[[databases]]\npath = \"/data/app.db\"\n"),
            )
            .unwrap();
            let err = Config::load(&path).unwrap_err().to_string();
            assert!(
                err.contains("is empty") && err.contains("storage."),
                "{storage}: {err}"
            );
        }
    }

    #[test]
    fn an_unreadable_directory_is_an_error_not_an_empty_fleet() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let config_path = dir.path().join("walsync.toml");
        let text = format!(
            "[storage]\nurl = \"/replica\"\n[[databases]]\ndir = \"{}\"\n",
            data.display()
        );
        let config = Config::parse(&text, &config_path).unwrap();
        assert!(config.discover().unwrap().is_empty());
        // Gone: no databases. Unreadable (here: not a directory): an error.
        std::fs::remove_dir(&data).unwrap();
        assert!(config.discover().unwrap().is_empty());
        std::fs::write(&data, b"not a directory").unwrap();
        let err = config.discover().unwrap_err();
        assert!(matches!(err, Error::Scan { .. }), "{err}");
    }

    #[test]
    fn retention_defaults_and_per_database_overrides() {
        let text = r#"
[storage]
url = "/replica"
[sync]
retention = "72h"
retention_snapshots = 3
[[databases]]
path = "/data/a.db"
[[databases]]
path = "/data/b.db"
retention = "off"
retention_snapshots = 0
"#;
        let config = Config::parse(text, Path::new("/etc/walsync.toml")).unwrap();
        let a = config.entries[0].sync.retention;
        assert_eq!(a.age, Some(Duration::from_secs(72 * 3600)));
        assert_eq!(a.snapshots, Some(3));
        assert!(config.entries[1].sync.retention.is_off());
        let zero = text.replace("retention = \"72h\"", "retention = \"0s\"");
        let err = Config::parse(&zero, Path::new("/etc/walsync.toml")).unwrap_err();
        assert!(err.to_string().contains("sync.retention"), "{err}");
    }

    #[test]
    fn compaction_levels_default_override_and_refuse_what_cannot_nest() {
        let text = r#"
[storage]
url = "/replica"
[sync]
compaction = [8, 64]
[[databases]]
path = "/data/a.db"
[[databases]]
path = "/data/b.db"
compaction = "off"
"#;
        let file = Path::new("/etc/walsync.toml");
        let config = Config::parse(text, file).unwrap();
        assert_eq!(&*config.entries[0].sync.compaction, &[8, 64]);
        assert!(config.entries[1].sync.compaction.is_empty());
        let plain = Config::parse(
            "[storage]\nurl = \"/r\"\n[[databases]]\npath = \"/a.db\"\n",
            file,
        )
        .unwrap();
        assert_eq!(&*plain.entries[0].sync.compaction, &crate::compact::LEVELS);
        for (bad, says) in [
            (
                "[8, 60]",
                "60 is not a larger multiple of the level before it (8)",
            ),
            ("[1, 4]", "1 is not a run"),
            ("[16, 16]", "16 is not a larger multiple"),
            ("[-4]", "-4 is not a number of objects"),
            ("\"sometimes\"", "expected a list of run lengths"),
        ] {
            let text = text.replace("[8, 64]", bad);
            let err = Config::parse(&text, file).unwrap_err().to_string();
            assert!(
                err.contains("sync.compaction") && err.contains(says),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn encryption_keys_come_from_the_environment_and_are_never_echoed() {
        let a = "aa".repeat(32);
        let b = "bb".repeat(32);
        // SAFETY: no other test reads or writes this variable.
        unsafe { std::env::set_var("WALSYNC_TEST_KEY_B", &b) };
        let text = format!(
            r#"
[storage]
url = "/replica"
[sync]
encryption_key = "{a}"
[[databases]]
path = "/data/a.db"
[[databases]]
path = "/data/b.db"
encryption_key = "${{WALSYNC_TEST_KEY_B}}"
previous_encryption_keys = ["{a}"]
[[databases]]
path = "/data/c.db"
encryption_key = "off"
"#
        );
        let file = Path::new("/etc/walsync.toml");
        let config = Config::parse(&text, file).unwrap();
        let id = |hex: &str| Key::from_hex(hex).unwrap().id();
        let current = |i: usize| {
            config.entries[i]
                .sync
                .encryption
                .as_ref()
                .and_then(|k| k.current())
                .map(|k| k.id())
        };
        assert_eq!(current(0), Some(id(&a)));
        assert_eq!(current(1), Some(id(&b)));
        assert_eq!(current(2), None);
        let keys = config.keys.as_ref().unwrap();
        assert!(keys.find(id(&a)).is_some() && keys.find(id(&b)).is_some());
        assert_eq!(keys.all().count(), 2);

        let short = text.replace(&a, &a[..62]);
        let err = Config::parse(&short, file).unwrap_err().to_string();
        assert!(
            err.contains("sync.encryption_key") && err.contains("64 hex digits"),
            "{err}"
        );
        assert!(!err.contains(&a[..62]), "{err}");
        let unset = text.replace("WALSYNC_TEST_KEY_B", "WALSYNC_TEST_KEY_UNSET");
        let err = Config::parse(&unset, file).unwrap_err().to_string();
        assert!(
            err.contains("databases[1].encryption_key") && err.contains("not set"),
            "{err}"
        );
        // "off" stops encrypting but keeps every key for reading.
        let off = &config.entries[2].sync.encryption.as_ref().unwrap();
        assert!(off.current().is_none() && off.find(id(&a)).is_some());
        let bad = text.replace(
            r#"previous_encryption_keys = [""#,
            r#"previous_encryption_keys = ["00"#,
        );
        let err = Config::parse(&bad, file).unwrap_err().to_string();
        assert!(
            err.contains("databases[1].previous_encryption_keys[0]"),
            "{err}"
        );
    }

    #[test]
    fn prefixes_map_back_to_where_their_databases_live() {
        let text = r#"
[storage]
url = "/replica"
[[databases]]
path = "/data/app.db"
prefix = "main"
[[databases]]
dir = "/data/tenants"
prefix = "tenants/{name}"
[[databases]]
path = "/data/shards/*.sqlite"
[[databases]]
dir = "/data/deep"
recursive = true
prefix = "deep/{relpath}"
"#;
        let config = Config::parse(text, Path::new("/etc/walsync.toml")).unwrap();
        let at = |p: &str| config.path_for(p);
        assert_eq!(at("main"), Some(PathBuf::from("/data/app.db")));
        assert_eq!(
            at("tenants/acme"),
            Some(PathBuf::from("/data/tenants/acme.db"))
        );
        assert_eq!(at("s1"), Some(PathBuf::from("/data/shards/s1.sqlite")));
        assert_eq!(at("deep/a/b"), Some(PathBuf::from("/data/deep/a/b.db")));
        assert_eq!(at("tenants/a/b"), None, "{{name}} never holds a slash");
        assert_eq!(at("elsewhere/x/y"), None);

        // And back: the prefix of a path, existing or not.
        let of = |p: &str| config.prefix_for(Path::new(p));
        assert_eq!(of("/data/app.db").as_deref(), Some("main"));
        assert_eq!(of("/data/x/../app.db").as_deref(), Some("main"));
        assert_eq!(of("/data/tenants/acme.db").as_deref(), Some("tenants/acme"));
        assert_eq!(
            of("/data/tenants/sub/acme.db"),
            None,
            "dir is not recursive"
        );
        assert_eq!(of("/data/shards/s1.sqlite").as_deref(), Some("s1"));
        assert_eq!(of("/data/shards/x/s1.sqlite"), None, "* stops at a slash");
        assert_eq!(of("/data/deep/a/b.db").as_deref(), Some("deep/a/b"));
        assert_eq!(of("/data/other.db"), None);
    }
}
