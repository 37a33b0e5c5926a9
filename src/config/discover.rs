//! From entries to databases: a file, a glob or a directory with a
//! pattern turned into the database files there now, each with its prefix,
//! and back (which file a prefix names, which prefix a file gets).

use super::*;

impl Config {
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
        // A file a `path` entry names is that entry's, with its settings: a
        // `dir` or `glob` entry that also matches it (one tenant of many
        // with settings of its own, or a file that appears later) leaves it
        // out, instead of the whole set being refused.
        let named: HashSet<PathBuf> = self
            .named_files()
            .into_iter()
            .map(|path| path.canonicalize().unwrap_or(path))
            .collect();
        for (index, entry) in self.entries.iter().enumerate() {
            let pattern = !entry.names_one_file();
            for (path, rel) in entry.matches()? {
                let key = path.canonicalize().unwrap_or_else(|_| path.clone());
                if pattern && named.contains(&key) {
                    continue;
                }
                let prefix = match &entry.prefix {
                    PrefixRule::Fixed(p) => p.clone(),
                    PrefixRule::Template(t) => render(t, &path, &rel),
                };
                validate_prefix(&prefix).map_err(|e| {
                    check.err(format!("databases[{index}]: {} gives {e}", path.display()))
                })?;
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
    /// A pattern's file that a `path` entry names is not the pattern's
    /// (as in [`Config::discover`]).
    pub fn path_for(&self, prefix: &str) -> Option<PathBuf> {
        let named = self.named_files();
        self.by_precedence().find_map(|entry| {
            entry
                .path_for(prefix)
                .filter(|path| entry.names_one_file() || !named.contains(&lexical(path)))
        })
    }

    /// The prefix of the database at `path` by this configuration, whether
    /// or not the file exists (restoring in place): the `path` entry that
    /// names it, else the first entry that matches it. A relative `path` is
    /// relative to the working directory, as on any command line.
    pub fn prefix_for(&self, path: &Path) -> Option<String> {
        let path = lexical(&std::path::absolute(path).ok()?);
        self.by_precedence()
            .find_map(|entry| entry.prefix_for(&path))
    }

    /// `path` entries first, then the patterns, each in file order.
    fn by_precedence(&self) -> impl Iterator<Item = &Entry> {
        self.entries
            .iter()
            .filter(|e| e.names_one_file())
            .chain(self.entries.iter().filter(|e| !e.names_one_file()))
    }

    /// The files `path` entries name.
    fn named_files(&self) -> HashSet<PathBuf> {
        self.entries
            .iter()
            .filter_map(|entry| match &entry.source {
                Source::File(path) => Some(lexical(path)),
                _ => None,
            })
            .collect()
    }
}

impl Entry {
    /// A `path` entry: one file, not a pattern.
    fn names_one_file(&self) -> bool {
        matches!(self.source, Source::File(_))
    }

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

/// `text` with whatever stands between double quotes replaced by `…`. The
/// quoted text is escaped as Rust's `{:?}` escapes it: an escaped quote
/// (`\"`) inside does not end it.
pub(super) fn without_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if inside && c == '\\' {
            chars.next();
        } else if c == '"' {
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

pub(super) fn check_template(template: &str) -> Result<(), String> {
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
pub(super) fn relpath(base: &Path, path: &Path) -> String {
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
pub(super) fn glob_base(pattern: &Path) -> PathBuf {
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

pub(super) fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
