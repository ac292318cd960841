#!/usr/bin/env bash
# docker/check.sh: the Docker Compose stack for real, on this machine, with no registry.
#
#   sudo docker/check.sh              # from the repository root; 10-30 minutes the first time
#
# 1. a Docker engine: the running one, or Debian's `dockerd --storage-driver=vfs` started here;
# 2. a base image from Debian's packages (debootstrap + docker import; it trusts the CAs this
#    machine trusts, for a TLS-inspecting proxy), PostgreSQL 15 on it (docker/postgres/), and
#    docker/Dockerfile on it with a CPU build of PyTorch (a local wheel from $TORCH_WHEELS,
#    served on loopback, else the PyTorch CPU index), with `--network host`;
# 3. `docker-compose up` of docker/compose.yaml, as it is but for the worker's GPU
#    reservation (a CPU machine cannot satisfy it): PostgreSQL, `create`, two workers, the
#    dashboard; the quickstart sweep (12 trials) runs to its end;
# 4. mid-trial, once the trial has saved a resume state and while the other worker runs,
#    `docker pause`, a look at the frozen trial, SIGKILL of its processes and `docker kill` of
#    one worker container: its trial must be failed after the grace period and retried by the
#    other worker from the resume state it died with (`resumed_from_step`, `lineage`);
# 5. the budget exact (12 trials counted, none lost, none retried twice), the dashboard
#    answering, then `docker-compose down -v` (its logs kept in $WORK: compose.log, worker-logs/).
#
# Prints what it sees; exits 0 when every check passed, 1 when one failed. It exits 77 (skip)
# only when no Docker engine can start here, which is the one case CI may skip it for.
# Settings (environment): SWEEPER_CHECK_STUDY=small runs the quickstart on 800 of its 2000
# examples for 2 epochs (same name, space and budget; for a busy machine, where the full
# one takes half an hour); SWEEPER_CHECK_KEEP=1 keeps the stack up afterwards; TORCH_WHEELS
# (default /opt/wheels); SWEEPER_CHECK_GRACE (default 20 s, the workers' --grace);
# SWEEPER_CHECK_REUSE=1 runs the stack on the images already built, without building. vfs
# copies every layer whole: the build cache grows by gigabytes per build (`docker builder
# prune -af` frees it).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

WORK=${SWEEPER_CHECK_WORK:-/tmp/sweeper-docker-check}
BASE_IMAGE=sweeper-debian:bookworm
POSTGRES_IMAGE=sweeper-postgres:15
IMAGE=sweeper:0.1.0
PROJECT=sweepercheck
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
GRACE=${SWEEPER_CHECK_GRACE:-20}
HEARTBEAT=5
N_TRIALS=12  # studies/quickstart.py's budget
KILL_BY=3  # kill a worker whose trial has 1 to KILL_BY evaluations (of 10; the small study's 4)
# Debian's client matches Debian's engine; a newer static `docker` earlier in PATH may lack buildx.
DOCKER=$( [ -x /usr/bin/docker ] && echo /usr/bin/docker || command -v docker || true)
COMPOSE=$(command -v docker-compose || true)
PYTHON=$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || command -v python3)
mkdir -p "$WORK"
failures=0

say() { printf 'check: %s\n' "$*"; }
pass() { printf 'check: PASS %s\n' "$*"; }
fail() { printf 'check: FAIL %s\n' "$*"; failures=$((failures + 1)); }
die() { printf 'check: FAIL %s\n' "$*"; cleanup; exit 1; }

started_dockerd=""
wheels_pid=""
cleanup() {
    if [ -n "$COMPOSE" ] && [ -f "$WORK/compose.cpu.yaml" ] && [ "${SWEEPER_CHECK_KEEP:-0}" != 1 ]; then
        # Kept: the stack's logs go with it (the workers' own are in the sweeps volume).
        compose logs --no-color --timestamps >"$WORK/compose.log" 2>&1
        rm -rf "$WORK/worker-logs"
        "$DOCKER" cp "${PROJECT}_dashboard_1:/sweeper/sweeps/quickstart/logs" "$WORK/worker-logs" >/dev/null 2>&1
        compose down -v --remove-orphans >/dev/null 2>&1
    fi
    [ -n "$wheels_pid" ] && kill "$wheels_pid" 2>/dev/null
    [ -n "$started_dockerd" ] && say "dockerd (pid $started_dockerd) left running; stop it with: kill $started_dockerd"
}
trap 'cleanup; exit 1' INT TERM

# --------------------------------------------------------------------------- 1. engine

engine() {
    if [ -n "$DOCKER" ] && "$DOCKER" info >/dev/null 2>&1; then
        return 0
    fi
    if ! command -v dockerd >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && {
            say "installing Debian's docker.io and docker-compose"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose >/dev/null 2>&1; }
        DOCKER=$( [ -x /usr/bin/docker ] && echo /usr/bin/docker || command -v docker || true)
        COMPOSE=$(command -v docker-compose || true)
    fi
    command -v dockerd >/dev/null 2>&1 || return 1
    [ "$(id -u)" = 0 ] || return 1
    say "starting dockerd --storage-driver=vfs (log: $WORK/dockerd.log)"
    nohup dockerd --storage-driver=vfs >"$WORK/dockerd.log" 2>&1 &
    started_dockerd=$!
    for _ in $(seq 60); do
        "$DOCKER" info >/dev/null 2>&1 && return 0
        sleep 1
    done
    return 1
}

if ! engine; then
    echo "check: SKIP no Docker engine can start here (need root and dockerd, or a running engine): nothing was checked" >&2
    exit 77
fi
[ -n "$COMPOSE" ] || die "no docker-compose: apt-get install docker-compose"
say "engine $("$DOCKER" version --format '{{.Server.Version}}') ($("$DOCKER" info --format '{{.Driver}}') storage), $("$COMPOSE" version --short 2>/dev/null || echo compose)"
df -h / | tail -1 | awk '{print "check: disk: " $4 " free on /"}'

# --------------------------------------------------------------------------- 2. images

base_image() {
    "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 && { say "base image $BASE_IMAGE: present"; return 0; }
    command -v debootstrap >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null 2>&1
    command -v debootstrap >/dev/null 2>&1 || die "no debootstrap: apt-get install debootstrap"
    say "base image $BASE_IMAGE: debootstrap bookworm (minbase, python3, python3-venv; a few minutes)"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" \
        http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 || die "debootstrap failed: see $WORK/debootstrap.log"
    # The CAs this machine trusts beyond Debian's (a TLS-inspecting proxy's): pip needs them.
    cp /usr/local/share/ca-certificates/*.crt "$WORK/rootfs/usr/local/share/ca-certificates/" 2>/dev/null \
        && chroot "$WORK/rootfs" update-ca-certificates >/dev/null 2>&1
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    tar -C "$WORK/rootfs" -c . | "$DOCKER" import - "$BASE_IMAGE" >/dev/null || die "docker import failed"
    rm -rf "$WORK/rootfs"
}

build() {  # build NAME LOG ARGS...: docker build with BuildKit, its log in $WORK
    local name=$1 log=$2
    shift 2
    say "building $name (log: $WORK/$log)"
    local started=$SECONDS
    if ! DOCKER_BUILDKIT=1 "$DOCKER" build --network host --progress plain "$@" >"$WORK/$log" 2>&1; then
        tail -25 "$WORK/$log"
        die "building $name failed: see $WORK/$log"
    fi
    pass "built $name in $((SECONDS - started)) s"
}

reuse() { [ "${SWEEPER_CHECK_REUSE:-0}" = 1 ] && "$DOCKER" image inspect "$IMAGE" "$POSTGRES_IMAGE" >/dev/null 2>&1; }
if reuse; then
    say "SWEEPER_CHECK_REUSE=1: the images $IMAGE and $POSTGRES_IMAGE as they are, no build"
else
base_image
build "$POSTGRES_IMAGE" build-postgres.log -f docker/postgres/Dockerfile -t "$POSTGRES_IMAGE" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" docker/postgres

wheel=$(ls "$TORCH_WHEELS"/torch-*+cpu-cp311-*.whl 2>/dev/null | sort -V | tail -1)
torch_args=(--build-arg TORCHVISION=)  # PyPI has no CPU torchvision: the image has none
if [ -n "$wheel" ]; then
    version=$(basename "$wheel" | cut -d- -f2)
    # A fixed port when it is free: the URL is a build argument, and a new one rebuilds every layer.
    port=8765
    "$PYTHON" -c 'import socket, sys; socket.create_server(("127.0.0.1", int(sys.argv[1]))).close()' "$port" 2>/dev/null \
        || port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$PYTHON" -m http.server --bind 127.0.0.1 "$port" --directory "$TORCH_WHEELS" >"$WORK/wheels.log" 2>&1 &
    wheels_pid=$!
    sleep 1
    say "PyTorch: the CPU wheel $(basename "$wheel"), served on 127.0.0.1:$port"
    torch_args+=(--build-arg TORCH="torch==$version" --build-arg PIP_FIND_LINKS="http://127.0.0.1:$port/")
else
    say "PyTorch: the CPU build from https://download.pytorch.org/whl/cpu"
    torch_args+=(--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)
fi
[ -f /etc/ssl/certs/ca-certificates.crt ] && torch_args+=(--build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt)
build "$IMAGE" build-sweeper.log -f docker/Dockerfile -t "$IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" \
    "${torch_args[@]}" .
[ -n "$wheels_pid" ] && kill "$wheels_pid" 2>/dev/null && wheels_pid=""
fi
"$DOCKER" run --rm "$IMAGE" env | sed 's/^/check:   image: /'
say "image size: $("$DOCKER" image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1 / 1e9}')"

# --------------------------------------------------------------------------- 3. the stack

STUDIES=$ROOT/studies
if [ "${SWEEPER_CHECK_STUDY:-quickstart}" = small ]; then
    STUDIES=$WORK/studies
    mkdir -p "$STUDIES"
    "$PYTHON" - "$ROOT/studies/quickstart.py" "$STUDIES/quickstart.py" <<'EOF' || die "cannot write the small quickstart"
import sys
from pathlib import Path

import re

text = Path(sys.argv[1]).read_text()
small, data = re.subn(r"SyntheticText\(n_train=\d+, n_test=\d+\)", "SyntheticText(n_train=800, n_test=100)", text)
small, epochs = re.subn(r"\bepochs=\d+,", "epochs=2,", small)
assert (data, epochs) == (1, 1), "studies/quickstart.py no longer has one SyntheticText(...) and one epochs=N"
Path(sys.argv[2]).write_text(small)
EOF
    say "study: the quickstart on 800 generated examples for 2 epochs (SWEEPER_CHECK_STUDY=small)"
fi

# compose.yaml as it is, less the worker's GPU reservation, with absolute paths so that it
# can be read from $WORK. Written by PyYAML, not edited as text.
"$PYTHON" - "$ROOT/docker/compose.yaml" "$WORK/compose.cpu.yaml" "$STUDIES" <<'EOF' || die "cannot write the CPU compose file"
import sys
from pathlib import Path
import yaml

source, target, studies = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
config = yaml.safe_load(source.read_text())
config.pop("name", None)
for name, service in config["services"].items():
    if name == "worker":
        service.pop("deploy", None)
anchor = config["x-sweeper"]
anchor["build"]["context"] = str((source.parent / anchor["build"]["context"]).resolve())
anchor["volumes"] = [v.replace("${SWEEPER_STUDIES:-../studies}", studies) for v in anchor["volumes"]]
for name, service in config["services"].items():
    if "build" in service:  # the anchor's keys, merged by PyYAML: take the rewritten ones
        service.update(build=anchor["build"], volumes=anchor["volumes"])
target.write_text(yaml.safe_dump(config, sort_keys=False))
EOF

export COMPOSE_PROJECT_NAME=$PROJECT POSTGRES_IMAGE SWEEPER_IMAGE=$IMAGE
POSTGRES_PASSWORD=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')
# One torch thread per worker: two workers' default two each oversubscribe a busy machine.
export POSTGRES_PASSWORD SWEEPER_HEARTBEAT=$HEARTBEAT SWEEPER_GRACE=$GRACE SWEEPER_GPUS=0 SWEEPER_THREADS=1
SWEEPER_DASHBOARD_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export SWEEPER_DASHBOARD_PORT
compose() { "$COMPOSE" -f "$WORK/compose.cpu.yaml" "$@"; }

compose down -v --remove-orphans >/dev/null 2>&1  # a stack a failed earlier run left
say "docker-compose up: postgres, create, 2 workers, dashboard (heartbeat ${HEARTBEAT} s, grace ${GRACE} s)"
sweep_started=$SECONDS
# The workers last: a quickstart trial takes seconds, and creating a container with vfs
# takes longer than that; the check must be watching when they start.
compose up -d --no-build postgres create dashboard >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; die "docker-compose up failed"; }

# What the study holds, read inside the dashboard container (it has the storage URL and
# sweeper): one JSON object per trial.
probe() {
    compose exec -T dashboard python - <<'EOF' 2>/dev/null
import json, os, warnings
warnings.filterwarnings("ignore")
import optuna
from sweeper import record
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name="quickstart", storage=os.environ["SWEEPER_STORAGE"])
for t in study.get_trials(deepcopy=False):
    print(json.dumps({"number": t.number, "state": t.state.name, "host": record.HOST.get(t),
                      "evaluations": len(t.intermediate_values), "resume": bool(record.RESUME.get(t)),
                      "retry_history": record.RETRY_HISTORY.get(t, []),
                      "resumed_from_step": record.RESUMED_FROM_STEP.get(t), "lineage": record.LINEAGE.get(t, []),
                      "fail_reason": record.FAIL_REASON.get(t)}))
EOF
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds
    local limit=$1 what=$2
    shift 2
    for _ in $(seq "$limit"); do
        "$@" && return 0
        sleep 1
    done
    return 1
}

created() { [ "$("$DOCKER" inspect -f '{{.State.Status}} {{.State.ExitCode}}' "${PROJECT}_create_1" 2>/dev/null)" = "exited 0" ]; }
wait_for 300 "create" created || { compose logs --no-color create postgres | tail -30; die "the create service did not finish"; }
pass "postgres healthy and \`sweeper create\` exited 0: $(compose logs --no-color create | grep -o "study 'quickstart' is ready.*" | head -1)"
compose up -d --no-build --scale worker=2 worker >>"$WORK/up.log" 2>&1 &  # watched from here on
up_pid=$!

# --------------------------------------------------------------------------- 4. kill a worker

# Read with psql in the postgres container, Optuna's tables directly: a Python probe takes
# seconds to start, longer than a small trial's window between two evaluations.
sql() {
    "$DOCKER" exec "${PROJECT}_postgres_1" psql -U "${POSTGRES_USER:-sweeper}" -d "${POSTGRES_DB:-sweeper}" \
        -At -F'|' -c "$1" 2>/dev/null
}
# Running trials that have 1 to KILL_BY evaluations and a saved resume state, one a line:
# number|"host"|evaluations|{"id": ..., "step": ...} (the resume state is a trial system attribute).
resumable_trials() {
    sql "SELECT t.number, h.value_json, (SELECT count(*) FROM trial_intermediate_values v WHERE v.trial_id = t.trial_id),
                r.value_json
         FROM trials t
         JOIN trial_user_attributes h ON h.trial_id = t.trial_id AND h.key = 'host'
         JOIN trial_system_attributes r ON r.trial_id = t.trial_id AND r.key = 'sweeper:resume' AND r.value_json <> 'null'
         WHERE t.state = 'RUNNING'
           AND (SELECT count(*) FROM trial_intermediate_values v WHERE v.trial_id = t.trial_id) BETWEEN 1 AND $KILL_BY"
}
running() { [ "$("$DOCKER" inspect -f '{{.State.Status}}' "$1" 2>/dev/null)" = running ]; }
stopped() { [ "$("$DOCKER" inspect -f '{{.State.Status}}' "$1" 2>/dev/null)" = exited ]; }
# victim: one worker container running a resumable trial while the other one runs too (it must
# be there to retry the trial); sets killed_worker and victim_row.
victim() {
    local rows worker other hostname
    rows=$(resumable_trials) || return 1
    [ -n "$rows" ] || return 1
    for worker in "${PROJECT}_worker_1" "${PROJECT}_worker_2"; do
        other=${PROJECT}_worker_$([ "$worker" = "${PROJECT}_worker_1" ] && echo 2 || echo 1)
        running "$worker" && running "$other" || continue
        hostname=$("$DOCKER" inspect -f '{{.Config.Hostname}}' "$worker" 2>/dev/null) || continue
        victim_row=$(printf '%s\n' "$rows" | awk -F'|' -v host="\"$hostname\"" '$2 == host {print; exit}')
        if [ -n "$victim_row" ]; then
            killed_worker=$worker
            return 0
        fi
    done
    return 1
}
# The trial can finish between the look and the kill: the container is paused first (its
# processes frozen), the trial looked at again, and only then killed, while still mid-trial.
killed_worker="" victim_row="" frozen_row="" found=""
for _ in $(seq 3000); do  # every 0.2 s for 10 minutes: a trial's window can be a second
    if victim && "$DOCKER" pause "$killed_worker" >/dev/null 2>&1; then
        number=${victim_row%%|*}
        frozen_row=$(resumable_trials | awk -F'|' -v n="$number" '$1 == n {print; exit}')
        if [ -n "$frozen_row" ] && [ "$(cut -d'|' -f2 <<<"$frozen_row")" = "$(cut -d'|' -f2 <<<"$victim_row")" ]; then
            found=1
            break
        fi
        "$DOCKER" unpause "$killed_worker" >/dev/null 2>&1  # it finished that trial meanwhile
    fi
    sleep 0.2
done
[ -n "$found" ] || { compose logs --no-color worker | tail -40; die "no worker was ever seen mid-trial with a resume state"; }
# `docker kill` signals the container's first process; the others die only once it has exited,
# and a trial process can run on meanwhile (seen: one more evaluation). So every process of the
# frozen container gets its SIGKILL first, and they all die as read when `docker kill` thaws them.
kill -KILL $("$DOCKER" top "$killed_worker" -eo pid | tail -n +2) 2>/dev/null
"$DOCKER" kill "$killed_worker" >/dev/null || die "docker kill $killed_worker failed"
killed_at=$SECONDS
say "$(date -u +%T.%N | cut -c1-12) UTC: $killed_worker paused, its trial read ($frozen_row), killed"
wait "$up_pid" || { cat "$WORK/up.log"; die "docker-compose up of the workers failed"; }
killed_trial=${frozen_row%%|*}
# What the trial died with, read once its container is gone: still running (nobody else ends
# it before the grace period), and the resume state its retry must continue from.
wait_for 30 "the killed container's exit" stopped "$killed_worker" || die "$killed_worker still running after docker kill"
dead_row=$(resumable_trials | awk -F'|' -v n="$killed_trial" '$1 == n {print; exit}')
[ -n "$dead_row" ] || die "trial $killed_trial was not running with a resume state when its container died"
[ "$dead_row" = "$frozen_row" ] || say "trial $killed_trial changed between the read under pause and its container's exit: $dead_row"
killed_evaluations=$(cut -d'|' -f3 <<<"$dead_row")
killed_step=$("$PYTHON" -c 'import json, sys; print(json.loads(sys.argv[1])["step"])' "$(cut -d'|' -f4- <<<"$dead_row")")
pass "docker kill $killed_worker (paused first) while it ran trial $killed_trial: $killed_evaluations evaluation(s) reported, resume state at step $killed_step"

# The retry: the killed trial failed by the surviving worker after the grace period, exactly one
# trial retrying it, finished, resumed from the step the killed trial had saved, and naming the
# killed trial in its lineage.
retried() {
    probe >"$WORK/trials.jsonl" || return 1
    "$PYTHON" - "$killed_trial" "$killed_step" "$WORK/trials.jsonl" <<'EOF'
import json, sys
number, step, trials = int(sys.argv[1]), int(sys.argv[2]), [json.loads(line) for line in open(sys.argv[3])]
killed = next(t for t in trials if t["number"] == number)
retries = [t for t in trials if number in t["retry_history"]]
if killed["state"] != "FAIL" or not retries or any(t["state"] not in ("COMPLETE", "PRUNED") for t in retries):
    sys.exit(1)  # not yet
retry = retries[0]
ok = len(retries) == 1 and retry["resumed_from_step"] == step and number in retry["lineage"]
print(f"{'RESUMED' if ok else 'WRONG'} trial {number} failed ({killed['fail_reason']}); "
      f"{len(retries)} retry: trial {retry['number']}, lineage {retry['lineage']}, resumed from step "
      f"{retry['resumed_from_step']} (the killed trial's resume state: step {step}), "
      f"{retry['evaluations']} evaluations, ended {retry['state']}")
EOF
}
if ! wait_for 600 "the killed trial's retry" retried >"$WORK/retried.txt"; then
    fail "trial $killed_trial was never retried to its end: $(tail -c 600 "$WORK/trials.jsonl" 2>/dev/null)"
elif grep -q '^RESUMED' "$WORK/retried.txt"; then
    pass "$(cut -d' ' -f2- "$WORK/retried.txt") ($((SECONDS - killed_at)) s after the kill)"
else
    fail "the retry did not continue the killed trial: $(cut -d' ' -f2- "$WORK/retried.txt")"
fi
restarts=$("$DOCKER" inspect -f '{{.RestartCount}} restarts, {{.State.Status}}, exit code {{.State.ExitCode}}' "$killed_worker")
# Docker does not apply a restart policy to a container stopped by `docker kill`.
say "the killed container afterwards: $restarts"

# --------------------------------------------------------------------------- 5. the end

finished() {
    local running=0 worker
    for worker in $("$DOCKER" ps -q --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=worker"); do
        running=$((running + 1))
    done
    [ "$running" = 0 ]
}
if wait_for 900 "the sweep's end" finished; then
    pass "every worker container exited, $((SECONDS - sweep_started)) s after up: $("$DOCKER" ps -a --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=worker" --format '{{.Names}} {{.Status}}' | paste -sd';')"
else
    fail "workers still running after 900 s"
fi
probe >"$WORK/trials.jsonl"
"$PYTHON" - "$N_TRIALS" "$WORK/trials.jsonl" <<'EOF' && pass "$(cat "$WORK/budget.txt")" || fail "$(cat "$WORK/budget.txt")"
import json, sys
budget, trials = int(sys.argv[1]), [json.loads(line) for line in open(sys.argv[2])]
replaced = {n for t in trials for n in t["retry_history"]}
counted = [t for t in trials if not (t["state"] == "FAIL" and t["number"] in replaced)]
states = {}
for t in counted:
    states[t["state"]] = states.get(t["state"], 0) + 1
# None twice: each failed trial has one retry of its own (one trial per retry history).
histories = [tuple(t["retry_history"]) for t in trials if t["retry_history"]]
twice = len(histories) - len(set(histories))
ok = len(counted) == budget and set(states) <= {"COMPLETE", "PRUNED"} and twice == 0
line = (f"budget {budget}: {len(counted)} trials counted {states}, {len(trials) - len(counted)} retried, "
        f"{twice} retried twice ({len(trials)} rows)")
open(sys.argv[2].replace("trials.jsonl", "budget.txt"), "w").write(line)
sys.exit(0 if ok else 1)
EOF
code=$(curl -s -L -o /dev/null -w '%{http_code}' "http://127.0.0.1:$SWEEPER_DASHBOARD_PORT/" || true)  # / redirects to /dashboard
[ "$code" = 200 ] && pass "dashboard answers on 127.0.0.1:$SWEEPER_DASHBOARD_PORT (HTTP $code)" \
    || fail "dashboard on 127.0.0.1:$SWEEPER_DASHBOARD_PORT answered HTTP $code"
say "worker logs (tail):"
compose logs --no-color worker 2>/dev/null | grep -E "failed|re-queued|continues|resuming|stops|best trial" | tail -12 | sed 's/^/check:   /'

cleanup
if [ "$failures" = 0 ]; then
    say "all checks passed"
    exit 0
fi
say "$failures check(s) failed"
exit 1
