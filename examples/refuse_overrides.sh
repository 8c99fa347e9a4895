# Sourced by the recipes. A few settings are also used by the recipe itself after the Python step (the
# merge reads RUN_DIR, the split reads TRAIN_FILES and ROLLOUTS): given as key=value overrides, they would
# reach the trainer but not that later step. Such an override stops the recipe, naming the variable to set.
#   refuse_overrides "KEY=VARIABLE ..." "$@"
refuse_overrides() {
    local pairs=$1 arg pair
    shift
    for arg in "$@"; do
        for pair in ${pairs}; do
            if [[ "${arg}" == "${pair%%=*}="* ]]; then
                echo "error: set ${pair#*=}=... instead of the override ${arg}: this recipe also uses it after the Python step" >&2
                exit 2
            fi
        done
    done
}
