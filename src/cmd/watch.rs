//! `walsync watch`: replicates until stopped, alone or as an app's sidecar.

use super::*;

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
        mirrors: Arc::from([]),
    })
}

pub(super) async fn watch(args: WatchArgs, shutdown: CancellationToken) -> Result<u8> {
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
    let control = plan.config_files().first().map(|path| {
        plan.watch()
            .control_socket
            .clone()
            .unwrap_or_else(|| control::default_socket(path))
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
        None if args.databases.is_empty() => match config::locate() {
            Some(path) => Some(path),
            None => {
                return Err(Usage(format!(
                    "nothing to watch: name the database files, or give --config FILE ({})",
                    config::where_looked()
                ))
                .into());
            }
        },
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
        let keep_retrying = args.keep_retrying || config.watch.keep_retrying;
        let storage = open_config_storage(&config.storage).await?;
        let mut mirrors = Vec::with_capacity(config.mirrors.len());
        for mirror in &config.mirrors {
            let storage = open_config_storage(&mirror.storage)
                .await
                .with_context(|| format!("mirror {}", mirror.name))?;
            mirrors.push(Mirror {
                name: mirror.name.clone(),
                storage,
            });
        }
        // Every store at once, each bounded in time: a mirror that hangs
        // must not hold back the start of `[storage]`'s replication.
        let stores = std::iter::once((None, &storage))
            .chain(mirrors.iter().map(|m| (Some(&m.name), &m.storage)));
        let checks = stores.map(|(name, storage)| async move {
            let checked = check_storage(storage.as_ref(), keep_retrying).await;
            match name {
                Some(name) => checked.with_context(|| format!("mirror {name}")),
                None => checked,
            }
        });
        // Every refusal said at once: fixing one store should not reveal the next.
        let refused: Vec<String> = futures_util::future::join_all(checks)
            .await
            .into_iter()
            .filter_map(|checked| checked.err().map(|e| format!("{e:#}")))
            .collect();
        if !refused.is_empty() {
            bail!("{}", refused.join("; and "));
        }
        let mirrors = Arc::from(mirrors);
        return Ok(Plan::Config {
            config,
            storage,
            mirrors,
        });
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
    /// (clap's defaults are read from SyncOptions::default, which the file
    /// starts from).
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
