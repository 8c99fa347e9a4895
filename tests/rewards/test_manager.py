"""RewardManager: loading by path, setup at construction, and validation of the output."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from pebr.rewards.manager import RewardFunctionError, RewardManager, load_reward_function, resolve_options

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

INPUTS = [
    {"qid": "q-0", "response": "fine", "response_length": 3, "ground_truth": "1", "key_word": [], "image": None},
    {"qid": "q-bad", "response": "boom " * 100, "response_length": 5, "ground_truth": "2", "key_word": [],
     "image": None},
    {"qid": "q-2", "response": "fine", "response_length": 3, "ground_truth": "3", "key_word": [], "image": None},
]


def write(tmp_path: Path, body: str, name: str = "reward.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


BATCH = """
    CALLS = []

    def setup(**kwargs):
        CALLS.append(kwargs)

    def compute_score(reward_inputs, scale=1.0):
        return [{"overall": scale * len(x["response"]), "length": x["response_length"]} for x in reward_inputs]

    NOT_A_FUNCTION = 3
"""


def test_load_reward_function_by_path(tmp_path: Path) -> None:
    path = write(tmp_path, BATCH)
    fn = load_reward_function(f"{path}:compute_score")
    assert fn([INPUTS[0]]) == [{"overall": 4.0, "length": 3}]
    assert load_reward_function(path).__name__ == "compute_score"  # the default name


def test_load_reward_function_errors(tmp_path: Path) -> None:
    path = write(tmp_path, BATCH)
    with pytest.raises(FileNotFoundError, match="missing.py"):
        load_reward_function(f"{tmp_path}/missing.py:compute_score")
    with pytest.raises(AttributeError, match="no function 'score_it'.*compute_score"):
        load_reward_function(f"{path}:score_it")
    with pytest.raises(TypeError, match="NOT_A_FUNCTION.*int"):
        load_reward_function(f"{path}:NOT_A_FUNCTION")
    with pytest.raises(ValueError, match=r"\.py file"):
        load_reward_function(f"{tmp_path}/reward.txt:compute_score")


def test_manager_calls_setup_once_and_passes_kwargs(tmp_path: Path) -> None:
    path = write(tmp_path, BATCH)
    manager = RewardManager(f"{path}:compute_score", reward_function_kwargs={"scale": 0.5})
    out = manager.compute(INPUTS)
    assert out == [{"overall": 2.0, "length": 3.0}, {"overall": 250.0, "length": 5.0}, {"overall": 2.0, "length": 3.0}]
    assert all(type(v) is float for scores in out for v in scores.values())
    manager.compute(INPUTS)
    assert manager.module.CALLS == [{"scale": 0.5}]
    # A second manager gets its own module (own state), not the first one's.
    other = RewardManager(f"{path}:compute_score")
    assert other.module is not manager.module and other.module.CALLS == [{}]


def test_raising_function_names_the_offending_input(tmp_path: Path) -> None:
    path = write(tmp_path, """
        def compute_score(reward_inputs):
            for x in reward_inputs:
                if x["response"].startswith("boom"):
                    raise ZeroDivisionError("cannot score")
            return [{"overall": 1.0} for _ in reward_inputs]
    """)
    with pytest.raises(RewardFunctionError) as info:
        RewardManager(f"{path}:compute_score").compute(INPUTS)
    message = str(info.value)
    assert "ZeroDivisionError: cannot score" in message
    assert "input #1" in message and "q-bad" in message
    assert "boom boom" in message and len(message) < 600  # the response is truncated
    assert isinstance(info.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize(
    "returned, match",
    [
        ("[{'overall': float('nan')} for _ in reward_inputs]", "overall=nan, not a finite number.*q-0"),
        ("[{'overall': 1.0, 'clip': float('inf')} for _ in reward_inputs]", "clip=inf"),
        ("[{'overall': 1.0}]", "returned 1 results for 3 inputs"),
        ("[{'overall': 1.0}] * 4", "returned 4 results for 3 inputs"),
        ("[{'accuracy': 1.0} for _ in reward_inputs]", "no 'overall'.*q-0"),
        ("[{'overall': '1.0'} for _ in reward_inputs]", "not a number"),
        ("[1.0 for _ in reward_inputs]", "a float instead of a dict"),
        ("{'overall': 1.0}", "must return a list"),
        ("[{'overall': 1.0, **({'x': 0.0} if i else {})} for i, _ in enumerate(reward_inputs)]",
         "keys.*q-bad"),
        # An int past float's range raised a bare OverflowError; a key 1 beside "1" lost a value without a word.
        ("[{'overall': 10 ** 400} for _ in reward_inputs]", r"overall=100000000000\.\.\. \(401 digits\), not a finite.*q-0"),
        ("[{'overall': 1.0, 1: 2.0, '1': 3.0} for _ in reward_inputs]", "the key 1 \\(int\\); score names are strings"),
    ],
)
def test_bad_outputs_are_rejected(tmp_path: Path, returned: str, match: str) -> None:
    path = write(tmp_path, f"def compute_score(reward_inputs):\n    return {returned}\n")
    with pytest.raises(RewardFunctionError, match=match):
        RewardManager(path).compute(INPUTS)


def test_numpy_numbers_and_bools_are_scores(tmp_path: Path) -> None:
    """numpy.bool_ is no numbers.Real: `accuracy == 1` on numpy arrays was refused as "np.True_ (bool), not a number"
    while Python's bool passed."""
    path = write(tmp_path, "import numpy as np\n"
                           "def compute_score(reward_inputs):\n"
                           "    return [{'overall': np.float32(0.5), 'accuracy': np.array([1, 0])[i % 2] == 1}\n"
                           "            for i, _ in enumerate(reward_inputs)]\n")
    assert RewardManager(path).compute(INPUTS[:2]) == [{"overall": 0.5, "accuracy": 1.0}, {"overall": 0.5, "accuracy": 0.0}]


def test_overall_optional_when_not_required(tmp_path: Path) -> None:
    path = write(tmp_path, "def compute_score(reward_inputs):\n    return [{'accuracy': 1} for _ in reward_inputs]\n")
    assert RewardManager(path, require_overall=False).compute(INPUTS[:1]) == [{"accuracy": 1.0}]


def test_sequential_reward_type(tmp_path: Path) -> None:
    path = write(tmp_path, """
        def score_one(reward_input, bonus=0.0):
            if reward_input["qid"] == "q-bad":
                raise KeyError("key_word")
            return {"overall": reward_input["response_length"] + bonus}
    """)
    manager = RewardManager(f"{path}:score_one", reward_type="sequential", reward_function_kwargs={"bonus": 0.5})
    assert manager.compute([INPUTS[0], INPUTS[2]]) == [{"overall": 3.5}, {"overall": 3.5}]
    with pytest.raises(RewardFunctionError, match="input #1.*q-bad"):
        manager.compute(INPUTS)


def test_unknown_reward_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reward_type must be one of.*'parallel'"):
        RewardManager(write(tmp_path, BATCH), reward_type="parallel")


def test_resolve_options_rejects_unknown_keys() -> None:
    assert resolve_options({"a": 1, "b": 2}, {"b": 3}, "f.py") == {"a": 1, "b": 3}
    with pytest.raises(KeyError, match=r"\['c'\] for f.py; accepted keys: \['a', 'b'\]"):
        resolve_options({"a": 1, "b": 2}, {"c": 3}, "f.py")


@pytest.mark.parametrize("value, match", [("0.4", "must be a finite number"), (float("nan"), "must be a finite number"),
                                          (True, "must be a finite number"), (None, "must be a finite number")])
def test_resolve_options_refuses_a_value_of_another_kind_than_its_default(value, match) -> None:
    """A quoted weight ("0.4") failed only at the first product, blamed on a sample."""
    with pytest.raises(TypeError, match=rf"reward_function_kwargs weight={value!r} for f.py {match} \(default 0.4\)"):
        resolve_options({"weight": 0.4, "flag": False, "path": None}, {"weight": value}, "f.py")
    with pytest.raises(TypeError, match="flag=1 for f.py must be true or false"):
        resolve_options({"weight": 0.4, "flag": False}, {"flag": 1}, "f.py")
    assert resolve_options({"weight": 0.4, "n": 512, "path": None}, {"weight": 1, "n": 256.0, "path": "x"}, "f.py") == {
        "weight": 1, "n": 256.0, "path": "x"}


@pytest.mark.parametrize("kwargs", [{"clip_threshold": 0.0}, {"max_length": -1}])
def test_stage1_settings_that_only_real_captions_would_reach_are_refused_at_start_up(kwargs) -> None:
    """clip_threshold=0 passed the start-up probe (its response has no description) and stopped the run at the
    first step, blamed on input #0."""
    spec = os.path.join(ROOT, "examples", "reward_function", "pebr_1.py") + ":compute_score"
    (key, value), = kwargs.items()
    with pytest.raises(ValueError, match=rf"{key}={value!r} for pebr_1.py must be positive"):
        RewardManager(spec, reward_function_kwargs={"clip_weight": 0, **kwargs})


def test_a_function_that_fails_on_every_input_points_at_the_settings(tmp_path: Path) -> None:
    path = write(tmp_path, """
        def compute_score(reward_inputs, scale=1.0):
            return [{"overall": 2.0 / scale} for _ in reward_inputs]
    """)
    with pytest.raises(RewardFunctionError, match=r"on every input tried alone \(input #0 .*q-0.*; input #1 .*q-bad"
                                                  r".*\): check worker.reward.reward_function_kwargs"):
        RewardManager(f"{path}:compute_score", reward_function_kwargs={"scale": "2"}).compute(INPUTS)


@pytest.mark.parametrize("name", ["pebr_1", "pebr_2", "pebr_sample"])
def test_a_shipped_reward_file_under_the_other_reward_type_is_refused_by_name(name: str) -> None:
    """Under reward_type=sequential they failed on the first input with "string indices must be integers"."""
    spec = os.path.join(ROOT, "examples", "reward_function", f"{name}.py") + ":compute_score"
    with pytest.raises(ValueError, match=rf"{name}\.py declares REWARD_TYPE = 'batch'.*reward_type=batch \(it is "
                                         r"sequential\)"):
        RewardManager(spec, reward_type="sequential", reward_function_kwargs={"clip_weight": 0} if name == "pebr_1"
                      else None)


@pytest.mark.parametrize("fails_when, message, most_calls", [
    # Failing only as a whole (out of memory, say): each input was retried alone, 4 481 calls for a stage-1
    # batch, the error reported minutes late.
    ("len(reward_inputs) > 600", r"on a batch of 4480 \(no single ", 6),
    # One bad input among 4 480: found by halving, about 2 log2 N calls.
    ("any(x['qid'] == 'q-3001' for x in reward_inputs)", r"on input #3001 .*q-3001", 2 * 13 + 3),
])
def test_the_input_that_breaks_a_large_batch_is_searched_by_halving(tmp_path: Path, fails_when: str, message: str,
                                                                   most_calls: int) -> None:
    path = write(tmp_path, f"""
        CALLS = []

        def compute_score(reward_inputs):
            CALLS.append(len(reward_inputs))
            if {fails_when}:
                raise ValueError("cannot score")
            return [{{"overall": 1.0}} for _ in reward_inputs]
    """)
    manager = RewardManager(f"{path}:compute_score")
    inputs = [dict(INPUTS[0], qid=f"q-{i}") for i in range(4480)]
    with pytest.raises(RewardFunctionError, match="ValueError: cannot score " + message):
        manager.compute(inputs)
    assert len(manager.function.__globals__["CALLS"]) <= most_calls


def test_a_reward_that_is_unavailable_is_not_searched_for_a_culprit(tmp_path: Path) -> None:
    """RewardUnavailable (a service down) is no input's fault: one call, not one per half of the batch, each of
    which would repeat every request and its retries."""
    path = write(tmp_path, """
        from pebr.rewards.manager import RewardUnavailable

        CALLS = []

        def compute_score(reward_inputs):
            CALLS.append(len(reward_inputs))
            raise RewardUnavailable("http://scorer/score: no answer")
    """)
    manager = RewardManager(f"{path}:compute_score")
    with pytest.raises(RewardFunctionError, match=r"could not score a batch of 3: http://scorer/score: no answer"):
        manager.compute(INPUTS)
    assert manager.function.__globals__["CALLS"] == [3]


def test_the_reward_worker_process_loads_no_torch_for_a_reward_without_clip():
    """Each run starts a reward worker beside the training workers; with torch imported (for the CLIP scorer, which
    stage 2 never starts) it took 1.9 s of CPU from their start-up on two cores, now 0.6 s."""
    import subprocess
    import sys

    code = ("import sys\nfrom pebr.workers.reward import RewardWorker, get_clip_scorer\n"
            "from pebr.rewards.manager import RewardManager\n"
            f"RewardManager(r'{ROOT}/examples/reward_function/pebr_2.py:compute_score')\n"
            "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "[]\n", proc.stdout + proc.stderr[-2000:]
