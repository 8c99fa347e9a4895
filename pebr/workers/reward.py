"""Ray actors for rewards: the reward worker and the shared CLIP scorer.

`RewardWorker` runs a `RewardManager` in its own process, so the trainer can start scoring a batch
(``ref = worker.compute.remote(inputs)``) and collect it later with ``ray.get(ref)`` while other
work proceeds.

`get_clip_scorer` returns the one CLIP scorer of the job: a named actor ("pebr_clip_scorer"), created
by the first caller and found by the others, that loads the model once and scores a batch per call.
Without Ray (tests, a notebook) it returns an in-process scorer instead. Nothing here starts Ray:
importing this module only defines classes.
"""

from __future__ import annotations

import functools
import inspect
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import ray
from PIL import Image

from pebr.config import looks_like_model_id
from pebr.rewards.manager import RewardManager

if TYPE_CHECKING:
    from pebr.rewards.clip import ClipScorer

__all__ = ["RewardWorker", "ClipScorerActor", "RemoteClipScorer", "get_clip_scorer", "CLIP_ACTOR_NAME"]

CLIP_ACTOR_NAME = "pebr_clip_scorer"
# GPU share of the CLIP actor on GPU clusters (FG-CLIP large is about 0.5 B parameters, so a slice
# of one card is enough). The trainer's GPU workers must leave this much free on some card.
DEFAULT_CLIP_GPU_FRACTION = 0.1
# How long to wait for the CLIP actor to be scheduled and loaded before calling it a resource problem.
_START_TIMEOUT_S = 600.0
# How long a dying scorer may keep its name before a new one can take it.
_DEAD_NAME_WAIT_S = 60.0

# In-process scorers by (model path, settings): a scorer asked for with other settings is another scorer.
_local_scorers: dict[tuple[str, str], ClipScorer] = {}


class Scorer(Protocol):
    """What the reward files use: one call per batch."""

    def score(self, images: Sequence[Image.Image], captions: Sequence[str]) -> list[float]: ...


# num_cpus=0: reward scoring is light next to training; asking for a CPU here could leave a CPU-only
# cluster whose cores all belong to training workers unable to place the actor at all. The trainer
# can ask for more with RewardWorker.options(num_cpus=...).
@ray.remote(num_cpus=0)
class RewardWorker(RewardManager):
    """A `RewardManager` in a Ray actor: the same constructor arguments and `compute`.

    Constructor errors (a bad reward file, a missing CLIP path) surface on the first method call:
    call ``ray.get(worker.ready.remote())`` right after creation to fail at start-up.
    """

    def ready(self) -> bool:
        """True once the reward function is loaded and its setup has run."""
        return True


@ray.remote(num_cpus=0)
class ClipScorerActor:
    """A `ClipScorer` in a Ray actor; created through `get_clip_scorer`."""

    def __init__(self, model_path: str, **scorer_kwargs: Any) -> None:
        from pebr.rewards.clip import ClipScorer

        self.scorer = ClipScorer(model_path, **scorer_kwargs)
        self.scorer_kwargs = _non_default(scorer_kwargs)

    def settings(self) -> tuple[str, dict[str, Any]]:
        """The model path and the settings (those not at their defaults) the scorer was created with."""
        return self.scorer.model_path, self.scorer_kwargs

    def device(self) -> str:
        return str(self.scorer.device)

    def score(self, images: Sequence[Image.Image], captions: Sequence[str]) -> list[float]:
        return self.scorer.score(images, captions)


class RemoteClipScorer:
    """Calls the shared CLIP actor and waits for the result, so callers need not know about Ray.

    Args:
        actor: handle of a `ClipScorerActor`.
        reconnect: returns a live scorer actor; called once when `actor` has died (its owner, the reward
            worker that created it, ended: a run started right after another in the same Ray session).
    """

    def __init__(self, actor: ray.actor.ActorHandle,
                 reconnect: Callable[[], ray.actor.ActorHandle] | None = None) -> None:
        self.actor = actor
        self.reconnect = reconnect

    def score(self, images: Sequence[Image.Image], captions: Sequence[str]) -> list[float]:
        """See `ClipScorer.score`."""
        try:
            return ray.get(self.actor.score.remote(list(images), list(captions)))
        except ray.exceptions.RayActorError as exc:
            if exc.actor_init_failed or self.reconnect is None:
                raise
            self.actor = self.reconnect()
            return ray.get(self.actor.score.remote(list(images), list(captions)))


def _non_default(scorer_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The settings of a `ClipScorer` that differ from its defaults: what tells two scorers apart."""
    from pebr.rewards.clip import ClipScorer

    defaults = {name: p.default for name, p in inspect.signature(ClipScorer.__init__).parameters.items()}
    return {k: v for k, v in scorer_kwargs.items() if k not in defaults or v != defaults[k]}


def _cluster_has_gpus() -> bool:
    # Ray hides the cards from actors that asked for none (CUDA_VISIBLE_DEVICES=""), so inside a
    # CPU-only RewardWorker torch.cuda.is_available() is False even on a GPU node: ask Ray too.
    import torch

    return torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) > 0


def get_clip_scorer(
    model_path: str,
    use_ray: bool | None = None,
    num_gpus: float | None = None,
    **scorer_kwargs: Any,
) -> Scorer:
    """The job's CLIP scorer for `model_path`, created on first use.

    Args:
        model_path: local directory of the CLIP-family model, or a hub id ("org/name"), which the scorer
            fetches or takes from the Hugging Face cache where it runs (see `resolve_model_dir`).
        use_ray: None: the shared actor when Ray is initialised, in-process otherwise; True/False
            force one or the other.
        num_gpus: GPU share of the actor; default `DEFAULT_CLIP_GPU_FRACTION` when the cluster (or
            this process) has GPUs, else 0.
        **scorer_kwargs: passed to `ClipScorer` (device, dtype, max_text_length, batch_size,
            trust_remote_code, image_size) when the scorer is created.

    Returns:
        An object with ``score(images, captions) -> list[float]``.

    Raises:
        FileNotFoundError: if model_path is neither a directory nor a hub id the scorer can fetch.
        ValueError: if the shared actor already exists for a different model or other settings.
        RuntimeError: if the actor cannot be scheduled or loaded within 10 minutes.
    """
    if os.path.isdir(os.path.expanduser(model_path)):
        model_path = os.path.abspath(os.path.expanduser(model_path))
    elif not looks_like_model_id(model_path):
        raise FileNotFoundError(f"CLIP model directory not found: {model_path!r} (clip_model_path)")
    if use_ray is None:
        use_ray = ray.is_initialized()
    if not use_ray:
        key = (model_path, repr(sorted(_non_default(scorer_kwargs).items())))
        if key not in _local_scorers:
            from pebr.rewards.clip import ClipScorer

            _local_scorers[key] = ClipScorer(model_path, **scorer_kwargs)
        return _local_scorers[key]

    if num_gpus is None:
        num_gpus = DEFAULT_CLIP_GPU_FRACTION if _cluster_has_gpus() else 0
    connect = functools.partial(_scorer_actor, model_path, num_gpus, scorer_kwargs)
    return RemoteClipScorer(connect(), reconnect=connect)


def _scorer_actor(model_path: str, num_gpus: float, scorer_kwargs: dict[str, Any]) -> ray.actor.ActorHandle:
    """The live scorer actor for `model_path`, created when none is (see `get_clip_scorer`)."""
    wanted = _non_default(scorer_kwargs)
    deadline = time.monotonic() + _DEAD_NAME_WAIT_S
    while True:
        actor = ClipScorerActor.options(name=CLIP_ACTOR_NAME, get_if_exists=True, num_gpus=num_gpus).remote(
            model_path, **scorer_kwargs
        )
        try:
            loaded, settings = ray.get(actor.settings.remote(), timeout=_START_TIMEOUT_S)
            break
        except ray.exceptions.RayActorError as exc:
            # The name still pointed at a scorer whose owner had just died; it is released once Ray has marked the
            # actor dead, and the next call creates a live one. A scorer that failed to load is an error.
            if exc.actor_init_failed or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        except ray.exceptions.GetTimeoutError as exc:
            raise RuntimeError(
                f"the CLIP scorer actor ({num_gpus} GPU) was not ready after {_START_TIMEOUT_S:.0f} s; "
                f"check that the cluster has that much free ({ray.available_resources()})"
            ) from exc
    if loaded != model_path:
        raise ValueError(f"actor {CLIP_ACTOR_NAME!r} already serves {loaded!r}, not {model_path!r}")
    if settings != wanted:
        raise ValueError(f"actor {CLIP_ACTOR_NAME!r} already serves {loaded!r} with the settings {settings}, not "
                         f"{wanted}; one job has one CLIP scorer, so give every reward "
                         "function the same clip_* options")
    return actor
