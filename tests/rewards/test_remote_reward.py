"""examples/reward_function/remote.py against a real HTTP server in this process: chunks, order, retries, errors."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from pebr.rewards.manager import RewardFunctionError, RewardManager, load_reward_module

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = os.path.join(ROOT, "examples", "reward_function", "remote.py")
remote = load_reward_module(SPEC)


class Service:
    """A scoring service: overall = response length / 10; `failures` holds statuses to answer first, in order."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.failures: list[int] = []
        self.reply: bytes | None = None  # a fixed reply instead of the scores
        self.delay_s = 0.0
        self.barrier: threading.Barrier | None = None  # requests that must all be in flight at once
        self.redirect_to: str | None = None
        self.cut_short = 0  # replies to cut off mid-body first
        self.lock = threading.Lock()


@pytest.fixture
def service() -> Iterator[tuple[Service, str]]:
    state = Service()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append(body)
                state.headers.append(dict(self.headers))
                failure = state.failures.pop(0) if state.failures else None
                cut, state.cut_short = state.cut_short > 0, max(state.cut_short - 1, 0)
            if state.barrier is not None:
                state.barrier.wait()  # raises BrokenBarrierError if the others never come
            time.sleep(state.delay_s)
            if state.redirect_to:
                self.send_response(302)
                self.send_header("Location", state.redirect_to)
                self.end_headers()
                return
            if cut:  # promises 1000 bytes, sends 10, closes
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b'{"scores":')
                self.close_connection = True
                return
            if failure is not None:
                self.send_response(failure)
                self.end_headers()
                self.wfile.write(b"model is loading")
                return
            reply = state.reply or json.dumps({"scores": [
                {"overall": len(x["response"]) / 10, "question_chars": float(len(x["question"]))}
                for x in body["inputs"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/score"
    finally:
        server.shutdown()
        server.server_close()


def inputs(count: int, image: Image.Image | None = None) -> list[dict]:
    return [{"qid": f"q{i}", "question": "<image>How many cubes?" * (i % 2 + 1), "response": "x" * i,
             "response_length": i, "ground_truth": "3", "key_word": ["cube"], "image": image,
             "images": [image] if image else []} for i in range(count)]


def test_chunks_come_back_in_order_from_concurrent_requests(service):
    state, url = service
    state.barrier = threading.Barrier(3, timeout=30)  # the server answers only once all 3 chunks are in flight
    scores = remote.compute_score(inputs(7), url=url, batch_size=3, concurrency=3)
    assert [s["overall"] for s in scores] == [i / 10 for i in range(7)]
    assert [s["question_chars"] for s in scores] == [22.0, 44.0] * 3 + [22.0]
    assert sorted(len(r["inputs"]) for r in state.requests) == [1, 3, 3]
    assert remote.compute_score([], url=url) == [] and len(state.requests) == 3  # nothing to ask
    sent = state.requests[0]["inputs"][0]
    assert set(sent) == {"qid", "question", "response", "response_length", "ground_truth", "key_word"}  # no images
    assert "Authorization" not in state.headers[0]


def test_images_and_a_token_from_the_environment(service, monkeypatch):
    state, url = service
    monkeypatch.setenv("SCORER_TOKEN", "s3cret")
    encoded = []
    monkeypatch.setattr(remote, "_png", lambda image, png=remote._png: encoded.append(image) or png(image))
    image = Image.new("RGB", (28, 56), (255, 0, 0))
    remote.compute_score(inputs(2, image), url=url, send_images=True, api_key_env="SCORER_TOKEN")
    assert encoded == [image]  # the two responses of one prompt share its image: encoded once
    (request,) = state.requests
    decoded = Image.open(io.BytesIO(base64.b64decode(request["inputs"][1]["images"][0])))
    assert decoded.size == (28, 56) and decoded.getpixel((0, 0)) == (255, 0, 0)
    assert state.headers[0]["Authorization"] == "Bearer s3cret"
    with pytest.raises(ValueError, match="the environment variable MISSING_TOKEN is not set"):
        remote.setup(url=url, api_key_env="MISSING_TOKEN")


def test_a_busy_service_is_asked_again_and_a_refusal_is_not(service):
    state, url = service
    state.failures = [503, 429, 502]
    t0 = time.time()
    scores = remote.compute_score(inputs(2), url=url, backoff_s=0.05)
    assert [s["overall"] for s in scores] == [0.0, 0.1] and len(state.requests) == 4
    assert time.time() - t0 >= 0.05 + 0.1 + 0.2  # backoff, then twice as long each time
    state.requests.clear()
    state.cut_short = 1  # a reply cut off mid-body is asked for again
    assert len(remote.compute_score(inputs(2), url=url, backoff_s=0.01)) == 2 and len(state.requests) == 2
    state.requests.clear()
    state.failures = [400]
    with pytest.raises(RuntimeError, match=r"answered HTTP 400 Bad Request: 'model is loading' for chunk 1 of 1"):
        remote.compute_score(inputs(2), url=url, backoff_s=0.05)
    assert len(state.requests) == 1
    state.failures = [503] * 3
    with pytest.raises(RuntimeError, match=r"HTTP 503 .* 3 attempt\(s\)"):
        remote.compute_score(inputs(2), url=url, retries=2, backoff_s=0.01)


def test_a_service_that_stays_down_costs_one_round_of_retries(service):
    """Through the reward manager: retries + 1 requests, not three times that (the manager scores inputs alone to
    find a culprit only for a failure that may be an input's)."""
    state, url = service
    state.failures = [503] * 10
    manager = RewardManager(f"{SPEC}:compute_score", reward_function_kwargs={"url": url, "retries": 1,
                                                                            "backoff_s": 0.01})
    with pytest.raises(RewardFunctionError, match=r"could not score a batch of 4: .*HTTP 503 .* 2 attempt\(s\)"):
        manager.compute(inputs(4))
    assert len(state.requests) == 2


def test_a_redirect_is_not_followed(service):
    """urllib would resend the POST to the Location as a GET, token included: refused, naming both addresses."""
    state, url = service
    state.redirect_to = "http://elsewhere.invalid/score"
    with pytest.raises(RuntimeError, match=r"answered HTTP 302 .* a redirect to 'http://elsewhere.invalid/score', "
                                           r"which is not followed"):
        remote.compute_score(inputs(1), url=url)
    assert len(state.requests) == 1


def test_a_slow_or_absent_service_fails_naming_it(service):
    state, url = service
    state.delay_s = 0.5
    with pytest.raises(RuntimeError, match=r"no answer \(.*timed out.*2 attempt\(s\)"):
        remote.compute_score(inputs(1), url=url, timeout_s=0.1, retries=1, backoff_s=0.01)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/score"
    with pytest.raises(RuntimeError, match=rf"{closed}: no answer \(ConnectionRefusedError"):
        remote.compute_score(inputs(1), url=closed, retries=0)


@pytest.mark.parametrize("reply, message", [
    (b"<html>oops</html>", "not a JSON object with a \"scores\" list"),
    (b'{"scores": [{"overall": 1.0}]}', "returned 1 scores for chunk 1 of 1 .* of 2 inputs"),
])
def test_a_reply_of_the_wrong_shape_is_refused(service, reply, message):
    state, url = service
    state.reply = reply
    with pytest.raises(RuntimeError, match=message):
        remote.compute_score(inputs(2), url=url)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "url='': give the service's http:// or https:// address"),
    ({"url": "scorer:8000"}, "give the service's"),
    ({"url": "http://x", "retries": -1}, "retries=-1 for remote.py must be a whole number >= 0"),
    ({"url": "http://x", "batch_size": 2.5}, "batch_size=2.5 for remote.py must be a whole number >= 1"),
    ({"url": "http://x", "timeout_s": 0}, "timeout_s=0 must be above 0"),
    ({"url": "http://x", "backoff_s": -1}, "backoff_s=-1 must be 0 or more"),
    ({"url": "http://x", "timout_s": 5}, "unknown reward_function_kwargs"),
])
def test_settings_are_checked_at_start_up(kwargs, message):
    with pytest.raises((ValueError, KeyError), match=message):
        RewardManager(f"{SPEC}:compute_score", reward_function_kwargs=kwargs)


def test_through_the_reward_actor(service, ray_session):
    """The trainer's path: a RewardWorker actor in its own process calls the service; a service that refuses
    every request ends the call with the manager's error naming the service."""
    from pebr.workers.reward import RewardWorker

    state, url = service
    worker = RewardWorker.remote(f"{SPEC}:compute_score", "batch", {"url": url, "batch_size": 2})
    try:
        scores = ray_session.get(worker.compute.remote(inputs(3)), timeout=120)
        assert [s["overall"] for s in scores] == [0.0, 0.1, 0.2]
        state.failures = [403] * 10
        with pytest.raises(ray_session.exceptions.RayTaskError) as err:
            ray_session.get(worker.compute.remote(inputs(3)), timeout=120)
        assert isinstance(err.value.cause, RewardFunctionError)
        assert f"{url} answered HTTP 403 Forbidden" in str(err.value.cause)
    finally:
        ray_session.kill(worker)
