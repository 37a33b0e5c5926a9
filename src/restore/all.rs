//! `restore-all`: every database under a storage, each into its own file,
//! several at once.

use super::*;

/// How one database of a [`restore_all`] went.
#[derive(Debug)]
pub struct Outcome {
    pub prefix: String,
    pub output: PathBuf,
    pub result: Result<RestoreReport>,
}

/// Where a database restored into a directory goes: `dir/PREFIX.db`.
pub fn file_in_dir(dir: &Path, prefix: &str) -> PathBuf {
    dir.join(format!("{prefix}.db"))
}

/// One restore per prefix into `dir/PREFIX.db`, of the newest state.
pub fn into_dir(prefixes: Vec<String>, dir: &Path, force: bool) -> Vec<RestoreOptions> {
    prefixes
        .into_iter()
        .map(|prefix| RestoreOptions {
            output: file_in_dir(dir, &prefix),
            prefix,
            target: Target::Latest,
            force,
            keys: None,
            parallelism: FETCH_PARALLELISM,
        })
        .collect()
}

/// Runs the restores `parallelism` at a time. One failure does not stop the others.
pub async fn restore_all(
    storage: std::sync::Arc<dyn Storage>,
    jobs: Vec<RestoreOptions>,
    parallelism: usize,
) -> Vec<Outcome> {
    let mut pending = jobs.into_iter();
    let mut running = tokio::task::JoinSet::new();
    let mut done = Vec::new();
    loop {
        while running.len() < parallelism.max(1) {
            let Some(opts) = pending.next() else { break };
            let storage = storage.clone();
            running.spawn(async move {
                let prefix = opts.prefix.clone();
                let output = opts.output.clone();
                if let Some(parent) = output.parent()
                    && let Err(source) = std::fs::create_dir_all(parent)
                {
                    let result = Err(Error::Io {
                        path: parent.to_path_buf(),
                        source,
                    });
                    return Outcome {
                        prefix,
                        output,
                        result,
                    };
                }
                let result = restore(storage.as_ref(), &opts).await;
                Outcome {
                    prefix,
                    output,
                    result,
                }
            });
        }
        let next = running.join_next().await;
        if next.is_some() {
            crate::progress::current().database_done();
        }
        match next {
            Some(Ok(outcome)) => done.push(outcome),
            Some(Err(e)) => done.push(Outcome {
                prefix: "?".into(),
                output: PathBuf::from("?"),
                result: Err(Error::Io {
                    path: PathBuf::from("?"),
                    source: io::Error::other(e),
                }),
            }),
            None => break,
        }
    }
    done.sort_by(|a, b| a.prefix.cmp(&b.prefix));
    done
}
