"""What the bench scripts share: a measured child process and a moto server.

Imported by the scripts beside it (`python3 bench/NAME.py` puts bench/ on the path).
"""
import collections
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Measured = collections.namedtuple("Measured", "wall cpu rss_mib stdout")


def run_measured(cmd, env=None):
    """Runs cmd to its end; exits with its stderr if it fails. Returns wall
    seconds, user+sys CPU seconds, its own peak RSS in MiB (from the kernel,
    wait4) and its stdout."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{err.read().decode(errors='replace')}")
        return Measured(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024,
                        out.read().decode())


def venv_bin(name):
    """`name` from target/ci-venv (made by .ci/run) or target/bench-venv, if there."""
    for venv in ("ci-venv", "bench-venv"):
        path = os.path.join(ROOT, "target", venv, "bin", name)
        if os.path.exists(path):
            return path
    return None


def start_moto(work, bucket="bench"):
    """Starts moto on a free port with an empty `bucket`, its log in work;
    returns the process and its endpoint."""
    binary = venv_bin("moto_server")
    if not binary:
        sys.exit("moto_server not found in target/ci-venv or target/bench-venv: run .ci/run once")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    log = open(os.path.join(work, "moto.log"), "w")
    proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"),
                                   timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    sys.exit("moto did not start")


def rows(path):
    """Row count and payload bytes of table t, read-only: what a restore must give back."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*), coalesce(sum(length(v)), 0) FROM t").fetchone()
    finally:
        conn.close()
