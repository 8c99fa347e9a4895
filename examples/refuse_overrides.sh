# Sourced by the recipes. A few settings are also used by the recipe itself outside the Python step (the
# merge reads RUN_DIR, the split reads TRAIN_FILES and ROLLOUTS, stage 2 picks MODEL_PATH before it): given as
# key=value overrides, they would reach the trainer but not that other step. Such an override stops the recipe, naming the variable to set;
# so does a mapping that holds the key (trainer={save_checkpoint_path: ...} replaces the recipe's setting too).
# Config files are applied before every key=value, the recipe's own included: see refuse_file_keys.
#   refuse_overrides "KEY=VARIABLE ..." "$@"
refuse_overrides() {
    local pairs=$1 arg pair key setting
    shift
    for arg in "$@"; do
        [[ "${arg}" == *=* ]] || continue
        key=${arg%%=*}
        for pair in ${pairs}; do
            setting=${pair%%=*}
            # A mapping above the setting replaces it only if it names it (worker={rollout: {n: 4}} does not).
            if [[ "${key}" == "${setting}" || "${setting}" == "${key}."* && "${arg#*=}" == *"${setting##*.}"* ]]; then
                echo "error: set ${pair#*=}=... instead of the override ${arg}: this recipe also uses it outside the Python step" >&2
                exit 2
            fi
        done
    done
}

# A config=FILE argument is applied before the recipe's own key=value settings, so a key the recipe sets from a
# variable (data.train_files from TRAIN_FILES, ...) would be replaced without a word: stop, naming the variable.
# The project's own files under examples/ are exempt: they are layers written for these recipes (the CPU twins'
# examples/pebr_cpu.yaml sets trainer.n_gpus_per_node, which N_GPUS then sets).
#   refuse_file_keys "KEY=VARIABLE ..." "$@"
refuse_file_keys() {
    local pairs=$1 arg file examples
    shift
    examples=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
    for arg in "$@"; do
        [[ "${arg}" == config=* ]] || continue
        file=${arg#config=}
        file=${file/#\~\//${HOME}/}
        [[ "$(realpath -m -- "${file}")" == "${examples}"/* ]] && continue
        python3 - "${file}" ${pairs} <<'PY' || exit 2
import sys

import yaml

path, pairs = sys.argv[1], sys.argv[2:]
try:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
except (OSError, UnicodeDecodeError, yaml.YAMLError):
    sys.exit(0)  # the trainer names what is wrong with the file
for pair in pairs:
    key, variable = pair.split("=", 1)
    node = data
    for part in key.split("."):
        node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
    if node is not KeyError:
        print(f"error: {path} sets {key}, which this recipe sets after the file from {variable}: set {variable}=... "
              "instead (and leave the key out of the file)", file=sys.stderr)
        sys.exit(1)
PY
    done
}

# The recipes read their config files and reward functions, and the user's relative paths, from the repository
# root; started elsewhere, a relative RUN_DIR would go somewhere else than the caller meant. Stop instead.
require_repo_root() {
    local root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
    if [ "$(pwd -P)" != "${root}" ]; then
        echo "error: run this recipe from the repository root (cd ${root}): its config files, reward functions" \
             "and relative paths are read from there" >&2
        exit 2
    fi
}

# -h / --help: the recipe's header comment and its variables with their defaults, then exit (before any merge or
# Python step runs). A CPU twin runs its recipe with PEBR_RECIPE_AS set to its own path: the usage line names the
# twin, which is what the user ran, and its header comes first.
#   recipe_help "$0" "$@"
recipe_help() {
    local recipe=$1 arg shown=${PEBR_RECIPE_AS:-$1}
    unset PEBR_RECIPE_AS  # the twin's word for this call alone: not for the Python steps, nor a nested recipe
    shift
    for arg in "$@"; do
        if [[ "${arg}" == "-h" || "${arg}" == "--help" ]]; then
            echo "usage: bash ${shown} [config=FILE ...] [key=value ...]   (variables: VAR=value bash ${shown})"
            if [ "${shown}" != "${recipe}" ]; then
                sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${shown}"
                echo "It runs ${recipe}:"
            fi
            sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${recipe}"
            echo "variables (default):"
            local line name
            while IFS= read -r line; do
                name=${line%%=*}
                echo "${line}" | sed -E 's/^([A-Z0-9_]+)=\$\{[A-Z0-9_]+:-(.*)\}(.*)$/  \1 (\2)\3/'
                # A CPU twin sets some before it runs the recipe: say what this call gets.
                if [ -n "${!name+x}" ]; then echo "      now: ${!name}"; fi
            done < <(grep -E '^[A-Z0-9_]+=\$\{' "${recipe}")
            exit 0
        fi
    done
}

# A variable that must be a whole number of at least 1 (N_GPUS): stop naming the variable, not the config key it
# is passed on as.
#   require_count N_GPUS
require_count() {
    local name=$1
    if ! [[ "${!name}" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: ${name}=${!name} is not a whole number of at least 1" >&2
        exit 2
    fi
}
