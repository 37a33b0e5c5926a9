//! Turns what the user wrote (command line or `walsync.toml`) into validated
//! settings, naming the file and key that is wrong. Starts nothing, prints no
//! secrets.
//!
//! A configuration has one storage, sync defaults, watch settings, and
//! database entries. An entry is a single file, a glob (`/data/t/*.db`), or a
//! directory with a pattern; globs and directories name their databases with a
//! prefix template (`tenants/{name}`, `{relpath}`). [`Config::discover`] turns
//! entries into the current set of databases and refuses duplicates.

//!
//! Reading the file is in `parse` (from text to checked settings), finding
//! the databases its entries name in `discover`.

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

mod discover;
mod parse;

use discover::*;
use parse::*;

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
    /// Every `[[mirrors]]` entry (`watch`); otherwise one with an unset
    /// variable is needed only for `--from` it.
    pub mirrors: bool,
    pub keys: bool,
    pub databases: bool,
    pub control_socket: bool,
}

impl Uses {
    /// `watch`, `restore-all`, `explain`.
    pub const ALL: Uses = Uses {
        storage: true,
        mirrors: true,
        keys: true,
        databases: true,
        control_socket: true,
    };
    /// `list`: where storage is.
    pub const STORAGE: Uses = Uses {
        storage: true,
        mirrors: false,
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
    /// Other stores every database's chain also goes to (`[[mirrors]]`).
    pub mirrors: Vec<MirrorConfig>,
    /// Mirrors left out because a variable they name is unset (a command
    /// that reads one store): name, and the error `--from` it gives.
    pub unresolved_mirrors: Vec<(String, String)>,
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

/// A `[[mirrors]]` entry: another store, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorConfig {
    pub name: String,
    pub storage: StorageConfig,
}

impl Config {
    /// `[storage]`, or the mirror named `from` (`restore --from NAME`).
    pub fn store(&self, from: Option<&str>) -> Result<&StorageConfig, Error> {
        let Some(name) = from else {
            return Ok(&self.storage);
        };
        if let Some((_, why)) = self.unresolved_mirrors.iter().find(|(n, _)| n == name) {
            return Err(Error::Invalid {
                file: self.source.clone(),
                message: format!("mirror {name}: {why}"),
            });
        }
        match self.mirrors.iter().find(|m| m.name == name) {
            Some(m) => Ok(&m.storage),
            None if self.mirrors.is_empty() => Err(Error::Invalid {
                file: self.source.clone(),
                message: format!("no [[mirrors]] entry is named {name} (there are none)"),
            }),
            None => Err(Error::Invalid {
                file: self.source.clone(),
                message: format!(
                    "no [[mirrors]] entry is named {name} (mirrors: {})",
                    self.mirrors
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        }
    }
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

    /// A value of the wrong type is named by its key and said in TOML's
    /// words, never Rust's type names, and never shown.
    #[test]
    fn a_value_of_the_wrong_type_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walsync.toml");
        for (bad, key, expected) in [
            (
                "[sync]\ncheckpoint_pages = \"many\"\n",
                "checkpoint_pages",
                "a whole number",
            ),
            (
                "[watch]\nparallelism = \"8\"\n",
                "parallelism",
                "a whole number",
            ),
            ("storage = \"rep\"\n", "storage", "a table"),
        ] {
            std::fs::write(
                &path,
                format!("{bad}[[databases]]\npath = \"/data/app.db\"\n"),
            )
            .unwrap();
            let err = Config::load(&path).unwrap_err().to_string();
            assert!(
                err.contains(&format!("line 1: {key}: "))
                    || err.contains(&format!("line 2: {key}: ")),
                "{bad}: {err}"
            );
            assert!(err.contains(expected), "{bad}: {err}");
            assert!(
                !err.contains("u32") && !err.contains("usize") && !err.contains("Raw"),
                "{err}"
            );
            assert!(!err.contains("many") && !err.contains("\"8\""), "{err}");
        }
    }

    /// A store URL walsync cannot open is refused with the file, before
    /// anything runs (`explain` included).
    #[test]
    fn a_store_url_walsync_cannot_open_is_refused_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walsync.toml");
        for (storage, why) in [
            ("[storage]\nurl = \"gs://bucket/x\"\n", "unknown scheme"),
            ("[storage]\nurl = \"s3://\"\n", "no bucket name"),
            (
                "[storage]\nurl = \"/r\"\n[[mirrors]]\nname = \"far\"\nurl = \"gs://x\"\n",
                "mirrors[0] (far).url",
            ),
        ] {
            std::fs::write(
                &path,
                format!("{storage}[[databases]]\npath = \"/data/app.db\"\n"),
            )
            .unwrap();
            let err = Config::load(&path).unwrap_err().to_string();
            assert!(err.contains(why) && err.contains("walsync.toml"), "{err}");
        }
    }

    /// `$NAME` without braces is refused where it would be taken literally
    /// (a bucket named `$B`); `$$` is a literal `$`.
    #[test]
    fn a_bare_dollar_name_is_refused_with_the_braced_form() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walsync.toml");
        std::fs::write(
            &path,
            "[storage]\nurl = \"s3://$MYB/x\"\n[[databases]]\npath = \"/data/app.db\"\n",
        )
        .unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("storage.url") && err.contains("${MYB}"),
            "{err}"
        );
        std::fs::write(
            &path,
            "[storage]\nurl = \"/r/$$MYB\"\n[[databases]]\npath = \"/data/app.db\"\n",
        )
        .unwrap();
        assert_eq!(Config::load(&path).unwrap().storage.url, "/r/$MYB");
    }

    /// A local store named relative, with or without `file://`, is beside
    /// the file like the databases, wherever walsync was started.
    #[test]
    fn relative_local_stores_are_beside_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("conf");
        std::fs::create_dir(&sub).unwrap();
        let path = sub.join("walsync.toml");
        std::fs::write(
            &path,
            "[storage]\nurl = \"file://rep3\"\n[[mirrors]]\nname = \"near\"\nurl = \"rep4\"\n\
             [[mirrors]]\nname = \"far\"\nurl = \"file:///abs/rep5\"\n\
             [[databases]]\npath = \"/data/app.db\"\n",
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        let sub = std::path::absolute(&sub).unwrap();
        assert_eq!(
            config.storage.url,
            format!("file://{}", sub.join("rep3").display())
        );
        assert_eq!(
            config.mirrors[0].storage.url,
            sub.join("rep4").display().to_string()
        );
        assert_eq!(config.mirrors[1].storage.url, "file:///abs/rep5");
    }

    #[test]
    fn config_errors_name_the_key_never_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walsync.toml");
        for bad in [
            "[sync]\nprevious_encryption_keys = \"SECRET-KEY-VALUE\"\n",
            "[sync]\nencryption_key = 5\n[storage]\nsecret_access_key = [\"SECRET-KEY-VALUE\"]\n",
            "[storage]\nsecret_access_key = \"${SECRET-KEY-VALUE\"\n",
            // Escaped quotes and backslashes inside the value end nothing.
            "[sync]\nprevious_encryption_keys = \"SECRET\\\"-KEY-VALUE\"\n",
            "[sync]\nprevious_encryption_keys = \"SECRET\\\\\\\"-KEY-VALUE\\\\\"\n",
        ] {
            std::fs::write(
                &path,
                format!("{bad}[[databases]]\npath = \"/data/app.db\"\n[storage]\nurl = \"/r\"\n"),
            )
            .unwrap();
            let err = Config::load(&path).unwrap_err().to_string();
            assert!(!err.contains("KEY-VALUE"), "{bad}: {err}");
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

    /// A file a `path` entry names is that entry's both ways, wherever the
    /// entries stand in the file: restoring it in place uses that entry's
    /// prefix, and the pattern's prefix for it names no file.
    #[test]
    fn a_path_entry_takes_its_file_from_a_pattern_listed_before_it() {
        let text = r#"
[storage]
url = "/backups"
[[databases]]
dir = "/data"
prefix = "t/{name}"
[[databases]]
path = "/data/special.db"
prefix = "special"
"#;
        let config = Config::parse(text, Path::new("/etc/walsync.toml")).unwrap();
        let of = |p: &str| config.prefix_for(Path::new(p));
        assert_eq!(of("/data/special.db").as_deref(), Some("special"));
        assert_eq!(of("/data/other.db").as_deref(), Some("t/other"));
        assert_eq!(
            config.path_for("special").as_deref(),
            Some(Path::new("/data/special.db"))
        );
        assert_eq!(config.path_for("t/special"), None);
        assert_eq!(
            config.path_for("t/other").as_deref(),
            Some(Path::new("/data/other.db"))
        );
    }
}
