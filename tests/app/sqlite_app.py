#!/usr/bin/env python3
"""An SQLite app in its own process, driven by a test over stdin/stdout.

walsync's checkpoint ownership rests on POSIX advisory locks, and those never
conflict within one process: a test whose "app" is a connection inside the
test process cannot see a broken pin (DESIGN.md invariant 2a). This script is
the app in another process. It uses Python's stdlib `sqlite3` (whatever
SQLite it was built with), one connection, in autocommit mode
(`isolation_level=None`): transactions are exactly the ones named below.

Protocol: one command per line on stdin, exactly one reply line on stdout per
command, "ok ..." or "err ...". A long command (a loop) replies when it ends,
so a test can start one, do other things, and read the reply later; run two
of these processes (a writer and a checkpointer) for concurrency.

Commands (SIZE is a blob size in bytes; rows go to t(id INTEGER PRIMARY KEY, v BLOB)):
  open PATH [autocheckpoint=N] [synchronous=MODE] [page_size=N] [busy_timeout=MS]
                                 opens PATH in WAL mode and creates t -> ok
  insert N SIZE                  N rows in one transaction -> ok MAX_ID
  insert_each N SIZE             N rows, one commit each -> ok MAX_ID
  rollback_insert N SIZE         N rows in a transaction that is rolled back -> ok
  checkpoint MODE                PRAGMA wal_checkpoint(MODE) -> ok BUSY LOG CHECKPOINTED
  loop_insert SECONDS SIZE       single-row commits in a tight loop -> ok COUNT
  blob_loop SECONDS SIZE [KEEP]  one blob per commit, deleting all but the newest KEEP
                                 rows (default 64) in the same commit -> ok COUNT
  rate_insert PER_SEC SECONDS [SIZE]
                                 single-row commits at a steady pace -> ok COUNT
  checkpoint_loop MODES INTERVAL_MS SECONDS
                                 wal_checkpoint of each mode in MODES (comma list) in
                                 turn, one every INTERVAL_MS ->
                                 ok calls=N busy=N errors=N MODE=CALLS/BUSY... [first_error=...]
  begin_write [BUSY_TIMEOUT_MS]  BEGIN IMMEDIATE -> ok, or err CODE: message
                                 (the connection's busy_timeout is put back afterwards)
  begin                          BEGIN (deferred) -> ok
  commit / rollback              -> ok
  exec SQL...                    runs the rest of the line (one statement) -> ok CHANGES
  script SQL...                  runs the rest of the line as a script (executescript:
                                 commits an open transaction first) -> ok CHANGES
  query SQL...                   the first row of the rest of the line -> ok V1 V2 ...
  pragma NAME[=VALUE]            -> ok VALUE (first column of the first row, if any)
  count                          -> ok ROWS
  integrity_check                -> ok ok, or ok followed by the problems joined by " | "
  close                          closes the connection (SQLite may checkpoint and
                                 delete the WAL if it is the last one) -> ok
  pid                            -> ok PID
  quit                           -> ok, then exits

Errors never end the process: the reply is "err CODE: message" (CODE is
SQLite's error name, e.g. SQLITE_BUSY) and the next command is read.
"""

import os
import sqlite3
import sys
import time

conn = None
busy_timeout_ms = 10000

CREATE = "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB NOT NULL)"
INSERT = "INSERT INTO t(v) VALUES (randomblob(?))"


class Usage(Exception):
    pass


def need_conn():
    if conn is None:
        raise Usage("no database open (send: open PATH)")
    return conn


def options(args):
    out = {}
    for a in args:
        if "=" not in a:
            raise Usage(f"bad option {a!r} (expected NAME=VALUE)")
        k, v = a.split("=", 1)
        out[k] = v
    return out


def set_busy_timeout(c, ms):
    c.execute(f"PRAGMA busy_timeout={int(ms)}")


def max_id(c):
    row = c.execute("SELECT max(id) FROM t").fetchone()
    return row[0] or 0


def rollback_quietly(c):
    if c.in_transaction:
        try:
            c.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def commit_one(c, size):
    c.execute(INSERT, (size,))


def cmd_open(args):
    global conn, busy_timeout_ms
    if not args:
        raise Usage("open PATH [options]")
    path = args[0]
    opts = options(args[1:])
    if conn is not None:
        conn.close()
        conn = None
    busy_timeout_ms = int(opts.pop("busy_timeout", "10000"))
    c = sqlite3.connect(path, timeout=busy_timeout_ms / 1000.0, isolation_level=None,
                        check_same_thread=False)
    set_busy_timeout(c, busy_timeout_ms)
    if "page_size" in opts:
        c.execute(f"PRAGMA page_size={int(opts.pop('page_size'))}")
    mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise Usage(f"journal_mode is {mode}, not wal")
    if "synchronous" in opts:
        c.execute(f"PRAGMA synchronous={opts.pop('synchronous')}")
    if "autocheckpoint" in opts:
        c.execute(f"PRAGMA wal_autocheckpoint={int(opts.pop('autocheckpoint'))}")
    if opts:
        raise Usage(f"unknown options {sorted(opts)}")
    c.execute(CREATE)
    conn = c
    return ""


def cmd_insert(args):
    c = need_conn()
    n, size = int(args[0]), int(args[1])
    c.execute("BEGIN")
    try:
        for _ in range(n):
            commit_one(c, size)
        c.execute("COMMIT")
    except BaseException:
        rollback_quietly(c)
        raise
    return str(max_id(c))


def cmd_insert_each(args):
    c = need_conn()
    n, size = int(args[0]), int(args[1])
    for _ in range(n):
        commit_one(c, size)
    return str(max_id(c))


def cmd_rollback_insert(args):
    c = need_conn()
    n = int(args[0])
    size = int(args[1]) if len(args) > 1 else 100
    c.execute("BEGIN")
    try:
        for _ in range(n):
            commit_one(c, size)
    finally:
        c.execute("ROLLBACK")
    return ""


def checkpoint(c, mode):
    busy, log, done = c.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    return busy, log, done


def cmd_checkpoint(args):
    c = need_conn()
    mode = (args[0] if args else "PASSIVE").upper()
    busy, log, done = checkpoint(c, mode)
    return f"{busy} {log} {done}"


def cmd_loop_insert(args):
    c = need_conn()
    seconds, size = float(args[0]), int(args[1])
    end = time.monotonic() + seconds
    count = 0
    while time.monotonic() < end:
        for _ in range(50):
            c.execute(INSERT, (size,))
        count += 50
    return str(count)


def cmd_blob_loop(args):
    c = need_conn()
    seconds, size = float(args[0]), int(args[1])
    keep = int(args[2]) if len(args) > 2 else 64
    end = time.monotonic() + seconds
    count = 0
    while time.monotonic() < end:
        c.execute("BEGIN")
        try:
            cur = c.execute(INSERT, (size,))
            newest = cur.lastrowid
            # Freed overflow chains are reused by the next blobs: the pages
            # of the WAL keep changing hands.
            c.execute("DELETE FROM t WHERE id <= ?", (newest - keep,))
            c.execute("COMMIT")
        except BaseException:
            rollback_quietly(c)
            raise
        count += 1
    return str(count)


def cmd_rate_insert(args):
    c = need_conn()
    per_sec, seconds = float(args[0]), float(args[1])
    size = int(args[2]) if len(args) > 2 else 200
    start = time.monotonic()
    end = start + seconds
    count = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = start + count / per_sec
        if due > now:
            time.sleep(min(due - now, end - now))
            continue
        c.execute(INSERT, (size,))
        count += 1
    return str(count)


def cmd_checkpoint_loop(args):
    c = need_conn()
    modes = [m.upper() for m in args[0].split(",") if m]
    interval = int(args[1]) / 1000.0
    seconds = float(args[2])
    stats = {m: [0, 0] for m in modes}
    calls = busy_total = errors = 0
    first_error = None
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        mode = modes[i % len(modes)]
        i += 1
        try:
            busy, _, _ = checkpoint(c, mode)
        except sqlite3.Error as e:
            errors += 1
            if first_error is None:
                first_error = describe(e)
        else:
            calls += 1
            stats[mode][0] += 1
            if busy:
                busy_total += 1
                stats[mode][1] += 1
        time.sleep(interval)
    out = [f"calls={calls}", f"busy={busy_total}", f"errors={errors}"]
    out += [f"{m}={n}/{b}" for m, (n, b) in stats.items()]
    if first_error is not None:
        out.append("first_error=" + first_error.replace(" ", "_"))
    return " ".join(out)


def cmd_begin_write(args):
    c = need_conn()
    if args:
        set_busy_timeout(c, int(args[0]))
    try:
        c.execute("BEGIN IMMEDIATE")
    finally:
        if args:
            set_busy_timeout(c, busy_timeout_ms)
    return ""


def cmd_begin(args):
    need_conn().execute("BEGIN")
    return ""


def cmd_commit(args):
    need_conn().execute("COMMIT")
    return ""


def cmd_rollback(args):
    need_conn().execute("ROLLBACK")
    return ""


def cmd_exec(args, rest):
    c = need_conn()
    before = c.total_changes
    c.execute(rest)
    return str(c.total_changes - before)


def cmd_script(args, rest):
    c = need_conn()
    before = c.total_changes
    c.executescript(rest)
    return str(c.total_changes - before)


def cmd_query(args, rest):
    row = need_conn().execute(rest).fetchone()
    if row is None:
        return ""
    return " ".join(str(v) for v in row)


def cmd_pragma(args):
    row = need_conn().execute(f"PRAGMA {args[0]}").fetchone()
    return "" if row is None else str(row[0])


def cmd_count(args):
    return str(need_conn().execute("SELECT count(*) FROM t").fetchone()[0])


def cmd_integrity_check(args):
    rows = [r[0] for r in need_conn().execute("PRAGMA integrity_check").fetchall()]
    return " | ".join(rows)


def cmd_close(args):
    global conn
    if conn is not None:
        conn.close()
        conn = None
    return ""


def cmd_pid(args):
    return str(os.getpid())


COMMANDS = {
    "open": cmd_open,
    "insert": cmd_insert,
    "insert_each": cmd_insert_each,
    "rollback_insert": cmd_rollback_insert,
    "checkpoint": cmd_checkpoint,
    "loop_insert": cmd_loop_insert,
    "blob_loop": cmd_blob_loop,
    "rate_insert": cmd_rate_insert,
    "checkpoint_loop": cmd_checkpoint_loop,
    "begin_write": cmd_begin_write,
    "begin": cmd_begin,
    "commit": cmd_commit,
    "rollback": cmd_rollback,
    "pragma": cmd_pragma,
    "count": cmd_count,
    "integrity_check": cmd_integrity_check,
    "close": cmd_close,
    "pid": cmd_pid,
}

# Commands whose argument is the rest of the line, verbatim.
RAW = {"exec": cmd_exec, "script": cmd_script, "query": cmd_query}


def describe(e):
    name = getattr(e, "sqlite_errorname", None) or type(e).__name__
    return f"{name}: {e}"


def reply(line):
    sys.stdout.write(line.replace("\n", " ") + "\n")
    sys.stdout.flush()


def main():
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        name, _, rest = line.partition(" ")
        args = rest.split()
        if name == "quit":
            reply("ok")
            break
        try:
            if name in RAW:
                out = RAW[name](args, rest)
            elif name in COMMANDS:
                out = COMMANDS[name](args)
            else:
                raise Usage(f"unknown command {name!r}")
        except (Usage, ValueError, IndexError) as e:
            reply(f"err usage: {e}")
        except sqlite3.Error as e:
            if conn is not None and name not in ("begin_write", "begin"):
                rollback_quietly(conn)
            reply("err " + describe(e))
        else:
            reply(f"ok {out}".rstrip())
    if conn is not None:
        conn.close()


if __name__ == "__main__":
    main()
