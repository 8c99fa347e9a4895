"""A reward scored by an HTTP service: a reward-model server, an LLM judge, a code sandbox.

    worker.reward.reward_function=examples/reward_function/remote.py:compute_score
    worker.reward.reward_function_kwargs.url=http://scorer:8000/score

Each call POSTs the batch as JSON, in chunks of `batch_size`, `concurrency` chunks at a time::

    {"inputs": [{"qid": ..., "question": ..., "response": ..., "response_length": ..., "ground_truth": ...,
                 "key_word": [...]}, ...]}

and reads back one dict of scores per input, in the same order, with "overall" (the scalar GRPO optimises);
other keys are logged as reward/<key>::

    {"scores": [{"overall": 0.7, "judge": 0.7}, ...]}

`send_images=true` adds "images": the input's images as base64-encoded PNG files. A chunk whose request cannot
connect, times out, or is answered with HTTP 429 or 5xx is sent again up to `retries` times, after `backoff_s`
seconds, then twice as long each time; any other HTTP error ends the step at once with the status and the start
of the service's reply. `api_key_env` names an environment variable holding a bearer token (a token written in
the settings would be saved with every checkpoint's config.yaml); the reward actor must see that variable (on a
multi-node cluster, in the Ray runtime environment). Every call, retries included, must end within
trainer.worker_timeout_s; a batch that fails is tried again by the reward manager on its first inputs alone, to
name a culprit, so a service that is down is asked up to three times (retries + 1) before the step stops.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pebr.rewards.manager import resolve_options

REWARD_TYPE = "batch"
DEFAULTS: dict[str, Any] = {"url": "", "timeout_s": 60.0, "retries": 3, "backoff_s": 1.0, "batch_size": 64,
                            "concurrency": 4, "send_images": False, "api_key_env": ""}
# Statuses that say "try again later" rather than "this request is wrong".
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_REPLY_PREVIEW = 300  # characters of an error reply shown in the message


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    options = resolve_options(DEFAULTS, kwargs, os.path.basename(__file__))
    url = options["url"]
    if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"worker.reward.reward_function_kwargs.url={url!r}: give the service's http:// or https:// "
                         "address")
    for key in ("retries", "batch_size", "concurrency"):
        if not isinstance(options[key], int) or options[key] < (0 if key == "retries" else 1):
            raise ValueError(f"reward_function_kwargs {key}={options[key]!r} must be a whole number "
                             f"{'>= 0' if key == 'retries' else '>= 1'}")
    for key in ("timeout_s", "backoff_s"):
        if options[key] < 0 or key == "timeout_s" and options[key] == 0:
            raise ValueError(f"reward_function_kwargs {key}={options[key]!r} must be above 0")
    name = options["api_key_env"]
    if name and not os.environ.get(name):
        raise ValueError(f"reward_function_kwargs api_key_env={name!r}: the environment variable {name} is not set "
                         "(or empty) in the reward actor's process")
    return options


def setup(**kwargs: Any) -> None:
    """Check the settings once at start-up (the trainer's start-up probe then scores one response through the
    service, so an unreachable one stops the run before any rollout)."""
    _options(kwargs)


def _png(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _payload(item: dict[str, Any], send_images: bool) -> dict[str, Any]:
    fields = {key: item.get(key) for key in ("qid", "question", "response", "response_length", "ground_truth",
                                              "key_word")}
    if send_images:
        fields["images"] = [_png(image) for image in item.get("images") or []]
    return fields


def _post(chunk: list[dict[str, Any]], options: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The scores of one chunk; retried as the module docstring says."""
    url = options["url"]
    body = json.dumps({"inputs": [_payload(item, options["send_images"]) for item in chunk]}).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if options["api_key_env"]:
        headers["Authorization"] = f"Bearer {os.environ[options['api_key_env']]}"
    attempts = options["retries"] + 1
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=options["timeout_s"]) as reply:
                raw = reply.read()
            break
        except urllib.error.HTTPError as err:
            text = err.read().decode("utf-8", "replace")[:_REPLY_PREVIEW]
            problem = f"HTTP {err.code} {err.reason}: {text!r}"
            if err.code not in RETRY_STATUSES:
                raise RuntimeError(f"{url} answered {problem} for {where}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            reason = err.reason if isinstance(err, urllib.error.URLError) else err
            problem = f"no answer ({type(reason).__name__}: {reason})"
        if attempt == attempts:
            raise RuntimeError(f"{url}: {problem} for {where}, {attempts} attempt(s) "
                               "(reward_function_kwargs retries, timeout_s)")
        time.sleep(options["backoff_s"] * 2 ** (attempt - 1))
    try:
        scores = json.loads(raw)["scores"]
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(f"{url} replied {raw[:_REPLY_PREVIEW]!r} for {where}, not a JSON object with a "
                           "\"scores\" list") from None
    if not isinstance(scores, list) or len(scores) != len(chunk):
        count = len(scores) if isinstance(scores, list) else type(scores).__name__
        raise RuntimeError(f"{url} returned {count} scores for {where} of {len(chunk)} inputs")
    return scores


def compute_score(reward_inputs: list[dict], **kwargs: Any) -> list[dict[str, float]]:
    """Scores of a batch from the service, in the inputs' order (the reward manager checks each dict)."""
    options = _options(kwargs)
    size = options["batch_size"]
    chunks = [reward_inputs[start:start + size] for start in range(0, len(reward_inputs), size)]
    if not chunks:
        return []

    def score(numbered: tuple[int, list[dict]]) -> list[dict[str, Any]]:
        k, chunk = numbered
        return _post(chunk, options, f"chunk {k + 1} of {len(chunks)} (qids {chunk[0].get('qid')!r}..)")

    with ThreadPoolExecutor(max_workers=min(options["concurrency"], len(chunks))) as pool:
        return [s for scores in pool.map(score, enumerate(chunks)) for s in scores]
