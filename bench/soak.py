#!/usr/bin/env python3
"""Soak: many databases under a steady mixed write load for a long time.

Usage:
    python3 bench/soak.py [--databases 100] [--rate 500] [--minutes 60]
                          [--check-every 300] [--storage URL] [--walsync PATH]
                          [--workdir DIR] [--out FILE]

It starts `walsync watch` on --databases databases and one writer process per
ten databases (Python's sqlite3, SQLite's default auto-checkpoint, so the apps
checkpoint on their own as real apps do), committing --rate single-row
transactions per second in all, with row sizes from 100 bytes to 16 KiB and
now and then a transaction of 50 rows. Every row's content is a function of
its database and id, and ids only grow, so a restore to any position must
hold exactly rows 1..N, each with the right content.

Every --check-every seconds it restores every database into a scratch
directory (`walsync restore`) and checks that; the restored N against the
newest row the app had committed gives the lag. Every 10 s it reads walsync's
/metrics and RSS. At the end it prints, and appends to --out, the lag
percentiles, RSS over time, objects shipped and snapshots taken (by reason),
checkpoints, and every mismatch (which also makes the exit status 1).

Storage: a local directory in the work directory by default; --storage
s3://bucket/prefix with the usual AWS_* variables for S3 (the bucket must
exist). Requirements: python3 (stdlib), a built walsync (cargo build --release).
"""
import argparse
import hashlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from multiprocessing import Process, Value

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def content(db, row_id, size):
    seed = hashlib.sha256(f"{db}:{row_id}".encode()).digest()
    return (seed * (size // 32 + 1))[:size]


def writer(paths, rate, stop_at, committed):
    """Commits at `rate` per second over `paths`; publishes each database's
    newest committed id and commit time in `committed` (a flat array)."""
    rng = random.Random(os.getpid())
    conns = []
    for p in paths:
        c = sqlite3.connect(p, timeout=30, isolation_level=None)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, at REAL, v BLOB)")
        conns.append(c)
    ids = [c.execute("SELECT coalesce(max(id), 0) FROM t").fetchone()[0] for c in conns]
    start, n = time.monotonic(), 0
    while time.time() < stop_at:
        due = start + n / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        i = rng.randrange(len(conns))
        rows = 50 if rng.random() < 0.02 else 1
        size = rng.choice([100, 100, 100, 1000, 4000, 16384])
        c = conns[i]
        c.execute("BEGIN IMMEDIATE")
        for _ in range(rows):
            ids[i] += 1
            c.execute("INSERT INTO t(id, at, v) VALUES (?, ?, ?)",
                      (ids[i], time.time(), content(os.path.basename(paths[i]), ids[i], size)))
        c.execute("COMMIT")
        committed[i].value = ids[i]
        n += 1


def check(path, name, restored):
    """Rows 1..N with the right content; returns (N, time of row N) or raises."""
    c = sqlite3.connect(restored)
    ok = c.execute("PRAGMA integrity_check").fetchone()[0]
    if ok != "ok":
        raise AssertionError(f"{name}: integrity_check: {ok}")
    n, at = 0, None
    for row_id, row_at, v in c.execute("SELECT id, at, v FROM t ORDER BY id"):
        n += 1
        if row_id != n:
            raise AssertionError(f"{name}: row {n} missing (next is {row_id})")
        if v != content(f"{name}.db", row_id, len(v)):
            raise AssertionError(f"{name}: row {row_id} has the wrong content")
        at = row_at
    return n, at


def metrics(addr):
    try:
        text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        m = re.match(r'(walsync_\w+)(\{[^}]*\})? ([0-9.e+-]+)$', line)
        if m:
            labels = re.sub(r'prefix="[^"]*",?', "", m.group(2) or "")
            key = m.group(1) + ("" if labels in ("", "{}") else labels)
            out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--databases", type=int, default=100)
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--check-every", type=float, default=300)
    ap.add_argument("--storage")
    ap.add_argument("--walsync", default=os.path.join(ROOT, "target/release/walsync"))
    ap.add_argument("--workdir")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-soak.md"))
    args = ap.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="walsync-soak-")
    data = os.path.join(work, "data")
    os.makedirs(data, exist_ok=True)
    storage = args.storage or os.path.join(work, "replica")
    names = [f"db{i:03d}" for i in range(args.databases)]
    paths = [os.path.join(data, f"{n}.db") for n in names]
    for p in paths:
        c = sqlite3.connect(p)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, at REAL, v BLOB)")
        c.close()
    port = 20000 + os.getpid() % 20000
    addr = f"127.0.0.1:{port}"
    config = os.path.join(work, "walsync.toml")
    with open(config, "w") as f:
        f.write(f'[storage]\nurl = "{storage}"\n[watch]\nlisten = "{addr}"\n'
                f'[[databases]]\ndir = "{data}"\n')
    log = open(os.path.join(work, "walsync.log"), "w")
    watch = subprocess.Popen([args.walsync, "watch", "-c", config], stdout=log, stderr=log)
    time.sleep(2)

    stop_at = time.time() + args.minutes * 60
    committed = [Value("q", 0, lock=False) for _ in paths]
    writers = []
    for k in range(0, len(paths), 10):
        share = len(paths[k:k + 10]) / len(paths)
        w = Process(target=writer, args=(paths[k:k + 10], args.rate * share, stop_at, committed[k:k + 10]))
        w.start()
        writers.append(w)

    lags, mismatches, rss = [], [], []
    next_check = time.time() + args.check_every
    scratch = os.path.join(work, "scratch")
    os.makedirs(scratch, exist_ok=True)
    while time.time() < stop_at:
        time.sleep(10)
        rss.append((round(time.time() - (stop_at - args.minutes * 60)), rss_kib(watch.pid)))
        if watch.poll() is not None:
            mismatches.append(f"walsync exited with {watch.returncode}")
            break
        if time.time() >= next_check:
            next_check += args.check_every
            for name, path in zip(names, paths):
                newest = committed[names.index(name)].value
                began = time.time()
                out = os.path.join(scratch, f"{name}.db")
                r = subprocess.run([args.walsync, "restore", "-c", config, "--prefix", name,
                                    "-o", out, "--force"], capture_output=True, text=True)
                if r.returncode != 0:
                    mismatches.append(f"{name}: restore failed: {r.stderr.strip()}")
                    continue
                try:
                    n, _ = check(path, name, out)
                    # Never more than the app had committed by now.
                    if n > committed[names.index(name)].value:
                        mismatches.append(f"{name}: restored {n} rows, the app had {newest}")
                    # The lag: how long the first row missing from the
                    # restore had been committed when the restore began.
                    src = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
                    nxt = src.execute("SELECT at FROM t WHERE id = ?", (n + 1,)).fetchone()
                    src.close()
                    lags.append(max(0.0, began - nxt[0]) if nxt and nxt[0] < began else 0.0)
                except AssertionError as e:
                    mismatches.append(str(e))
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(out + suffix):
                        os.remove(out + suffix)
            print(f"checked {len(names)} databases; lag p50 {pct(lags, .5):.2f}s "
                  f"p99 {pct(lags, .99):.2f}s; {len(mismatches)} mismatches", flush=True)
    for w in writers:
        w.join()
    m = metrics(addr)
    watch.send_signal(signal.SIGTERM)
    code = watch.wait(timeout=120)
    if code != 0:
        mismatches.append(f"walsync exited with {code} after SIGTERM")
    # The final state: everything committed is in storage.
    for name, path in zip(names, paths):
        out = os.path.join(scratch, f"{name}.final.db")
        r = subprocess.run([args.walsync, "restore", "-c", config, "--prefix", name, "-o", out, "--force"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            mismatches.append(f"{name}: final restore failed: {r.stderr.strip()}")
            continue
        n, _ = check(path, name, out)
        if n != committed[names.index(name)].value:
            mismatches.append(f"{name}: final restore has {n} rows, the app committed {committed[names.index(name)].value}")

    total_commits = sum(v.value for v in committed)
    report = [
        f"## Soak {time.strftime('%Y-%m-%d %H:%M')}: {args.databases} databases, "
        f"{args.rate:g} commits/s for {args.minutes:g} min, storage {storage}",
        "",
        f"- rows committed: {total_commits}",
        f"- restore checks: every {args.check_every:g} s; lag (how long the first row missing "
        f"from a restore had been committed when the restore began) "
        f"p50 {pct(lags, .5):.2f} s, p95 {pct(lags, .95):.2f} s, p99 {pct(lags, .99):.2f} s, "
        f"max {max(lags) if lags else float('nan'):.2f} s ({len(lags)} restores)",
        f"- walsync RSS (KiB) over time: " + ", ".join(f"{t}s {k}" for t, k in rss[:: max(1, len(rss) // 12)]),
        f"- objects shipped: {m.get('walsync_segments_shipped_total', 0):.0f} segments, "
        + ", ".join(f"{k.split('{')[1].rstrip('}')} {v:.0f}" for k, v in m.items()
                    if k.startswith("walsync_snapshots_total{")) + " snapshots",
        f"- checkpoints: " + ", ".join(f"{k.split('{')[1].rstrip('}')} {v:.0f}" for k, v in m.items()
                                      if k.startswith("walsync_checkpoints_total{")),
        f"- errors: " + (", ".join(f"{k.split('{')[1].rstrip('}')} {v:.0f}" for k, v in m.items()
                                   if k.startswith("walsync_errors_total{")) or "none"),
        f"- mismatches: {len(mismatches)}" + "".join(f"\n  - {x}" for x in mismatches[:50]),
        "",
    ]
    text = "\n".join(report)
    print(text)
    with open(args.out, "a") as f:
        f.write(text + "\n")
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
