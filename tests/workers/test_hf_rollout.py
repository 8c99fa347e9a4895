"""The transformers rollout backend (worker.rollout.name=hf): what it samples and what it hands back, as vLLM does."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from pebr.workers.rollout import HFRollout, SamplingConfig

CPU = torch.device("cpu")
PROMPT = [{"prompt": "<|im_start|>user\nHow many cubes?<|im_end|>\n<|im_start|>assistant\n"}]


def sampling(**kw) -> SamplingConfig:
    return SamplingConfig(**{"n": 1, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_tokens": 12, **kw})


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def rollout(model_dir: str, processor, seed: int | None = None) -> HFRollout:
    return HFRollout(model_dir, processor=processor, device=CPU, dtype=torch.float32, trust_remote_code=False,
                     seed=seed)


@pytest.mark.parametrize("at_step", [1, 4])
def test_a_sampled_endoftext_ends_the_response_and_is_kept(tiny_model_dir, processor, at_step):
    """<|endoftext|> is a stop token and the pad token: it was cut as padding, so the actor never learnt to stop
    there, and as the first token it left an empty response (vLLM keeps it, as the last token)."""
    hf = rollout(tiny_model_dir, processor)
    eot = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    calls = {"n": 0}

    def choose_endoftext(module, args, out):
        calls["n"] += 1
        if calls["n"] == at_step:
            out[..., eot] += 1e4
        return out

    handle = hf.model.lm_head.register_forward_hook(choose_endoftext)
    try:
        response = hf.generate(PROMPT, sampling())[0].responses[0]
    finally:
        handle.remove()
    assert len(response) == at_step and response[-1] == eot


def test_the_models_generation_config_does_not_change_sampling(tiny_model_dir, processor, tmp_path):
    """A checkpoint's generation_config.json (repetition_penalty, no_repeat_ngram_size) is not the run's sampling:
    the actor's log-probs and vLLM know nothing of it."""
    shipped = str(tmp_path / "with_generation_config")
    shutil.copytree(tiny_model_dir, shipped)
    path = os.path.join(shipped, "generation_config.json")
    config = json.load(open(path)) if os.path.exists(path) else {}
    json.dump({**config, "repetition_penalty": 5.0, "no_repeat_ngram_size": 1}, open(path, "w"))
    params = sampling(max_tokens=24)
    plain = rollout(tiny_model_dir, processor).generate(PROMPT, params)[0].responses[0]
    assert len(plain) > len(set(plain))  # greedy repeats itself, which those settings forbid
    assert rollout(shipped, processor).generate(PROMPT, params)[0].responses[0] == plain


def test_seeded_at_start_and_a_seeded_validation_leaves_the_training_stream_alone(tiny_model_dir, processor):
    train, validation = sampling(n=4, temperature=1.0), sampling(temperature=0.5, seed=1)
    first = rollout(tiny_model_dir, processor, seed=3)  # the generator is the process's: one rollout at a time
    a1 = first.generate(PROMPT, train)[0].responses
    first.generate(PROMPT, validation)
    a2 = first.generate(PROMPT, train)[0].responses
    second = rollout(tiny_model_dir, processor, seed=3)
    b1, b2 = (second.generate(PROMPT, train)[0].responses for _ in range(2))
    assert (a1, a2) == (b1, b2) and a1 != a2  # as if no validation had run; two steps sample differently


def test_a_call_at_a_stream_samples_alike_whatever_ran_before(tiny_model_dir, processor):
    """A training rollout at (step, try) draws from a seed of its own: a run resumed at that step (a fresh engine,
    its process's stream at the start) samples what the uninterrupted run sampled there."""
    at = {k: sampling(n=4, temperature=1.0, stream=k) for k in ((2, 1), (3, 1), (2, 2))}
    hf = rollout(tiny_model_dir, processor, seed=3)
    hf.generate(PROMPT, sampling(n=4, temperature=1.0))  # step 1, before streams: moves the process's stream
    uninterrupted = hf.generate(PROMPT, at[(2, 1)])[0].responses
    resumed = rollout(tiny_model_dir, processor, seed=3).generate(PROMPT, at[(2, 1)])[0].responses
    assert resumed == uninterrupted
    assert hf.generate(PROMPT, at[(3, 1)])[0].responses != uninterrupted != hf.generate(PROMPT, at[(2, 2)])[0].responses
    assert rollout(tiny_model_dir, processor, seed=4).generate(PROMPT, at[(2, 1)])[0].responses != uninterrupted


def test_greedy_with_several_responses_gives_that_many_copies(tiny_model_dir, processor):
    """transformers refused greedy search with num_return_sequences > 1, which vLLM answers with n copies: a
    validation at temperature 0 with n > 1 failed at its first call."""
    hf = rollout(tiny_model_dir, processor)
    (one,) = hf.generate(PROMPT, sampling())[0].responses
    assert hf.generate(PROMPT, sampling(n=3))[0].responses == [one] * 3


def test_a_seeded_prompt_samples_alike_whatever_else_is_in_the_call(tiny_model_dir, processor):
    """The seed was set once per call, so a prompt's validation sample depended on the prompts before it (and so
    on val_batch_size and the number of ranks); vLLM seeds every request."""
    hf = rollout(tiny_model_dir, processor)
    other = [{"prompt": "<|im_start|>user\nWhat colour is the ball?<|im_end|>\n<|im_start|>assistant\n"}]
    seeded = sampling(n=2, temperature=1.0, seed=5)
    alone = hf.generate(PROMPT, seeded)[0].responses
    assert hf.generate(other + PROMPT, seeded)[1].responses == alone
    assert hf.generate(PROMPT, sampling(n=2, temperature=1.0, seed=6))[0].responses != alone


def test_a_weight_stream_that_stops_short_is_an_error(tiny_model_dir, processor):
    """The copy took what came (load_state_dict, strict=False): weights never sent stayed at their old values."""
    hf = rollout(tiny_model_dir, processor)
    weights = [(name, p.detach() + 0.01) for name, p in hf.model.named_parameters()]
    hf.load_weights(iter(weights))
    assert all(torch.equal(p, w) for (_, w), p in zip(weights, hf.model.parameters()))
    with pytest.raises(RuntimeError, match=r"stopped short: 2 weights not sent"):
        hf.load_weights(iter(weights[:-2]))
    with pytest.raises(RuntimeError, match="unexpected weight 'no.such.weight'"):
        hf.load_weights(iter([("no.such.weight", torch.zeros(1))]))


def test_seeded_questions_draw_their_own_random_numbers(tiny_model_dir, processor):
    """Every request of a seeded call had the same seed: the untrained model, near uniform, gave every question
    of an evaluation the same sampled text."""
    from pebr.workers.rollout import request_seed

    hf = rollout(tiny_model_dir, processor)
    seeded = sampling(n=1, temperature=1.0, seed=5)
    twins = [dict(PROMPT[0], qid="a"), dict(PROMPT[0], qid="b")]  # one question under two qids
    first, second = hf.generate(twins, seeded)
    assert first.responses != second.responses
    assert hf.generate(twins[1:], seeded)[0].responses == second.responses  # still the same alone
    assert request_seed(5, twins[0]) != request_seed(5, twins[1]) != request_seed(6, twins[1])
    assert request_seed(None, twins[0]) is None
