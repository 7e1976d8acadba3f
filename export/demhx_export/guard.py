"""A guard against divergence: a loss spike or a non-finite loss rolls training back.

Training without normalisation layers in bfloat16 can blow up suddenly (a run of the v3 recipe
at lr 1e-3 went from a training L1 of 0.02 to 6,000 within 300 steps and never recovered). Two
measures keep that from happening and one repairs it:

* gradient-norm clipping and a linear learning-rate warm-up (in :mod:`demhx_export.train`);
* :class:`DivergenceGuard`: every step's loss is compared with the largest loss of the last
  ``window`` healthy steps (not their mean: batches differ a lot — a batch of negatives or
  solvent cubes has a tiny loss, one of dense molecule a large one — and a blow-up is orders
  of magnitude, not a factor of a few). A non-finite loss or gradient, or a loss above
  ``spike_factor`` times that reference, restores the network and optimiser from the last
  good snapshot (taken in memory every ``snapshot_every`` healthy steps), halves the
  learning-rate scale and is logged to ``RUN/guard.tsv``. After ``max_rollbacks`` such
  events the run stops with an error.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

WINDOW = 200  # healthy steps whose largest loss is the reference
LR_FACTOR = 0.5  # learning-rate scale after each rollback
GUARD_COLUMNS = ("step", "loss", "reference", "restored_step", "lr_scale")


@dataclass
class GuardEvent:
    """One rollback: at ``step`` the loss was ``loss`` against the reference ``reference`` (the
    largest recent healthy loss); the weights of ``restored_step`` came back and the learning
    rate is now ×``lr_scale``."""

    step: int
    loss: float
    reference: float
    restored_step: int
    lr_scale: float


class DivergenceGuard:
    """Watches the training loss; rolls the network and optimiser back on a spike.

    Parameters
    ----------
    net, optimiser : what is restored.
    spike_factor : a loss above this many times the largest of the last ``window`` healthy
        losses is a spike (0: only non-finite losses are).
    snapshot_every : healthy steps between in-memory snapshots.
    max_rollbacks : give up (RuntimeError) after this many rollbacks.
    log : ``guard.tsv`` to append events to (None: not written).
    """

    def __init__(self, net: torch.nn.Module, optimiser: torch.optim.Optimizer,
                 spike_factor: float = 5.0, snapshot_every: int = 100, max_rollbacks: int = 20,
                 log: Path | None = None) -> None:
        self.net, self.optimiser = net, optimiser
        self.spike_factor, self.snapshot_every = spike_factor, snapshot_every
        self.max_rollbacks, self.log = max_rollbacks, log
        self.recent: deque[float] = deque(maxlen=WINDOW)
        self.healthy = 0  # healthy steps since the last snapshot or rollback
        self.events: list[GuardEvent] = []
        self._snapshot: tuple[int, dict[str, Any], dict[str, Any]] | None = None

    def is_spike(self, loss: float) -> bool:
        """Whether ``loss`` (this step's, before the update) is non-finite or a spike."""
        if not math.isfinite(loss):
            return True
        return bool(self.spike_factor and self.recent
                    and loss > self.spike_factor * self.reference)

    @property
    def reference(self) -> float:
        """The largest of the recent healthy losses (NaN before the first)."""
        return max(self.recent) if self.recent else math.nan

    def healthy_step(self, step: int, loss: float) -> None:
        """Record a healthy step before its update; snapshot (the weights that gave ``loss``)
        when one is due."""
        self.recent.append(loss)
        self.healthy += 1
        if self._snapshot is None or self.healthy % self.snapshot_every == 0:
            self.snapshot(step)

    def snapshot(self, step: int) -> None:
        """Keep the current network and optimiser state (copies on their device)."""
        weights = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self._snapshot = (step, weights, copy.deepcopy(self.optimiser.state_dict()))

    def roll_back(self, step: int, loss: float, lr_scale: float) -> float:
        """Restore the last snapshot after a spike at ``step``; return the new lr scale."""
        if self._snapshot is None:
            raise RuntimeError(f"training diverged at step {step} (loss {loss:.4g}) before a "
                               "snapshot was taken; lower --lr")
        if len(self.events) >= self.max_rollbacks:
            raise RuntimeError(f"training diverged {len(self.events) + 1} times (last at step "
                               f"{step}, loss {loss:.4g}); lower --lr or raise --clip-norm")
        restored, weights, optimiser_state = self._snapshot
        self.net.load_state_dict(weights)
        self.optimiser.load_state_dict(copy.deepcopy(optimiser_state))
        lr_scale *= LR_FACTOR
        for group in self.optimiser.param_groups:
            group["lr"] *= LR_FACTOR  # the plateau schedule keeps its lr in the optimiser
        self.healthy = 0
        event = GuardEvent(step, loss, self.reference, restored, lr_scale)
        self.events.append(event)
        self._write(event)
        return lr_scale

    def _write(self, event: GuardEvent) -> None:
        if self.log is None:
            return
        new = not self.log.exists()
        with open(self.log, "a", encoding="utf-8") as stream:
            if new:
                stream.write("\t".join(GUARD_COLUMNS) + "\n")
            stream.write("\t".join(f"{getattr(event, c):.6g}" for c in GUARD_COLUMNS) + "\n")
