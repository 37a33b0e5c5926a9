#!/usr/bin/env bash
# End-to-end test of walsync's container image: the Dockerfile's `prebuilt`
# target, deploy/entrypoint.sh, a podman volume, a real S3 protocol server
# (moto) on 127.0.0.1, SIGTERM through `podman stop`, and a restore into a
# fresh volume.
#
#   tests/container/setup.sh && tests/container/e2e.sh      (as root; .ci/run does)
#
# Environment (all optional):
#   WALSYNC_BIN   the walsync binary to put in the image (default: target/release/walsync)
#   USE_IMAGE     test this image instead of building one (default-build.sh does)
#   DOCKERFILE    the Dockerfile with a `prebuilt` target (default: the repository's)
#   BASE_IMAGE    local base image with python3 + CA certs (default localhost/walsync-base:bookworm)
#   MOTO_VENV     a venv with moto[server] (default target/ci-venv, made if missing)
#   ROWS          rows the app writes (default 500)
#   KEEP=1        keep the image, the work dir and the moto log after the run
#
# Prints PASS/FAIL lines and a closing "container e2e: N passed, N failed";
# exits non-zero if any check failed.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
WALSYNC_BIN=${WALSYNC_BIN:-$REPO/target/release/walsync}
DOCKERFILE=${DOCKERFILE:-$REPO/Dockerfile}
BASE_IMAGE=${BASE_IMAGE:-localhost/walsync-base:bookworm}
MOTO_VERSION=${MOTO_VERSION:-5.2.5}
MOTO_VENV=${MOTO_VENV:-$REPO/target/ci-venv}
ROWS=${ROWS:-500}
APP_EXIT=42          # the app's status on SIGTERM: must come out of `podman wait`
BUCKET=walsync-e2e
T0=$(date +%s)

RUN_ID=$$-$RANDOM
IMAGE=localhost/walsync-e2e:$RUN_ID
C1=walsync-e2e-1-$RUN_ID
C2=walsync-e2e-2-$RUN_ID
V1=walsync-e2e-data1-$RUN_ID
V2=walsync-e2e-data2-$RUN_ID
WORK=$(mktemp -d "${TMPDIR:-/tmp}/walsync-e2e.XXXXXX")
MOTO_PID=
PASSED=0
FAILED=0

log() { printf '[%4ds] %s\n' "$(($(date +%s) - T0))" "$*"; }
pass() { PASSED=$((PASSED + 1)); printf 'PASS: %s\n' "$*"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL: %s\n' "$*"; }
# A failure that makes the rest meaningless: show what helps, then stop.
die() {
    fail "$*"
    for c in "$C1" "$C2"; do
        if podman container exists "$c" 2>/dev/null; then
            echo "---- podman logs $c (last 60 lines) ----"
            podman logs "$c" 2>&1 | tail -60 || true
        fi
    done
    if [ -f "$WORK/moto.log" ]; then
        echo "---- moto log (last 20 lines) ----"
        tail -20 "$WORK/moto.log" || true
    fi
    exit 1
}

cleanup() {
    local rc=$?
    set +e
    for c in "$C1" "$C2"; do
        podman rm -f -t 0 "$c" >/dev/null 2>&1
    done
    for v in "$V1" "$V2"; do
        podman volume rm -f "$v" >/dev/null 2>&1
    done
    if [ -n "$MOTO_PID" ] && kill -0 "$MOTO_PID" 2>/dev/null; then
        kill "$MOTO_PID" 2>/dev/null
        wait "$MOTO_PID" 2>/dev/null
    fi
    if [ -z "${KEEP:-}" ]; then
        if [ -n "${USE_IMAGE:-}" ]; then
            podman untag "$IMAGE" >/dev/null 2>&1
        else
            podman rmi -f "$IMAGE" >/dev/null 2>&1
        fi
        rm -rf "$WORK"
    else
        echo "kept: image $IMAGE, work dir $WORK"
    fi
    echo "container e2e: $PASSED passed, $FAILED failed"
    log "done (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- preflight
command -v podman >/dev/null || die "podman is not installed (run tests/container/setup.sh)"
podman image exists "$BASE_IMAGE" || die "no base image $BASE_IMAGE (run tests/container/setup.sh)"
[ -n "${USE_IMAGE:-}" ] || [ -x "$WALSYNC_BIN" ] || die "no walsync binary at $WALSYNC_BIN (cargo build --release)"
[ -f "$REPO/deploy/entrypoint.sh" ] || die "no $REPO/deploy/entrypoint.sh"

if ! "$MOTO_VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('moto') != '$MOTO_VERSION')" 2>/dev/null \
    || [ ! -x "$MOTO_VENV/bin/moto_server" ]; then
    log "installing moto $MOTO_VERSION into $MOTO_VENV"
    [ -x "$MOTO_VENV/bin/python" ] || python3 -m venv "$MOTO_VENV"
    "$MOTO_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
fi
PY=$MOTO_VENV/bin/python

# ---------------------------------------------------------------- moto
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
ENDPOINT=http://127.0.0.1:$PORT
"$MOTO_VENV/bin/moto_server" -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 &
MOTO_PID=$!

# s3 ENDPOINT VERB BUCKET [PREFIX]: moto checks no signatures, so plain HTTP does.
cat >"$WORK/s3.py" <<'PY'
import re, sys, urllib.error, urllib.parse, urllib.request
endpoint, verb, bucket = sys.argv[1:4]
if verb == "ping":
    try:
        urllib.request.urlopen(endpoint + "/", timeout=1)
    except urllib.error.HTTPError:
        pass
elif verb == "mb":
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=10)
elif verb == "ls":
    # Number of keys under the prefix (one page of up to 1000 is plenty here).
    q = urllib.parse.urlencode({"list-type": "2", "prefix": sys.argv[4]})
    body = urllib.request.urlopen(f"{endpoint}/{bucket}?{q}", timeout=10).read().decode()
    print(len(re.findall(r"<Key>", body)))
PY
s3() { "$PY" "$WORK/s3.py" "$ENDPOINT" "$@"; }

for _ in $(seq 1 150); do
    kill -0 "$MOTO_PID" 2>/dev/null || die "moto_server exited early"
    if s3 ping - 2>/dev/null; then break; fi
    sleep 0.2
done
s3 ping - 2>/dev/null || die "moto_server did not answer on $ENDPOINT within 30 s"
s3 mb "$BUCKET" || die "could not create bucket $BUCKET"
log "moto $MOTO_VERSION on $ENDPOINT, bucket $BUCKET"

# ---------------------------------------------------------------- image
if [ -n "${USE_IMAGE:-}" ]; then
    podman tag "$USE_IMAGE" "$IMAGE" || die "no image $USE_IMAGE"
    pass "image $USE_IMAGE (given)"
else
    mkdir -p "$WORK/ctx/target/release" "$WORK/ctx/deploy"
    cp "$REPO/deploy/entrypoint.sh" "$WORK/ctx/deploy/entrypoint.sh"
    cp "$WALSYNC_BIN" "$WORK/ctx/target/release/walsync"
    strip "$WORK/ctx/target/release/walsync" 2>/dev/null || true
    if timeout 300 podman build -q --target prebuilt --build-arg "BASE=$BASE_IMAGE" \
        -f "$DOCKERFILE" -t "$IMAGE" "$WORK/ctx" >"$WORK/build.log" 2>&1; then
        pass "image builds offline (--target prebuilt, BASE=$BASE_IMAGE)"
    else
        cat "$WORK/build.log"
        die "podman build --target prebuilt"
    fi
fi
log "image $IMAGE"

# ---------------------------------------------------------------- config, app
cat >"$WORK/walsync.toml" <<EOF
[storage]
url = "s3://$BUCKET/e2e"
endpoint = "$ENDPOINT"
region = "us-east-1"
path_style = true
access_key_id = "\${AWS_ACCESS_KEY_ID}"
secret_access_key = "\${AWS_SECRET_ACCESS_KEY}"

[sync]
sync_interval = "0s"

[watch]
shutdown_timeout = "20s"

[[databases]]
path = "/data/app.db"
prefix = "app"
EOF

# write N: N rows in N/10 commits (20 ms apart), then wait for SIGTERM, add a last row
#          ("goodbye": only walsync's final sync can ship it) and exit APP_EXIT.
# check N: print what is there and exit 0 only if it is all there, intact.
cat >"$WORK/app.py" <<'PY'
import signal, sqlite3, sys, time
mode, n = sys.argv[1], int(sys.argv[2])
exit_code = int(sys.argv[3]) if len(sys.argv) > 3 else 0
conn = sqlite3.connect("/data/app.db", isolation_level=None)
if mode == "write":
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
    for start in range(0, n, 10):
        conn.execute("BEGIN")
        for i in range(start, min(start + 10, n)):
            conn.execute("INSERT INTO t(v) VALUES (?)", (f"row {i} " + "x" * 200,))
        conn.execute("COMMIT")
        time.sleep(0.02)  # many small commits over a while: many WAL segments
    print(f"app: wrote {n} rows", flush=True)
    def goodbye(signum, frame):
        conn.execute("INSERT INTO t(v) VALUES ('goodbye')")
        conn.close()
        print(f"app: SIGTERM, wrote goodbye, exiting {exit_code}", flush=True)
        sys.exit(exit_code)
    signal.signal(signal.SIGTERM, goodbye)
    while True:
        time.sleep(0.1)
else:
    ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
    count = conn.execute("SELECT count(*) FROM t WHERE v LIKE 'row %'").fetchone()[0]
    last = conn.execute("SELECT v FROM t ORDER BY id DESC LIMIT 1").fetchone()[0]
    print(f"app: integrity={ok} rows={count} last={last}", flush=True)
    sys.exit(0 if (ok, count, last) == ("ok", n, "goodbye") else 1)
PY
chmod 644 "$WORK/walsync.toml" "$WORK/app.py"

# Everything both containers share.
RUN_ARGS=(
    --network=host
    -v "$WORK/walsync.toml:/etc/walsync.toml:ro,Z"
    -v "$WORK/app.py:/app/app.py:ro,Z"
    -e AWS_ACCESS_KEY_ID=e2e-key -e AWS_SECRET_ACCESS_KEY=e2e-secret
    -e WALSYNC_LOG=info
)

# ---------------------------------------------------------------- first life
podman volume create "$V1" >/dev/null
timeout 60 podman run -d --name "$C1" -v "$V1:/data" "${RUN_ARGS[@]}" \
    "$IMAGE" python3 /app/app.py write "$ROWS" "$APP_EXIT" >/dev/null \
    || die "podman run (first container)"
log "container $C1 started on empty volume $V1 and empty storage"

deadline=$(($(date +%s) + 60))
until podman logs "$C1" 2>&1 | grep -q "app: wrote $ROWS rows"; do
    [ "$(podman inspect -f '{{.State.Running}}' "$C1")" = true ] || die "first container exited before the app wrote its rows"
    [ "$(date +%s)" -lt "$deadline" ] || die "the app did not write its rows within 60 s"
    sleep 0.5
done
pass "entrypoint started the app on a fresh volume with empty storage"

deadline=$(($(date +%s) + 60))
while :; do
    n=$(s3 ls "$BUCKET" e2e/app/ 2>/dev/null || echo 0)
    [ "$n" -gt 0 ] && break
    [ "$(date +%s)" -lt "$deadline" ] || die "no objects under s3://$BUCKET/e2e/app/ within 60 s"
    sleep 0.5
done
pass "walsync shipped objects to storage ($n under e2e/app/)"

t_stop=$(date +%s)
timeout 90 podman stop -t 60 "$C1" >/dev/null || die "podman stop"
status=$(timeout 30 podman wait "$C1" | tail -1)
log "stopped in $(($(date +%s) - t_stop)) s"
if [ "$status" = "$APP_EXIT" ]; then
    pass "container exit status is the app's ($status) after SIGTERM"
else
    fail "container exit status $status, expected the app's $APP_EXIT"
    podman logs "$C1" 2>&1 | tail -40
fi
podman logs "$C1" >"$WORK/c1.log" 2>&1 || true
if grep -q "app: SIGTERM, wrote goodbye" "$WORK/c1.log"; then
    pass "SIGTERM reached the app through walsync"
else
    fail "the app never saw SIGTERM"
fi
if grep -q "every database flushed" "$WORK/c1.log"; then
    pass "walsync did its final sync after the app exited"
else
    fail "no final sync in the first container's log"
fi
podman rm "$C1" >/dev/null
podman volume rm "$V1" >/dev/null
log "container and volume $V1 removed; $(s3 ls "$BUCKET" e2e/app/) objects in storage"

# ---------------------------------------------------------------- second life
podman volume create "$V2" >/dev/null
timeout 120 podman run --name "$C2" -v "$V2:/data" "${RUN_ARGS[@]}" \
    "$IMAGE" python3 /app/app.py check "$ROWS" >"$WORK/c2.log" 2>&1 && status=0 || status=$?
if [ "$status" = 0 ]; then
    pass "entrypoint restored the lost volume: $(grep 'app: integrity' "$WORK/c2.log")"
else
    fail "restore into a fresh volume (status $status)"
    tail -40 "$WORK/c2.log"
fi

# A restore is routine: the watch after it meets the restored file as
# exactly what was shipped, and says nothing alarming.
if grep -q " WARN \| ERROR " "$WORK/c2.log"; then
    fail "the second container warned after a routine restore"
    grep " WARN \| ERROR " "$WORK/c2.log" | head -5
else
    pass "no warning in the second container's log"
fi

# The same, read independently of walsync and its entrypoint.
check=$(timeout 60 podman run --rm -v "$V2:/data" --entrypoint python3 "$IMAGE" -c \
    "import sqlite3; c = sqlite3.connect('/data/app.db'); print(c.execute('select count(*) from t').fetchone()[0], c.execute('pragma journal_mode').fetchone()[0])" 2>&1) || true
if [ "$check" = "$((ROWS + 1)) wal" ]; then
    pass "restored volume holds $((ROWS + 1)) rows (journal_mode wal)"
else
    fail "restored volume: expected '$((ROWS + 1)) wal', got '$check'"
fi

[ "$FAILED" -eq 0 ]
