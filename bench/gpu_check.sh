#!/usr/bin/env bash
# GPU check on a CUDA machine, in under 10 minutes: the gpu-marked tests and the whole test
# suite (their failures printed), the noise-estimation bench, 256³ runs (default and reference
# tiling) with stage times, the demhx command end to end on 256³, the reference tiling on
# one GPU against every GPU, the feed (raw network against the pipeline's network stage),
# several maps in one warm process, and the GPU's busy percentage.
#
# Use as .device/measure.sh of ../shared/tools/device (run.sh installs onnxruntime-gpu and the
# demhx wheel into a scratch site folder first, then runs this from the project root):
#     cp bench/gpu_check.sh .device/measure.sh
# or directly on any CUDA machine with demhx and onnxruntime-gpu installed:
#     bash bench/gpu_check.sh
# Results go under $OUT (or $TMPDIR/out): log.txt, util.csv (GPU utilisation every 100 ms),
# gpu-tests.txt and suite.txt (pytest's whole output). The tests need pytest and onnx (and
# pytest-xdist for workers); without them that step says so and the timings still run.
set -u
R=${OUT:-${TMPDIR:-/tmp}/out}; mkdir -p "$R"
W=${TMPDIR:-/tmp}
ROOT=$PWD
LOG="$R/log.txt"
say() { echo "== $*" | tee -a "$LOG"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,memory.free --format=csv | tee -a "$LOG"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 100 \
    > "$R/util.csv" &
UTIL=$!
trap 'kill $UTIL 2>/dev/null' EXIT

# demhx refuses to run with both onnxruntime and onnxruntime-gpu installed (they share one
# module): drop the machine's CPU build when the GPU build is installed beside it.
if python3 -c "import importlib.metadata as m; m.version('onnxruntime'); m.version('onnxruntime-gpu')" \
        2>/dev/null; then
    say "both onnxruntime packages installed: uninstalling the CPU build"
    python3 -m pip uninstall -y -q onnxruntime 2>&1 | tail -2 | tee -a "$LOG"
fi
python3 -c "import onnxruntime as o, demhx; print('onnxruntime', o.__version__,
o.get_available_providers(), 'demhx', demhx.__version__)" 2>&1 | tee -a "$LOG"

# 1. The checkout's tests against the installed demhx: every gpu-marked test (about 30 s),
#    then the whole suite (about 4 minutes on 14 workers); the failures and the counts printed.
tests() {  # tests NAME TIMEOUT PYTEST-ARGS...: run, keep the output, print what failed
    local name=$1 limit=$2; shift 2
    say "$name"
    (cd "$W" && timeout "$limit" python3 -m pytest -q -p no:cacheprovider -rfEs \
        --rootdir "$ROOT" -c "$ROOT/pyproject.toml" "$@" "$ROOT/tests" > "$R/$name.txt" 2>&1)
    echo "exit $?" >> "$R/$name.txt"
    grep -E "^(FAILED|ERROR|SKIPPED) | (passed|failed|skipped|error)|^exit " "$R/$name.txt" \
        | cut -c1-300 | tee -a "$LOG"
}
if python3 -c "import pytest, onnx" 2>/dev/null; then
    tests gpu-tests 150 -m gpu
    workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 14")
    tests suite 420 $workers
else
    say "skipped: pytest or onnx is not installed here (add their wheels to the bundle)"
fi

# 2. Noise estimation, old (SciPy) against new (numba), on every shared map and 256³ (~40 s).
say "noise estimation: bench/noise_speed.py"
(cd "$ROOT" && timeout 90 python3 bench/noise_speed.py --repeats 3 2>&1 | tee -a "$LOG")

# 3. 256³ with the default model: wall time and the stage times (--debug's DEBUG lines).
say "256³ runs, device cuda"
cd "$W"  # not the project root: the checkout's demhx/ would shadow the installed wheel
python3 -c "
import sys; sys.path.insert(0, '$ROOT/bench'); from pathlib import Path; from speed import synthetic_map
synthetic_map(256, Path('$W/m256.mrc'))"
for tiling in default default reference; do  # the first run pays numba's and cuDNN's start
    timeout 100 /usr/bin/time -f "$tiling: wall %e s, peak RSS %M KB" python3 -c "
import logging, sys
logging.basicConfig(level=logging.DEBUG, format='demhx: %(message)s', stream=sys.stdout)
for name in ('numba', 'matplotlib'):
    logging.getLogger(name).setLevel(logging.WARNING)
from demhx.pipeline import enhance_file
print(enhance_file('$W/m256.mrc', '$W/o-$tiling.mrc', device='cuda', tiling='$tiling',
                   overwrite=True).line())
" 2>&1 | grep -E "stage times|wrote|wall|device|Error|error" | tee -a "$LOG"
done
# 3b. The command itself, end to end (the bar: 256³ default in at most 1.5 s wall): numba's
#     set-up overlaps the CUDA session's creation, and the process skips the teardown.
say "256³, the demhx command, device cuda, default tiling"
for run in 1 2 3; do
    timeout 60 /usr/bin/time -f "command run $run: wall %e s, peak RSS %M KB" python3 -m demhx \
        "$W/m256.mrc" "$W/o-cli.mrc" --device cuda --overwrite --debug 2>&1 \
        | grep -E "stage times|wrote|wall|error" | tee -a "$LOG"
done
# 4. Several GPUs (when the machine has them): the reference tiling on one GPU and on all,
#    for the scaling; on a one-GPU machine, cuda:all is cuda:0 and the line says so.
say "several GPUs: reference tiling, cuda:0 against cuda:all"
for devices in cuda:0 cuda:all; do
    timeout 100 /usr/bin/time -f "$devices: wall %e s" python3 -c "
from demhx.device import cuda_device_count
from demhx.pipeline import enhance_file
print('$devices', cuda_device_count(), 'GPUs visible')
print(enhance_file('$W/m256.mrc', '$W/o-multi.mrc', device='$devices', tiling='reference',
                   overwrite=True).line())
" 2>&1 | grep -E "GPUs visible|wrote|wall|Error|error" | tee -a "$LOG"
done
# 5. The feed and warm maps (bench/gpu_feed.py): the raw network's ms per cube against the
#    reference tiling's network stage (the bar: 75 % or better), three 256³ maps in one
#    process (the bar: ≤ 0.6 s each once warm), and the GPU's busy % during each (util.csv).
say "feed: raw network against the reference tiling's network stage; several maps warm"
timeout 150 python3 "$ROOT/bench/gpu_feed.py" "$W/m256.mrc" --device cuda --tiling reference \
    --maps 3 --util "$R/util.csv" 2>&1 | grep -vE "^\s*$" | tail -8 | tee -a "$LOG"
say "GPU busy over the whole check (util.csv): mean and largest"
awk -F', ' '{ split($2, b, " "); n++; s += b[1]; if (b[1] > m) m = b[1] }
            END { if (n) printf "%d samples, mean %.0f %%, largest %d %%\n", n, s / n, m }' \
    "$R/util.csv" | tee -a "$LOG"
say "done"
