#!/usr/bin/env bash
# The container install without Docker or a GPU: runs the Dockerfile's install steps in a fresh
# virtual environment outside the repository, then checks what the image relies on.
#   1. the dependency line of the Dockerfile (onnxruntime-gpu included), binary wheels only;
#   2. demhx from a copy of exactly what the Dockerfile copies, with --no-deps;
#   3. no CPU onnxruntime installed, the CUDA provider compiled in, the models installed;
#   4. demhx --version, then the bundled example with --device cpu and with --device auto
#      (onnxruntime-gpu without a GPU must report the CPU provider and write the output);
#      --device cuda must stop with exit status 2 and one line;
#   5. the kernels compiled as the images compile them (generic CPU, into a seed folder);
#   6. when run as root: the --device cpu run again as an unprivileged user with no home and a
#      read-only installation, as `docker run -u UID` does, with the image's numba settings:
#      its fresh cache seeded, nothing may be compiled.
# Downloads about 400 MB from PyPI; the example runs take a few minutes on 2 cores.
# usage: [PYTHON=python3] bash bench/container_check.sh [WORKDIR]    (WORKDIR is emptied first)
# Step 5 needs an interpreter that the unprivileged user can run (a system python3).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-${TMPDIR:-/tmp}/demhx-container-check}
python=${PYTHON:-python3}
export ORT_DISABLE_TELEMETRY=1  # as in the image
case "$work" in "$root"|"$root"/*) echo "WORKDIR must be outside $root" >&2; exit 2 ;; esac
rm -rf "$work" && mkdir -p "$work/src" "$work/out" && chmod 755 "$work"

# The Dockerfile's dependency requirements, ${ORT_GPU_VERSION} replaced by the ARG default.
mapfile -t requirements < <(python3 - "$root/Dockerfile" <<'EOF'
import re, shlex, sys
text = open(sys.argv[1], encoding="utf-8").read().replace("\\\n", " ")
version = re.search(r"^ARG ORT_GPU_VERSION=(\S+)", text, re.M).group(1)
line = next(line for line in text.splitlines() if line.startswith("RUN") and "--only-binary" in line)
for word in shlex.split(line)[1:]:
    if not word.startswith("-") and not word.endswith("/pip") and word != "install":
        print(word.replace("${ORT_GPU_VERSION}", version))
EOF
)
echo "== requirements: ${requirements[*]}"

echo "== install ($python, Python $("$python" -c 'import sys; print(sys.version.split()[0])'))"
"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install -q --no-cache-dir --only-binary=:all: "${requirements[@]}"
cp "$root/pyproject.toml" "$root/README.md" "$root/LICENSE" "$work/src/"
cp -r "$root/demhx" "$root/models" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
"$work/venv/bin/pip" install -q --no-cache-dir --no-deps "$work/src"
"$work/venv/bin/pip" list 2>/dev/null | grep -i -E "^(demhx|onnxruntime(-gpu)?|numpy|scipy|numba|mrcfile|fire) "

echo "== checks"
cd "$work"  # not the repository: the installed package must be the one imported
"$work/venv/bin/python" - <<'EOF'
import importlib.metadata as m, importlib.resources as r
import onnxruntime as ort, demhx, demhx.models
names = {d.metadata["Name"] for d in m.distributions()}
assert "onnxruntime" not in names, "CPU onnxruntime installed beside onnxruntime-gpu"
assert "CUDAExecutionProvider" in ort.get_available_providers(), ort.get_available_providers()
models = sorted(p.name for p in r.files(demhx.models).iterdir() if p.name.endswith(".onnx"))
print("onnxruntime-gpu", m.version("onnxruntime-gpu"), "providers", ort.get_available_providers())
print("demhx", demhx.__file__, "models", models)
assert models, "no models installed"
EOF
"$work/venv/bin/demhx" --version

example="$root/examples/emd_5168.map"
for device in cpu auto; do
    echo "== demhx $example out/$device.mrc --device $device --threads 2"
    /usr/bin/time -f "wall %e s, peak RSS %M kB" "$work/venv/bin/demhx" "$example" \
        "$work/out/$device.mrc" --device "$device" --threads 2 2> "$work/out/$device.log" \
        || { cat "$work/out/$device.log"; exit 1; }
    cat "$work/out/$device.log"
    grep -q "device cpu (CPUExecutionProvider" "$work/out/$device.log"
done
echo "== demhx --device cuda (no GPU here: must be exit status 2 and one line)"
status=0
"$work/venv/bin/demhx" "$example" "$work/out/cuda.mrc" --device cuda 2> "$work/out/cuda.log" \
    || status=$?
cat "$work/out/cuda.log"
[ "$status" -eq 2 ] && [ "$(wc -l < "$work/out/cuda.log")" -eq 1 ] && [ ! -e "$work/out/cuda.mrc" ]

"$work/venv/bin/python" - "$example" "$work/out/cpu.mrc" "$work/out/auto.mrc" <<'EOF'
import sys, mrcfile, numpy as np
with mrcfile.open(sys.argv[1], permissive=True) as src:
    shape, voxel = src.data.shape, src.voxel_size
for name in sys.argv[2:]:
    with mrcfile.open(name) as out:
        assert out.data.shape == shape and out.voxel_size == voxel, name
        assert np.isfinite(out.data).all() and out.data.std() > 0, name
        print(name, out.data.shape, out.data.dtype, "std", float(out.data.std()))
EOF

echo "== kernels compiled ahead, as the images do (NUMBA_CPU_NAME=generic)"
NUMBA_CPU_NAME=generic NUMBA_CACHE_DIR="$work/numba-seed" "$work/venv/bin/python" -m demhx._precompile
chmod -R a+rX "$work/numba-seed"

as_user=(setpriv --reuid 65534 --regid 65534 --clear-groups env HOME=/nonexistent)
if [ "$(id -u)" -ne 0 ] || ! command -v setpriv > /dev/null; then
    echo "== not root: the unprivileged run is skipped"
elif ! "${as_user[@]}" "$work/venv/bin/python" -c "" 2> /dev/null; then
    echo "== $python cannot be run by uid 65534: the unprivileged run is skipped (set PYTHON)"
else
    echo "== as uid 65534, no home, read-only installation, the image's numba settings"
    mkdir -p "$work/user" && chown 65534:65534 "$work/user"
    /usr/bin/time -f "wall %e s" "${as_user[@]}" NUMBA_CPU_NAME=generic NUMBA_DEBUG_CACHE=1 \
        DEMHX_NUMBA_SEED="$work/numba-seed" NUMBA_CACHE_DIR="$work/user/numba-cache" \
        "$work/venv/bin/demhx" "$example" "$work/user/cpu.mrc" --device cpu --threads 2 \
        --quiet > "$work/user/cache.log"
    ls -l "$work/user/cpu.mrc"
    echo "kernels loaded: $(grep -c "data loaded" "$work/user/cache.log"), compiled: \
$(grep -c "data saved" "$work/user/cache.log")"
    ! grep -q "data saved" "$work/user/cache.log"
fi
echo "== container check passed"
