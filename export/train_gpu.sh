#!/usr/bin/env bash
# One training run on one machine with PyTorch (a GPU when present), inside a wall-clock budget:
# build the datasets, train, and leave only what is worth bringing back in OUT.
#
#   export/train_gpu.sh STRUCTURES WORK OUT MINUTES [WHEELS] [-- ONE-RUN OPTIONS]
#
#   STRUCTURES  folder with manifest.tsv and the atomic models (train and val splits)
#   WORK        scratch folder (datasets, runs, site packages)
#   OUT         receives NAME.tar (or NAME.tar.partNN) per network and one_run.log
#   MINUTES     budget of the whole call (keep a minute under the machine's limit)
#   WHEELS      optional folder of wheels for an offline machine (gemmi, mrcfile, fire, ...),
#               installed into WORK/site first
#   options     those of `demhx-export one-run` (--widths 16,32,64/32,64,128, --recipe v5,
#               --variants,
#               --build-minutes, --lr, --negative-fraction, --device, ...)
#
# Run from anywhere; the repository is found from this script's place. The trainer's output
# goes to files, never through a pipe: its data workers would hold a pipe open and the call
# would hang until its limit.
set -uo pipefail
if (($# < 4)); then
    echo "usage: $0 STRUCTURES WORK OUT MINUTES [WHEELS] [-- one-run options]" >&2
    exit 2
fi
structures=$1 work=$2 out=$3 minutes=$4
shift 4
wheels=""
if (($# > 0)) && [[ $1 != -- ]]; then wheels=$1; shift; fi
if (($# > 0)) && [[ $1 == -- ]]; then shift; fi
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work" "$out" || exit 1
if [[ -n $wheels ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$work/site" "$wheels"/*.whl || exit 1
fi
export PYTHONPATH="$work/site:$repo:$repo/export${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-$work/numba}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader
status=0
python3 -m demhx_export.cli one-run "$structures" "$work" "$out" --minutes "$minutes" "$@" \
    >"$work/one_run.stdout" 2>&1 </dev/null || status=$?
tail -n 40 "$work/one_run.stdout"
exit "$status"
