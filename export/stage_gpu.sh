#!/usr/bin/env bash
# Stage what one training call on a lent GPU machine needs, in .gpu/ (ignored by git):
#   .gpu/structures  the train- and val-split structures with at most MAX_ATOMS atoms, and
#                    their manifest (the whole folder would not fit beside the tracked tree)
#   .gpu/wheels      gemmi, mrcfile, fire and termcolor for CPython 3.12 on x86-64
#   .gpu/clean       demhx/ as committed (HEAD), so that edits in progress cannot reach the
#                    dataset build
# then print the call to make. Run from the repository root, after committing.
#
#   bash export/stage_gpu.sh [STRUCTURES] [MAX_ATOMS]
set -euo pipefail
structures=${1:-../shared/data/structures}
max_atoms=${2:-12000}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/structures .gpu/wheels .gpu/clean
python3 - "$structures" "$max_atoms" <<'PY'
import csv, shutil, sys
from pathlib import Path
source, limit = Path(sys.argv[1]), int(sys.argv[2])
with (source / "manifest.tsv").open() as handle:
    rows = list(csv.DictReader(handle, delimiter="\t"))
keep = [r for r in rows if r["split"] in ("train", "val") and int(r["n_atoms"]) <= limit]
with open(".gpu/structures/manifest.tsv", "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
    writer.writeheader()
    writer.writerows(keep)
for row in keep:
    shutil.copy(source / row["file"], ".gpu/structures/")
print(f"{len(keep)} structures staged")
PY
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .gpu/wheels gemmi mrcfile fire termcolor
git archive HEAD demhx | tar -x -C .gpu/clean
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
staged=$(du -sb .gpu | cut -f1)
echo "tracked tree $((tracked / 1048576)) MiB + .gpu $((staged / 1048576)) MiB (a call carries at most 64 MiB)"
echo "the call (carry [\".gpu\"], timeout 600 s):"
echo "  mkdir -p /tmp/w/site && cp -r .gpu/clean/demhx /tmp/w/site/ && bash export/train_gpu.sh .gpu/structures /tmp/w \$OUT 8.5 .gpu/wheels -- --widths 16,32,64/16,32,64 --variants 'negative_fraction=0.25/negative_fraction=0.4;negative_scale=0.7,2' --build-minutes 2.3"
