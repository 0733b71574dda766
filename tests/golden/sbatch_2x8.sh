#!/bin/bash
# Rendered by dlightning.launch.sbatch.render_sbatch from dlightning/launch/train.sbatch.tmpl for run /scratch/runs/sd21-2x8.
# Change the launch section of the config and resubmit rather than editing this copy.
#SBATCH --job-name=dlightning
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=480G
#SBATCH --partition=gpu
#SBATCH --account=proj123
#SBATCH --time=24:00:00
#SBATCH --constraint=h100
#SBATCH --qos=normal
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=/scratch/runs/sd21-2x8/slurm-%j.out
#SBATCH --error=/scratch/runs/sd21-2x8/slurm-%j.out
#SBATCH --exclusive
#SBATCH --mail-type=FAIL

# Exit on errors (cluster module scripts often read unset variables, so -u comes after the setup).
set -eo pipefail

echo "[dlightning] job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?} at $(date -Is)"

# ---- environment (launch.env_setup) ----
module load cuda/12.4
source .venv/bin/activate
set -u
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# ---- pre-emption: this shell must outlive the tasks (the job ends with it) ----
# SLURM signals the tasks itself; a USR1 that only this shell gets (--signal=B:USR1@N, scancel --full
# or --batch) goes on to srun, which forwards it to every task. TERM reaches the tasks directly.
step_pid=
on_usr1() {
    echo "[dlightning] batch shell got USR1: forwarding USR1 to the training step"
    if [[ -n $step_pid ]]; then kill -USR1 "$step_pid" 2>/dev/null || true; fi
}
trap on_usr1 USR1
trap 'echo "[dlightning] batch shell got TERM: waiting for the training step to end"' TERM

# ---- training: resumes from the newest valid checkpoint in the run folder after a requeue ----
srun --kill-on-bad-exit=1 python -m dlightning.cli fit --config /scratch/runs/sd21-2x8/config.yaml trainer.num_nodes=2 trainer.devices=8 &
step_pid=$!
# A trapped signal ends "wait" early; wait again until srun itself has ended, then exit with its status.
while :; do
    status=0
    wait "$step_pid" || status=$?
    kill -0 "$step_pid" 2>/dev/null || break
done
exit "$status"
