#!/usr/bin/env python3
"""Snapshot and restore a large SQLite database with walsync; print time and peak RSS.

Usage: bench/snapshot_restore.py [--size-mb 1024] [--storage URL] [--encrypt] [--keep]

Builds walsync (release), creates a database of about --size-mb megabytes, ships a
snapshot of it with `walsync snapshot` (local directory storage by default), restores
it with `walsync restore`, checks the restored file is byte-identical to the source,
and prints wall time and peak resident memory of each step. Peak RSS is read from
the kernel (getrusage of the finished child), so no extra tools are needed.
"""
import argparse, hashlib, os, resource, shutil, sqlite3, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_measured(cmd, env=None):
    """Runs cmd; returns wall seconds and that process's own peak RSS in MiB."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.monotonic() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            sys.exit(f"{' '.join(cmd)} failed:\n{err.read().decode(errors='replace')}")
    return elapsed, usage.ru_maxrss / 1024


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--storage", help="storage URL (default: a temp directory)")
    ap.add_argument("--encrypt", action="store_true",
                    help="encrypt the snapshot (AES-256-GCM, a fixed test key) and restore with the key")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    binary = os.path.join(ROOT, "target", "release", "walsync")
    work = tempfile.mkdtemp(prefix="walsync-bench-", dir=os.environ.get("BENCH_DIR"))
    try:
        db = os.path.join(work, "big.db")
        storage = args.storage or os.path.join(work, "replica")
        t0 = time.monotonic()
        conn = sqlite3.connect(db)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        rows = args.size_mb * 1024 // 4  # ~4 KB per row
        batch = 10_000
        for start in range(0, rows, batch):
            n = min(batch, rows - start)
            # Half random, half repeated bytes: compressible like real data.
            conn.execute(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < ?) "
                "INSERT INTO t(v) SELECT randomblob(2000) || zeroblob(2000) FROM c", (n,))
            conn.commit()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        size = os.path.getsize(db)
        print(f"database: {size / 2**20:.0f} MiB, {rows} rows, created in {time.monotonic() - t0:.1f} s")

        env = dict(os.environ, WALSYNC_LOG="warn")
        if args.encrypt:
            env["WALSYNC_ENCRYPTION_KEY"] = "ab" * 32
        snap_s, snap_rss = run_measured([binary, "snapshot", db, "--storage", storage], env)
        out = os.path.join(work, "restored.db")
        rest_s, rest_rss = run_measured(
            [binary, "restore", "--prefix", "big", "-o", out, "--storage", storage], env)
        same = sha256(db) == sha256(out)
        stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(storage) for f in fs) \
            if not storage.startswith("s3://") else float("nan")

        print()
        print(f"| step     | wall time | peak RSS  | note |")
        print(f"|----------|-----------|-----------|------|")
        print(f"| snapshot | {snap_s:7.1f} s | {snap_rss:6.0f} MiB | {stored / 2**20:.0f} MiB stored |")
        print(f"| restore  | {rest_s:7.1f} s | {rest_rss:6.0f} MiB | byte-identical: {same} |")
        if not same:
            sys.exit("restored file differs from the source")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
