//! Turns what the user typed into validated settings, naming what is wrong.
//! Starts nothing and prints no secrets.

use std::path::{Path, PathBuf};

/// The directory used as storage when none is configured: beside the database.
pub const DEFAULT_REPLICA_DIR: &str = "walsync-replica";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    #[error("prefix {prefix:?}: {reason}")]
    BadPrefix {
        prefix: String,
        reason: &'static str,
    },
    #[error("{path}: cannot derive a prefix from this file name; pass --prefix")]
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
}

/// Checks that a database prefix stays inside the storage root.
pub fn validate_prefix(prefix: &str) -> Result<(), Error> {
    let bad = |reason| {
        Err(Error::BadPrefix {
            prefix: prefix.to_string(),
            reason,
        })
    };
    if prefix.is_empty() {
        return bad("is empty");
    }
    if prefix.starts_with('/') {
        return bad("must not start with '/'");
    }
    if prefix.ends_with('/') {
        return bad("must not end with '/'");
    }
    if prefix.split('/').any(|s| s.is_empty()) {
        return bad("has an empty path segment ('//')");
    }
    if prefix.split('/').any(|s| s == ".." || s == ".") {
        return bad("must not contain '.' or '..' segments");
    }
    if prefix.chars().any(|c| c.is_control() || c == '\\') {
        return bad("must not contain control characters or '\\'");
    }
    Ok(())
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
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    dir.join(DEFAULT_REPLICA_DIR)
}

/// Pairs each database with its prefix, rejecting duplicates.
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
}
