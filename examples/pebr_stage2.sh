#!/usr/bin/env bash
# Stage 2 of PeBR-R1: reasoning RL on the medium cases, from the merged stage-1 model; then merge.
# Extra arguments are config overrides (key=value) or more config files (config=FILE). Files are applied first
# and every key=value after them: a file may not set a key this recipe sets below from a variable (set the variable).
set -euo pipefail
source "$(dirname "$0")/refuse_overrides.sh"
recipe_help "$0" "$@"
require_repo_root
refuse_overrides "trainer.save_checkpoint_path=RUN_DIR worker.actor.model.model_path=MODEL_PATH" "$@"
refuse_file_keys "worker.actor.model.model_path=MODEL_PATH data.train_files=TRAIN_FILES data.image_dir=IMAGE_DIR \
    trainer.n_gpus_per_node=N_GPUS trainer.save_checkpoint_path=RUN_DIR" "$@"

STAGE1_DIR=${STAGE1_DIR:-checkpoints/easy_r1/pebr_stage1}
TRAIN_FILES=${TRAIN_FILES:-dataset/mediumcase.json}                   # written by examples/pebr_sample.sh
IMAGE_DIR=${IMAGE_DIR:-null}
N_GPUS=${N_GPUS:-8}
require_count N_GPUS
RUN_DIR=${RUN_DIR:-checkpoints/easy_r1/pebr_stage2}
MODEL_PATH=${MODEL_PATH:-}                                            # empty: STAGE1_DIR's last checkpoint, merged
TRAIN_ARGS=(config=examples/pebr_stage2.yaml data.train_files="${TRAIN_FILES}" data.image_dir="${IMAGE_DIR}"
    trainer.n_gpus_per_node="${N_GPUS}" trainer.save_checkpoint_path="${RUN_DIR}")
# Stage 1's last checkpoint, merged (again) into a Hugging Face model unless MODEL_PATH is given; one of a stage 1
# that has not reached its last step is refused (rerun stage 1: it resumes), and the log says which model it is.
if [ -n "${MODEL_PATH}" ]; then
    echo "stage 2 starts from MODEL_PATH=${MODEL_PATH} (not from STAGE1_DIR)" >&2
else
    # Before the first merge of that checkpoint, the settings and data are checked against the model config and
    # processor saved in its actor/huggingface, so that a mistyped override or a bad data file stops before the
    # merge (minutes for a 7B model). Once merged (weights there), the merge is skipped and so is this check.
    STAGE1_HF=$(python3 -c 'import os, sys
from pebr.checkpoint import latest_checkpoint
from pebr.config import has_model_weights
last = latest_checkpoint(sys.argv[1])
hf = os.path.join(last, "actor", "huggingface") if last else ""
print(hf if os.path.isfile(os.path.join(hf, "config.json")) and not has_model_weights(hf) else "")' "${STAGE1_DIR}")
    if [ -n "${STAGE1_HF}" ]; then
        python3 -m pebr.trainer.main --check "${TRAIN_ARGS[@]}" worker.actor.model.model_path="${STAGE1_HF}" "$@"
    fi
    MODEL_PATH=$(python3 scripts/model_merger.py --latest_in="${STAGE1_DIR}" --final_only | tail -n 1)
    echo "stage 2 starts from stage 1's merged model ${MODEL_PATH}" >&2
fi

python3 -m pebr.trainer.main "${TRAIN_ARGS[@]}" worker.actor.model.model_path="${MODEL_PATH}" "$@"

python3 scripts/model_merger.py --latest_in="${RUN_DIR}"
