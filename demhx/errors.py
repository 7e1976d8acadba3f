"""How demhx speaks of problems: its warning class, and options named for the reader.

Library code (the Python API) names an option by its parameter and ``=``, as a caller writes
it: ``pass voxel_size=``, ``give noise_stats=MEAN,STD``, ``tiling='x' is not a tiling scheme``.
The command line shows the same messages with its flags (:func:`cli_terms`): ``pass
--voxel-size``, ``give --noise-stats MEAN,STD``, ``--tiling 'x' is not a tiling scheme``. So
one message serves both, and API users are never told about flags they cannot pass.
"""

from __future__ import annotations

import re

__all__ = ["cli_terms", "DemhxWarning", "describe_error", "MissingExtra", "option", "OPTIONS",
           "USAGE_ERRORS"]


class MissingExtra(ImportError):
    """An option needs an optional dependency that is not installed (the message names the
    ``pip install`` that adds it)."""


USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError,
                IsADirectoryError, NotADirectoryError, MissingExtra)
"""Errors of the input or the options (exit status 2 on the command line)."""

# Parameters of the API that are also options of the command line (``out_dir`` → ``--out-dir``).
OPTIONS = ("voxel_size", "noise_stats", "half2", "mask", "model", "device", "batch_size",
           "threads", "tiling", "tta", "confidence", "overwrite", "out_dir", "suffix", "shard",
           "preview")
_OPTION = re.compile(r"(?<![\w-])(" + "|".join(OPTIONS) + r")=")
_NO_SPACE_BEFORE = set(" \t\n;,.:)]}")


class DemhxWarning(UserWarning):
    """A warning the demhx command line prints as one ``demhx: warning:`` line."""


def option(name: str) -> str:
    """How a message names the option ``name`` (a parameter of :data:`OPTIONS`): ``name=``."""
    if name not in OPTIONS:
        raise KeyError(f"{name!r} is not an option of demhx")
    return f"{name}="


def cli_terms(text: str) -> str:
    """``text`` with every ``parameter=`` of :data:`OPTIONS` shown as its command-line flag.

    ``voxel_size=`` at the end of a clause becomes ``--voxel-size``; followed by a value
    (``noise_stats=MEAN,STD``, ``tiling='x'``) it becomes ``--noise-stats MEAN,STD``.
    """
    def flag(match: re.Match[str]) -> str:
        end = match.end()
        following = text[end] if end < len(text) else " "
        spelled = "--" + match.group(1).replace("_", "-")
        return spelled if following in _NO_SPACE_BEFORE else spelled + " "

    return _OPTION.sub(flag, text)


def describe_error(error: BaseException) -> str:
    """One line for an exception, as the command line shows it: its message (options named as
    flags, :func:`cli_terms`), or ``file: reason`` for operating-system errors."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{error.filename}: {error.strerror.lower()}"
        if isinstance(error, PermissionError):
            text += "; check the permissions or choose another path"
    elif isinstance(error, MemoryError):
        text = ("out of memory; try --batch-size 1, fewer --threads, or a machine with more "
                "memory")
    else:
        text = str(error).strip() or type(error).__name__
        if not isinstance(error, (*USAGE_ERRORS, RuntimeError)):
            text = f"{type(error).__name__}: {text}"
    return " ".join(cli_terms(text).split())[:500]
