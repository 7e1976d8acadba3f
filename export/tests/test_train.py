"""Training loop: checkpoints, resume and logging on a tiny synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from demhx_export.checkpoint import load_checkpoint
from demhx_export.train import train_command


def _dataset(folder: Path, count: int, seed: int) -> Path:
    """A dataset folder in the builder's format: blobs in noise, target = clean blobs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    index = []
    grid = np.indices((24, 24, 24)).astype(np.float32)
    for i in range(count):
        centre = rng.uniform(8, 16, size=3).reshape(3, 1, 1, 1)
        clean = np.exp(-((grid - centre) ** 2).sum(0) / 8.0).astype(np.float32)
        noisy = (clean + rng.normal(0, 0.1, clean.shape)).astype(np.float32)
        np.savez(folder / f"s{i}.npz", input=noisy, target=clean,
                 signal=(clean > 0.2).astype(np.uint8))
        index.append({"id": f"s{i}"})
    (folder / "index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ds")
    return _dataset(root / "train", 3, 0), _dataset(root / "val", 2, 1)


def test_run_writes_checkpoints_log_and_resumes(data: tuple[Path, Path], tmp_path: Path) -> None:
    train_dir, val_dir = data
    run = tmp_path / "run"
    options = dict(widths="2,4,8", cube_size=16, batch_size=2, val_every=2, val_batches=1,
                   threads=1)
    train_command(str(train_dir), str(val_dir), str(run), steps=4, **options)
    for name in ("latest.json", "latest.safetensors", "latest.opt.pt", "best.json", "log.tsv"):
        assert (run / name).is_file(), name
    assert json.loads((run / "latest.json").read_text())["step"] == 4
    train_command(str(train_dir), str(val_dir), str(run), steps=6, **options)
    rows = (run / "log.tsv").read_text().strip().splitlines()
    assert [int(r.split("\t")[0]) for r in rows[1:]] == [2, 4, 6]
    net, config = load_checkpoint(run / "latest")
    assert config["step"] == 6 and tuple(net.widths) == (2, 4, 8)
    assert config["cube_size"] == 64 and config["stride"] == 16


def test_resume_with_other_architecture_is_refused(data: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    train_dir, val_dir = data
    run = tmp_path / "run"
    train_command(str(train_dir), str(val_dir), str(run), widths="2,4,8", cube_size=16,
                  batch_size=2, steps=2, val_every=2, val_batches=1, threads=1)
    with pytest.raises(ValueError, match="other settings"):
        train_command(str(train_dir), str(val_dir), str(run), widths="4,4,8", cube_size=16,
                      batch_size=2, steps=4, val_every=2, val_batches=1, threads=1)


def test_same_seed_gives_same_weights(data: tuple[Path, Path], tmp_path: Path) -> None:
    train_dir, val_dir = data
    weights = []
    for name in ("a", "b"):
        train_command(str(train_dir), str(val_dir), str(tmp_path / name), widths="2,4,8",
                      cube_size=16, batch_size=2, steps=3, val_every=3, val_batches=1,
                      threads=1)
        net, _ = load_checkpoint(tmp_path / name / "latest")
        weights.append(np.concatenate([p.detach().numpy().ravel() for p in net.parameters()]))
    np.testing.assert_array_equal(weights[0], weights[1])


def test_cosine_schedule_decays_to_min_lr_over_the_first_steps(data: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    train_dir, val_dir = data
    run = tmp_path / "run"
    options = dict(widths="2,4,8", cube_size=16, batch_size=2, val_every=2, val_batches=1,
                   threads=1, schedule="cosine", lr=1e-3, min_lr=1e-5, warmup_steps=0)
    train_command(str(train_dir), str(val_dir), str(run), steps=4, **options)
    lrs = [float(r.split("\t")[2]) for r in
           (run / "log.tsv").read_text().strip().splitlines()[1:]]
    # lr used for step 2 (index 1 of 4) and step 4 (index 3): strictly decreasing
    assert lrs[0] > lrs[1] > 1e-5
    # resuming with more steps keeps the decay length fixed when the run started
    train_command(str(train_dir), str(val_dir), str(run), steps=6, **options)
    config = json.loads((run / "latest.json").read_text())["train"]
    assert config["schedule"] == "cosine" and config["decay_steps"] == 4
    lrs = [float(r.split("\t")[2]) for r in
           (run / "log.tsv").read_text().strip().splitlines()[1:]]
    assert lrs[-1] == pytest.approx(1e-5)


def test_cosine_lr_endpoints() -> None:
    from demhx_export.train import TrainConfig, cosine_lr

    config = TrainConfig(train_dir="t", val_dir="v", lr=1e-3, min_lr=1e-5, schedule="cosine",
                         decay_steps=100)
    assert cosine_lr(config, 0) == pytest.approx(1e-3)
    assert cosine_lr(config, 50) == pytest.approx(0.5 * (1e-3 + 1e-5))
    assert cosine_lr(config, 100) == pytest.approx(1e-5)
    assert cosine_lr(config, 1000) == pytest.approx(1e-5)


def test_worker_processes_give_a_deterministic_stream(data: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    train_dir, val_dir = data
    weights = []
    for name in ("a", "b"):
        train_command(str(train_dir), str(val_dir), str(tmp_path / name), widths="2,4,8",
                      cube_size=16, batch_size=2, steps=3, val_every=3, val_batches=1,
                      threads=1, workers=2)
        net, _ = load_checkpoint(tmp_path / name / "latest")
        weights.append(np.concatenate([p.detach().numpy().ravel() for p in net.parameters()]))
    np.testing.assert_array_equal(weights[0], weights[1])


def test_gpu_only_settings_are_refused_on_cpu(data: tuple[Path, Path], tmp_path: Path) -> None:
    import torch

    train_dir, val_dir = data
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        train_command(str(train_dir), str(val_dir), str(tmp_path / "r"), device="cuda")
    with pytest.raises(ValueError, match="CUDA GPU only"):
        train_command(str(train_dir), str(val_dir), str(tmp_path / "r"), widths="2,4,8",
                      cube_size=16, steps=1, precision="bf16")
    with pytest.raises(ValueError, match="--schedule"):
        train_command(str(train_dir), str(val_dir), str(tmp_path / "r"), schedule="linear")


def test_warm_up_raises_the_learning_rate_linearly() -> None:
    import torch

    from demhx_export.train import TrainConfig, _schedule_lr

    config = TrainConfig(train_dir="t", val_dir="v", lr=1e-3, min_lr=1e-5, schedule="cosine",
                         decay_steps=1000, warmup_steps=10)
    optimiser = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    seen = []
    for step in range(12):
        _schedule_lr(config, optimiser, step, lr_scale=1.0)
        seen.append(optimiser.param_groups[0]["lr"])
    assert seen[0] == pytest.approx(1e-4, rel=1e-3) and seen[4] == pytest.approx(5e-4, rel=1e-3)
    assert all(a < b for a, b in zip(seen[:9], seen[1:10], strict=True))
    assert seen[11] < seen[9] <= 1e-3  # the cosine decay once the warm-up is over
    _schedule_lr(config, optimiser, 11, lr_scale=0.25)
    assert optimiser.param_groups[0]["lr"] == pytest.approx(0.25 * seen[11])


def _absurd_lr_run(data: tuple[Path, Path], tmp_path: Path, spike_factor: float) -> Path:
    """60 steps of a tiny net at lr 30 without clipping or warm-up; the run folder."""
    train_dir, val_dir = data
    run = tmp_path / "run"
    train_command(str(train_dir), str(val_dir), str(run), widths="2,4,8", cube_size=16,
                  batch_size=2, steps=60, val_every=20, val_batches=1, threads=1, lr=30.0,
                  schedule="cosine", min_lr=30.0, warmup_steps=0, clip_norm=0,
                  spike_factor=spike_factor, negative_fraction=0.2)
    return run


def test_guard_recovers_a_forced_divergence(data: tuple[Path, Path], tmp_path: Path) -> None:
    """An absurd learning rate without clipping blows the loss up; the guard restores the
    last good weights with a lower learning rate until training is stable again."""
    run = _absurd_lr_run(data, tmp_path, spike_factor=3.0)
    events = (run / "guard.tsv").read_text().strip().splitlines()[1:]
    assert events, "the absurd learning rate never set the guard off"
    scales = [float(e.split("\t")[4]) for e in events]
    assert scales == sorted(scales, reverse=True) and scales[-1] < 1.0
    rows = [r.split("\t") for r in (run / "log.tsv").read_text().strip().splitlines()[1:]]
    untrained_l1 = 0.7  # |target| scale of the tiny dataset: an untrained net sits near it
    assert all(np.isfinite(float(r[4])) for r in rows)
    assert float(rows[-1][4]) < 0.5 * untrained_l1 and float(rows[-1][5]) > 0.5  # it learns
    latest = json.loads((run / "latest.json").read_text())
    assert latest["step"] == 60 and latest["lr_scale"] == pytest.approx(scales[-1])
    net, _ = load_checkpoint(run / "latest")
    assert all(np.isfinite(p.detach().numpy()).all() for p in net.parameters())


def test_without_the_guard_the_same_run_diverges(data: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    """The forced divergence above is real: with the guard blind to spikes (and non-finite
    losses impossible to skip) the run ends far worse than where it started."""
    run = _absurd_lr_run(data, tmp_path, spike_factor=0)
    rows = [r.split("\t") for r in (run / "log.tsv").read_text().strip().splitlines()[1:]]
    last = float(rows[-1][4])
    assert not np.isfinite(last) or last > 0.7


def test_error_head_trains_a_second_channel(data: tuple[Path, Path], tmp_path: Path) -> None:
    train_dir, val_dir = data
    first = tmp_path / "plain"
    options = dict(widths="2,4,8", cube_size=16, batch_size=2, val_every=2, val_batches=1,
                   threads=1)
    train_command(str(train_dir), str(val_dir), str(first), steps=2, **options)
    run = tmp_path / "run"
    # fine-tuning a one-channel checkpoint into a network with an error head
    train_command(str(train_dir), str(val_dir), str(run), steps=4, error_head=True,
                  init=str(first / "best"), negative_fraction=0.5, **options)
    net, config = load_checkpoint(run / "latest")
    assert config["architecture"]["error_head"] is True and net.outputs == 2
    plain, _ = load_checkpoint(first / "best")
    tuned = dict(net.named_parameters())
    assert any(not np.array_equal(tuned[name].detach().numpy(), p.detach().numpy())
               for name, p in plain.named_parameters())
    rows = [r.split("\t") for r in (run / "log.tsv").read_text().strip().splitlines()]
    assert rows[0][-2:] == ["val_neg", "val_err_rs"]
    assert all(np.isfinite(float(r[-1])) and np.isfinite(float(r[-2])) for r in rows[1:])
