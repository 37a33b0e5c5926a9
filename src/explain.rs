//! `walsync explain`: the configuration as walsync resolved it (databases
//! found now, prefixes, effective intervals, storage), with every secret
//! masked, so that an operator can check a walsync.toml before running it.

use std::fmt::Write;
use std::time::Duration;

use crate::config::{self, Config, PrefixRule, Source};
use crate::replica::SyncOptions;

/// A store's URL and S3 settings, secrets masked.
fn write_store(out: &mut String, label: &str, storage: &config::StorageConfig) {
    let s3 = &storage.s3;
    let _ = writeln!(
        out,
        "{label} {}",
        crate::storage::redact_userinfo(&storage.url)
    );
    if let Some(endpoint) = &s3.endpoint {
        let _ = writeln!(
            out,
            "  endpoint     {}",
            crate::storage::redact_userinfo(endpoint)
        );
    }
    if let Some(region) = &s3.region {
        let _ = writeln!(out, "  region       {region}");
    }
    if let Some(path_style) = s3.force_path_style {
        let _ = writeln!(out, "  path style   {path_style}");
    }
    let credentials = match &s3.credentials {
        Some(c) => format!("access key {}, secret (masked)", mask(&c.access_key_id)),
        None => "the AWS default chain (environment, profile, role)".into(),
    };
    let _ = writeln!(out, "  credentials  {credentials}");
}

/// The report, one line per fact. Fails only if discovery does (the same
/// errors `watch` would refuse to start with).
pub fn explain(config: &Config) -> Result<String, config::Error> {
    let targets = config.discover()?;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "configuration  {}", config.source.display());
    write_store(&mut out, "storage       ", &config.storage);
    for mirror in &config.mirrors {
        write_store(
            &mut out,
            &format!("mirror {:<7}", mirror.name),
            &mirror.storage,
        );
    }
    let watch = &config.watch;
    let _ = writeln!(
        out,
        "watch          parallelism {}, {}, shutdown timeout {}, close idle after {}, max open {}",
        watch.parallelism,
        if watch.poll {
            format!("polling every {}", human(watch.poll_interval))
        } else {
            "file events".into()
        },
        human(watch.shutdown_timeout),
        watch.close_idle_after.map_or("never".into(), human),
        watch
            .max_open
            .map_or("from the open-file limit".into(), |n| n.to_string()),
    );
    let _ = writeln!(
        out,
        "  listen       {}",
        watch
            .listen
            .map_or("off (no /metrics, /health or status page)".into(), |a| a
                .to_string())
    );
    let socket = watch
        .control_socket
        .clone()
        .unwrap_or_else(|| crate::control::default_socket(&config.source));
    let _ = writeln!(out, "  control      {} (walsync sync)", socket.display());
    for (index, entry) in config.entries.iter().enumerate() {
        let source = match &entry.source {
            Source::File(path) => format!("file {}", path.display()),
            Source::Glob { pattern, .. } => format!("glob {pattern}"),
            Source::Dir {
                dir,
                pattern,
                recursive,
            } => format!(
                "dir {} matching {pattern}{}",
                dir.display(),
                if *recursive { ", recursive" } else { "" }
            ),
        };
        let prefix = match &entry.prefix {
            PrefixRule::Fixed(p) => p.clone(),
            PrefixRule::Template(t) => t.clone(),
        };
        let _ = writeln!(out, "databases[{index}]   {source} -> prefix {prefix}");
        let _ = writeln!(out, "  sync         {}", sync(&entry.sync));
    }
    let _ = writeln!(out, "found now      {} database(s)", targets.len());
    for target in &targets {
        let state = if target.path.exists() {
            ""
        } else {
            "  (missing)"
        };
        let _ = writeln!(
            out,
            "  {} -> {}{state}",
            target.path.display(),
            target.prefix
        );
    }
    Ok(out)
}

fn sync(s: &SyncOptions) -> String {
    let retention = match (s.retention.age, s.retention.snapshots) {
        (None, None) => "keep every snapshot".to_string(),
        (Some(age), None) => format!("keep {}", human(age)),
        (None, Some(n)) => format!("keep {n} snapshots"),
        (Some(age), Some(n)) => format!("keep {} and {n} snapshots", human(age)),
    };
    // What compaction keeps is part of what is kept: past the exact window,
    // the objects a run stands for go.
    let compaction = if s.compaction.is_empty() {
        "no compaction".to_string()
    } else {
        let levels: Vec<String> = s.compaction.iter().map(u64::to_string).collect();
        let window = match s.exact_window {
            Some(w) => format!(
                "every transaction exact for {}, older ones by run",
                human(w)
            ),
            None => "every transaction kept exact".to_string(),
        };
        format!(
            "compaction into runs of {} objects, {window}",
            levels.join(", ")
        )
    };
    // A key shows as its id only, as object headers record it.
    let encryption = match &s.encryption {
        None => "not encrypted".to_string(),
        Some(keys) => {
            let sealing = match keys.current() {
                Some(k) => format!("encrypted with key {}", k.id()),
                None => "not encrypted (turned off)".to_string(),
            };
            sealing
                + &keys
                    .previous()
                    .iter()
                    .map(|k| format!(", opens {}", k.id()))
                    .collect::<String>()
        }
    };
    format!(
        "every {}, snapshot every {}, checkpoint after {} pages or {}, truncate past {} pages, {retention}, {compaction}, {encryption}",
        human(s.sync_interval),
        human(s.snapshot_interval),
        s.checkpoint_pages,
        human(s.checkpoint_interval),
        s.truncate_pages
    )
}

fn human(d: Duration) -> String {
    if d.is_zero() {
        "0s".into()
    } else {
        humantime::format_duration(d).to_string()
    }
}

/// Enough of a key to tell which one it is, not enough to use it.
fn mask(key: &str) -> String {
    let shown: String = key.chars().take(4).collect();
    format!("{shown}****")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn explains_everything_and_masks_secrets() {
        let text = r#"
[storage]
url = "s3://bucket/prod"
endpoint = "http://admin:endpoint-pass@127.0.0.1:9000"
access_key_id = "AKIAEXAMPLEKEY123"
secret_access_key = "very-secret-value"
[sync]
encryption_key = "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e"
[[databases]]
path = "/nonexistent/app.db"
prefix = "app"
sync_interval = "0s"
[[databases]]
path = "/nonexistent/plain.db"
encryption_key = "off"
"#;
        let config = Config::parse(text, Path::new("/etc/walsync.toml")).unwrap();
        let report = explain(&config).unwrap();
        assert!(report.contains("s3://bucket/prod"), "{report}");
        assert!(report.contains("AKIA****"), "{report}");
        assert!(!report.contains("EXAMPLEKEY123"), "{report}");
        assert!(!report.contains("very-secret-value"), "{report}");
        assert!(
            report.contains("http://127.0.0.1:9000") && !report.contains("endpoint-pass"),
            "{report}"
        );
        assert!(
            report.contains("/nonexistent/app.db -> app  (missing)"),
            "{report}"
        );
        assert!(report.contains("every 0s"), "{report}");
        assert!(!report.contains("5e5e5e"), "{report}");
        let id = crate::encryption::Key::from_bytes(&[0x5e; 32]).id();
        assert!(
            report.contains(&format!("encrypted with key {id}")),
            "{report}"
        );
        assert!(report.contains("not encrypted"), "{report}");
    }
}
