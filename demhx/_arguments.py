"""The command line read into checked values: :class:`Arguments` and :func:`parse_arguments`.

fire reads the words (with the exact-option translation of :mod:`demhx._argv`); this module
turns its strings into typed values and refuses combinations that make no sense (a
``--half2`` with several maps, a ``--shard`` with one). The values themselves (positive
integers, voxel sizes, noise statistics, tilings, rotations) are checked where the library
checks them (:mod:`demhx.validate`, :class:`demhx.options.EnhanceOptions`), so the command
line and the API refuse the same things with the same words.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from demhx import _argv
from demhx._argv import UsageError

if TYPE_CHECKING:
    from demhx.batch import Shard

PROGRAM = "demhx"
_ONE_MAP_ONLY = {
    "half2": ("--half2 does not combine with several inputs, --out-dir or --suffix; run "
              "demhx H1 OUT --half2 H2 for each pair of half-maps"),
    "noise_stats": ("--noise-stats gives one map's solvent noise, not several; leave it out "
                    "(estimated per map) or run each map on its own"),
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Arguments:
    """The parsed command line, values converted and checked.

    ``input`` is the (first) input map; ``output`` is OUT, or None with ``--out-dir`` or
    ``--suffix`` (:attr:`batch`), where ``more_inputs`` holds the other input maps and
    ``shard`` this job's share of them (None: all).
    """

    input: str
    output: str | None
    half2: str | None = None
    model: str | None = None
    device: str = "auto"
    batch_size: int | None = None
    threads: int | None = None
    tiling: str = "default"
    voxel_size: tuple[float, float, float] | None = None
    noise_stats: tuple[float, float] | None = None
    mask: str | None = None
    overwrite: bool = False
    quiet: bool = False
    debug: bool = False
    more_inputs: tuple[str, ...] = ()
    out_dir: str | None = None
    suffix: str | None = None
    shard: Shard | None = None
    preview: str | None = None
    confidence: str | None = None
    tta: int | None = None

    @property
    def inputs(self) -> tuple[str, ...]:
        """All input maps, in order."""
        return (self.input, *self.more_inputs)

    @property
    def batch(self) -> bool:
        """Whether outputs are named by ``--out-dir``/``--suffix`` (any number of inputs)."""
        return self.out_dir is not None or self.suffix is not None


def parse_arguments(argv: Sequence[str]) -> Arguments:
    """Parse the command line with fire into checked :class:`Arguments`; UsageError if wrong."""
    import fire
    from fire.decorators import SetParseFn, SetParseFns

    captured: list[dict[str, Any]] = []

    @SetParseFn(str)  # the input and output paths (fire's *varargs) stay text
    @SetParseFns(**{name: str for name in _argv.VALUED})
    def command(*paths: str, half2: str | None = None, model: str | None = None,
                device: str = "auto", batch_size: str | None = None, threads: str | None = None,
                tiling: str = "default", voxel_size: str | None = None,
                noise_stats: str | None = None, mask: str | None = None,
                overwrite: bool = False, quiet: bool = False, debug: bool = False,
                out_dir: str | None = None, suffix: str | None = None,
                shard: str | None = None, preview: str | None = None, confidence: str | None = None,
                tta: str | None = None) -> None:
        captured.append(dict(locals()))

    messages = io.StringIO()
    try:
        with contextlib.redirect_stdout(messages), contextlib.redirect_stderr(messages):
            fire.Fire(command, command=_argv.fire_argv(argv) + ["--"], name=PROGRAM)
    except fire.core.FireExit:
        raise UsageError(_fire_error(messages.getvalue())) from None
    if not captured:
        raise UsageError(f"could not read the arguments; see {PROGRAM} --help")
    return _convert(captured[0])


def _fire_error(text: str) -> str:
    """fire's error text as one line that says what to do."""
    found = re.search(r"ERROR: (.*)", _ANSI.sub("", text))
    message = found.group(1).strip() if found else "could not read the arguments"
    consumed = re.match(r"Could not consume arg: (.*)", message)
    if consumed:
        arg = consumed.group(1)
        if arg.startswith("-"):
            return f"unknown option {arg.split('=')[0]}; see {PROGRAM} --help"
        return (f"unexpected extra argument {arg!r}; usage: {PROGRAM} IN OUT [options], "
                f"see {PROGRAM} --help")
    missing = re.search(r"required argument: (\w+)", message)
    if missing:
        name = {"input": "IN", "output": "OUT"}.get(missing.group(1), missing.group(1))
        return f"missing {name}; usage: {PROGRAM} IN OUT [options], see {PROGRAM} --help"
    return f"{message}; see {PROGRAM} --help"


def _convert(raw: dict[str, Any]) -> Arguments:
    """Check and convert fire's strings into typed :class:`Arguments`."""
    paths = _paths(raw)
    batch = raw["out_dir"] is not None or raw["suffix"] is not None
    return Arguments(
        input=paths[0], output=None if batch else paths[1],
        more_inputs=tuple(paths[1:]) if batch else (),
        out_dir=raw["out_dir"], suffix=raw["suffix"], preview=raw["preview"],
        shard=_shard(raw["shard"], batch),
        half2=raw["half2"], model=raw["model"], device=str(raw["device"]),
        batch_size=_positive_int("--batch-size", raw["batch_size"]),
        threads=_positive_int("--threads", raw["threads"]),
        tiling=str(raw["tiling"]),
        voxel_size=_voxel_size(raw["voxel_size"]),
        noise_stats=_noise_stats(raw["noise_stats"]),
        mask=raw["mask"],
        confidence=_one_map_only("--confidence", raw["confidence"], batch),
        tta=_positive_int("--tta", _one_map_only("--tta", raw["tta"], batch)),
        **{name: _flag(name, raw[name]) for name in ("overwrite", "quiet", "debug")},
    )


def _one_map_only(option: str, value: str | None, batch: bool) -> str | None:
    if value is not None and batch:
        raise UsageError(f"{option} works with the one-map form {PROGRAM} IN OUT; run each map "
                         "on its own to get its confidence map")
    return value


def _shard(text: str | None, batch: bool) -> Shard | None:
    """This job's share of several maps: ``--shard``, else SLURM's array variables."""
    if not batch:
        if text is not None:
            raise UsageError(f"--shard {text} shares several maps among jobs; use it with "
                             f"{PROGRAM} IN [IN ...] --out-dir DIR|--suffix SUF, or leave it "
                             "out")
        return None  # one map: a SLURM array's variables do not apply
    from demhx import batch as several

    try:
        return several.choose_shard(text, os.environ)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _paths(raw: dict[str, Any]) -> list[str]:
    """The positional paths: IN OUT, or with --out-dir/--suffix one or more inputs."""
    paths = [str(path) for path in raw["paths"]]
    several = f"{PROGRAM} IN [IN ...] --out-dir DIR|--suffix SUF [options]"
    if raw["out_dir"] is not None or raw["suffix"] is not None:
        if not paths:
            raise UsageError(f"missing IN; usage: {several}, see {PROGRAM} --help")
        for option in ("half2", "noise_stats") if len(paths) > 1 else ("half2",):
            if raw[option] is not None:
                raise UsageError(_ONE_MAP_ONLY[option])
        return paths
    if len(paths) < 2:
        missing = "IN" if not paths else "OUT"
        raise UsageError(f"missing {missing}; usage: {PROGRAM} IN OUT [options], or {several}; "
                         f"see {PROGRAM} --help")
    if len(paths) > 2:
        raise UsageError(f"unexpected extra argument {paths[2]!r}; usage: {PROGRAM} IN OUT "
                         f"[options], or for several maps {several}; see {PROGRAM} --help")
    return paths


def _positive_int(option: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{option} {text!r}: must be a positive integer")
    return value


def _floats(option: str, text: str, count: Sequence[int], form: str) -> list[float]:
    parts = [part for part in re.split(r"[,\s]+", text.strip().strip("()[]")) if part]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) not in count:
        raise UsageError(f"{option} {text!r}: expected {form}")
    return values


def _voxel_size(text: str | None) -> tuple[float, float, float] | None:
    if text is None:
        return None
    values = _floats("--voxel-size", text, (1, 3), "one value in Å or three, X,Y,Z")
    if len(values) == 1:
        values *= 3
    x, y, z = values
    return z, y, x


def _noise_stats(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    mean, std = _floats("--noise-stats", text, (2,), "two values, MEAN,STD")
    return mean, std


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise UsageError(f"--{name} takes no value (got {value!r})")
