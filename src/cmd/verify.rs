//! `walsync verify`: checks chains in storage end to end, or (with
//! --chain-only) their headers and trailers alone.

use futures_util::StreamExt;

use super::*;
use crate::progress;
use crate::verify::{self, Depth, Report};

/// Databases checked at once when verifying a whole store; each reads its
/// own objects several at a time as well.
const DATABASES_AT_ONCE: usize = 4;

pub(super) async fn verify(args: &VerifyArgs) -> Result<()> {
    if let Some(prefix) = &args.prefix {
        config::validate_prefix(prefix)?;
    }
    let config = reading_config(
        args.config.as_ref(),
        &args.storage,
        config::Uses::STORAGE_AND_KEYS,
    )?;
    let storage = match &config {
        Some(config) => open_config_storage(config.store(args.from.as_deref())?).await?,
        None => {
            no_mirrors_without_config(args.from.as_deref())?;
            open_default_replica(&args.storage, Path::new(config::DEFAULT_REPLICA_DIR)).await?
        }
    };
    let prefixes = match &args.prefix {
        Some(prefix) => vec![prefix.clone()],
        None => {
            let listed = chain::database_names(storage.as_ref())
                .await
                .with_context(|| format!("listing {}", storage.describe()))?;
            for (name, why) in &listed.refused {
                eprintln!("warning: not checking {name:?}: not a valid database name (it {why})");
            }
            if listed.found.is_empty() {
                bail!("no database in {}", storage.describe());
            }
            listed.found
        }
    };
    let depth = if args.chain_only {
        Depth::ChainOnly
    } else {
        Depth::Full
    };
    // Headers and trailers are never encrypted: a scrub needs no key.
    let keys = match depth {
        Depth::ChainOnly => None,
        Depth::Full => reading_keys(config.as_ref(), args.storage.encryption_key_file.as_deref())?,
    };
    let live = args.db.as_deref();
    let scratch = verify::scratch_dir(live);
    let storage = storage.as_ref();
    progress::install_for_databases(args.quiet, prefixes.len() as u64, "verify");
    let reports = futures_util::stream::iter(&prefixes)
        .map(|prefix| {
            let keys = keys.clone();
            let scratch = &scratch;
            async move {
                verify::verify(storage, prefix, live, scratch, keys, depth)
                    .await
                    .with_context(|| format!("verifying {prefix} in {}", storage.describe()))
            }
        })
        .buffered(DATABASES_AT_ONCE);
    let mut reports = std::pin::pin!(reports);
    let mut failed = Vec::new();
    for prefix in &prefixes {
        let Some(report) = reports.next().await else {
            break;
        };
        progress::current().database_done();
        let report = match report {
            Ok(report) => report,
            // One database's store error does not end a scrub of the others.
            Err(e) if prefixes.len() > 1 => Report {
                problems: vec![format!("{e:#}")],
                ..Report::default()
            },
            Err(e) => {
                progress::current().finish();
                return Err(e);
            }
        };
        progress::out_of_the_way(|| say_report(prefix, &report, depth));
        if !report.problems.is_empty() {
            failed.push((prefix, report.problems.len()));
        }
    }
    progress::current().finish();
    if prefixes.len() > 1 {
        sayln!(
            "{} databases: {} ok, {} with problems",
            prefixes.len(),
            prefixes.len() - failed.len(),
            failed.len()
        );
    }
    match failed.as_slice() {
        [] => Ok(()),
        [(prefix, problems)] => bail!("{prefix}: {problems} problem(s) found"),
        more => {
            let named: Vec<&str> = more.iter().take(10).map(|(p, _)| p.as_str()).collect();
            let rest = more.len() - named.len();
            bail!(
                "{} databases have problems: {}{}",
                more.len(),
                named.join(", "),
                if rest > 0 {
                    format!(" and {rest} more")
                } else {
                    String::new()
                }
            )
        }
    }
}

fn say_report(prefix: &str, report: &Report, depth: Depth) {
    sayln!(
        "{}: {} objects ({} snapshots, {} bytes){}, head {}",
        prefix,
        report.objects,
        report.snapshots,
        report.bytes,
        if report.runs > 0 {
            format!(", {} runs", report.runs)
        } else {
            String::new()
        },
        report.head.map_or("-".into(), |h| h.to_string())
    );
    if depth == Depth::ChainOnly {
        sayln!("  headers and trailers only: links checked, bodies not read");
    }
    if report.restored {
        sayln!("  newest state restored and passed PRAGMA integrity_check");
    }
    if let Some(pages) = report.compared_pages {
        sayln!("  compared {pages} pages with the live database");
    }
    for problem in &report.problems {
        eprintln!("  problem: {problem}");
    }
    if report.problems.is_empty() {
        sayln!("  ok");
    }
}
