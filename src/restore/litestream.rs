//! `walsync restore --litestream`: a database from a Litestream 0.5
//! replica, for users who switch. The files the plan names are downloaded
//! one at a time into a scratch directory, each read and checked through
//! [`crate::litestream::ltx`] as its pages go into a temp file beside the
//! output, which is checked with `PRAGMA integrity_check` and then moved
//! into place exactly as a walsync restore's is.

use std::io::BufReader;
use std::os::unix::fs::FileExt;

use tokio::io::AsyncWriteExt;

use super::*;
use crate::litestream::{self, LtxFile, ltx};

/// What a restore from a Litestream replica did.
#[derive(Debug, Clone)]
pub struct LitestreamReport {
    /// Litestream's transaction restored to.
    pub txid: u64,
    pub files: usize,
    pub bytes: u64,
    pub page_size: u32,
    pub pages: u32,
    /// When Litestream wrote the last file read (ms since the epoch).
    pub timestamp_ms: u64,
}

/// Restores the Litestream replica under `opts.prefix` into `opts.output`;
/// `Target::Seq` names a Litestream transaction (its files' names, in hex).
pub async fn restore_litestream(
    storage: &dyn Storage,
    opts: &RestoreOptions,
) -> Result<LitestreamReport> {
    let output = &opts.output;
    if !opts.force && output.exists() {
        return Err(Error::OutputExists {
            path: output.clone(),
        });
    }
    let files = litestream::list(storage, &opts.prefix).await?;
    if files.is_empty() {
        return Err(Error::NoReplica {
            prefix: opts.prefix.clone(),
            storage: format!(
                "{} (looked for Litestream 0.5 LTX files)",
                storage.describe()
            ),
        });
    }
    let planned = litestream_plan(storage, &opts.prefix, &files, opts.target).await?;
    crate::progress::current().planned(
        &opts.prefix,
        planned.len(),
        planned.iter().map(|f| f.size).sum(),
    );
    let (lock, scratch) = hold_output(output).await?;
    let tmp =
        sidefile::temp_beside(output, "litestream").map_err(io_at(&sidefile::dir_of(output)))?;
    let mut report = LitestreamReport {
        txid: 0,
        files: planned.len(),
        bytes: planned.iter().map(|f| f.size).sum(),
        page_size: 0,
        pages: 0,
        timestamp_ms: 0,
    };
    for file in &planned {
        let spool = scratch.path().join("file.ltx");
        download(storage, &file.key, &spool).await?;
        let out = tmp.as_file().try_clone().map_err(io_at(tmp.path()))?;
        let (key, spooled, page_size) = (file.key.clone(), spool.clone(), report.page_size);
        let header =
            tokio::task::spawn_blocking(move || apply_file(&key, &spooled, &out, page_size))
                .await
                .map_err(|e| Error::Io {
                    path: spool.clone(),
                    source: io::Error::other(e),
                })??;
        if (header.min_txid, header.max_txid) != (file.min_txid, file.max_txid) {
            return Err(Error::Litestream {
                key: file.key.clone(),
                why: format!(
                    "its header says transactions {:x}-{:x}, its name another range",
                    header.min_txid, header.max_txid
                ),
            });
        }
        report.txid = header.max_txid;
        report.page_size = header.page_size;
        report.pages = header.commit;
        report.timestamp_ms = u64::try_from(header.timestamp_ms).unwrap_or(0);
        std::fs::remove_file(&spool).map_err(io_at(&spool))?;
        crate::progress::current().fetched(file.size);
    }
    let output = output.clone();
    let force = opts.force;
    tokio::task::spawn_blocking(move || -> Result<()> {
        tmp.as_file().sync_all().map_err(io_at(tmp.path()))?;
        check_integrity(tmp.path())?;
        let (_, path) = tmp.keep().map_err(|e| Error::Io {
            path: output.clone(),
            source: e.error,
        })?;
        let placed = place(&path, &output, force);
        if placed.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        placed?;
        let dir = sidefile::dir_of(&output);
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_at(&dir))
    })
    .await
    .map_err(|e| Error::Io {
        path: opts.output.clone(),
        source: io::Error::other(e),
    })??;
    drop(scratch);
    drop(lock);
    Ok(report)
}

/// The files that reach `target`: a Litestream transaction, or the newest
/// one whose file was written at or before a time (read from the headers
/// of a few files, halving the range each time).
async fn litestream_plan(
    storage: &dyn Storage,
    prefix: &str,
    files: &[LtxFile],
    target: Target,
) -> Result<Vec<LtxFile>> {
    let txid = match target {
        Target::Latest => None,
        Target::Seq(txid) => Some(txid),
        Target::Time(ms) => Some(txid_at(storage, prefix, files, ms).await?),
    };
    litestream::plan(files, txid).map_err(|why| Error::Litestream {
        key: format!("{prefix}/"),
        why: why.to_string(),
    })
}

/// The newest transaction a plan can reach whose file was written at or
/// before `ms`.
async fn txid_at(storage: &dyn Storage, prefix: &str, files: &[LtxFile], ms: u64) -> Result<u64> {
    // One file for each transaction a file ends at, oldest first.
    let mut ends: Vec<&LtxFile> = Vec::new();
    let mut sorted: Vec<&LtxFile> = files.iter().collect();
    sorted.sort_by_key(|f| (f.max_txid, f.level));
    for file in sorted {
        if ends.last().is_none_or(|e| e.max_txid != file.max_txid) {
            ends.push(file);
        }
    }
    let written = async |file: &LtxFile| -> Result<u64> {
        let head = storage
            .get_range(&file.key, 0, ltx::HEADER_SIZE as u64)
            .await?;
        let header = ltx::read_header(&head).map_err(|e| Error::Litestream {
            key: file.key.clone(),
            why: e.to_string(),
        })?;
        Ok(u64::try_from(header.timestamp_ms).unwrap_or(0))
    };
    let Some(first) = ends.first() else {
        return Err(Error::NoReplica {
            prefix: prefix.to_string(),
            storage: storage.describe(),
        });
    };
    let earliest = written(first).await?;
    if earliest > ms {
        return Err(Error::BeforeEarliest {
            prefix: prefix.to_string(),
            at: format_ms(ms),
            earliest: format!("{} (transaction {:x})", format_ms(earliest), first.max_txid),
            not_yet_replicated: first.min_txid == 1,
        });
    }
    let (mut lo, mut hi) = (0, ends.len());
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if written(ends[mid]).await? <= ms {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    // A plan may not reach that very transaction (its level-0 file gone):
    // the newest it reaches before it is still not later than asked.
    let txid = ends[lo].max_txid;
    match litestream::plan(files, Some(txid)) {
        Err(litestream::NoPlan::Short { reached, .. }) if reached > 0 => Ok(reached),
        _ => Ok(txid),
    }
}

async fn download(storage: &dyn Storage, key: &str, to: &Path) -> Result<()> {
    let spool_err = |source| Error::Spool {
        key: key.to_string(),
        path: to.to_path_buf(),
        source,
    };
    let mut reader = storage.get(key).await?;
    let mut file = tokio::fs::File::create(to).await.map_err(spool_err)?;
    tokio::io::copy(&mut reader, &mut file)
        .await
        .map_err(spool_err)?;
    file.flush().await.map_err(spool_err)
}

/// Reads one downloaded LTX file into `out`: its pages where they belong,
/// then the file cut to the size the file gives. Every file of one restore
/// has the page size of the first.
fn apply_file(key: &str, spool: &Path, out: &File, page_size: u32) -> Result<ltx::Header> {
    let refuse = |why: String| Error::Litestream {
        key: key.to_string(),
        why,
    };
    let input = BufReader::with_capacity(1 << 20, File::open(spool).map_err(io_at(spool))?);
    // Pages of another size land in the temp file all the same, which this
    // refusal then throws away with the rest of the restore.
    let mut write = |header: &ltx::Header, pgno: u32, page: &[u8]| -> io::Result<()> {
        out.write_all_at(page, u64::from(pgno - 1) * u64::from(header.page_size))
    };
    let (header, _) = ltx::read(input, &mut write).map_err(|e| refuse(e.to_string()))?;
    if page_size != 0 && header.page_size != page_size {
        return Err(refuse(format!(
            "its pages are {} bytes, those before {page_size}",
            header.page_size
        )));
    }
    out.set_len(u64::from(header.commit) * u64::from(header.page_size))
        .map_err(io_at(spool))?;
    Ok(header)
}
