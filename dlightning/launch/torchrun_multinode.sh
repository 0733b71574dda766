#!/usr/bin/env bash
# Multi-node training with plain torchrun (no SLURM needed): run this once on every node.
#
# Environment (all nodes use the same values except NODE_RANK):
#   MASTER_ADDR     host name or IP of node 0, reachable from every node      (required)
#   MASTER_PORT     free TCP port on node 0                                    (default 29500)
#   NNODES          number of nodes                                            (default 1)
#   NODE_RANK       this node's index, 0..NNODES-1                             (default $SLURM_NODEID, else 0)
#   NPROC_PER_NODE  processes (= GPUs) per node                                (default 1)
#
# Arguments are passed to `dlightning fit`, e.g.:
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=1 NPROC_PER_NODE=8 \
#     launch/torchrun_multinode.sh --config runs/x/config.yaml
# trainer.num_nodes and trainer.devices are appended from NNODES and NPROC_PER_NODE. Lightning
# detects torchrun (TORCHELASTIC_RUN_ID) and takes ranks from it. Pre-emption: torchrun forwards
# SIGTERM to the workers, which checkpoint at the next step boundary and exit (no automatic requeue).
set -euo pipefail

: "${MASTER_ADDR:?set MASTER_ADDR to the host name of node 0}"
MASTER_PORT="${MASTER_PORT:-29500}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"

exec torchrun \
  --nnodes="${NNODES}" \
  --node-rank="${NODE_RANK}" \
  --nproc-per-node="${NPROC_PER_NODE}" \
  --master-addr="${MASTER_ADDR}" \
  --master-port="${MASTER_PORT}" \
  -m dlightning.cli fit "$@" "trainer.num_nodes=${NNODES}" "trainer.devices=${NPROC_PER_NODE}"
