"""PeBR reward terms (pure functions), the CLIP scorer and the reward-function manager.

- `pebr.rewards.terms`: format, accuracy, keyword recall, length and CLIP-alignment terms.
- `pebr.rewards.clip`: `ClipScorer`, image-caption cosine similarity with a CLIP-family model.
- `pebr.rewards.manager`: `RewardManager`, which loads ``path/to/file.py:function`` and validates
  its output. The stage reward files live in ``examples/reward_function/``.
"""

from pebr.rewards.manager import RewardFunctionError, RewardManager, RewardUnavailable, load_reward_function
from pebr.rewards.terms import (
    accuracy_reward,
    clip_alignment_reward,
    extract_final_answer,
    extract_image_description,
    format_reward,
    keyword_recall,
    length_reward,
)

__all__ = [
    "RewardFunctionError",
    "RewardManager",
    "RewardUnavailable",
    "load_reward_function",
    "accuracy_reward",
    "clip_alignment_reward",
    "extract_final_answer",
    "extract_image_description",
    "format_reward",
    "keyword_recall",
    "length_reward",
]
