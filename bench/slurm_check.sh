#!/usr/bin/env bash
# Several maps under a real SLURM job array, on a throwaway single-node cluster.
#
# Starts munged, slurmctld and slurmd (Debian's slurm-wlm; needs root: apt-get install -y
# slurm-wlm) with a configuration and state under a scratch folder, submits
#     sbatch --array=1-2 --wrap "demhx a.mrc b.mrc c.mrc --out-dir out --model tight-fast"
# with no --shard, so each task takes its share from SLURM_ARRAY_TASK_ID/_COUNT, waits, and
# checks that every map was written exactly once (task 1: a and c, task 2: b) and that each
# task's log ends with its shard line. A second array, --array=0-1, checks the _MIN offset.
# Then stops the daemons. Exit status 0 when every check passed.
#
#     bash bench/slurm_check.sh            # from the project root, demhx installed
set -u
ROOT=$PWD
W=$(mktemp -d /tmp/demhx-slurm.XXXXXX)
HOST=$(hostname -s)
CPUS=$(nproc)
fail() { echo "slurm_check: FAILED: $*"; status=1; }
status=0

mkdir -p "$W/state" "$W/spool" "$W/log" "$W/maps"
cat > "$W/slurm.conf" <<EOF
ClusterName=demhx-check
SlurmctldHost=$HOST
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
StateSaveLocation=$W/state
SlurmdSpoolDir=$W/spool
SlurmctldPidFile=$W/slurmctld.pid
SlurmdPidFile=$W/slurmd.pid
SlurmctldLogFile=$W/log/slurmctld.log
SlurmdLogFile=$W/log/slurmd.log
SlurmUser=root
ReturnToService=2
NodeName=$HOST CPUs=$CPUS State=UNKNOWN
PartitionName=check Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$W/slurm.conf
mkdir -p /run/munge  # the socket's folder (a fresh container has none)
started_munge=0
if ! pgrep -x munged >/dev/null; then
    munged --force 2>/dev/null && started_munge=1 || fail "munged did not start"
fi
slurmctld -f "$SLURM_CONF" && slurmd -f "$SLURM_CONF" || fail "slurm daemons did not start"
stop() {  # the daemons of this check only (and munged if it started it)
    pkill -f "$W/slurm.conf" 2>/dev/null
    [ "$started_munge" = 1 ] && pkill -x munged 2>/dev/null
    sleep 1
}
trap stop EXIT
for _ in $(seq 30); do sinfo -h -o %t 2>/dev/null | grep -q idle && break; sleep 1; done
sinfo || fail "no SLURM node came up"

# Three small maps (crops of the bundled example).
python3 - "$W/maps" <<'EOF'
import sys
from pathlib import Path
import mrcfile, numpy as np
with mrcfile.open("examples/emd_5168.map", permissive=True) as source:
    data, voxel = np.asarray(source.data, np.float32), source.voxel_size
for name, start in (("a", 0), ("b", 20), ("c", 40)):
    with mrcfile.new(Path(sys.argv[1]) / f"{name}.mrc") as out:
        out.set_data(np.ascontiguousarray(data[start:start + 48, 10:70, 10:70]))
        out.voxel_size = voxel
EOF

run_array() {  # $1: --array range, $2: output folder name
    local job
    job=$(sbatch --parsable --array="$1" --cpus-per-task=1 -o "$W/log/$2-%a.out" \
        --chdir "$ROOT" --wrap "demhx $W/maps/a.mrc $W/maps/b.mrc $W/maps/c.mrc \
        --out-dir $W/$2 --model tight-fast --threads 1 --tiling fast") || fail "sbatch $1"
    for _ in $(seq 600); do squeue -h -j "$job" 2>/dev/null | grep -q . || break; sleep 1; done
    echo "array $1 (job $job):"; cat "$W/log/$2"-*.out
}

run_array 1-2 out
[ "$(ls "$W/out" 2>/dev/null | tr '\n' ' ')" = "a.mrc b.mrc c.mrc " ] || fail "outputs: $(ls "$W/out")"
grep -q "shard 1 of 2 (SLURM_ARRAY_TASK_ID=1): 2 of 3 maps" "$W/log/out-1.out" || fail "task 1"
grep -q "shard 2 of 2 (SLURM_ARRAY_TASK_ID=2): 1 of 3 maps" "$W/log/out-2.out" || fail "task 2"
grep -q "b.mrc" "$W/log/out-1.out" && fail "task 1 ran b.mrc"

run_array 0-1 out0
[ "$(ls "$W/out0" 2>/dev/null | tr '\n' ' ')" = "a.mrc b.mrc c.mrc " ] || fail "outputs with --array=0-1"
grep -q "shard 1 of 2 (SLURM_ARRAY_TASK_ID=0)" "$W/log/out0-0.out" || fail "task 0"

[ "$status" = 0 ] && echo "slurm_check: every map written once by its task; shard lines right"
exit "$status"
