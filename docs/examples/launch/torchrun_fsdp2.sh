#!/bin/bash
# Glance LoRAs across nodes with torchrun, the base sharded over every rank (docs/distributed.md, "How to launch").
# Run this on every node with NODE_RANK=0..NODES-1 and MASTER_ADDR=<node 0's address>; Lightning reads the ranks
# torchrun sets (TorchElasticEnvironment).
set -euo pipefail

NODES=${NODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CONFIG=${CONFIG:-configs/qwen-image.yaml}
# Every rank of every node writes into this one run folder (a filesystem rank 0 can write).
export GLANCE_LIGHTNING_RUN_DIR=${GLANCE_LIGHTNING_RUN_DIR:-$PWD/runs/torchrun}
ENCODE_CACHE=${ENCODE_CACHE:-$PWD/encode-cache}  # shared, or node-local where nodes share no filesystem

torchrun --nnodes "$NODES" --nproc_per_node "$GPUS_PER_NODE" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m glance_lightning fit --config "$CONFIG" \
  --trainer.accelerator ${ACCELERATOR:-gpu} --trainer.devices "$GPUS_PER_NODE" --trainer.num_nodes "$NODES" \
  --trainer.strategy fsdp2 --model.init_args.encode_cache "$ENCODE_CACHE" "$@"
