"""Several GPUs as one runtime: every batch is split across the devices and run at once.

``--device cuda:0,1`` (or ``cuda:all``) loads the model once per GPU (:func:`load_group`);
the :class:`RuntimeGroup` looks like one :class:`~demhx.session.Runtime` to the pipeline,
with a batch as large as its members' together. Each call of :meth:`RuntimeGroup.run` cuts
the batch into consecutive parts, one per device (each at most that device's batch size),
runs them in parallel threads (ONNX Runtime releases the GIL while a device works) and joins
the predictions in cube order. Each cube is predicted by exactly one device, as one device
would predict it, so the output does not depend on how many devices share the work, and a
several-maps run keeps every device busy on each map in turn.

An error on any device stops the run with that device named. DeepEMhancer's several-GPU
runs are known to hang (its issues #8 and #28); here nothing waits on a device that failed:
each part's result or exception is collected before the batch returns.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from demhx.device import parse_devices
from demhx.model import ModelSpec
from demhx.session import Runtime, load_runtime

__all__ = ["group_of", "load_group", "Loaded", "RuntimeGroup"]


@dataclass(eq=False)
class RuntimeGroup:
    """Runtimes of one model on several devices, run as one (see the module's docstring)."""

    members: tuple[Runtime, ...]
    _pool: concurrent.futures.ThreadPoolExecutor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.members) < 2:
            raise ValueError("a device group needs at least two runtimes")
        files = {member.model_file.name for member in self.members}
        if len({member.spec.path for member in self.members}) != 1 or len(files) != 1:
            raise ValueError("a device group runs one model file on every device")
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=len(self.members), thread_name_prefix="demhx-device")

    @property
    def spec(self) -> ModelSpec:
        return self.members[0].spec

    @property
    def model_file(self) -> Path:
        return self.members[0].model_file

    @property
    def device(self) -> str:
        """The devices, e.g. ``cuda:0,1``."""
        kinds = {member.device.partition(":")[0] for member in self.members}
        if kinds == {"cuda"}:
            return "cuda:" + ",".join(member.device.partition(":")[2] or "0"
                                      for member in self.members)
        return ",".join(member.device for member in self.members)

    @property
    def batch_size(self) -> int:
        """Cubes per call: the members' batch sizes together."""
        return sum(member.batch_size for member in self.members)

    @property
    def description(self) -> str:
        """One line: the devices, each one's batch, and the model."""
        first = self.members[0]
        batches = "+".join(str(member.batch_size) for member in self.members)
        line = (f"devices {self.device} ({len(self.members)} devices), batch {batches}, "
                f"model {first.spec.label} [{first.model_file.name}]")
        notes = sorted({member.note for member in self.members if member.note})
        return f"{line}; {'; '.join(notes)}" if notes else line

    def parts(self, count: int) -> list[tuple[int, int, Runtime]]:
        """``(first, count, member)`` for a batch of ``count`` cubes: consecutive parts, the
        i-th member taking up to its batch size; members past the end get nothing."""
        result, first = [], 0
        for member in self.members:
            take = min(member.batch_size, count - first)
            if take <= 0:
                break
            result.append((first, take, member))
            first += take
        if first < count:  # more cubes than one call holds: the rest go round again
            result += [(start + first, size, member)
                       for start, size, member in self.parts(count - first)]
        return result

    def run(self, batch: NDArray[Any]) -> NDArray[np.float32]:
        """Predictions ``(b, 1, c, c, c)`` float32 for a batch, its parts run in parallel."""
        parts = self.parts(int(batch.shape[0]))
        futures = [self._pool.submit(member.run, batch[first:first + size])
                   for first, size, member in parts]
        concurrent.futures.wait(futures)
        output = np.empty(batch.shape, dtype=np.float32)
        for (first, size, member), future in zip(parts, futures, strict=True):
            error = future.exception()
            if error is not None:
                raise RuntimeError(f"{member.device}: {error}") from error
            output[first:first + size] = future.result()
        return output

    def close(self) -> None:
        """Stop the group's threads (the members' sessions stay usable)."""
        self._pool.shutdown(wait=True)


Loaded = Runtime | RuntimeGroup
"""What an :class:`~demhx.pipeline.Enhancer` runs on: one device, or a group of GPUs."""


def load_group(model: str | Path | None, device: str, batch_size: int | None = None,
               threads: int | None = None) -> Loaded:
    """One runtime for one device, a :class:`RuntimeGroup` for several (``cuda:0,1``,
    ``cuda:all``); ``batch_size`` is per device. The device list is checked first."""
    requests = parse_devices(device)
    names = ([device] if len(requests) == 1 and requests[0].kind != "cuda"
             else [f"cuda:{request.index}" for request in requests])
    members = [load_runtime(model, device=name, batch_size=batch_size, threads=threads)
               for name in names]
    return members[0] if len(members) == 1 else group_of(members)


def group_of(members: Sequence[Runtime]) -> RuntimeGroup:
    """A group of loaded runtimes (each on its own device), checked to run one model."""
    return RuntimeGroup(tuple(members))
