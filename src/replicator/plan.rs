//! Which databases `watch` replicates: a fixed set named on the command
//! line, or those a walsync.toml names (re-read when it changes), and the
//! directories to watch for them.

use super::*;

/// One database to replicate.
#[derive(Debug, Clone)]
pub struct DbSpec {
    pub path: PathBuf,
    pub prefix: String,
    pub storage: Arc<dyn Storage>,
    pub sync: SyncOptions,
}

impl DbSpec {
    /// `listed[i]`: store `i`'s objects of this prefix from the start-up
    /// listing, where it had them.
    pub(super) async fn open(&self, listed: Vec<replica::Listed>) -> replica::Result<Replica> {
        Replica::open_listed(
            &self.path,
            &self.prefix,
            self.storage.clone(),
            self.sync.clone(),
            listed,
        )
        .await
    }
}

/// Which databases to replicate.
// One per process: the size of its variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Plan {
    /// Named on the command line: a fixed set.
    Fixed {
        specs: Vec<DbSpec>,
        watch: WatchSettings,
    },
    /// From a walsync.toml, re-read when it changes.
    Config {
        config: Config,
        storage: Arc<dyn Storage>,
        /// The opened `[[mirrors]]` of `config`, in its order.
        mirrors: Arc<[Mirror]>,
    },
}

impl Plan {
    /// The watch settings of this plan.
    pub fn watch(&self) -> &WatchSettings {
        match self {
            Plan::Fixed { watch, .. } => watch,
            Plan::Config { config, .. } => &config.watch,
        }
    }

    pub(super) fn targets(&self) -> Result<Vec<DbSpec>> {
        match self {
            Plan::Fixed { specs, .. } => Ok(specs.clone()),
            Plan::Config {
                config,
                storage,
                mirrors,
            } => Ok(config
                .discover()?
                .into_iter()
                .map(|t| DbSpec {
                    path: t.path,
                    prefix: t.prefix,
                    storage: storage.clone(),
                    sync: SyncOptions {
                        mirrors: mirrors.clone(),
                        ..t.sync
                    },
                })
                .collect()),
        }
    }

    /// Directories to watch (and whether recursively).
    pub(super) fn roots(&self) -> HashSet<(PathBuf, bool)> {
        let mut roots = HashSet::new();
        match self {
            Plan::Fixed { specs, .. } => {
                for spec in specs {
                    roots.insert((parent_of(&spec.path), false));
                }
            }
            Plan::Config { config, .. } => {
                for entry in &config.entries {
                    roots.insert(entry.source.watch_roots());
                }
                // A file that is a link to another directory (a mounted
                // Kubernetes ConfigMap, /etc/x.toml -> /srv/conf/x.toml) is
                // edited there.
                roots.insert((parent_of(&config.source), false));
                roots.insert((parent_of(&canonical(&config.source)), false));
            }
        }
        roots
            .into_iter()
            .map(|(dir, recursive)| (canonical(&dir), recursive))
            .collect()
    }

    /// The walsync.toml this plan comes from, if any (links resolved).
    pub fn config_file(&self) -> Option<PathBuf> {
        match self {
            Plan::Fixed { .. } => None,
            Plan::Config { config, .. } => Some(canonical(&config.source)),
        }
    }

    /// The paths an event about the configuration file may name: the file
    /// where its directory is (links in the directory's path resolved, as
    /// the watcher reports them) and, where it is a link, what it resolves
    /// to.
    pub fn config_files(&self) -> Vec<PathBuf> {
        let Plan::Config { config, .. } = self else {
            return Vec::new();
        };
        let mut files = vec![in_canonical_dir(&config.source)];
        let resolved = canonical(&config.source);
        if !files.contains(&resolved) {
            files.push(resolved);
        }
        files
    }
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `path` with its directory's links resolved, its own name kept (a link
/// stays the link).
pub fn in_canonical_dir(path: &Path) -> PathBuf {
    match path.file_name() {
        Some(name) => parent_of(path)
            .canonicalize()
            .map(|dir| dir.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        None => path.to_path_buf(),
    }
}

/// The path the watcher reports for `path`, also for files that do not exist yet.
pub(super) fn canonical(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            dir.canonicalize()
                .map(|d| d.join(name))
                .unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    }
}
