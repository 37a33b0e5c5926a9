//! From the text of walsync.toml to checked settings: the file's shape
//! (unknown keys refused), then each value checked and named by file and
//! key when wrong.

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    storage: Option<RawStorage>,
    /// Each a `name` plus the keys of `[storage]` (checked as a `RawStorage`).
    #[serde(default)]
    mirrors: Vec<toml::Table>,
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
pub(super) struct Checker<'a> {
    pub(super) file: &'a Path,
    pub(super) uses: Uses,
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

    /// A `[[mirrors]]` entry's name and its `[storage]` keys.
    fn mirror_keys(
        &self,
        section: &str,
        mut table: toml::Table,
    ) -> Result<(Option<String>, RawStorage), Error> {
        let name = match table.remove("name") {
            None => None,
            Some(toml::Value::String(name)) => Some(name),
            Some(_) => return Err(self.err(format!("{section}.name must be a string"))),
        };
        let raw = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| {
                // The parser quotes the value it choked on; a value may be a secret.
                let message = without_quoted(e.message().trim()).replace('\n', " ");
                self.err(format!("{section}: {message}"))
            })?;
        Ok((name, raw))
    }

    /// A mirror's name: given, short, plain, and not taken by another.
    fn mirror_name(
        &self,
        section: &str,
        name: Option<String>,
        before: &[MirrorConfig],
    ) -> Result<String, Error> {
        let Some(name) = name else {
            return Err(self.err(format!(
                "{section}: name is missing (restore --from NAME picks the mirror)"
            )));
        };
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if name.is_empty() || name.len() > 64 || !name.chars().all(plain) {
            return Err(self.err(format!(
                "{section}.name must be 1-64 letters, digits, '-', '_' or '.'"
            )));
        }
        if before.iter().any(|m| m.name == name) {
            return Err(self.err(format!("{section}: two mirrors are named {name}")));
        }
        Ok(name)
    }

    pub(super) fn err(&self, message: impl fmt::Display) -> Error {
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
                // `$NAME` (Litestream's habit, and the shell's) would be taken
                // literally: a bucket named `$B`, a new chain. Refused where a
                // value is no secret; a secret may hold any `$`.
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let secret = key.ends_with("secret_access_key") || key.ends_with("session_token");
                if !secret && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
                    return Err(self.err(format!(
                        "{key}: ${name} is not expanded: write ${{{name}}} (or $$ for a literal $)"
                    )));
                }
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

/// Where a store's objects are, so that two spellings of one place compare
/// A serde type error in the words of the file: "expected u32" says
/// nothing to someone writing TOML.
fn readable_type(message: &str) -> String {
    let mut out = message.to_string();
    for rust in ["u8", "u16", "u32", "u64", "usize", "i32", "i64"] {
        out = out.replace(&format!("expected {rust}"), "expected a whole number");
    }
    if let Some(at) = out.find("expected struct Raw") {
        out.replace_range(at.., "expected a table (a [section] or { ... })");
    }
    out
}

/// A store URL with a relative local directory (`DIR` or `file://DIR`) made
/// relative to the configuration file's directory, like database paths, so
/// that it does not depend on where walsync was started. Any other URL as is.
fn local_beside(url: &str, base_dir: &Path) -> String {
    let (scheme, dir) = match url.strip_prefix("file://") {
        Some(dir) => ("file://", dir),
        None if url.contains("://") => return url.to_string(),
        None => ("", url),
    };
    if dir.is_empty() || Path::new(dir).is_absolute() {
        return url.to_string();
    }
    format!("{scheme}{}", base_dir.join(dir).display())
}

/// equal: the URL without `file://`, `.` parts or a trailing `/`, and the
/// endpoint without a trailing `/`.
fn place(store: &StorageConfig) -> (String, Option<&str>) {
    let url = store.url.strip_prefix("file://").unwrap_or(&store.url);
    let url = if url.contains("://") {
        url.trim_end_matches('/').to_string()
    } else {
        Path::new(url)
            .components()
            .collect::<PathBuf>()
            .display()
            .to_string()
    };
    (
        url,
        store
            .s3
            .endpoint
            .as_deref()
            .map(|e| e.trim_end_matches('/')),
    )
}

/// How store `a` overlaps store `b`, if it does: each store lists its
/// databases from its root, so one inside the other would list the other's
/// objects as a database of its own.
fn overlap(a: &StorageConfig, b: &StorageConfig) -> Option<&'static str> {
    let ((a, a_end), (b, b_end)) = (place(a), place(b));
    if a_end != b_end {
        None
    } else if a == b {
        Some("the same store as")
    } else if a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/")) {
        Some("inside, or around, the store of")
    } else {
        None
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

    /// The `[watch]` section of `path` alone, checked as it would be in a
    /// whole file: how a running `watch` is reached while the rest of the
    /// file holds an edit it refused (and kept running the last one).
    pub fn watch_section_of(path: &Path) -> Result<WatchSettings, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read {
            file: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| Error::Read {
            file: path.to_path_buf(),
            message: without_quoted(e.message().trim()).replace('\n', " "),
        })?;
        // `[storage]` too: a file is checked with one (it is not used).
        let mut only = toml::Table::new();
        for section in ["watch", "storage"] {
            if let Some(value) = table.remove(section) {
                only.insert(section.into(), value);
            }
        }
        Ok(Self::parse_for(&only.to_string(), path, Uses::CONTROL_SOCKET)?.watch)
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
            let message = readable_type(&without_quoted(e.message().trim()).replace('\n', " "));
            // A value of the wrong type: the key is on that line.
            let key = e
                .span()
                .and_then(|s| text.get(..s.start.min(text.len())))
                .and_then(|before| before.rsplit('\n').next())
                .and_then(|start| start.split('=').next())
                .map(str::trim)
                .filter(|k| {
                    !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                });
            match (line, key) {
                (Some(line), Some(key)) => check.err(format!("line {line}: {key}: {message}")),
                (Some(line), None) => check.err(format!("line {line}: {message}")),
                (None, _) => check.err(message),
            }
        })?;
        // Absolute, so that paths and `{relpath}` do not depend on the
        // directory walsync was started from.
        let base_dir = std::path::absolute(parent_of(path)).unwrap_or_else(|_| parent_of(path));
        let storage = Self::storage(&check, raw.storage.unwrap_or_default(), "storage");
        let mut storage = check
            .unless_unused(uses.storage, storage)?
            .unwrap_or_default();
        storage.url = local_beside(&storage.url, &base_dir);
        let mut mirrors: Vec<MirrorConfig> = Vec::with_capacity(raw.mirrors.len());
        let mut unresolved_mirrors = Vec::new();
        for (i, raw) in raw.mirrors.into_iter().enumerate() {
            let section = format!("mirrors[{i}]");
            let (name, raw) = check.mirror_keys(&section, raw)?;
            let name = check.mirror_name(&section, name, &mirrors)?;
            let section = format!("mirrors[{i}] ({name})");
            let mut store = match Self::storage(&check, raw, &section) {
                Ok(store) => store,
                Err(Error::Unset { .. }) if !uses.storage => continue,
                // Reading one store needs a mirror's variables only to read
                // that mirror.
                Err(e @ Error::Unset { .. }) if !uses.mirrors => {
                    unresolved_mirrors.push((name, e.to_string()));
                    continue;
                }
                Err(e) => return Err(e),
            };
            store.url = local_beside(&store.url, &base_dir);
            if uses.storage
                && let Some(how) = overlap(&store, &storage)
            {
                return Err(check.err(format!(
                    "{section}: {how} [storage]; a mirror must be another bucket, prefix or \
                     directory, beside it"
                )));
            }
            for twin in &mirrors {
                if let Some(how) = overlap(&store, &twin.storage) {
                    return Err(check.err(format!("{section}: {how} mirror {}", twin.name)));
                }
            }
            mirrors.push(MirrorConfig {
                name,
                storage: store,
            });
        }
        let sync = check.sync(
            &SyncOptions::default(),
            &raw.sync.unwrap_or_default(),
            "sync",
        )?;
        let watch = Self::watch(&check, raw.watch.unwrap_or_default())?;
        // Reaching a running watch (`status`, `sync`) needs no database.
        if raw.databases.is_empty() && (uses.databases || uses.storage) {
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
            mirrors,
            unresolved_mirrors,
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

    /// `section` names the table in errors: `storage`, or a mirror.
    fn storage(
        check: &Checker<'_>,
        raw: RawStorage,
        section: &str,
    ) -> Result<StorageConfig, Error> {
        let expand = |key: &str, v: &Option<String>| -> Result<Option<String>, Error> {
            v.as_deref().map(|v| check.expand(key, v)).transpose()
        };
        let url = match (
            expand(&format!("{section}.url"), &raw.url)?,
            expand(&format!("{section}.bucket"), &raw.bucket)?,
        ) {
            (Some(_), Some(_)) => {
                return Err(check.err(format!("{section}: give either url or bucket, not both")));
            }
            (Some(url), None) => {
                if raw.prefix.is_some() {
                    return Err(check.err(format!(
                        "{section}.prefix goes with bucket; put it in the url"
                    )));
                }
                // An empty value (an unset-but-empty ${VAR}, say) would be read
                // as a relative path, the config's own directory.
                if url.trim().is_empty() {
                    return Err(check.err(format!(
                        "{section}.url is empty (give s3://bucket/prefix or a directory)"
                    )));
                }
                url
            }
            (None, Some(bucket)) if bucket.trim().is_empty() => {
                return Err(check.err(format!("{section}.bucket is empty")));
            }
            (None, Some(bucket)) => match expand(&format!("{section}.prefix"), &raw.prefix)? {
                Some(prefix) => format!("s3://{bucket}/{}", prefix.trim_matches('/')),
                None => format!("s3://{bucket}"),
            },
            (None, None) => {
                return Err(check.err(format!(
                    "{section}: set url (s3://bucket/prefix or a directory) or bucket"
                )));
            }
        };
        if let Some(why) = crate::storage::url_problem(&url) {
            return Err(check.err(format!("{section}.url {url:?}: {why}")));
        }
        if let Some(prefix) = url.strip_prefix("s3://").and_then(|r| r.split_once('/'))
            && !prefix.1.is_empty()
        {
            validate_prefix(prefix.1.trim_end_matches('/'))
                .map_err(|e| check.err(format!("{section}.url: {e}")))?;
        }
        let access_key = expand(&format!("{section}.access_key_id"), &raw.access_key_id)?;
        let secret = expand(
            &format!("{section}.secret_access_key"),
            &raw.secret_access_key,
        )?;
        let token = expand(&format!("{section}.session_token"), &raw.session_token)?;
        let credentials = match (access_key, secret) {
            (Some(id), Some(secret)) => {
                Some(crate::storage::StaticCredentials::new(id, secret, token))
            }
            (None, None) => None,
            _ => {
                return Err(check.err(format!(
                    "{section}: access_key_id and secret_access_key go together"
                )));
            }
        };
        Ok(StorageConfig {
            url,
            s3: S3Options {
                endpoint: expand(&format!("{section}.endpoint"), &raw.endpoint)?,
                region: expand(&format!("{section}.region"), &raw.region)?,
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
}
