"""Several maps under a real SLURM job array (bench/slurm_check.sh), where SLURM can start.

The check starts its own single-node cluster (munged, slurmctld, slurmd from Debian's
slurm-wlm), so it needs those programs and root; elsewhere (CI installs Python packages
only) it is skipped with the reason. ``bash bench/slurm_check.sh`` runs it by hand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "demhx")

pytestmark = pytest.mark.slow


def test_several_maps_under_a_slurm_job_array() -> None:
    missing = [name for name in PROGRAMS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"SLURM cannot be started here: {', '.join(missing)} not installed "
                    "(apt-get install slurm-wlm)")
    if os.geteuid() != 0:
        pytest.skip("SLURM's daemons need root to start")
    if subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0:
        pytest.skip("a SLURM controller already runs here; not starting a second one")
    result = subprocess.run(["bash", "bench/slurm_check.sh"], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "every map written once by its task" in result.stdout
