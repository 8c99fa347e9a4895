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
connect, times out, is cut off, or is answered with HTTP 408, 429, 500, 502, 503 or 504 is sent again up to
`retries` times, after `backoff_s` seconds, then twice as long each time; any other HTTP status (a redirect
included: it is not followed, so neither the POST body nor the token goes anywhere but `url`) ends the step at
once with the status and the start of the service's reply. `api_key_env` names an environment variable holding
a bearer token (a token written in the settings would be saved with every checkpoint's config.yaml); the reward
actor must see that variable (on a multi-node cluster, in the Ray runtime environment).

`timeout_s` bounds each wait on the socket, not a whole request. Every call, retries included, must end within
trainer.worker_timeout_s. A service that stays unavailable through the retries raises `RewardUnavailable`, so the
step stops after retries + 1 requests; any other failure (a refused request, a reply of the wrong shape) is scored
again by the reward manager on inputs alone, to name the input it fails on.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pebr.rewards.manager import RewardUnavailable, check_whole_numbers, resolve_options

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
    check_whole_numbers(options, {"retries": 0, "batch_size": 1, "concurrency": 1}, os.path.basename(__file__))
    if not options["timeout_s"] > 0:
        raise ValueError(f"reward_function_kwargs timeout_s={options['timeout_s']!r} must be above 0")
    if options["backoff_s"] < 0:
        raise ValueError(f"reward_function_kwargs backoff_s={options['backoff_s']!r} must be 0 or more")
    name = options["api_key_env"]
    if name and not os.environ.get(name):
        raise ValueError(f"reward_function_kwargs api_key_env={name!r}: the environment variable {name} is not set "
                         "(or empty) in the reward actor's process")
    return options


def setup(**kwargs: Any) -> None:
    """Check the settings once at start-up (the trainer's start-up probe then scores one response through the
    service, so an unreachable one stops the run before any rollout)."""
    _options(kwargs)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect becomes an HTTP error: urllib would resend the POST as a body-less GET, with the token, to
    wherever the Location header points."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _png(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _payload(item: dict[str, Any], pngs: dict[int, str] | None) -> dict[str, Any]:
    """One input as sent. `pngs` (None: no images) holds the encodings made so far in this call, by image object:
    the n responses of a prompt share its image objects, which stay alive for the call."""
    fields = {key: item.get(key) for key in ("qid", "question", "response", "response_length", "ground_truth",
                                              "key_word")}
    if pngs is not None:
        images = item.get("images") or []
        for image in images:
            if id(image) not in pngs:
                pngs[id(image)] = _png(image)
        fields["images"] = [pngs[id(image)] for image in images]
    return fields


def _error_reply(err: urllib.error.HTTPError) -> str:
    try:
        return err.read().decode("utf-8", "replace")[:_REPLY_PREVIEW]
    except (OSError, http.client.HTTPException):  # the error's own body failed to arrive
        return ""


def _post(body: bytes, size: int, options: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The scores of one chunk of `size` inputs; retried as the module docstring says."""
    url = options["url"]
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if options["api_key_env"]:
        headers["Authorization"] = f"Bearer {os.environ[options['api_key_env']]}"
    attempts = options["retries"] + 1
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=options["timeout_s"]) as reply:
                raw = reply.read()
            break
        except urllib.error.HTTPError as err:
            problem = f"HTTP {err.code} {err.reason}: {_error_reply(err)!r}"
            if 300 <= err.code < 400:
                raise RuntimeError(f"{url} answered {problem} for {where}, a redirect to "
                                   f"{err.headers.get('Location')!r}, which is not followed: set url to the "
                                   "address that answers") from None
            if err.code not in RETRY_STATUSES:
                raise RuntimeError(f"{url} answered {problem} for {where}") from None
        except (OSError, http.client.HTTPException) as err:  # refused, timed out, cut off (URLError is an OSError)
            reason = err.reason if isinstance(err, urllib.error.URLError) else err
            problem = f"no answer ({type(reason).__name__}: {reason})"
        if attempt == attempts:  # (no input's fault: the manager does not score inputs alone to find one)
            raise RewardUnavailable(f"{url}: {problem} for {where}, {attempts} attempt(s) "
                                    "(reward_function_kwargs retries, timeout_s)")
        time.sleep(options["backoff_s"] * 2 ** (attempt - 1))
    try:
        scores = json.loads(raw)["scores"]
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(f"{url} replied {raw[:_REPLY_PREVIEW]!r} for {where}, not a JSON object with a "
                           "\"scores\" list") from None
    if not isinstance(scores, list) or len(scores) != size:
        count = len(scores) if isinstance(scores, list) else type(scores).__name__
        raise RuntimeError(f"{url} returned {count} scores for {where} of {size} inputs")
    return scores


def compute_score(reward_inputs: list[dict], **kwargs: Any) -> list[dict[str, float]]:
    """Scores of a batch from the service, in the inputs' order (the reward manager checks each dict)."""
    options = _options(kwargs)
    size = options["batch_size"]
    chunks = [reward_inputs[start:start + size] for start in range(0, len(reward_inputs), size)]
    if not chunks:
        return []
    pngs: dict[int, str] | None = {} if options["send_images"] else None
    bodies = [json.dumps({"inputs": [_payload(item, pngs) for item in chunk]}).encode() for chunk in chunks]
    pool = ThreadPoolExecutor(max_workers=min(options["concurrency"], len(chunks)))
    try:
        futures = [pool.submit(_post, body, len(chunk), options,
                               f"chunk {k + 1} of {len(chunks)} (qids {chunk[0].get('qid')!r}..)")
                   for k, (body, chunk) in enumerate(zip(bodies, chunks))]
        return [s for future in futures for s in future.result()]
    finally:
        # On a failed chunk, the chunks not yet sent are dropped rather than waited for, retries and all.
        pool.shutdown(wait=False, cancel_futures=True)
