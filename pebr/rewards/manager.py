"""Load a user reward function by path and check what it returns.

A reward file is plain Python, loaded at run time from ``worker.reward.reward_function``
(``path/to/file.py:function``)::

    def compute_score(reward_inputs: list[dict], **kwargs) -> list[dict[str, float]]: ...   # batch
    def compute_score(reward_input: dict, **kwargs) -> dict[str, float]: ...               # sequential

``kwargs`` are ``worker.reward.reward_function_kwargs``. If the file defines ``setup(**kwargs)``,
it is called once when the manager is built, so a bad configuration (a missing model path, an
unknown weight) fails at start-up rather than at the first scoring step. A file that sets
``REWARD_TYPE = "batch"`` (or ``"sequential"``) is refused under the other reward_type, by name, instead of
failing on its first input.

Inputs are dicts with keys response (str), response_length (int), question (str, the record's question with its
`<image>` placeholders, without the template, for a reward model or a judge), ground_truth (str),
key_word (list[str]), image (the first image, a PIL image, or None), images (all of them, in the prompt's order)
and qid (str). Outputs are one dict per input whose
values are finite floats, with ``overall`` (the scalar GRPO optimises) unless require_overall is off.
When a batch fails, the manager scores its inputs alone to name the one it fails on, unless the function raised
`RewardUnavailable` (no input's fault, a service that does not answer).
No Ray here: `pebr.workers.reward.RewardWorker` runs a manager inside an actor.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import numbers
import os
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import numpy as np

from pebr.config import split_reward_spec

__all__ = [
    "RewardFunctionError",
    "RewardUnavailable",
    "RewardManager",
    "load_reward_function",
    "load_reward_module",
    "resolve_options",
    "check_whole_numbers",
    "reward_input",
    "REWARD_TYPES",
]

REWARD_TYPES = ("batch", "sequential")
DEFAULT_FUNCTION = "compute_score"
_PREVIEW_CHARS = 200
_module_ids = itertools.count()


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned something the trainer cannot use."""


class RewardUnavailable(RuntimeError):
    """Raised by a reward function whose failure is no input's fault (a scoring service that does not answer):
    the manager then stops at once instead of scoring inputs alone to find a culprit, which against a service
    that is down only repeats every request and its retries."""


def reward_input(response: str, response_length: int, question: str, ground_truth: str, key_words: list[str],
                 qid: str, images: list[Any]) -> dict[str, Any]:
    """One input of a reward function, as the module docstring lists its keys (the one place they are made)."""
    return {"response": response, "response_length": response_length, "question": question,
            "ground_truth": ground_truth, "key_word": key_words, "qid": qid,
            "image": images[0] if images else None, "images": list(images)}


def _split_spec(spec: str) -> tuple[str, str]:
    path, name = split_reward_spec(spec)
    return path, name or DEFAULT_FUNCTION


def load_reward_module(path: str) -> ModuleType:
    """Import a Python file as a fresh module (each call gets its own module and module state).

    Args:
        path: path to a .py file, absolute or relative to the working directory.

    Returns:
        The executed module.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the path does not name a .py file.
    """
    full = os.path.abspath(path)
    if not full.endswith(".py"):
        raise ValueError(f"reward function file must be a .py file, got {path!r}")
    if not os.path.isfile(full):
        raise FileNotFoundError(f"reward function file not found: {path!r} (resolved to {full})")
    stem = os.path.splitext(os.path.basename(full))[0]
    name = f"pebr_reward_fn_{stem}_{next(_module_ids)}"
    spec = importlib.util.spec_from_file_location(name, full)
    assert spec is not None and spec.loader is not None  # a .py path always has a source loader
    module = importlib.util.module_from_spec(spec)
    # Registered before running so that dataclasses and pickling inside the file can find it.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _function_from(module: ModuleType, name: str, path: str) -> Callable[..., Any]:
    if not hasattr(module, name):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise AttributeError(f"reward function file {path!r} has no function {name!r}; it defines {public}")
    function = getattr(module, name)
    if not callable(function):
        raise TypeError(f"{name!r} in reward function file {path!r} is a {type(function).__name__}, not a function")
    return function


def load_reward_function(spec: str) -> Callable[..., Any]:
    """Load ``path/to/file.py:function`` (the function defaults to compute_score).

    Args:
        spec: the file and function name, separated by a colon.

    Returns:
        The function object.

    Raises:
        FileNotFoundError: if the file does not exist.
        AttributeError: if the file does not define the function.
        TypeError: if the name is bound to something that is not callable.
    """
    path, name = _split_spec(spec)
    return _function_from(load_reward_module(path), name, path)


def resolve_options(defaults: Mapping[str, Any], overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Defaults updated by overrides, rejecting keys that are not among the defaults.

    Reward files use this so that a misspelt key in reward_function_kwargs (say "clip_wieght")
    is an error instead of a silently ignored setting.

    Args:
        defaults: every accepted key with its default value.
        overrides: the user's values.
        where: name shown in the error (the reward file).

    Returns:
        A new dict with all default keys.

    Raises:
        KeyError: naming the unknown keys and the accepted ones.
        TypeError: a value of another kind than its default's: a number for a number (finite; "0.4" from a
            quoted YAML value would fail only at the first product, blamed on a sample), a bool for a bool.
    """
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise KeyError(
            f"unknown reward_function_kwargs {unknown} for {where}; accepted keys: {sorted(defaults)}"
        )
    for key, value in overrides.items():
        default = defaults[key]
        if isinstance(default, bool):
            wrong = not isinstance(value, bool)
        elif isinstance(default, numbers.Real):
            wrong = isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
        else:
            continue
        if wrong:
            raise TypeError(f"reward_function_kwargs {key}={value!r} for {where} must be "
                            f"{'true or false' if isinstance(default, bool) else 'a finite number'} "
                            f"(default {default!r})")
    return {**defaults, **overrides}


def check_whole_numbers(options: Mapping[str, Any], minimums: Mapping[str, int], where: str) -> None:
    """Refuse a setting that counts something (a batch size, retries) unless it is a whole number of at least its
    minimum: 2.5 or -1 would fail later, far from the setting, or quietly do nothing.

    Raises:
        ValueError: naming the key, its value, the reward file and the minimum.
    """
    for key, minimum in minimums.items():
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise ValueError(f"reward_function_kwargs {key}={value!r} for {where} must be a whole number >= {minimum}")


def _describe(index: int, item: Any) -> str:
    """One line that identifies an input: its index, qid and the start of its response."""
    if not isinstance(item, Mapping):
        return f"input #{index} ({type(item).__name__})"
    response = str(item.get("response", ""))
    preview = response[:_PREVIEW_CHARS] + ("..." if len(response) > _PREVIEW_CHARS else "")
    qid, truth = item.get("qid", "?"), item.get("ground_truth")
    return f"input #{index} (qid={qid!r}, ground_truth={truth!r}, response={preview!r})"


class RewardManager:
    """Calls a user reward function on a batch and validates its output.

    Args:
        reward_function: ``path/to/file.py:function``.
        reward_type: "batch" (the function takes the list of inputs) or "sequential" (it takes one
            input dict and returns one dict).
        reward_function_kwargs: keyword arguments passed to the function (and to ``setup``).
        require_overall: whether every output must contain "overall".

    Raises:
        ValueError: for an unknown reward_type.
        FileNotFoundError, AttributeError, TypeError: from loading the function.
        Exception: whatever the file's ``setup`` raises for a bad configuration.
    """

    def __init__(
        self,
        reward_function: str,
        reward_type: str = "batch",
        reward_function_kwargs: dict | None = None,
        require_overall: bool = True,
    ) -> None:
        if reward_type not in REWARD_TYPES:
            raise ValueError(f"worker.reward.reward_type must be one of {REWARD_TYPES}, got {reward_type!r}")
        self.spec = reward_function
        self.reward_type = reward_type
        self.kwargs = dict(reward_function_kwargs or {})
        self.require_overall = require_overall
        path, name = _split_spec(reward_function)
        self.module = load_reward_module(path)
        self.function = _function_from(self.module, name, path)
        declared = getattr(self.module, "REWARD_TYPE", None)
        if declared is not None and declared != reward_type:
            raise ValueError(f"{path} declares REWARD_TYPE = {declared!r}: its functions take "
                             f"{'the list of inputs' if declared == 'batch' else 'one input'}, so set "
                             f"worker.reward.reward_type={declared} (it is {reward_type})")
        setup = getattr(self.module, "setup", None)
        if callable(setup):
            setup(**self.kwargs)

    def compute(self, inputs: list[dict]) -> list[dict[str, float]]:
        """Score a batch.

        Args:
            inputs: one dict per response (see the module docstring for the keys).

        Returns:
            One dict per input, every value a finite Python float, all dicts with the same keys.

        Raises:
            RewardFunctionError: if the function raises (the message names the offending input) or
                returns a list of the wrong length, a non-dict, a non-finite or non-numeric value,
                no "overall" when it is required, or dicts with different keys.
        """
        if self.reward_type == "sequential":
            outputs = [self._call_one(index, item) for index, item in enumerate(inputs)]
        else:
            outputs = self._call_batch(inputs)
        return self._validate(inputs, outputs)

    def _call_one(self, index: int, item: dict) -> Any:
        try:
            return self.function(item, **self.kwargs)
        except Exception as exc:
            raise RewardFunctionError(
                f"reward function {self.spec} raised {type(exc).__name__}: {exc} on {_describe(index, item)}"
            ) from exc

    def _call_batch(self, inputs: list[dict]) -> Any:
        try:
            return self.function(inputs, **self.kwargs)
        except RewardUnavailable as exc:
            raise RewardFunctionError(f"reward function {self.spec} could not score a batch of {len(inputs)}: "
                                      f"{exc}") from exc
        except Exception as exc:
            culprit = self._find_culprit(inputs)
            where = culprit if culprit else f"a batch of {len(inputs)} (no single input fails alone)"
            raise RewardFunctionError(
                f"reward function {self.spec} raised {type(exc).__name__}: {exc} on {where}"
            ) from exc

    def _find_culprit(self, inputs: list[dict]) -> str | None:
        """Name the input that breaks a failed batch, halving the batch until one input is left: about 2 log2 N
        calls over N inputs in all (one call per input took 4481 calls for a stage-1 batch that failed only
        together). When the first two inputs each fail alone, a setting or the function is the likelier cause,
        and the message says so. None: no half fails alone (the batch fails only together)."""
        def fails(items: list[dict]) -> bool:
            try:
                self.function(items, **self.kwargs)
            except Exception:  # noqa: BLE001 - any failure points at these inputs
                return True
            return False

        if len(inputs) > 1 and fails(inputs[:1]) and fails(inputs[1:2]):
            return (f"every input tried alone ({_describe(0, inputs[0])}; {_describe(1, inputs[1])}): check "
                    "worker.reward.reward_function_kwargs and the reward function rather than the data")
        low, high = 0, len(inputs)  # inputs[low:high] fails
        while high - low > 1:
            middle = (low + high) // 2
            if fails(inputs[low:middle]):
                high = middle
            elif fails(inputs[middle:high]):
                low = middle
            else:
                return None
        return _describe(low, inputs[low])

    def _validate(self, inputs: list[dict], outputs: Any) -> list[dict[str, float]]:
        if not isinstance(outputs, (list, tuple)):
            raise RewardFunctionError(
                f"reward function {self.spec} must return a list of dicts, got {type(outputs).__name__}"
            )
        if len(outputs) != len(inputs):
            raise RewardFunctionError(
                f"reward function {self.spec} returned {len(outputs)} results for {len(inputs)} inputs"
            )
        checked = [self._check_one(index, inputs[index], output) for index, output in enumerate(outputs)]
        if checked:
            keys = set(checked[0])
            for index, scores in enumerate(checked):
                if set(scores) != keys:
                    raise RewardFunctionError(
                        f"reward function {self.spec} returned keys {sorted(scores)} for "
                        f"{_describe(index, inputs[index])} but {sorted(keys)} for input #0"
                    )
        return checked

    def _check_one(self, index: int, item: dict, output: Any) -> dict[str, float]:
        def fail(problem: str) -> RewardFunctionError:
            return RewardFunctionError(f"reward function {self.spec} returned {problem} for {_describe(index, item)}")

        if not isinstance(output, Mapping):
            raise fail(f"a {type(output).__name__} instead of a dict")
        if self.require_overall and "overall" not in output:
            raise fail(f"no 'overall' score (keys: {sorted(output)})")
        scores: dict[str, float] = {}
        for key, value in output.items():
            # numbers.Real covers int, float, bool and numpy's numbers; numpy's bool is not registered as one.
            # Tensors and strings are refused.
            if not isinstance(value, (numbers.Real, np.bool_)):
                raise fail(f"{key}={value!r} ({type(value).__name__}), not a number")
            if not isinstance(key, str):  # str(1) and "1" would become one key, one value lost
                raise fail(f"the key {key!r} ({type(key).__name__}); score names are strings")
            try:
                number = float(value)
            except OverflowError:  # an int past float's range
                raise fail(f"{key}={str(value)[:12]}... ({len(str(value))} digits), not a finite number") from None
            if not math.isfinite(number):
                raise fail(f"{key}={value}, not a finite number")
            scores[key] = number
        return scores
