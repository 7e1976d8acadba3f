"""``demhx-export one-run``: data, training and packing in one call, on CPU with a tiny setup."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from demhx_export.checkpoint import load_checkpoint
from demhx_export.dataset import DEFAULT_STRUCTURES
from demhx_export.one_run import PART_BYTES, _pack

SCRIPT = Path(__file__).resolve().parents[1] / "train_gpu.sh"


def _small_structures(folder: Path) -> Path:
    """The two smallest train-split and the smallest val-split structures, with a manifest."""
    with (DEFAULT_STRUCTURES / "manifest.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    keep = []
    for split, count in (("train", 2), ("val", 1)):
        chosen = sorted((r for r in rows if r["split"] == split), key=lambda r: int(r["n_atoms"]))
        keep += chosen[:count]
    folder.mkdir()
    with (folder / "manifest.tsv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(keep)
    for row in keep:
        shutil.copy(DEFAULT_STRUCTURES / row["file"], folder / row["file"])
    return folder


@pytest.mark.skipif(not (DEFAULT_STRUCTURES / "manifest.tsv").is_file(),
                    reason="needs ../shared/data/structures")
def test_device_command_builds_trains_and_packs_within_its_budget(tmp_path: Path) -> None:
    """The device command itself (export/train_gpu.sh), with a tiny setup on the CPU."""
    structures = _small_structures(tmp_path / "structures")
    out = tmp_path / "out"
    options = ("--build-minutes 1.5 --widths 2,4,8 --train-count 2 --val-count 1 --workers 2 "
               "--device cpu --cube-size 16 --batch-size 2 --val-every 2 --val-batches 1 "
               "--steps 4").split() + ["--variants", "negative_fraction=0.3;negative_scale=0.8,1.2"]
    done = subprocess.run(["bash", str(SCRIPT), str(structures), str(tmp_path / "work"),
                           str(out), "3", "--", *options], capture_output=True, text=True,
                          timeout=170, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["one_run.log", "w2-4-8-v1.tar"]
    with tarfile.open(out / "w2-4-8-v1.tar") as tar:
        names = set(tar.getnames())
        tar.extractall(tmp_path / "back", filter="data")
    assert {"w2-4-8-v1/best.safetensors", "w2-4-8-v1/best.json", "w2-4-8-v1/log.tsv",
            "w2-4-8-v1/train.log"} <= names
    assert not any("opt" in n or "latest" in n for n in names)  # only what is worth keeping
    net, config = load_checkpoint(tmp_path / "back" / "w2-4-8-v1" / "best")
    # the v5 recipe (whole-map negatives), with this run's variant over it
    assert net.outputs == 2 and config["train"]["negative_source"] == "map"
    assert config["train"]["negative_fraction"] == 0.3
    assert config["train"]["negative_scale"] == [0.8, 1.2]
    assert config["train"]["decay_minutes"] > 0 and config["train"]["clip_norm"] == 1.0
    assert config["step"] in (2, 4) and config["train"]["decay_steps"] == 4
    log = (out / "one_run.log").read_text()
    assert "datasets: 2 train and 1 val maps" in log and "exit 0" in log


def test_large_runs_come_back_in_parts(tmp_path: Path) -> None:
    run = tmp_path / "big"
    run.mkdir()
    (run / "best.safetensors").write_bytes(b"\1" * (PART_BYTES + 5000))
    (run / "best.json").write_text(json.dumps({"step": 1}))
    parts = _pack(run, tmp_path)
    assert [p.name for p in parts] == ["big.tar.part00", "big.tar.part01"]
    assert all(p.stat().st_size <= PART_BYTES for p in parts)
    joined = tmp_path / "joined.tar"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as tar:
        assert set(tar.getnames()) == {"big/best.safetensors", "big/best.json"}


def test_variants_and_resolutions_are_checked() -> None:
    from demhx_export.one_run import _resolutions, _variants

    assert _variants("a=1;b=2,3/a=4", 2) == ({"a": "1", "b": "2,3"}, {"a": "4"})
    assert _variants(None, 3) == ()
    with pytest.raises(ValueError, match="2 entries for 3"):
        _variants("a=1/a=2", 3)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        _variants("a", 1)
    assert _resolutions(None, "v5") == (2.5, 7.5) and _resolutions(None, "v4") == (2.5, 6.0)
    assert _resolutions("3,8", "v5") == (3.0, 8.0)
    with pytest.raises(ValueError, match="LOW,HIGH"):
        _resolutions("8,3", "v5")
