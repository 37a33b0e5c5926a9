#!/usr/bin/env python3
"""Delta restart: what a restart costs after pages changed while walsync was stopped.

Usage:
    python3 bench/delta_restart.py [--mb 1024] [--changed 100] [--runs 2]
        [--walsync target/release/walsync] [--workdir DIR] [--keep]

For each run the script
  1. makes a WAL-mode database of about --mb MiB (table t, rows of 3,000 random
     bytes, so one row a page), checkpointed and closed;
  2. runs `walsync watch DB --storage file://DIR` until its first snapshot is in
     the replica directory, then stops it with SIGTERM;
  3. with walsync stopped, rewrites --changed rows spread over the whole file
     (one transaction), and closes: SQLite's last close checkpoints them into the
     database file and deletes the WAL, so the chain cannot be continued;
  4. starts walsync again and waits for the object that brings the chain up to
     date, then stops it; reports that object's kind, pages and bytes, and how
     long the restart took to ship it (which is reading and hashing the file);
  5. does 3-4 again after deleting the state record beside the database, which
     is what every restart cost before deltas existed: a full snapshot;
  6. restores the replica and checks that it equals the source, row for row.

Figures are printed; nothing is asserted about time (these machines are shared).
"""

import argparse
import glob
import hashlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

ROW = 3000


def make_db(path, mb):
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    rows = mb * 1024 * 1024 // 4096
    batch = 5000
    for start in range(0, rows, batch):
        con.executemany(
            "INSERT INTO t(v) VALUES (?)",
            ((os.urandom(ROW),) for _ in range(min(batch, rows - start))),
        )
        con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return rows


def objects(replica):
    return sorted(glob.glob(os.path.join(replica, "bench", "*.seg")))


def start_watch(binary, db, replica, log):
    return subprocess.Popen(
        [binary, "watch", db, "--storage", "file://" + replica, "--prefix", "bench"],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "a"),
        env={**os.environ, "WALSYNC_LOG": "info"},
    )


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


def wait_for(replica, count, timeout=600):
    deadline = time.time() + timeout
    while len(objects(replica)) < count:
        if time.time() > deadline:
            sys.exit(f"timed out waiting for {count} objects in {replica}")
        time.sleep(0.05)
    return objects(replica)[-1]


def header(path):
    with open(path, "rb") as f:
        h = f.read(96)
    kind = {1: "snapshot", 2: "segment", 3: "delta"}.get(h[10], "?")
    db_pages = int.from_bytes(h[24:28], "big")
    pages = int.from_bytes(h[28:32], "big")
    return kind, pages, db_pages


def change_rows(db, rows, changed):
    con = sqlite3.connect(db)
    ids = random.sample(range(1, rows + 1), changed)
    con.executemany("UPDATE t SET v = ? WHERE id = ?", ((os.urandom(ROW), i) for i in ids))
    con.commit()
    con.close()


def compare_ms(log):
    """The time walsync's last page-by-page comparison took, from its log."""
    ms = None
    with open(log, errors="replace") as f:
        for line in f:
            if "compared every page with the state record" in line:
                for part in line.split():
                    if part.startswith("ms="):
                        ms = int(part[3:])
    return ms


def restart(binary, db, replica, log):
    before = len(objects(replica))
    t0 = time.time()
    proc = start_watch(binary, db, replica, log)
    newest = wait_for(replica, before + 1)
    took = time.time() - t0
    time.sleep(0.5)
    stop(proc)
    kind, pages, db_pages = header(newest)
    return kind, pages, db_pages, os.path.getsize(newest), took


def digest(db):
    con = sqlite3.connect(db)
    h = hashlib.sha256()
    for row_id, v in con.execute("SELECT id, v FROM t ORDER BY id"):
        h.update(row_id.to_bytes(8, "little"))
        h.update(v)
    con.close()
    return h.hexdigest()


def run(args, n):
    work = tempfile.mkdtemp(prefix="delta-restart-", dir=args.workdir)
    db = os.path.join(work, "bench.db")
    replica = os.path.join(work, "replica")
    log = os.path.join(work, "walsync.log")
    t0 = time.time()
    rows = make_db(db, args.mb)
    size = os.path.getsize(db)
    print(f"run {n}: database {size / 2**20:.0f} MiB, {rows} rows, made in {time.time() - t0:.1f} s")
    proc = start_watch(args.walsync, db, replica, log)
    t0 = time.time()
    first = wait_for(replica, 1)
    print(f"  initial snapshot: {os.path.getsize(first) / 2**20:.1f} MiB in {time.time() - t0:.1f} s")
    stop(proc)

    change_rows(db, rows, args.changed)
    kind, pages, db_pages, size_b, took = restart(args.walsync, db, replica, log)
    print(
        f"  restart after {args.changed} rows changed: a {kind} of {pages} of {db_pages} pages, "
        f"{size_b / 1024:.0f} KiB uploaded, shipped {took:.2f} s after start "
        f"(reading and comparing every page: {compare_ms(log)} ms)"
    )

    for record in glob.glob(db + "-walsync-state-*"):
        os.remove(record)
    change_rows(db, rows, args.changed)
    kind, pages, db_pages, size_b, took = restart(args.walsync, db, replica, log)
    print(
        f"  the same without a state record: a {kind} of {pages} pages, "
        f"{size_b / 2**20:.1f} MiB uploaded, shipped {took:.2f} s after start"
    )

    out = os.path.join(work, "restored.db")
    subprocess.run(
        [args.walsync, "restore", "--prefix", "bench", "--storage", "file://" + replica, "-o", out],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    same = digest(out) == digest(db)
    print(f"  restore equals the source: {same}")
    if not args.keep:
        shutil.rmtree(work)
    if not same:
        sys.exit("the restore differs from the source")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=1024)
    p.add_argument("--changed", type=int, default=100)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--walsync", default="target/release/walsync")
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    for n in range(1, args.runs + 1):
        run(args, n)


if __name__ == "__main__":
    main()
