#!/usr/bin/env python3
"""Start `walsync watch` on a fleet whose chains are already in storage.

Usage: bench/watch_start.py --store DIR --databases DIR [--walsync PATH[,PATH...]] [--runs 2]

--store is a local store holding many databases' chains (the `fleet`
directory that `bench/restore_all.py --tools walsync --keep` leaves: 1,000
databases with a day's chain each) and --databases the directory of their
database files, named `<prefix>.db` (the `restored` directory beside it).
Each run starts `walsync watch --exec true` on all of them: the app starts
once every database has synced once, and exits at once, and walsync with it.
Printed per binary, runs alternating: the time to that exit, the peak RSS,
CPU time, and the objects the store gained (a chain continued writes none).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def files_under(path):
    return sum(len(names) for _, _, names in os.walk(path))


def start_once(walsync, config, work):
    """Runs `walsync watch --exec true`: the app (`true`) starts once every
    database has synced once, and walsync exits once it has."""
    log_path = os.path.join(work, "watch.log")
    env = dict(os.environ, WALSYNC_LOG="warn")
    with open(log_path, "w") as log:
        start = time.monotonic()
        proc = subprocess.Popen([walsync, "watch", "-c", config, "--exec", "true"], env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"walsync watch exited {os.waitstatus_to_exitcode(status)}; see {log_path}")
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--databases", required=True)
    ap.add_argument("--walsync", default=os.path.join(ROOT, "target", "release", "walsync"),
                    help="one binary, or several separated by commas to compare")
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    binaries = args.walsync.split(",")
    count = sum(1 for n in os.listdir(args.databases) if n.endswith(".db"))
    work = tempfile.mkdtemp(prefix="walsync-watch-start-")
    config = os.path.join(work, "walsync.toml")
    with open(config, "w") as f:
        f.write(f'[storage]\nurl = "{os.path.abspath(args.store)}"\n'
                f'[[databases]]\ndir = "{os.path.abspath(args.databases)}"\n'
                f'prefix = "{{name}}"\n')
    results = []
    for run in range(args.runs):
        for walsync in binaries:
            before = files_under(args.store)
            first_pass, rss, cpu = start_once(walsync, config, work)
            gained = files_under(args.store) - before
            results.append((walsync, first_pass, rss, cpu, gained))
            print(f"run {run + 1} {walsync}: {count} databases, started, synced and stopped in "
                  f"{first_pass:.1f} s, peak RSS {rss:.0f} MiB, CPU {cpu:.1f} s, "
                  f"{gained} objects written", flush=True)
    print()
    print("| binary | databases | start, first pass, stop | peak RSS | CPU | objects written |")
    print("|---|---:|---:|---:|---:|---:|")
    for walsync, first_pass, rss, cpu, gained in results:
        print(f"| {walsync} | {count:,} | {first_pass:.1f} s | {rss:.0f} MiB | {cpu:.1f} s "
              f"| {gained} |")


if __name__ == "__main__":
    main()
