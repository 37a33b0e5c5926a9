#!/usr/bin/env python3
"""Restore time of a long chain: many small objects since the last snapshot.

Usage: bench/long_chain.py [--commits 2000] [--moto] [--storage URL]
                           [--parallelism 1,8,16] [--compaction 16,256,4096|off]
                           [--exact-window 1h|off] [--compact] [--walsync PATH]
                           [--keep]

Runs `walsync watch` with `sync_interval = 0` next to an app process that
makes --commits small commits a few milliseconds apart, so that nearly every
commit becomes its own object, as a busy database's day of 1 s syncs does.
Then it restores the head once per --parallelism value (objects fetched at
once) and prints, for each, the objects read, wall time and peak RSS, and
checks the restored rows equal the source's. `watch` compacts the chain as it
grows (--compaction sets its levels; `off` for none): the script waits until
its runs are all stored and prints what compaction cost (runs stored, their
bytes, objects read) next to what replication shipped, from `/metrics`. With
--compact it then runs `walsync compact` (timed, with the objects it read)
and restores again.

Point-in-time restores: the writer pauses twice, at a 48th of the run
before its end (30 minutes of a day) and halfway, ships, and notes its rows
and the time. A `--timestamp` restore to the recent point must equal it; to
the halfway point, when --exact-window is shorter than the run and the
objects there are deleted, it must not be later (the script prints how many
commits behind it is). With a day compressed into a few minutes, give
--exact-window in the same proportion (a day in 6 minutes: 1 h is 15 s).

Storage: a local directory by default; --moto starts moto from
target/ci-venv (made by .ci/run) on a free port with a fresh bucket;
--storage s3://bucket/prefix uses the usual AWS_* variables.
"""
import argparse
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request

import benchlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_measured(cmd, env):
    """Runs cmd; returns wall seconds, peak RSS in MiB and its stdout."""
    m = benchlib.run_measured(cmd, env)
    return m.wall, m.rss_mib, m.stdout


def start_moto(work):
    proc, endpoint = benchlib.start_moto(work)
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
    }
    return proc, "s3://bench/chain", env


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commits", type=int, default=2000)
    ap.add_argument("--storage", help="storage URL (default: a local directory)")
    ap.add_argument("--moto", action="store_true", help="start moto and use it")
    ap.add_argument("--parallelism", default="1,8,16")
    ap.add_argument("--compaction", default="16,256,4096",
                    help="levels watch compacts into, or off")
    ap.add_argument("--exact-window", default="1h",
                    help="watch's exact_window: objects runs stand for go once this old")
    ap.add_argument("--compact", action="store_true",
                    help="then run walsync compact and restore again")
    ap.add_argument("--walsync", default=os.path.join(ROOT, "target", "release", "walsync"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if not os.path.exists(args.walsync):
        sys.exit(f"{args.walsync} not found: cargo build --release")

    work = tempfile.mkdtemp(prefix="walsync-chain-", dir=os.environ.get("BENCH_DIR"))
    moto = None
    env = dict(os.environ, WALSYNC_LOG="warn")
    try:
        if args.moto:
            moto, storage, extra = start_moto(work)
            env.update(extra)
        else:
            storage = args.storage or os.path.join(work, "replica")
        db = os.path.join(work, "chain.db")
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        config = os.path.join(work, "walsync.toml")
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        listen = f"127.0.0.1:{s.getsockname()[1]}"
        s.close()
        levels = '"off"' if args.compaction == "off" else f"[{args.compaction}]"
        with open(config, "w") as f:
            f.write(f'[storage]\nurl = "{storage}"\n[sync]\nsync_interval = "0s"\n'
                    f'compaction = {levels}\nexact_window = "{args.exact_window}"\n'
                    f'[watch]\nlisten = "{listen}"\n'
                    f'[[databases]]\npath = "{db}"\nprefix = "chain"\n')
        watch = subprocess.Popen([args.walsync, "watch", "-c", config], env=env,
                                 stderr=open(os.path.join(work, "watch.log"), "w"))
        time.sleep(1)
        t0 = time.monotonic()
        # The points a --timestamp restore must reach: (label, time, rows).
        pauses = {args.commits // 2: "halfway", args.commits - args.commits // 48: "recent"}
        points = []
        for i in range(args.commits):
            if i in pauses:
                subprocess.run([args.walsync, "sync", "-c", config, "--wait"], env=env,
                               check=True, stdout=subprocess.DEVNULL)
                time.sleep(0.05)
                points.append((pauses[i], time.time(), benchlib.rows(db)))
                time.sleep(0.05)
            conn.execute("INSERT INTO t(v) VALUES (randomblob(200))")
            time.sleep(0.003)
        subprocess.run([args.walsync, "sync", "-c", config, "--wait"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        written = time.monotonic() - t0

        def metrics():
            text = urllib.request.urlopen(f"http://{listen}/metrics", timeout=10).read().decode()
            out = {}
            for line in text.splitlines():
                if line.startswith("walsync_") and '{prefix="chain"}' in line:
                    name, value = line.split('{prefix="chain"} ')
                    out[name] = float(value)
            return out
        # Compaction runs beside the syncs: wait until it has caught up.
        caught_up = time.monotonic()
        last = None
        while True:
            now = metrics()
            key = (now.get("walsync_runs_stored_total"), now.get("walsync_compaction_reads_total"))
            if key == last:
                break
            last = key
            time.sleep(2)
        caught_up = time.monotonic() - caught_up
        watch.terminate()
        watch.wait()
        source = benchlib.rows(db)
        conn.close()
        print(f"{args.commits} commits shipped in {written:.1f} s to {storage}")
        m = last and now
        segments = int(m.get("walsync_segments_shipped_total", 0))
        shipped = m.get("walsync_shipped_bytes_total", 0)
        runs = int(m.get("walsync_runs_stored_total", 0))
        print(f"replication: {segments} segments, {shipped / 2**20:.1f} MiB; "
              f"compaction ({args.compaction}): {runs} runs (PUTs), "
              f"{m.get('walsync_runs_stored_bytes_total', 0) / 2**20:.1f} MiB, "
              f"{int(m.get('walsync_compaction_reads_total', 0))} objects read (GETs), "
              f"{int(m.get('walsync_compaction_failures_total', 0))} failed passes; "
              f"caught up within {caught_up:.1f} s of the last sync")
        print(f"exact window {args.exact_window}: "
              f"{int(m.get('walsync_replaced_objects_deleted_total', 0))} objects deleted")
        secs, _, said = run_measured(
            [args.walsync, "list", "-c", config, "--prefix", "chain"], env)
        print(f"listing the chain alone (`walsync list --prefix chain`): {secs:.2f} s")
        print("".join(f"    {line}\n" for line in said.splitlines()), end="")
        for label, at, expected in points:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"
            out = os.path.join(work, f"at-{label}.db")
            secs, rss, said = run_measured(
                [args.walsync, "restore", "-c", config, "--prefix", "chain", "-o", out,
                 "--timestamp", stamp], env)
            got = benchlib.rows(out)
            objects = said.split("(")[1].split(" objects")[0] if " objects" in said else "?"
            if got == expected:
                verdict = "equal to the source then"
            elif got[0] < expected[0]:
                verdict = f"{expected[0] - got[0]} commits before it (the nearest run end)"
            else:
                sys.exit(f"--timestamp {stamp} ({label}) restored {got}, later than {expected}")
            print(f"--timestamp {label} ({stamp}): {objects} objects, {secs:.2f} s, "
                  f"{rss:.0f} MiB; {verdict}")
            if label == "recent" and got != expected:
                sys.exit(f"--timestamp {stamp} restored {got}, not the source's {expected}")
        print()
        print("| parallelism | objects | wall time | peak RSS | rows equal |")
        print("|---|---|---|---|---|")
        def restores(label):
            for p in [int(x) for x in args.parallelism.split(",")]:
                out = os.path.join(work, f"restored-{label}{p}.db")
                secs, rss, said = run_measured(
                    [args.walsync, "restore", "-c", config, "--prefix", "chain", "-o", out,
                     "--parallelism", str(p)], env)
                objects = said.split("(")[1].split(" objects")[0] if " objects" in said else "?"
                same = benchlib.rows(out) == source
                print(f"| {label}{p} | {objects} | {secs:.2f} s | {rss:.0f} MiB | {same} |")
                if not same:
                    sys.exit(f"restored rows {benchlib.rows(out)} differ from the source's {source}")
        restores("")
        if args.compact:
            secs, rss, said = run_measured(
                [args.walsync, "compact", "-c", config, "--prefix", "chain"], env)
            print(f"| compact | {said.strip()} | {secs:.2f} s | {rss:.0f} MiB | |")
            restores("after compact, ")
    finally:
        if moto:
            moto.terminate()
            moto.wait()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
