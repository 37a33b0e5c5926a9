//! `walsync list`: databases in storage, and the restore points of one.

use super::*;

pub(super) async fn list(args: ListArgs) -> Result<()> {
    let storage = match reading_config(args.config.as_ref(), &args.storage, config::Uses::STORAGE)?
    {
        Some(config) => open_config_storage(config.store(args.from.as_deref())?).await?,
        None => {
            no_mirrors_without_config(args.from.as_deref())?;
            open_default_replica(&args.storage, Path::new(config::DEFAULT_REPLICA_DIR)).await?
        }
    };
    let mut under = String::new();
    if let Some(prefix) = &args.prefix {
        let name = prefix.strip_suffix('/').unwrap_or(prefix);
        config::validate_prefix(name)?;
        if !prefix.ends_with('/') {
            let (objects, runs) = chain::list_with_runs(storage.as_ref(), name)
                .await
                .with_context(|| format!("listing {name} in {}", storage.describe()))?;
            if !objects.is_empty() {
                return restore_points(storage.as_ref(), name, (objects, runs), args.all).await;
            }
        }
        under = format!("{name}/");
    }
    // Tips and counts only: the objects of a whole fleet's chains would not
    // fit a small machine's memory.
    let listed = crate::tips::list_tips_under(storage.as_ref(), &under)
        .await
        .with_context(|| match under.as_str() {
            "" => format!("listing {}", storage.describe()),
            under => format!("listing {under} in {}", storage.describe()),
        })?;
    for (name, why) in &listed.refused {
        eprintln!("warning: ignoring {name:?} in storage: not a valid database name (it {why})");
    }
    let dbs = listed.found;
    if dbs.is_empty() {
        if !under.is_empty() {
            bail!(
                "no database {} (nor any below it) in {}",
                under.trim_end_matches('/'),
                storage.describe()
            );
        }
        sayln!("no databases in {}", storage.describe());
        return Ok(());
    }
    sayln!(
        "{:<32} {:>8} {:>10} {:>10} {:>14} {:>14}  LAST SYNC",
        "PREFIX",
        "OBJECTS",
        "HEAD SEQ",
        "SNAPSHOT",
        "STORED BYTES",
        "DB BYTES"
    );
    let mut attention = 0;
    for found in dbs {
        let prefix = found.name;
        // A chain the listing could not sum up (it forks) is listed whole,
        // to name its forks; its row then comes from that listing alone.
        let (objects, count, bytes) = match found.tips {
            Some(tips) => (tips, found.objects, found.bytes),
            None => {
                let all = chain::list(storage.as_ref(), &prefix)
                    .await
                    .with_context(|| format!("listing {prefix} in {}", storage.describe()))?;
                let (count, bytes) = (all.len() as u64, all.iter().map(|o| o.size).sum());
                (all, count, bytes)
            }
        };
        let Some(head) = objects.last() else { continue };
        let snapshot = objects
            .iter()
            .rev()
            .find(|o| o.kind == crate::segment::Kind::Snapshot)
            .map(|o| o.seq.to_string())
            .unwrap_or_else(|| "-".into());
        let (db_bytes, time) = match chain::read_header(storage.as_ref(), head).await {
            Ok(h) => (
                (u64::from(h.db_pages) * u64::from(h.page_size)).to_string(),
                format_ms(h.timestamp_ms),
            ),
            Err(e) => ("?".into(), format!("unreadable: {e}")),
        };
        sayln!(
            "{:<32} {:>8} {:>10} {:>10} {:>14} {:>14}  {}",
            prefix,
            count,
            head.seq,
            snapshot,
            bytes,
            db_bytes,
            time
        );
        if let Some(forked) = chain::describe_forks(&objects) {
            sayln!("  needs attention: {forked}");
            attention += 1;
        }
    }
    if attention > 0 {
        eprintln!(
            "warning: {attention} database(s) need attention; `walsync verify --prefix NAME` \
             shows which branch restore follows"
        );
    }
    Ok(())
}

/// One database's restore points: each snapshot starts one, and every
/// object after it up to the head is a state `restore` can reach; where
/// objects older than the exact window were deleted, the ends of the runs
/// that stand for them.
async fn restore_points(
    storage: &dyn Storage,
    prefix: &str,
    (mut objects, runs): (Vec<chain::ObjectRef>, Vec<(u64, chain::ObjectRef)>),
    all: bool,
) -> Result<()> {
    chain::find_unmarked_start(storage, &mut objects)
        .await
        .with_context(|| format!("reading the first object of {prefix}"))?;
    let (Some(first), Some(head)) = (
        objects
            .iter()
            .find(|o| o.kind == crate::segment::Kind::Snapshot),
        objects.last(),
    ) else {
        bail!(
            "no restorable replica of {prefix} in {}",
            storage.describe()
        );
    };
    let header = |o| async move {
        chain::read_header(storage, o)
            .await
            .with_context(|| format!("reading {}", o.key))
    };
    let earliest = header(first).await?;
    let latest = header(head).await?;
    sayln!("{prefix} in {}", storage.describe());
    sayln!(
        "  earliest  sequence {:>10}  {}",
        first.seq,
        format_ms(earliest.timestamp_ms)
    );
    sayln!(
        "  latest    sequence {:>10}  {}",
        head.seq,
        format_ms(latest.timestamp_ms)
    );
    sayln!(
        "  {} objects and {} runs, {} bytes stored",
        objects.len(),
        runs.len(),
        objects
            .iter()
            .chain(runs.iter().map(|(_, r)| r))
            .map(|o| o.size)
            .sum::<u64>()
    );
    let points = chain::restore_points(&objects, &runs, first.seq);
    // The newest hole: before it, only run ends remain.
    let exact_from = points
        .windows(2)
        .rposition(|w| w[1].seq != w[0].seq + 1)
        .map(|i| {
            (
                points[i + 1],
                points[..=i + 1]
                    .windows(2)
                    .map(|w| w[1].seq - w[0].seq)
                    .max()
                    .unwrap_or(1),
            )
        });
    match exact_from {
        None => sayln!("  every sequence from the earliest to the latest can be restored exactly"),
        Some((from, apart)) => {
            let h = header(from).await?;
            sayln!(
                "  exact     sequence {:>10}  {}  (every sequence from here on)",
                from.seq,
                format_ms(h.timestamp_ms)
            );
            sayln!(
                "  before it, the ends of runs (up to {apart} sequences apart): older objects \
                 were deleted once the exact window passed"
            );
        }
    }
    if all {
        // One header read per point: what --all asks for, and only then.
        let restorable = points.iter().copied();
        sayln!("  every restore point (restore --txid SEQ or --timestamp TIME):");
        for object in restorable {
            let h = header(object).await?;
            sayln!(
                "    sequence {:>10}  {}  {:<8}  {} bytes",
                object.seq,
                format_ms(h.timestamp_ms),
                format!("{:?}", h.kind).to_lowercase(),
                object.size
            );
        }
        if let Some(forked) = chain::describe_forks(&objects) {
            sayln!("  needs attention: {forked}");
        }
        return Ok(());
    }
    sayln!("  snapshots (each starts a restorable run up to the next):");
    for snapshot in objects
        .iter()
        .filter(|o| o.kind == crate::segment::Kind::Snapshot)
    {
        let h = header(snapshot).await?;
        sayln!(
            "    sequence {:>10}  {}  {} bytes",
            snapshot.seq,
            format_ms(h.timestamp_ms),
            snapshot.size
        );
    }
    if let Some(forked) = chain::describe_forks(&objects) {
        sayln!("  needs attention: {forked}");
    }
    Ok(())
}
