#!/usr/bin/env bash
# Full-size training on one CUDA machine that has PyTorch but may have no network access.
#
#   export/train_gpu.sh start STRUCTURES WORK MINUTES [WHEELS]
#       install the wheels in WHEELS (gemmi, mrcfile, fire, ... for an offline machine) into
#       WORK/site, time a training step, build the train and val datasets with every core,
#       then train the paper's network (32,64,128) on 64³ cubes in the background, in its own
#       process session, for MINUTES with a cosine schedule sized to the measured step time.
#   export/train_gpu.sh wait WORK SECONDS
#       follow the training log for SECONDS, or until training has ended.
#   export/train_gpu.sh snapshot WORK DEST
#       pack the run (latest, best, optimiser state, log) as DEST/run.tar.partNN, 15 MB each;
#       unpack with: cat run.tar.part* | tar -x
#
# Run from the repository root. Settings below are the model v3 recipe (bench/QUALITY.md: the
# truth target, no normalisation layers, masked and zoned inputs) at the paper's width; the
# shipped tight 0.2 used TARGET=locscale NORM=group MASKED=0 ZONED=0.
set -euo pipefail

TARGET=${TARGET:-truth}
NORM=${NORM:-none}
MASKED=${MASKED:-0.3}
ZONED=${ZONED:-0.1}
WIDTHS=32,64,128
CUBE=64
BATCH=8
VAL_EVERY=250
VAL_BATCHES=16
REPO=$(pwd)

setup_env() {
    local work=$1
    export PYTHONPATH="$work/site:$REPO:$REPO/export${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
}

cmd_start() {
    local structures=$1 work=$2 minutes=$3 wheels=${4:-}
    mkdir -p "$work"
    if [[ -n "$wheels" ]]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$work/site" "$wheels"/*.whl
    fi
    setup_env "$work"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    local cores
    cores=$(nproc)
    # time one training step on random data while the datasets are built
    python3 - "$WIDTHS" "$CUBE" "$BATCH" >"$work/step_seconds" 2>"$work/step_bench.log" <<'EOF' &
import sys, time, torch
from demhx_export.network import UNet3D, parse_widths
widths, cube, batch = parse_widths(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.backends.cudnn.benchmark = True
net = UNet3D(widths).cuda()
opt = torch.optim.Adam(net.parameters())
x = torch.randn(batch, 1, cube, cube, cube, device="cuda")
times = []
for i in range(30):
    torch.cuda.synchronize(); t = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = net(x)
    loss = torch.nn.functional.l1_loss(y.float(), x)
    opt.zero_grad(); loss.backward(); opt.step()
    torch.cuda.synchronize(); times.append(time.perf_counter() - t)
times = sorted(times[10:])
print(f"{times[len(times) // 2]:.4f}")
print(f"step bench: median {times[len(times) // 2]:.4f} s, min {times[0]:.4f} s, "
      f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", file=sys.stderr)
EOF
    local bench=$!
    local t0=$SECONDS
    python3 -m demhx_export.cli build-dataset val "$work/ds/val" --workers "$cores" \
        --structures_dir "$structures" --masked "$MASKED" --zoned "$ZONED"
    python3 -m demhx_export.cli build-dataset train "$work/ds/train" --workers "$cores" \
        --structures_dir "$structures" --masked "$MASKED" --zoned "$ZONED"
    echo "datasets built in $((SECONDS - t0)) s: $(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$work/ds/train/index.json") train maps"
    wait $bench || true
    cat "$work/step_bench.log"
    local step steps
    step=$(head -1 "$work/step_seconds")
    # the data pipeline and validation cost extra: size the schedule for 85 % of the budget
    steps=$(python3 -c "print(int(0.85 * $minutes * 60 / $step))")
    echo "training $steps steps (cosine schedule) for at most $minutes min"
    setsid nohup python3 -m demhx_export.cli train "$work/ds/train" "$work/ds/val" "$work/run" \
        --widths "$WIDTHS" --cube-size "$CUBE" --batch-size "$BATCH" --steps "$steps" \
        --schedule cosine --val-every "$VAL_EVERY" --val-batches "$VAL_BATCHES" \
        --target "$TARGET" --norm "$NORM" --device cuda --workers "$((cores > 4 ? cores - 4 : 1))" --max-minutes "$minutes" \
        >"$work/train.log" 2>&1 </dev/null &
    echo "training started (log: $work/train.log)"
}

cmd_wait() {
    local work=$1 seconds=$2 end=$((SECONDS + $2))
    while ((SECONDS < end)); do
        if ! pgrep -f "demhx_export.cli train" >/dev/null; then
            echo "training process has ended"
            break
        fi
        sleep 10
    done
    tail -n 5 "$work/train.log" || true
}

cmd_snapshot() {
    local work=$1 dest=$2
    mkdir -p "$dest"
    cp "$work/train.log" "$dest/train.log" 2>/dev/null || true
    (cd "$work/run" && tar -cf - --exclude='*.tmp' ./*) | split -b 15m -d - "$dest/run.tar.part"
    ls -la "$dest"
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    wait) shift; cmd_wait "$@" ;;
    snapshot) shift; cmd_snapshot "$@" ;;
    *) echo "usage: $0 start STRUCTURES WORK MINUTES [WHEELS] | wait WORK SECONDS | snapshot WORK DEST" >&2
       exit 2 ;;
esac
