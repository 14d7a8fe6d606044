#!/usr/bin/env bash
# Launch sidpt on one node with torchrun (CPU: gloo, GPU: nccl, chosen by the program).
#
#   ./torchrun.sh configs/debug.toml                      # one process
#   NGPU=4 ./torchrun.sh configs/debug.toml --run.seed=1  # four ranks (GPUs, or CPU processes)
#   LOG_RANK=0,1 ./torchrun.sh ...                        # show the output of ranks 0 and 1
#   MAX_RESTARTS=2 ./torchrun.sh cfg.toml --run.checkpoint_every=10 --run.resume=auto
#                                                         # a dead rank restarts the job from its last checkpoint
#
# Multi-node runs on SLURM: see launch/slurm.sbatch.
set -euo pipefail
NGPU=${NGPU:-1}
LOG_RANK=${LOG_RANK:-0}
MAX_RESTARTS=${MAX_RESTARTS:-0}
if [ $# -lt 1 ]; then
    echo "usage: $0 <config.toml> [--section.key=value ...]" >&2
    exit 2
fi
# Several CPU ranks share the cores: give each its share of threads unless told otherwise.
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    cores=$(nproc)
    export OMP_NUM_THREADS=$(( cores / NGPU > 0 ? cores / NGPU : 1 ))
fi
exec torchrun --standalone --nproc-per-node "$NGPU" --max-restarts "$MAX_RESTARTS" --local-ranks-filter "$LOG_RANK" --tee 3 \
    -m sidpt "$@"
