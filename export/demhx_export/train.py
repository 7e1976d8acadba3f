"""Training of the demhx U-net on synthetic pairs: L1 loss, Adam, learning rate halved on plateau.

A run lives in one folder (``RUN``) that can be committed and resumed anywhere:

``RUN/latest.safetensors`` + ``RUN/latest.json``
    the newest checkpoint (format of :mod:`demhx_export.checkpoint`), written every
    ``checkpoint_every`` steps and at the end;
``RUN/best.safetensors`` + ``RUN/best.json``
    the checkpoint with the lowest validation loss so far (the one to export);
``RUN/latest.opt.pt``
    optimiser, scheduler and random-generator state for an exact resume;
``RUN/log.tsv``
    one row per validation: step, wall seconds, learning rate, mean training loss since
    the previous row, validation L1 loss, validation CC, mean |output| on negatives
    (``val_neg``: phase-randomised validation cubes, whose target is empty) and, with an error
    head, the rank correlation of the estimated and the realised error (``val_err_rs``);
``RUN/guard.tsv``
    the divergence guard's rollbacks, if any (:mod:`demhx_export.guard`);
``RUN/loss.png``
    the loss curve (needs matplotlib).

Running the same command again resumes from ``RUN/latest.*``: the step counter, the
optimiser, the learning-rate schedule and the sampler seed continue where they stopped, so a
run can be split over any number of sittings (``--max-minutes`` stops it cleanly).

Stability (:mod:`demhx_export.guard`): gradients are clipped to ``clip_norm``, the learning
rate rises linearly over ``warmup_steps``, and a loss spike or a non-finite loss rolls the
network and optimiser back to the last good snapshot with half the learning rate.

What the network learns besides the target: ``negative_fraction`` of the cubes are negatives
(:mod:`demhx_export.sampler`: phase-randomised inputs, empty targets), and with ``error_head``
a second output channel learns the absolute error of the first (L1 towards
``|output - target|``, the output held fixed, weighted by ``error_weight``). The best
checkpoint minimises the validation loss of the same mixture: ``(1 - f) × val L1 + f × val
neg`` for a negative fraction ``f``.

Two learning-rate schedules: ``plateau`` (the paper: halved after ``plateau_patience``
validations without improvement) and ``cosine`` (from ``lr`` down to ``min_lr`` over the
``--steps`` given when the run starts; better when the compute budget is known in advance).

On a CUDA machine (``--device cuda``) the network trains in bfloat16 autocast
(``--precision bf16``, the default there) and ``--workers`` processes cut and augment the
cubes while the GPU computes. Runs can move between CPU and GPU machines: checkpoints are
stored on the CPU and the settings that do not change the maths (device, workers, threads)
are not part of the run's identity.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from demhx_export.checkpoint import (
    git_commit,
    load_checkpoint,
    optimiser_state_path,
    save_checkpoint,
)
from demhx_export.guard import DivergenceGuard
from demhx_export.network import UNet3D, count_parameters, parse_widths
from demhx_export.sampler import CubeSampler

INFERENCE_CUBE_SIZE = 64  # voxels: cube edge the exported model runs on
REFERENCE_STRIDE = 16  # voxels: the paper's tiling stride at 64³
LOG_COLUMNS = ("step", "seconds", "lr", "train_l1", "val_l1", "val_cc", "val_neg", "val_err_rs")
ERROR_SAMPLES = 200_000  # voxels drawn for the validation rank correlation of the error head


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (stored in every checkpoint's JSON)."""

    train_dir: str
    val_dir: str
    widths: tuple[int, ...] = (16, 32, 64)
    cube_size: int = 32
    batch_size: int = 4
    lr: float = 1e-3
    min_lr: float = 1e-5
    plateau_patience: int = 5
    seed: int = 0
    val_every: int = 200
    val_batches: int = 16
    checkpoint_every: int = 200
    scale_jitter: float = 0.2
    init: str | None = None
    schedule: str = "plateau"
    decay_steps: int = 0  # cosine schedule: steps from lr to min_lr
    precision: str = "fp32"
    target: str = "locscale"
    norm: str = "group"
    negative_fraction: float = 0.0
    negative_scale: tuple[float, float] = (0.5, 2.0)
    negative_source: str = "cube"
    error_head: bool = False
    error_weight: float = 0.25
    warmup_steps: int = 200
    clip_norm: float = 1.0  # 0: no clipping
    spike_factor: float = 5.0  # 0: only non-finite losses roll back
    decay_minutes: float = 0.0  # cosine schedule: also decay over this training time


SCHEDULES = ("plateau", "cosine")
PRECISIONS = ("fp32", "bf16")
# settings that do not define the run: they may differ between sittings
RUNTIME_SETTINGS = ("train_dir", "val_dir", "init", "precision")


def _schedule_lr(config: TrainConfig, optimiser: torch.optim.Optimizer, step: int,
                 lr_scale: float, seconds: float = 0.0) -> None:
    """Set the learning rate of ``step``: the cosine schedule, or the plateau schedule's own
    value after the warm-up; times the linear warm-up factor and the guard's scale."""
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    if config.schedule == "cosine":
        lr = cosine_lr(config, step, seconds)
    elif warm < 1.0 or step == config.warmup_steps:
        lr = config.lr  # the plateau schedule takes over from here
    else:
        return
    for group in optimiser.param_groups:
        group["lr"] = lr * warm * lr_scale


def cosine_lr(config: TrainConfig, step: int, seconds: float = 0.0) -> float:
    """Learning rate of the cosine schedule at ``step`` after ``seconds`` of training
    (constant ``min_lr`` after the end): the decay follows the steps, or the training time
    when ``decay_minutes`` is set and that is further along (a run with a fixed time budget
    on a machine whose speed is not known in advance)."""
    fraction = min(1.0, step / max(1, config.decay_steps))
    if config.decay_minutes > 0:
        fraction = max(fraction, min(1.0, seconds / (60 * config.decay_minutes)))
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * fraction))


def pick_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` (refused without a GPU) or ``auto``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch sees no CUDA GPU; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device {device}: not one of cpu, cuda, cuda:N, auto")
    return torch.device(device)


def _validate(net: torch.nn.Module, batches: list[tuple[NDArray[Any], NDArray[Any]]],
              device: torch.device | None = None) -> tuple[float, float, float]:
    """Mean L1 loss, mean per-cube CC and, with an error head, the Spearman correlation of
    the estimated and the realised absolute error over fixed validation batches (float32)."""
    net.eval()
    losses, ccs, estimated, realised = [], [], [], []
    with torch.no_grad():
        for inputs, targets in batches:
            out = net(torch.from_numpy(inputs).to(device or "cpu")).float().cpu().numpy()
            pred = out[:, :1]
            losses.append(float(np.abs(pred - targets).mean()))
            if out.shape[1] > 1:
                estimated.append(out[:, 1].ravel())
                realised.append(np.abs(pred - targets).ravel())
            for p, t in zip(pred, targets, strict=True):
                p, t = p.ravel() - p.mean(), t.ravel() - t.mean()
                denom = math.sqrt(float(p @ p) * float(t @ t))
                if denom > 0:
                    ccs.append(float(p @ t) / denom)
    net.train()
    return (float(np.mean(losses)), float(np.mean(ccs)) if ccs else float("nan"),
            _rank_correlation(estimated, realised))


def _rank_correlation(estimated: list[NDArray[Any]], realised: list[NDArray[Any]]) -> float:
    """Spearman correlation of two voxel lists on a fixed random sample (NaN when empty)."""
    if not estimated:
        return float("nan")
    from scipy.stats import spearmanr

    a, b = np.concatenate(estimated), np.concatenate(realised)
    if a.size > ERROR_SAMPLES:
        pick = np.random.default_rng(0).choice(a.size, ERROR_SAMPLES, replace=False)
        a, b = a[pick], b[pick]
    return float(spearmanr(a, b)[0])


def _jitter_scale(inputs: NDArray[Any], targets: NDArray[Any], rng: np.random.Generator,
                  jitter: float) -> tuple[NDArray[Any], NDArray[Any]]:
    """Scale each (input, target) pair by one random factor in [1/(1+j), 1+j].

    The runtime's noise estimate is never exact, and the output is scaled back with the same
    estimate, so the network should be equivariant to a common scale of input and target.
    """
    if jitter <= 0:
        return inputs, targets
    factors = np.exp(rng.uniform(-1.0, 1.0, size=(len(inputs), 1, 1, 1, 1))
                     * np.log1p(jitter)).astype(np.float32)
    return inputs * factors, targets * factors


def _append_log(run: Path, row: dict[str, float]) -> None:
    path = run / "log.tsv"
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as stream:
        if new:
            stream.write("\t".join(LOG_COLUMNS) + "\n")
        stream.write("\t".join(f"{row[c]:.6g}" for c in LOG_COLUMNS) + "\n")


def plot_log(run: Path) -> Path | None:
    """Draw ``RUN/loss.png`` from ``RUN/log.tsv``; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    table = np.atleast_2d(np.loadtxt(run / "log.tsv", skiprows=1, delimiter="\t"))
    fig, (ax_loss, ax_cc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(table[:, 0], table[:, 3], label="train L1")
    ax_loss.plot(table[:, 0], table[:, 4], label="validation L1")
    if table.shape[1] > 6 and np.isfinite(table[:, 6]).any():
        ax_loss.plot(table[:, 0], table[:, 6], label="validation |output| on negatives")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("L1 loss (normalised units)")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_cc.plot(table[:, 0], table[:, 5], color="C2")
    ax_cc.set_xlabel("step")
    ax_cc.set_ylabel("validation CC (per cube)")
    fig.tight_layout()
    out = run / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class _BatchStream(torch.utils.data.IterableDataset):
    """Endless training batches cut by DataLoader worker processes.

    The sampler (maps already in memory) is inherited by each forked worker, which re-seeds it
    from (seed, step, worker): the stream is deterministic for a given number of workers.
    """

    def __init__(self, sampler: CubeSampler, seed: int, step: int, jitter: float) -> None:
        self.sampler, self.seed, self.step, self.jitter = sampler, seed, step, jitter

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        self.sampler.rng = np.random.default_rng([self.seed, self.step, worker])
        rng = np.random.default_rng([self.seed, self.step, worker, 1])
        while True:
            inputs, targets = _jitter_scale(*self.sampler.batch(), rng, self.jitter)
            yield torch.from_numpy(inputs), torch.from_numpy(targets)


def _batches(config: TrainConfig, sampler: CubeSampler, step: int, workers: int,
             pin: bool):
    """Iterator of (input, target) CPU tensors: in this process, or from worker processes."""
    if workers <= 0:
        rng = np.random.default_rng([config.seed, step])
        while True:
            inputs, targets = _jitter_scale(*sampler.batch(), rng, config.scale_jitter)
            yield torch.from_numpy(inputs), torch.from_numpy(targets)
    loader = torch.utils.data.DataLoader(
        _BatchStream(sampler, config.seed, step, config.scale_jitter), batch_size=None,
        num_workers=workers, pin_memory=pin, prefetch_factor=4, persistent_workers=False,
        multiprocessing_context="fork")
    yield from loader


class _State:
    """Mutable training state that is checkpointed: step, elapsed time, best validation."""

    def __init__(self) -> None:
        self.step = 0
        self.seconds = 0.0
        self.best_val = float("inf")
        self.lr_scale = 1.0  # lowered by the divergence guard's rollbacks


def _save(run: Path, tag: str, net: UNet3D, config: TrainConfig, state: _State,
          optimiser: torch.optim.Optimizer | None = None, scheduler: object | None = None) -> None:
    info = {"train": asdict(config), "step": state.step, "seconds": round(state.seconds, 1),
            "best_val_l1": state.best_val, "lr_scale": state.lr_scale,
            "seed": config.seed, "commit": git_commit(),
            "cube_size": INFERENCE_CUBE_SIZE, "stride": REFERENCE_STRIDE,
            "data": f"synthetic pairs {config.train_dir}"}
    save_checkpoint(run / tag, net, info)
    if optimiser is not None:
        final = optimiser_state_path(run / tag)
        tmp = final.with_name(final.name + ".tmp")
        torch.save({"optimiser": optimiser.state_dict(),
                    "scheduler": scheduler.state_dict(),  # type: ignore[union-attr]
                    "torch_rng": torch.get_rng_state(),
                    "step": state.step, "seconds": state.seconds,
                    "best_val": state.best_val, "lr_scale": state.lr_scale}, tmp)
        os.replace(tmp, final)


def _build(config: TrainConfig, run: Path, device: torch.device | None = None
           ) -> tuple[UNet3D, torch.optim.Optimizer,
                      torch.optim.lr_scheduler.ReduceLROnPlateau, _State]:
    """Network, optimiser, scheduler and state, fresh or resumed from ``RUN/latest``."""
    torch.manual_seed(config.seed)
    state = _State()
    if (run / "latest.json").exists():
        net, _ = load_checkpoint(run / "latest")
    elif config.init:
        net = _initialised(config)
    else:
        net = UNet3D(widths=config.widths, norm=config.norm, error_head=config.error_head)
    net = net.to(device or "cpu")
    optimiser = torch.optim.Adam(net.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser, mode="min", factor=0.5, patience=config.plateau_patience,
        min_lr=config.min_lr)
    resume = optimiser_state_path(run / "latest")
    if resume.exists():
        saved = torch.load(resume, weights_only=False, map_location="cpu")
        optimiser.load_state_dict(saved["optimiser"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        state.step, state.seconds, state.best_val = (saved["step"], saved["seconds"],
                                                     saved["best_val"])
        state.lr_scale = float(saved.get("lr_scale", 1.0))
    return net, optimiser, scheduler, state


def _initialised(config: TrainConfig) -> UNet3D:
    """A network with the weights of ``config.init``; an error head it lacks starts fresh."""
    start, _ = load_checkpoint(str(config.init))
    if tuple(start.widths) != tuple(config.widths) or start.norm != config.norm:
        raise ValueError(f"{config.init}: widths {start.widths} and norm {start.norm!r} differ "
                         f"from --widths {config.widths} --norm {config.norm}; pass matching "
                         "ones")
    if start.error_head == config.error_head:
        return start
    net = UNet3D(widths=config.widths, norm=config.norm, error_head=config.error_head)
    weights = {k: v for k, v in start.state_dict().items() if not k.startswith("error.")}
    net.load_state_dict(weights, strict=not config.error_head)
    return net


def train(config: TrainConfig, run: Path, max_steps: int, max_minutes: float = math.inf,
          threads: int | None = None, report=print, device: str = "cpu",
          workers: int = 0) -> Path:
    """Train until ``max_steps`` or ``max_minutes``, checkpointing into ``run``; return ``run``."""
    run.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    target = pick_device(device)
    if config.precision == "bf16" and target.type != "cuda":
        raise ValueError("--precision bf16 trains on a CUDA GPU only; use --precision fp32 "
                         "on the CPU")
    if target.type == "cuda":
        torch.backends.cudnn.benchmark = True
    net, optimiser, scheduler, state = _build(config, run, target)
    sampler, val = _samplers(config, state.step)
    where = f"{target}" + (f", {config.precision}" if target.type == "cuda" else "")
    report(f"network widths {config.widths}: {count_parameters(net):,} parameters; "
           + (f"resuming at step {state.step}" if state.step else "new run") + f" on {where}")
    batches = _batches(config, sampler, state.step, workers, pin=target.type == "cuda")
    started, running = time.monotonic(), []
    base_seconds = state.seconds
    guard = DivergenceGuard(net, optimiser, spike_factor=config.spike_factor,
                            log=run / "guard.tsv")
    net.train()
    while state.step < max_steps:
        if (time.monotonic() - started) / 60 > max_minutes:
            report(f"time limit reached at step {state.step}")
            break
        _schedule_lr(config, optimiser, state.step, state.lr_scale, state.seconds)
        map_loss = _guarded_step(config, net, optimiser, guard, state, next(batches), target,
                                 report)
        state.step += 1
        if map_loss is not None:  # None: rolled back, nothing learnt from this batch
            running.append(map_loss)
        state.seconds = base_seconds + time.monotonic() - started
        if state.step % config.val_every == 0:
            _validation_round(config, run, net, optimiser, scheduler, state, val,
                              [float(v) for v in running], report, target)
            running = []
        elif state.step % config.checkpoint_every == 0:
            _save(run, "latest", net, config, state, optimiser, scheduler)
    _save(run, "latest", net, config, state, optimiser, scheduler)
    if (run / "log.tsv").exists():
        plot_log(run)
    return run


def _samplers(config: TrainConfig, step: int) -> tuple[CubeSampler, tuple[list, list]]:
    """The training sampler (its stream continues after a resume: the seed moves with the
    step counter) and the fixed validation batches: plain cubes and negatives."""
    sampler = CubeSampler(config.train_dir, cube_size=config.cube_size,
                          batch_size=config.batch_size, seed=config.seed + 7919 * step,
                          target=config.target, negative_fraction=config.negative_fraction,
                          negative_scale=config.negative_scale,
                          negative_source=config.negative_source)
    val_sampler = CubeSampler(config.val_dir, cube_size=config.cube_size,
                              batch_size=config.batch_size, seed=config.seed, augment=False,
                              target=config.target, negative_source=config.negative_source)
    return sampler, (val_sampler.fixed_batches(config.val_batches, seed=config.seed),
                     val_sampler.fixed_batches(config.val_batches, seed=config.seed + 1,
                                               negatives=True))


def _guarded_step(config: TrainConfig, net: UNet3D, optimiser: torch.optim.Optimizer,
                  guard: DivergenceGuard, state: _State, batch: tuple[torch.Tensor, torch.Tensor],
                  device: torch.device, report) -> torch.Tensor | None:
    """One optimiser step on ``batch``, unless its loss (or gradient) is a spike: then the
    guard rolls back and None is returned; otherwise the step's map loss (on the device)."""
    inputs, targets = (t.to(device, non_blocking=True) for t in batch)
    loss, map_loss = _step_loss(config, net, inputs, targets, device)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    norm = (torch.nn.utils.clip_grad_norm_(net.parameters(), config.clip_norm)
            if config.clip_norm > 0 else torch.zeros(()))
    # one device sync for both; a non-finite gradient norm is a divergence too
    value, grad_norm = torch.stack((loss.detach().float(),
                                    norm.float().to(loss.device))).tolist()
    value = value if math.isfinite(grad_norm) else math.nan
    if guard.is_spike(value):
        state.lr_scale = guard.roll_back(state.step, value, state.lr_scale)
        event = guard.events[-1]
        report(f"guard: loss {value:.4g} at step {state.step} (largest recent "
               f"{event.reference:.4g}); restored the weights of step "
               f"{event.restored_step}, learning rate now x{state.lr_scale:g}")
        return None
    guard.healthy_step(state.step, value)  # snapshots the weights that gave this loss
    optimiser.step()
    return map_loss.detach()


def _step_loss(config: TrainConfig, net: UNet3D, inputs: torch.Tensor, targets: torch.Tensor,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's loss to minimise and its map part: L1 of channel 0 to the target, plus
    ``error_weight`` × L1 of the error channel to channel 0's realised absolute error."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
        out = net(inputs)
    pred = out[:, :1].float()
    map_loss = torch.nn.functional.l1_loss(pred, targets)
    if out.shape[1] == 1:
        return map_loss, map_loss
    realised = (pred.detach() - targets).abs()
    error_loss = torch.nn.functional.l1_loss(out[:, 1:2].float(), realised)
    return map_loss + config.error_weight * error_loss, map_loss


def _validation_round(config: TrainConfig, run: Path, net: UNet3D,
                      optimiser: torch.optim.Optimizer, scheduler, state: _State,
                      val: tuple[list, list], running: list[float], report,
                      device: torch.device | None = None) -> None:
    positives, negatives = val
    val_l1, val_cc, val_err_rs = _validate(net, positives, device)
    val_neg = _validate(net, negatives, device)[0]
    fraction = config.negative_fraction
    score = (1 - fraction) * val_l1 + fraction * val_neg
    if config.schedule == "plateau" and state.step > config.warmup_steps:
        scheduler.step(score)
    lr = optimiser.param_groups[0]["lr"]
    row = {"step": state.step, "seconds": state.seconds, "lr": lr,
           "train_l1": float(np.mean(running)) if running else float("nan"),
           "val_l1": val_l1, "val_cc": val_cc, "val_neg": val_neg, "val_err_rs": val_err_rs}
    _append_log(run, row)
    if score < state.best_val:
        state.best_val = score
        _save(run, "best", net, config, state)
    _save(run, "latest", net, config, state, optimiser, scheduler)
    report(f"step {state.step:6d}  {state.seconds / 60:6.1f} min  lr {lr:.2e}  "
           f"train L1 {row['train_l1']:.5f}  val L1 {val_l1:.5f}  val CC {val_cc:.4f}  "
           f"neg {val_neg:.5f}" + (f"  err rs {val_err_rs:.3f}" if config.error_head else ""))


def train_command(train_dir: str, val_dir: str, run: str, widths: object = (16, 32, 64),
                  cube_size: int = 32, batch_size: int = 4, steps: int = 10000,
                  max_minutes: float = math.inf, lr: float = 1e-3, seed: int = 0,
                  val_every: int = 200, val_batches: int = 16, threads: int | None = None,
                  init: str | None = None, scale_jitter: float = 0.2,
                  schedule: str = "plateau", device: str = "cpu", precision: str = "auto",
                  workers: int = 0, min_lr: float = 1e-5, target: str = "locscale",
                  norm: str = "group", negative_fraction: float = 0.0,
                  negative_scale: object = (0.5, 2.0), negative_source: str = "cube",
                  error_head: bool = False, error_weight: float = 0.25,
                  warmup_steps: int = 200, clip_norm: float = 1.0,
                  spike_factor: float = 5.0, decay_minutes: float = 0.0) -> None:
    """Train (or resume) a run in folder RUN on the datasets in TRAIN_DIR and VAL_DIR.

    Parameters
    ----------
    train_dir, val_dir : dataset folders written by ``demhx-export build-dataset``.
    run : run folder; an existing run is resumed from ``RUN/latest``.
    widths : network widths, e.g. ``16,32,64`` (the paper: ``32,64,128``).
    cube_size : training cube edge in voxels (divisible by 8).
    batch_size : cubes per step.
    steps : stop at this total step count (across resumes).
    max_minutes : stop cleanly after this many minutes of this sitting.
    lr : initial learning rate.
    seed : seed of the network initialisation and of the cube sampler.
    val_every : steps between validations (and checkpoints).
    val_batches : fixed validation batches.
    threads : torch CPU threads.
    init : start a new run from this checkpoint's weights (e.g. fine-tuning on larger cubes).
    scale_jitter : common random scale of input and target, up to a factor 1 + scale_jitter.
    schedule : "plateau" (lr halved after 5 validations without improvement, the paper's) or
        "cosine" (lr decays to min_lr over the STEPS given when the run starts).
    device : "cpu", "cuda" or "auto".
    precision : "fp32", "bf16" (autocast, CUDA only) or "auto" (bf16 on CUDA, else fp32).
    workers : processes that cut and augment cubes (0: in this process).
    min_lr : lowest learning rate of either schedule.
    target : target recipe in the datasets (``locscale``, ``locscale-full`` or ``truth``).
    norm : ``group`` (GroupNorm, the paper's) or ``none`` (no normalisation layers).
    negative_fraction : fraction of training cubes made negatives (phase-randomised input,
        empty target).
    negative_scale : LOW,HIGH range of the negatives' random amplitude factor.
    negative_source : "cube" (each cube's own phases randomised, at the molecule's level) or
        "map" (cubes of the whole map phase-randomised and normalised as the runtime does: a
        noise map as a user's would look; needs a dataset built with this generator).
    error_head : train a second output channel that estimates the first one's |error|.
    error_weight : weight of the error channel's L1 loss.
    warmup_steps : steps of linear learning-rate warm-up.
    clip_norm : clip the gradient norm to this (0: no clipping).
    spike_factor : a step loss above this many times the largest recent one rolls training back
        to the last good snapshot with half the learning rate (0: only non-finite losses).
    decay_minutes : cosine schedule: decay over this many minutes of training as well, so a
        run with a time budget ends at ``min_lr`` whatever the machine's speed (the decay
        follows whichever of steps and time is further along).
    """
    config = _command_config(dict(locals()))  # the options above, checked
    run_dir = Path(run)
    train(_resumed_config(config, run_dir), run_dir, max_steps=int(steps),
          max_minutes=float(max_minutes), threads=threads, device=device, workers=int(workers))


def _command_config(options: dict[str, Any]) -> TrainConfig:
    """The :class:`TrainConfig` of :func:`train_command`'s options (ValueError naming a bad
    one)."""
    o = options
    schedule, precision = o["schedule"], o["precision"]
    if schedule not in SCHEDULES:
        raise ValueError(f"--schedule {schedule}: not one of {', '.join(SCHEDULES)}")
    if precision == "auto":
        precision = "bf16" if pick_device(o["device"]).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision}: not one of auto, {', '.join(PRECISIONS)}")
    return TrainConfig(train_dir=str(o["train_dir"]), val_dir=str(o["val_dir"]),
                       widths=parse_widths(o["widths"]), cube_size=int(o["cube_size"]),
                       batch_size=int(o["batch_size"]), lr=float(o["lr"]), seed=int(o["seed"]),
                       val_every=int(o["val_every"]), val_batches=int(o["val_batches"]),
                       checkpoint_every=int(o["val_every"]),
                       scale_jitter=float(o["scale_jitter"]),
                       init=str(o["init"]) if o["init"] else None, schedule=schedule,
                       decay_steps=int(o["steps"]) if schedule == "cosine" else 0,
                       precision=precision, min_lr=float(o["min_lr"]), target=str(o["target"]),
                       norm=str(o["norm"]), negative_fraction=float(o["negative_fraction"]),
                       negative_scale=_pair(o["negative_scale"]),
                       negative_source=str(o["negative_source"]),
                       error_head=bool(o["error_head"]), error_weight=float(o["error_weight"]),
                       warmup_steps=int(o["warmup_steps"]), clip_norm=float(o["clip_norm"]),
                       spike_factor=float(o["spike_factor"]),
                       decay_minutes=float(o["decay_minutes"]))


def _resumed_config(config: TrainConfig, run_dir: Path) -> TrainConfig:
    """``config`` for a run that may already exist in ``run_dir``.

    A resumed run keeps the cosine decay length it started with (``--steps`` may only extend
    the run), and is refused when a setting that defines it (anything but
    :data:`RUNTIME_SETTINGS`) differs from the one it started with.
    """
    saved = run_dir / "latest.json"
    if not saved.exists():
        return config
    previous = json.loads(saved.read_text()).get("train", {})
    if previous.get("schedule") == "cosine":
        # the decay length was fixed when the run started; --steps may only extend it
        config = replace(config, decay_steps=int(previous["decay_steps"]))
    changed = {k: v for k, v in asdict(config).items()
               if k in previous and _norm(previous[k]) != _norm(v)
               and k not in RUNTIME_SETTINGS}
    if changed:
        raise ValueError(f"{run_dir}: run was started with other settings "
                         f"({', '.join(sorted(changed))}); use a new run folder")
    return config


def _pair(value: object) -> tuple[float, float]:
    """``"0.5,2"``, ``(0.5, 2)`` or ``[0.5, 2]`` as two floats."""
    parts = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    if len(parts) != 2:
        raise ValueError(f"{value!r}: pass two numbers LOW,HIGH")
    return float(parts[0]), float(parts[1])


def _norm(value: object) -> object:
    return list(value) if isinstance(value, (list, tuple)) else value
