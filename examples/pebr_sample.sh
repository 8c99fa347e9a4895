#!/usr/bin/env bash
# Dataset-level sampling with the warm-up model, then the easy / medium / hard split.
# Rerunning after an interruption resumes: finished questions are kept, nothing is duplicated.
set -euo pipefail
source "$(dirname "$0")/refuse_overrides.sh"
recipe_help "$0" "$@"
require_repo_root
refuse_overrides "data.train_files=TRAIN_FILES trainer.sample_output=ROLLOUTS" "$@"
refuse_file_keys "worker.actor.model.model_path=MODEL_PATH data.train_files=TRAIN_FILES data.image_dir=IMAGE_DIR \
    trainer.sample_output=ROLLOUTS trainer.n_gpus_per_node=N_GPUS" "$@"

MODEL_PATH=${MODEL_PATH:-saves/pebr_r1/qwen2_5vl_7b/full_sft_warm_up}  # the merged warm-up SFT model
TRAIN_FILES=${TRAIN_FILES:-dataset/train.json}                        # the RL data set to split
IMAGE_DIR=${IMAGE_DIR:-null}                                          # relative image paths are joined to it (null: as written)
ROLLOUTS=${ROLLOUTS:-_rollout_outputs/rollouts.jsonl}
SPLIT_DIR=${SPLIT_DIR:-dataset}                                       # stage 1 / 2 read easycase / mediumcase.json here
N_GPUS=${N_GPUS:-8}
require_count N_GPUS

if [ -d "${TRAIN_FILES}" ]; then  # refused by the split too, but only after the whole sampling run
  case "$(realpath -m -- "${SPLIT_DIR}")/" in "$(realpath -m -- "${TRAIN_FILES}")"/*)
    echo "error: SPLIT_DIR=${SPLIT_DIR} lies in TRAIN_FILES=${TRAIN_FILES}: a later sampling run would read the" \
         "split files there as more questions; set SPLIT_DIR elsewhere" >&2
    exit 2;;
  esac
fi
for split_file in easycase.json mediumcase.json hardcase.json; do  # the split would replace what it splits
  if [ "$(realpath -m -- "${TRAIN_FILES}")" = "$(realpath -m -- "${SPLIT_DIR}/${split_file}")" ]; then
    echo "error: TRAIN_FILES=${TRAIN_FILES} is the split file ${SPLIT_DIR}/${split_file}: the split would replace" \
         "the records it splits; set SPLIT_DIR elsewhere" >&2
    exit 2
  fi
done
config=(config=examples/pebr_sample.yaml
    worker.actor.model.model_path="${MODEL_PATH}"
    data.train_files="${TRAIN_FILES}"
    data.image_dir="${IMAGE_DIR}"
    trainer.sample_output="${ROLLOUTS}"
    trainer.n_gpus_per_node="${N_GPUS}"
    "$@")

python3 -m pebr.trainer.sample_main "${config[@]}"

# The split takes the run's settings: questions sampled worker.rollout.n x trainer.total_epochs times, and the
# records sampling skipped as malformed (data.on_bad_record=skip, however it was set) skipped too.
settings=$(python3 -c 'import sys; from pebr.config import load_config
cfg = load_config(sys.argv[1:], training=False)
print(cfg.worker.rollout.n * cfg.trainer.total_epochs, cfg.data.on_bad_record)
print(cfg.data.prompt_key); print(cfg.data.answer_key); print(cfg.data.image_key)' "${config[@]}")
{ read -r n_per_question on_bad_record; read -r prompt_key; read -r answer_key; read -r image_key; } <<< "${settings}"
split_args=(--prompt_key "${prompt_key}" --answer_key "${answer_key}" --image_key "${image_key}")
[ "${on_bad_record}" = "skip" ] && split_args+=(--skip_bad_lines)

python3 _rollout_outputs/sample_dataset.py --rollouts="${ROLLOUTS}" --dataset="${TRAIN_FILES}" \
    --output_dir="${SPLIT_DIR}" --n "${n_per_question}" "${split_args[@]}"
