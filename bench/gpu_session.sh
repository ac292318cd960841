#!/usr/bin/env bash
# The GPU benchmarks as device calls that fit the device tool's limits: one command runs at
# most 10 minutes, and a session has 15 minutes of device time, the machine's start included.
# Each PART is one call; a session takes the first part not yet measured (bench/README.md, GPU).
#
#   bash bench/gpu_session.sh speed               # throughput with the compiled contenders, packing; ~8 min
#   bash bench/gpu_session.sh quality-baseline    # Trainer.hyperparameter_search, 420 s; ~8 min
#   bash bench/gpu_session.sh quality-sweep FILE  # the sweep against FILE (the baseline's JSON), twice; ~8 min
#   bash bench/gpu_session.sh full-train          # the sweep on all of SST-2 train, 300 s; ~7 min
#   bash bench/gpu_session.sh check               # the wheels install, the GPU answers, 6 workers start; ~2 min
#   bash bench/gpu_session.sh arrays              # trial arrays against sequential, Trainer and packing; ~8 min
#   bash bench/gpu_session.sh schedulers          # random/TPE + Hyperband, promotion, PBT, 90 s each; ~8 min
#   bash bench/gpu_session.sh soups               # greedy/uniform soups against the best trial, probe and
#                                                 # trial heads, 3 study seeds; ~8 min (an estimate: not run yet)
#
# Run from the project root on the GPU machine, with .gpu carried (../shared/gpu/prep.sh made
# it here). Each script's figures go to $OUT as JSON beside the whole log; a step whose
# estimate no longer fits the call's time (GPU_SESSION_S, default 560 s) is skipped and says so.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-}
out=${OUT:-gpu-out}
mkdir -p "$out"

limit=${GPU_SESSION_S:-560}

# step NAME MINUTES COMMAND...: run COMMAND unless its estimate would outlast the call.
step() {
    local name=$1 minutes=$2; shift 2
    local left=$((limit - SECONDS))
    if ((minutes * 60 > left)); then
        echo "gpu_session: $name skipped: about $minutes min, $left s left in this call"
        return 0
    fi
    echo "gpu_session: $name: $* ($(date -u +%H:%M:%S), $left s left)"
    local started=$SECONDS
    "$@" || echo "gpu_session: $name failed with exit code $?"
    echo "gpu_session: $name took $((SECONDS - started)) s"
}

main() {
    # The GPU machine lacks Optuna and SQLAlchemy (../shared/gpu/README.md); GPU_SESSION_WHEELS=0
    # skips this where they are installed (a dry run of the script on a CPU machine).
    if [ "${GPU_SESSION_WHEELS:-1}" != 0 ]; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl || {
            echo "gpu_session: the wheels in .gpu/wheels did not install: carry .gpu (../shared/gpu/prep.sh makes it)"; exit 1; }
        export PYTHONPATH=/tmp/site:$PWD
    fi
    export PYTHONUNBUFFERED=1

    case $part in
        check)
            step nvidia-smi 1 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
            step versions 1 python3 -c "import torch, transformers, optuna; print(torch.__version__, transformers.__version__, optuna.__version__, torch.cuda.get_device_name(0))"
            # Six workers on the GPU, forked from the template against fresh interpreters.
            step worker-start 2 python3 bench/worker_start.py --model minilm --workers 6 --workers-per-gpu 6 \
                --repeats 2 --json "$out/worker_start.json"
            ;;
        speed)
            # Eager sweeper was measured at 1.43x on an H100; what is new is the compiled step.
            step throughput 3 python3 bench/throughput.py --device cuda --models minilm --samples 8000 \
                --contenders sweeper,compiled,cuda-graphs --json "$out/throughput.json"
            step packing 5 python3 bench/packing.py --device cuda --workers-per-gpu 1,6 --json "$out/packing.json"
            ;;
        quality-baseline)
            step baseline 8 python3 bench/time_to_quality.py --device cuda --part baseline --json "$out/baseline.json"
            ;;
        quality-sweep)
            file=${2:?"quality-sweep needs the baseline's JSON (from quality-baseline's \$OUT)"}
            # The target is the baseline's best within a third of its wall time: a longer sweep
            # cannot change whether it was met.
            budget=$(python3 -c "import json, sys; print(round(json.load(open(sys.argv[1]))['baseline']['wall_s'] / 3))" "$file")
            step sweep 4 python3 bench/time_to_quality.py --device cuda --part sweep --baseline-json "$file" \
                --budget "$budget" --json "$out/time_to_quality.json"
            step sweep-center 4 python3 bench/time_to_quality.py --device cuda --part sweep --baseline-json "$file" \
                --budget "$budget" --first-trials center --json "$out/time_to_quality_center.json"
            ;;
        full-train)
            step full-train 7 python3 bench/time_to_quality.py --device cuda --full-train --budget 300 \
                --json "$out/full_train.json"
            ;;
        arrays)
            # Issue 21: MiniLM-L6 on 4,000 SST-2 sentences, one epoch a trial at depth 2. First
            # the array of K against the same K trials one after another (K = 1..16, launches
            # counted too), then K = 16 against Trainer padded to 128 one at a time and against
            # 8 worker processes on the GPU (bench/packing.py's two contenders).
            step arrays-k 4 python3 bench/arrays.py --device cuda --models minilm --k 1,2,4,8,16 \
                --json "$out/arrays.json"
            step arrays-contenders 4 python3 bench/arrays.py --device cuda --models minilm --k 16 \
                --contenders-only --trainer --packing 8 --json "$out/arrays_contenders.json"
            ;;
        schedulers)
            # Issue 16: MiniLM-L6 on 8,000 SST-2 sentences, 4 workers on the GPU, 90 s each for
            # random search and TPE with Hyperband, promotion and PBT. Ray Tune is not on the GPU
            # machine (nor can it be installed there), so its two contenders say so and are skipped.
            step schedulers 8 python3 bench/schedulers.py --device cuda --json "$out/schedulers.json"
            ;;
        soups)
            # Issue 19: a 12-trial MiniLM-L6 sweep on 20,000 SST-2 sentences, all 6 blocks in reach,
            # per study seed and head_init; its soups against its best trial on SST-2 validation.
            step soups 8 python3 bench/soup.py --device cuda --train 20000 --trials 12 --runs 3 --depths 2 6 \
                --head-init probe trial --seeds 0 --json "$out/soups.json"
            ;;
        *)
            echo "usage: bash bench/gpu_session.sh speed | quality-baseline | quality-sweep FILE | full-train | check | arrays | schedulers | soups"
            exit 2
            ;;
    esac
}

# A pipeline, not a process substitution: the call returns only once the log is written whole.
main "$@" 2>&1 | tee -a "$out/session.log"
exit "${PIPESTATUS[0]}"
