"""Decide whether a candidate model ships: every release measure against the shipped default.

    python bench/candidate.py NAME_OR_FOLDER [--default MODEL] [--count 12]
                              [--invented-count 4] [--position-count 4] [--threads 2]
                              [--no-record]

``NAME_OR_FOLDER`` is a folder of ``/work/shared/candidates`` (or any folder) holding a
checkpoint ``best.safetensors`` + ``best.json`` (the format of
``export/demhx_export/checkpoint.py``) or a ready ONNX file, which is then used as it is. A
checkpoint is exported to a temporary ONNX file with ``demhx_export.onnx_export.export_onnx``
(fp32 only; of a network with an error head, the map channel, the export's default) and must
load in the runtime as a demhx model; a checkpoint the export or the
runtime cannot take (e.g. an architecture field this export does not know) stops with the
reason.

Both models (candidate and default, the registry's unless ``--default``) then go through:

- ``bench/invented.py``: noise in (the real maps and ``--invented-count`` synthetic val maps),
  empty space and FSC beyond the resolution on those synthetic maps;
- ``bench/quality.py``: ``--count`` synthetic val maps and the three real maps with fitted
  models, deposited and degraded;
- ``bench/position_study.py``: CC of the outputs for the map and an offset crop of it
  (``--position-count`` synthetic val maps);
- speed: median seconds per 64³ cube through the runtime (one cube per call,
  :data:`SPEED_RUNS` runs after a warm-up, the two models alternating), ``--threads``.

Verdict (the default is measured against the bars only): noise in ≤ 0.1 % of the voxels and
no blob above 30 % of the real peak (``invented.MAX_ABOVE_SHARE``, ``invented.MAX_BLOB_RATIO``);
median synthetic FSC0.5 and masked FSC0.5 no worse than the default's by more than
:data:`SYNTHETIC_FSC_TOLERANCE`; median unmodelled density kept no lower than the default's by
more than :data:`UNMODELLED_TOLERANCE`; masked FSC0.5 on every real map (deposited and
degraded) no worse than the default's by more than :data:`REAL_FSC_TOLERANCE`. One row per
model is appended to the table under "## Candidates" in ``bench/QUALITY.md``
(``--no-record`` only prints them).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import invented  # noqa: E402
import position_study  # noqa: E402
import quality  # noqa: E402

CANDIDATES_DIR = quality.ROOT.parent / "shared" / "candidates"
QUALITY_MD = Path(__file__).resolve().parent / "QUALITY.md"
HEADING = "## Candidates"
CHECKPOINT = "best"
SPEED_RUNS = 5
SYNTHETIC_FSC_TOLERANCE = 0.02  # Å, median over the synthetic val maps
UNMODELLED_TOLERANCE = 0.02  # share of the true level
REAL_FSC_TOLERANCE = 0.05  # Å, each real map (differences below ~0.1 Å are mostly noise)
TABLE_HEADER = ("date", "model", "noise above % / blob %", "synth FSC0.5 / m (Å)", "unmod",
                "empty mass %", "FSC >res truth / model", "real FSC0.5 m (Å, vs default)",
                "position CC m", "s per cube", "verdict")


@dataclass
class Measures:
    """Everything measured for one model."""

    label: str
    model: str  # what demhx.enhance is given: a registered name or an ONNX path
    noise: tuple[bool, str] = (False, "")
    noise_worst: invented.NoiseScore = field(default_factory=invented.NoiseScore)
    invented_medians: dict[str, float] = field(default_factory=dict)
    synthetic: dict[str, float] = field(default_factory=dict)  # medians of quality's scores
    real: dict[str, float] = field(default_factory=dict)  # FSC0.5 m per real map
    position: tuple[float, float] = (float("nan"), float("nan"))  # median CC box, mask
    seconds_per_cube: float = float("nan")
    errors: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- the candidate


def candidate_folder(name: str) -> Path:
    """The candidate's folder: a path, or a name under CANDIDATES_DIR."""
    folder = Path(name) if Path(name).is_dir() else CANDIDATES_DIR / name
    if not folder.is_dir():
        raise SystemExit(f"{name}: no such candidate folder (looked in {CANDIDATES_DIR}); "
                         "pass a folder holding best.safetensors + best.json or an ONNX file")
    return folder


def candidate_model(folder: Path, scratch: Path) -> tuple[Path, str]:
    """The candidate's ONNX file (ready, or exported into ``scratch``) and how it was made."""
    ready = sorted(p for p in folder.glob("*.onnx") if not p.name.endswith(".fp16.onnx"))
    if ready:
        return ready[0], f"ready ONNX file {ready[0].name}"
    try:
        from demhx_export.checkpoint import load_checkpoint
        from demhx_export.onnx_export import export_onnx
    except ImportError as error:
        raise SystemExit(f"{folder}: exporting a checkpoint needs the export package "
                         f"({error}); pip install -e export") from None
    try:
        net, config = load_checkpoint(folder / CHECKPOINT)
        report = export_onnx(net, config, scratch / f"{folder.name}.onnx", fp16=False,
                             metadata={"name": folder.name})
    except (OSError, ValueError, RuntimeError) as error:
        architecture = _architecture(folder)
        raise SystemExit(f"{folder}: cannot export checkpoint {CHECKPOINT} with this "
                         f"demhx_export (architecture {architecture}): {error}") from None
    output = report.metadata.get("demhx.output", "map")
    return report.path, (f"exported from {CHECKPOINT} (step {config.get('step', '?')}, output "
                         f"{output}, relative error {report.relative_error:.1e} against "
                         "PyTorch)")


def check_runtime(path: Path, folder: Path, threads: int) -> None:
    """Stop with the reason when the runtime does not take the model (e.g. two outputs)."""
    from demhx.session import load_runtime

    try:
        load_runtime(path, device="cpu", threads=threads)
    except (OSError, ValueError) as error:
        raise SystemExit(f"{folder}: the runtime refuses the candidate's model (architecture "
                         f"{_architecture(folder)}): {error}") from None


def _architecture(folder: Path) -> str:
    import json

    try:
        return json.dumps(json.loads((folder / f"{CHECKPOINT}.json").read_text())
                          .get("architecture"))
    except (OSError, ValueError):
        return "unknown"


# --------------------------------------------------------------------------- measures


def measure_invented(models: list[Measures], count: int, threads: int) -> str:
    """invented.py's measures for every model; returns its report."""
    variants = [m.model for m in models]
    results, notes = invented.measure(variants, count, "val", "all", "default", threads)
    for m in models:
        m.noise = invented.verdict(results, m.model)
        m.noise_worst = invented.worst(results, m.model)
        m.invented_medians = invented.synthetic_medians(results, m.model)
    text = invented.report(results, variants, notes)
    for m in models:  # the labels instead of temporary paths
        text = text.replace(m.model, m.label)
    return text


def measure_quality(models: list[Measures], count: int, threads: int) -> None:
    """quality.py's scores of every model on the synthetic val maps and the real maps."""
    cases = quality.synthetic_cases("val", count) + quality.real_cases()
    for m in models:
        synthetic: list[dict[str, float]] = []
        for case in cases:
            output, _ = quality.run_model(m.model, case, "default", threads)
            if isinstance(output, str):
                m.errors.append(f"{case.name} ({case.group}): {output}")
                continue
            scores = quality.score(output, case)
            if case.group.startswith("synthetic"):
                synthetic.append(scores)
            else:
                m.real[f"{case.name}, {case.group.split(', ')[1]}"] = scores["FSC0.5 m"]
        m.synthetic = {key: float(np.nanmedian([s[key] for s in synthetic]))
                       for key in ("FSC0.5", "FSC0.5 m", "unmod", "blobs")} if synthetic else {}


def measure_position(models: list[Measures], count: int, threads: int) -> None:
    """Median CC (box, mask) of the outputs for a map and its offset crop."""
    cases = quality.synthetic_cases("val", count)
    for m in models:
        pairs = [position_study.cut_agreement(m.model, case, position_study.DEFAULT_OFFSET,
                                              threads) for case in cases]
        m.position = (float(np.median([p[0] for p in pairs])),
                      float(np.median([p[1] for p in pairs])))


def measure_speed(models: list[Measures], threads: int) -> None:
    """Median seconds per cube through the runtime, the models alternating."""
    from demhx.session import load_runtime

    runtimes = [load_runtime(m.model, device="cpu", batch_size=1, threads=threads)
                for m in models]
    rng = np.random.default_rng(0)
    times: list[list[float]] = [[] for _ in models]
    for round_ in range(SPEED_RUNS + 1):  # round 0 warms up
        for runtime, seconds in zip(runtimes, times, strict=True):
            cube = runtime.spec.cube_size
            batch = (0.1 * rng.standard_normal((1, 1, cube, cube, cube))).astype(np.float32)
            start = time.perf_counter()
            runtime.run(batch)
            if round_:
                seconds.append(time.perf_counter() - start)
    for m, seconds in zip(models, times, strict=True):
        m.seconds_per_cube = float(np.median(seconds))


# --------------------------------------------------------------------------- verdict


def verdict(m: Measures, default: Measures) -> str:
    """"ships", "reference: ..." for the default, or the failed bars."""
    failed = [] if m.noise[0] else ["noise bars"]
    if m.errors:
        failed.append(f"{len(m.errors)} runs failed")
    if m is not default:
        for key in ("FSC0.5", "FSC0.5 m"):
            if not m.synthetic.get(key, np.inf) <= default.synthetic.get(key, np.nan) + \
                    SYNTHETIC_FSC_TOLERANCE:
                failed.append(f"synthetic {key}")
        if not m.synthetic.get("unmod", -np.inf) >= default.synthetic.get("unmod", np.nan) - \
                UNMODELLED_TOLERANCE:
            failed.append("unmodelled density")
        worse = [name for name, value in default.real.items()
                 if not m.real.get(name, np.inf) <= value + REAL_FSC_TOLERANCE]
        if worse:
            failed.append(f"real maps ({', '.join(worse)})")
    if m is default:
        return "default (reference); " + ("meets the noise bars" if not failed else
                                          "fails " + ", ".join(failed))
    return "**ships**" if not failed else "does not ship: fails " + ", ".join(failed)


def row(m: Measures, default: Measures) -> tuple[str, ...]:
    """One line of the Candidates table."""
    worst, medians = m.noise_worst, m.invented_medians
    if m is default or not default.real:
        real = "reference" if m is default else "-"
    else:
        worse = max(default.real, key=lambda k: m.real.get(k, np.inf) - default.real[k])
        real = f"worst {m.real.get(worse, np.nan) - default.real[worse]:+.2f} ({worse})"
    speed = f"{m.seconds_per_cube:.2f} (×{m.seconds_per_cube / default.seconds_per_cube:.2f})"
    return (datetime.date.today().isoformat(), m.label,
            f"{100 * worst.above:.3f} / {100 * worst.blob:.1f}",
            f"{m.synthetic.get('FSC0.5', np.nan):.2f} / {m.synthetic.get('FSC0.5 m', np.nan):.2f}",
            f"{m.synthetic.get('unmod', np.nan):.2f}",
            f"{100 * medians.get('empty mass', np.nan):.1f}",
            f"{medians.get('FSC truth', np.nan):.3f} / {medians.get('FSC model', np.nan):.3f}",
            real, f"{m.position[1]:.4f}", speed, verdict(m, default))


def record(rows: list[tuple[str, ...]], path: Path = QUALITY_MD) -> None:
    """Append rows to the table under HEADING (created at the end of the file if missing)."""
    lines = path.read_text().splitlines()
    if HEADING not in lines:
        lines += ["", HEADING, "", "| " + " | ".join(TABLE_HEADER) + " |",
                  "|" + "---|" * len(TABLE_HEADER)]
    at = lines.index(HEADING) + 1
    while at < len(lines) and not lines[at].startswith("|"):
        at += 1
    while at < len(lines) and lines[at].startswith("|"):
        at += 1
    lines[at:at] = ["| " + " | ".join(r) + " |" for r in rows]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("candidate", help="folder name under shared/candidates, or a folder")
    parser.add_argument("--default", help="model to compare with (default: the registry's)")
    parser.add_argument("--count", type=int, default=12, help="synthetic val maps, quality")
    parser.add_argument("--invented-count", type=int, default=4, help="synthetic val maps, "
                        "invented density")
    parser.add_argument("--position-count", type=int, default=4, help="synthetic val maps, "
                        "position consistency")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true", help="do not write QUALITY.md")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="demhx-candidate-") as scratch:
        models, made = _models(args.candidate, args.default, Path(scratch), args.threads)
        print(f"candidate {args.candidate}: {made}\nmachine: {quality.machine()}", flush=True)
        print(measure_invented(models, args.invented_count, args.threads), flush=True)
        measure_quality(models, args.count, args.threads)
        measure_position(models, args.position_count, args.threads)
        measure_speed(models, args.threads)
    rows = [row(m, models[1]) for m in models]
    print(invented.format_table(TABLE_HEADER, rows))
    for m in models:
        print("\n".join(f"{m.label}: real {k}: FSC0.5 m {v:.2f} Å" for k, v in m.real.items()))
        print("\n".join(f"{m.label}: error: {e}" for e in m.errors))
    print(f"({time.perf_counter() - start:.0f} s)")
    if not args.no_record:
        record(rows)
    return 0


def _models(candidate: str, default: str | None, scratch: Path, threads: int
            ) -> tuple[list[Measures], str]:
    """[candidate, default] and how the candidate's model was made."""
    from demhx.model import load_registry, read_metadata

    folder = candidate_folder(candidate)
    path, made = candidate_model(folder, scratch)
    check_runtime(path, folder, threads)
    default = default or load_registry()["default"]
    from demhx.model import resolve_model

    metadata = read_metadata(resolve_model(default)[0])
    label = f"`{default}` {metadata.get('demhx.version', '')}".strip()
    return [Measures(f"`{folder.name}`", str(path)), Measures(label, default)], made


if __name__ == "__main__":
    raise SystemExit(main())
