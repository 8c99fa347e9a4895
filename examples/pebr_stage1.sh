#!/usr/bin/env bash
# Stage 1 of PeBR-R1: perception RL on the easy cases, then merge the final checkpoint.
# Extra arguments are config overrides (key=value) or more config files (config=FILE). Files are applied first
# and every key=value after them: a file may not set a key this recipe sets below from a variable (set the variable).
set -euo pipefail
source "$(dirname "$0")/refuse_overrides.sh"
recipe_help "$0" "$@"
require_repo_root
refuse_overrides "trainer.save_checkpoint_path=RUN_DIR" "$@"
refuse_file_keys "worker.actor.model.model_path=MODEL_PATH data.train_files=TRAIN_FILES data.image_dir=IMAGE_DIR \
    worker.reward.reward_function_kwargs.clip_model_path=CLIP_MODEL_PATH trainer.n_gpus_per_node=N_GPUS trainer.save_checkpoint_path=RUN_DIR" "$@"

MODEL_PATH=${MODEL_PATH:-saves/pebr_r1/qwen2_5vl_7b/full_sft_warm_up}  # the merged warm-up SFT model
TRAIN_FILES=${TRAIN_FILES:-dataset/easycase.json}                     # written by examples/pebr_sample.sh
IMAGE_DIR=${IMAGE_DIR:-null}                                          # relative image paths are joined to it
CLIP_MODEL_PATH=${CLIP_MODEL_PATH:-qihoo360/fg-clip-large}            # FG-CLIP: a hub id or a local directory
N_GPUS=${N_GPUS:-7}
require_count N_GPUS
RUN_DIR=${RUN_DIR:-checkpoints/easy_r1/pebr_stage1}
# The reward's keyword arguments are read as YAML, where a path would lose a " #..." tail, turn into a mapping at
# ": " or into a number: pass it as a single-quoted YAML string, its quotes doubled.
CLIP_MODEL_YAML=\'${CLIP_MODEL_PATH//\'/\'\'}\'

python3 -m pebr.trainer.main config=examples/pebr_stage1.yaml \
    worker.actor.model.model_path="${MODEL_PATH}" \
    data.train_files="${TRAIN_FILES}" \
    data.image_dir="${IMAGE_DIR}" \
    worker.reward.reward_function_kwargs.clip_model_path="${CLIP_MODEL_YAML}" \
    trainer.n_gpus_per_node="${N_GPUS}" \
    trainer.save_checkpoint_path="${RUN_DIR}" \
    "$@"

# The merged model (RUN_DIR/global_step_<last>/actor/huggingface) is where stage 2 starts.
python3 scripts/model_merger.py --latest_in="${RUN_DIR}"
