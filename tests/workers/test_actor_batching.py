"""Packed (padding-free) and token-budget micro-batches in the actor, checked against the padded fixed-size path.

Single process, tiny fp32 model, no Ray: torch.distributed is not initialised, so update_policy runs as
world size 1 and the all_reduce that agrees on the micro-batch count is the identity.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import random

import pytest
import torch

from pebr.config import (
    ActorConfig,
    AlgorithmConfig,
    ConfigError,
    OptimConfig,
    load_config,
)
from pebr.algorithms.losses import ppo_policy_loss
from pebr.protocol import Batch
from pebr.workers import actor as actor_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU = torch.device("cpu")
# (image size or None for a text-only prompt, prompt text): prompts of different lengths, images of 3 sizes.
PROMPTS = [((56, 56), "How many cubes?"), ((112, 112), "Subtract all red cubes. How many objects are left?"),
           (None, "Are there more spheres than cylinders in the image shown there?"), ((84, 56), "What color?")]
RESPONSE_LENGTHS = [1, 17, 9, 24, 3, 12, 20, 6]  # two responses per prompt, deliberately unsorted


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from a second thread, and with the cores shared by other jobs two OpenMP
    threads spin against each other (measured: 16 s instead of 0.4 s for one update test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    m = actor_lib.load_hf_model(tiny_model_dir)
    m.config.use_cache = False
    return m


@pytest.fixture(scope="module")
def varlen_model(tiny_model_dir):
    """The same weights with the attention that worker.actor.padding_free loads (pebr.workers.attention)."""
    m = actor_lib.load_hf_model(tiny_model_dir, padding_free=True)
    m.config.use_cache = False
    return m


@pytest.fixture
def packing_model(request, model, varlen_model):
    """The model a packed row runs through: the trainer's varlen attention, or plain SDPA (transformers then
    builds a block-diagonal mask from the positions). Both must match the padded SDPA forward."""
    return {"varlen": varlen_model, "sdpa": model}[request.param]


def make_batch(processor, seed: int = 0) -> Batch:
    """8 samples: each prompt of PROMPTS twice, with random-pixel images and random response tokens."""
    from PIL import Image

    rng = random.Random(seed)
    tok = processor.tokenizer
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    prompt_ids, response_ids, images = [], [], []
    for k, (size, text) in enumerate(PROMPTS):
        content = ([{"type": "image"}] if size else []) + [{"type": "text", "text": text}]
        chat = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        ims = []
        if size:
            pixels = bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3))
            ims = [Image.frombytes("RGB", size, pixels)]
        ids = processor(text=[chat], images=ims or None, return_tensors="pt")["input_ids"][0].tolist()
        for j in range(2):
            prompt_ids.append(ids)
            response_ids.append([rng.choice(vocab) for _ in range(RESPONSE_LENGTHS[2 * k + j])])
            images.append(ims)
    return Batch(prompt_ids=prompt_ids, response_ids=response_ids, images=images, non_tensors={})


@pytest.fixture(scope="module")
def batch(processor) -> Batch:
    return make_batch(processor)


# -- images -----------------------------------------------------------------------------------------
def test_image_tokens_without_their_images_are_refused(processor, batch):
    """A Batch whose images were left behind (what a worker's generate returns before the controller puts them
    back): the model read the image tokens as text, and the log-probs came out 0.2 nats off, silently."""
    stripped = Batch(prompt_ids=batch.prompt_ids, response_ids=batch.response_ids,
                     images=[[] for _ in batch.images], non_tensors={})
    with pytest.raises(ValueError, match=r"a micro-batch of 8 sequences holds \d+ image tokens, and its 0 images "
                                         r"make 0: the Batch's images do not go with its ids"):
        actor_lib.collate(stripped, processor, torch.device("cpu"))
    actor_lib.collate(batch, processor, torch.device("cpu"))  # (the whole Batch passes)




def test_the_patch_embedding_by_matmul_gives_the_conv3ds_logits_and_gradients(tiny_model_dir, model, processor):
    """`load_hf_model` computes the vision patch embedding as a matrix product (its stride-equals-kernel Conv3d
    is linear in the patch): the logits and every gradient, the Conv3d weight's included, are those of the
    model as transformers runs it, and the parameters keep their names."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    plain = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                        attn_implementation="sdpa")
    assert type(model.model.visual.patch_embed).forward is type(plain.model.visual.patch_embed).forward
    assert "forward" in vars(model.model.visual.patch_embed) and "forward" not in vars(plain.model.visual.patch_embed)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    content = [{"type": "image"}, {"type": "text", "text": "How many?"}]
    chat = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    rng = random.Random(3)
    image = Image.frombytes("RGB", (112, 84), bytes(rng.randrange(256) for _ in range(112 * 84 * 3)))
    inputs = processor(text=[chat], images=[image], return_tensors="pt")
    grads = []
    for m in (model, plain):
        m.zero_grad()
        logits = m(**inputs, use_cache=False).logits
        logits.float().logsumexp(-1).sum().backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
        m.zero_grad()
    (ours, our_grads), (theirs, their_grads) = grads
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert our_grads.keys() == their_grads.keys() and "model.visual.patch_embed.proj.weight" in our_grads
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_shared_images_are_processed_once_with_the_same_tensors(processor, batch):
    """The n responses of a prompt share its image object, through a pickle round trip too; the distinct
    objects' pixels, taken in `image_order`, are exactly the tensors of processing every entry."""
    import pickle

    shipped = pickle.loads(pickle.dumps(batch))
    images = [im for ims in shipped.images for im in ims]
    assert len(images) == 6 and len({id(im) for im in images}) == 3
    images.append(copy.deepcopy(images[0]))  # equal pixels, another object: processed on its own, still right
    want = processor.image_processor(images=images, return_tensors="pt")
    pixel_values, grid, order = actor_lib.image_inputs(images, processor)
    assert order.tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert torch.equal(grid, want["image_grid_thw"])
    every = actor_lib.every_image_copy({"pixel_values": pixel_values, "image_grid_thw": grid, "image_order": order})
    assert torch.equal(every["pixel_values"], want["pixel_values"])


@pytest.mark.parametrize("padding_free", [False, True])
def test_encoding_each_distinct_image_once_gives_the_same_logprobs_and_gradients(model, varlen_model, processor, batch,
                                                                               padding_free):
    model = varlen_model if padding_free else model
    shuffled = batch.select([3, 6, 0, 5, 2, 7, 1, 4])  # copies of an image apart, distinct images interleaved
    inputs = actor_lib.model_inputs(model, shuffled, processor, CPU, padding_free)
    assert inputs["image_order"].tolist() == [0, 1, 2, 0, 1, 2]
    assert inputs["pixel_values"].shape[0] * 2 == actor_lib.every_image_copy(inputs)["pixel_values"].shape[0]
    results = []
    for layout in (inputs, actor_lib.every_image_copy(inputs)):
        model.zero_grad()
        logp, _ = actor_lib.response_logprobs(model, layout)
        logp.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "visual" in n and p.grad is not None}
        results.append((logp.detach(), grads))
    model.zero_grad()
    (once, once_grads), (every, every_grads) = results
    assert torch.allclose(once, every, atol=1e-5)
    assert once_grads.keys() == every_grads.keys() and len(once_grads) > 10
    for name in once_grads:
        assert torch.allclose(once_grads[name], every_grads[name], rtol=1e-4, atol=1e-6), name
    assert not hasattr(model.model, "get_image_features") or "get_image_features" not in vars(model.model)


# -- packed layout ----------------------------------------------------------------------------------


def test_logprobs_are_those_of_the_sampling_temperature_by_the_full_logits(model, processor, batch):
    """log_softmax(logits / T) at each response token, from the model's full logits: the layouts are compared
    with each other elsewhere, this is the number itself (a temperature left out would pass those)."""
    model.eval()
    inputs = actor_lib.collate(batch, processor, CPU)
    forward = {k: v for k, v in inputs.items()
               if k not in ("response_mask", "response_index", "predictor_index", "image_order")}
    with torch.no_grad():
        logp, entropy = actor_lib.response_logprobs(model, inputs, temperature=0.7, with_entropy=True)
        with actor_lib.images_encoded_once(model, inputs.get("image_order")):
            logits = model(**forward, use_cache=False).logits
    valid = inputs["response_mask"].bool()
    width = inputs["input_ids"].shape[1]
    predictors, positions = inputs["predictor_index"][valid], inputs["response_index"][valid]
    rows = logits[predictors // width, predictors % width].float() / 0.7
    labels = inputs["input_ids"].flatten()[positions]
    expected = torch.log_softmax(rows, -1).gather(-1, labels[:, None])[:, 0]
    torch.testing.assert_close(logp[valid], expected, atol=1e-5, rtol=0)
    probs = torch.softmax(rows, -1)
    torch.testing.assert_close(entropy[valid], -(probs * torch.log_softmax(rows, -1)).sum(-1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("packing_model", ["varlen", "sdpa"], indirect=True)
def test_packed_logprobs_and_entropies_match_padded(model, packing_model, processor, batch):
    model.eval()
    padded = actor_lib.collate(batch, processor, CPU)
    packed = actor_lib.collate_packed(batch, processor, CPU, packing_model)
    lengths = actor_lib.sequence_lengths(batch)
    assert packed["input_ids"].shape == (1, sum(lengths))  # no pad token computed
    assert padded["input_ids"].numel() > sum(lengths)  # while the padded layout has some
    with torch.no_grad():
        logp_pad, ent_pad = actor_lib.response_logprobs(model, padded, temperature=0.7, with_entropy=True)
        logp_pack, ent_pack = actor_lib.response_logprobs(packing_model, packed, temperature=0.7, with_entropy=True)
        # Same row without the text-position row: attention is then causal over the whole row, so later
        # sequences see earlier ones. The comparison above must be able to tell.
        leaky = dict(packed, position_ids=packed["position_ids"][1:])
        logp_leaky, _ = actor_lib.response_logprobs(packing_model, leaky, temperature=0.7)
    assert logp_pack.shape == logp_pad.shape == (len(batch), max(RESPONSE_LENGTHS))
    mask = batch.response_mask()
    assert torch.all(logp_pack[mask == 0] == 0) and torch.all(ent_pack[mask == 0] == 0)
    assert torch.all(logp_pack[mask == 1] < 0)
    torch.testing.assert_close(logp_pack, logp_pad, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_pack, ent_pad, atol=1e-5, rtol=0)
    assert (logp_leaky - logp_pad).abs().max() > 1e-3


def test_padded_rows_through_the_varlen_model_are_exact(model, varlen_model, processor, batch):
    """transformers builds no mask for the varlen attention, so a right-padded row is causal over its pads:
    the real tokens come out as with SDPA and its mask."""
    inputs = actor_lib.collate(batch, processor, CPU)
    assert not inputs["attention_mask"].all()
    with torch.no_grad():
        want, _ = actor_lib.response_logprobs(model, inputs)
        got, _ = actor_lib.response_logprobs(varlen_model, inputs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("packing_model", ["varlen", "sdpa"], indirect=True)
def test_packed_gradients_match_padded(model, packing_model, processor, batch):
    weights = torch.randn(batch.response_mask().shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for padding_free, m in ((False, model), (True, packing_model)):
        m.train()
        m.zero_grad(set_to_none=True)
        inputs = actor_lib.model_inputs(m, batch, processor, CPU, padding_free)
        logp, entropy = actor_lib.response_logprobs(m, inputs, with_entropy=True)
        assert not entropy.requires_grad  # a metric: its [B, T, V] graph is not kept for the backward
        (logp * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        m.zero_grad(set_to_none=True)
    padded, packed = grads
    assert set(padded) == set(packed)
    assert any(n.startswith("model.visual") for n in padded), "the vision tower must be in the comparison"
    for name, g in padded.items():
        gap = (packed[name] - g).norm()
        assert gap <= 1e-4 * g.norm() + 1e-9, f"{name}: |packed - padded| = {gap:.3e}, |padded| = {g.norm():.3e}"


# -- a shared prompt laid out once (share_prompts) -------------------------------------------------------


def test_a_shared_prompt_is_laid_out_once_and_gives_the_padded_logprobs(model, varlen_model, processor, batch):
    shuffled = batch.select([3, 6, 0, 5, 2, 7, 1, 4])  # a prompt's responses apart: laid out together anyway
    assert shuffled.prompt_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    padded = actor_lib.collate(shuffled, processor, CPU)
    shared = actor_lib.model_inputs(varlen_model, shuffled, processor, CPU, padding_free=True, share_prompts=True)
    prompts = {tuple(p) for p in shuffled.prompt_ids}
    assert shared["input_ids"].shape[1] == sum(map(len, prompts)) + sum(RESPONSE_LENGTHS)
    assert shared["image_grid_thw"].shape[0] == 3 and shared["image_order"].tolist() == [0, 1, 2]
    model.eval(), varlen_model.eval()
    with torch.no_grad():
        logp_pad, ent_pad = actor_lib.response_logprobs(model, padded, temperature=0.7, with_entropy=True)
        logp, ent = actor_lib.response_logprobs(varlen_model, shared, temperature=0.7, with_entropy=True)
        # Every first response token predicted from the token before it in the row (the previous response's
        # last token for a later response) instead of the prompt's last one: the comparison must tell.
        wrong = dict(shared, predictor_index=shared["response_index"] - 1)
        logp_wrong, _ = actor_lib.response_logprobs(varlen_model, wrong, temperature=0.7)
    torch.testing.assert_close(logp, logp_pad, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ent_pad, atol=1e-5, rtol=0)
    assert (logp_wrong - logp_pad).abs().max() > 1e-3


def test_a_shared_prompt_with_two_images_gives_the_padded_logprobs(model, varlen_model, processor):
    """Two images in one prompt: only the first sample's image entries enter the row, in order."""
    from PIL import Image

    images = [Image.new("RGB", (56, 56), (200, 30, 30)), Image.new("RGB", (84, 56), (30, 30, 200))]
    chat = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which image is redder?"}]}],
        add_generation_prompt=True, tokenize=False)
    ids = processor(text=[chat], images=images, return_tensors="pt")["input_ids"][0].tolist()
    two = Batch(prompt_ids=[ids] * 3, response_ids=[[11, 12, 13], [14], [15, 16]], images=[images] * 3,
                non_tensors={})
    batch = Batch.concat([two, make_batch(processor).select([0, 1])])
    shared = actor_lib.model_inputs(varlen_model, batch, processor, CPU, padding_free=True, share_prompts=True)
    assert shared["image_grid_thw"].shape[0] == 3 and shared["image_order"].tolist() == [0, 1, 2]
    with torch.no_grad():
        want, _ = actor_lib.response_logprobs(model.eval(), actor_lib.collate(batch, processor, CPU))
        got, _ = actor_lib.response_logprobs(varlen_model.eval(), shared)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_shared_prompt_gives_the_padded_gradients(model, varlen_model, processor, batch):
    weights = torch.randn(batch.response_mask().shape, generator=torch.Generator().manual_seed(3))
    grads = []
    for m, layout in ((model, {"padding_free": False}), (varlen_model, {"padding_free": True, "share_prompts": True})):
        m.train()
        m.zero_grad(set_to_none=True)
        logp, _ = actor_lib.response_logprobs(m, actor_lib.model_inputs(m, batch, processor, CPU, **layout))
        (logp * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        m.zero_grad(set_to_none=True)
    padded, shared = grads
    assert set(padded) == set(shared) and any(n.startswith("model.visual") for n in padded)
    for name, g in padded.items():
        gap = (shared[name] - g).norm()
        assert gap <= 1e-4 * g.norm() + 1e-9, f"{name}: |shared - padded| = {gap:.3e}, |padded| = {g.norm():.3e}"


def test_token_budgets_count_a_shared_prompt_once():
    # Two prompts of 10 tokens, three responses each of 2, 3, 4 tokens: 12, 13, 14 tokens per sequence.
    lengths = [12, 13, 14, 12, 13, 14]
    units = [[0, 1, 2], [3, 4, 5]]
    # Whole sequences: 39 tokens a prompt; a budget of 40 holds one prompt's three.
    assert actor_lib.image_group_budget_groups(lengths, 40, units) == [[2, 1, 0], [5, 4, 3]]  # longest first
    # The prompt once: 10 + 9 = 19 tokens a prompt, both in one micro-batch of 38.
    assert actor_lib.image_group_budget_groups(lengths, 40, units, shared=[10, 10]) == [[2, 1, 0, 5, 4, 3]]
    # A budget of 15 cuts a prompt's responses into pieces, each with the prompt: 10 + 3 + 2 and 10 + 4.
    assert actor_lib.image_group_budget_groups(lengths, 15, units, shared=[10, 10]) == [[1, 0], [4, 3], [2], [5]]


@pytest.mark.slow
@pytest.mark.parametrize("padding_free", [False, True])
def test_compiled_decoder_layers_give_the_same_logprobs_and_gradients(model, varlen_model, processor, batch, padding_free):
    """worker.actor.use_torch_compile: the same numbers as eager, padded (SDPA inside the graph) and packed (the
    varlen attention left out of it), for two micro-batches of different lengths (dynamic shapes)."""
    eager = varlen_model if padding_free else model
    compiled = copy.deepcopy(eager)
    actor_lib.compile_decoder_layers(compiled)
    weights = torch.randn(batch.response_mask().shape, generator=torch.Generator().manual_seed(2))
    for part in (batch.select(range(0, 5)), batch.select(range(5, 8))):
        results = []
        for m in (eager, compiled):
            m.train()
            m.zero_grad(set_to_none=True)
            inputs = actor_lib.model_inputs(m, part, processor, CPU, padding_free)
            logp, _ = actor_lib.response_logprobs(m, inputs)
            (logp * weights[:len(part), :logp.shape[1]]).sum().backward()
            results.append((logp.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
            m.zero_grad(set_to_none=True)
        (want, want_grads), (got, got_grads) = results
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert set(got_grads) == set(want_grads)
        for name, g in want_grads.items():
            gap = (got_grads[name] - g).norm()
            assert gap <= 1e-4 * g.norm() + 1e-9, f"{name}: |compiled - eager| = {gap:.3e}, |eager| = {g.norm():.3e}"
    # The layers really run compiled: their forward is torch.compile's wrapper, not the module's method.
    assert all(hasattr(layer.forward, "_torchdynamo_orig_callable") for layer in actor_lib.decoder_layers(compiled))


# -- token-budget micro-batches ---------------------------------------------------------------------


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize("budget", [1, 40, 100, 250, 10_000])
def test_token_budget_groups_cover_every_sample_within_budget(padding_free, budget):
    lengths = [random.Random(s).randint(5, 120) for s in range(23)]
    groups = actor_lib.token_budget_groups(lengths, budget, padding_free)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        tokens = actor_lib.micro_batch_tokens([lengths[i] for i in g], padding_free)
        assert tokens <= budget or len(g) == 1, (g, tokens)
    if budget == 1:
        assert len(groups) == len(lengths)  # every sequence is over budget: one each
    if budget == 10_000:
        assert len(groups) == 1
    # Longest first, filled in order: a group never holds a sequence longer than one of an earlier group.
    for a, b in itertools.pairwise(groups):
        assert min(lengths[i] for i in a) >= max(lengths[i] for i in b)

    for count in range(len(groups), len(lengths) + 1, 3):
        split = actor_lib.split_to_count(groups, count, lengths, padding_free)
        assert len(split) == count and all(split)
        assert sorted(i for g in split for i in g) == list(range(len(lengths)))
        for g in split:
            tokens = actor_lib.micro_batch_tokens([lengths[i] for i in g], padding_free)
            assert tokens <= budget or len(g) == 1
    with pytest.raises(ValueError, match="non-empty"):
        actor_lib.split_to_count(groups, len(lengths) + 1, lengths, padding_free)


def test_packed_groups_keep_a_prompts_responses_together_by_hand():
    lengths, units = [6, 5, 4, 3, 3, 2], [[0, 1], [2, 3], [4, 5]]
    # Units of 11, 7 and 5 tokens, largest first into the first group they fit.
    assert actor_lib.image_group_budget_groups(lengths, 11, units) == [[0, 1], [2, 3], [4, 5]]
    assert actor_lib.image_group_budget_groups(lengths, 12, units) == [[0, 1], [2, 3, 4, 5]]
    # A unit over the budget is cut as token_budget_groups cuts it ([6], [5, 4], [3]); the pieces are then packed.
    assert actor_lib.image_group_budget_groups([6, 5, 4, 3], 9, [[0, 1, 2, 3]]) == [[1, 2], [0, 3]]


def test_packed_plan_encodes_each_image_once_when_its_responses_fit_the_budget(batch):
    """Sorted by length, a prompt's responses spread over the micro-batches, and each encodes the image again."""
    lengths = actor_lib.sequence_lengths(batch)
    largest_unit = max(sum(lengths[i] for i in unit) for unit in batch.image_groups())
    budget = largest_unit + 10

    def encodings(plan):
        return sum(actor_lib.distinct_images(batch.select(idx)) for idx in plan)

    packed = actor_lib.plan_micro_batches(batch, 2, budget, True, CPU)
    by_length = actor_lib.token_budget_groups(lengths, budget, padding_free=True)
    assert sorted(i for g in packed for i in g) == list(range(len(batch)))
    assert all(actor_lib.micro_batch_tokens([lengths[i] for i in g], True) <= budget for g in packed)
    assert encodings(packed) == actor_lib.distinct_images(batch) == 3
    assert encodings(by_length) > encodings(packed)


def test_padded_token_count_is_count_times_longest():
    assert actor_lib.micro_batch_tokens([10, 30, 20], padding_free=False) == 90
    assert actor_lib.micro_batch_tokens([10, 30, 20], padding_free=True) == 60
    # Padded, a budget of 99 fits [50] and [10, 10] but not [50, 10] (2 x 50 tokens): by length, not by position.
    assert actor_lib.token_budget_groups([10, 50, 10], 99, padding_free=False) == [[1], [0, 2]]
    assert actor_lib.token_budget_groups([10, 50, 10], 100, padding_free=False) == [[1, 0], [2]]
    assert actor_lib.token_budget_groups([10, 50, 10], 70, padding_free=True) == [[1, 0, 2]]


def _plan_on_rank(rank: int, world: int, init_method: str, out_dir: str) -> None:
    """One gloo rank: rank 0 has short sequences (one micro-batch would do), rank 1 long ones (three)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        length = 10 if rank == 0 else 100
        batch = Batch(prompt_ids=[[1] * length] * 6, response_ids=[[2]] * 6, images=[[]] * 6)
        plan = actor_lib.plan_micro_batches(batch, 2, 250, True, CPU)
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(plan, f)
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_number_of_micro_batches(tmp_path):
    # Forked, not spawned: a spawned child would spend seconds importing torch and this module again.
    torch.multiprocessing.start_processes(_plan_on_rank, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path)),
                                          nprocs=2, start_method="fork")
    plans = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert [len(p) for p in plans] == [3, 3]  # rank 0 splits its single group to match rank 1
    for plan in plans:
        assert sorted(i for g in plan for i in g) == list(range(6))


@pytest.mark.parametrize("padding_free", [False, True])
def test_dynamic_compute_logprobs_keeps_the_order(model, varlen_model, processor, batch, padding_free):
    budget = 200
    plan = actor_lib.plan_micro_batches(batch, 3, budget, padding_free, CPU)
    flat = [i for g in plan for i in g]
    assert sorted(flat) == list(range(len(batch))) and flat != sorted(flat), "the plan must reorder for this test"
    assert len(plan) > 1
    lengths = actor_lib.sequence_lengths(batch)
    for g in plan:
        assert actor_lib.micro_batch_tokens([lengths[i] for i in g], padding_free) <= budget or len(g) == 1

    fixed = actor_lib.compute_logprobs(model, batch, processor, CPU, 3, 1.0)
    dynamic = actor_lib.compute_logprobs(varlen_model if padding_free else model, batch, processor, CPU, 3, 1.0,
                                         padding_free=padding_free, max_token_len=budget)
    for a, b in zip(dynamic, fixed):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# -- update_policy --------------------------------------------------------------------------------


def experience(model, processor, batch: Batch) -> Batch:
    """The batch with old / ref log-probs off the current policy (so ratios and KL are not trivial) and advantages."""
    gen = torch.Generator().manual_seed(2)
    mask = batch.response_mask()
    logp, _ = actor_lib.compute_logprobs(model, batch, processor, CPU, 8, 1.0)
    out = batch.select(range(len(batch)))
    out.tensors["response_mask"] = mask
    out.tensors["old_logprobs"] = (logp + 0.1 * torch.randn(mask.shape, generator=gen)) * mask
    out.tensors["ref_logprobs"] = (logp + 0.3 * torch.randn(mask.shape, generator=gen)) * mask
    out.tensors["advantages"] = torch.randn(len(batch), 1, generator=gen) * mask
    return out


def run_update(model, processor, batch: Batch, mini_batch_size: int | None = None, first_on_policy: bool = False,
               **actor_kw) -> dict[str, float]:
    """One update_policy call (one optimizer step per mini-batch; one mini-batch by default) on a copy of `model`."""
    policy = copy.deepcopy(model)
    cfg = ActorConfig(**{"micro_batch_size_per_device_for_update": 2, **actor_kw})
    optimizer, scheduler = actor_lib.build_optimizer(policy, OptimConfig(lr=1e-3), total_steps=4)
    return actor_lib.update_policy(policy, optimizer, scheduler, batch, processor, CPU, cfg, AlgorithmConfig(),
                                   temperature=1.0, mini_batch_size=mini_batch_size or len(batch),
                                   first_on_policy=first_on_policy)


def test_update_policy_frees_the_gradients_it_stepped_with(model, processor, batch):
    """The last mini-batch's gradients were held until the next update, through the rollout and the log-prob
    passes (fp32 shards: about 4.7 GiB a GPU at 7 B over 7 GPUs)."""
    policy = copy.deepcopy(model)
    optimizer, scheduler = actor_lib.build_optimizer(policy, OptimConfig(lr=1e-3), total_steps=4)
    exp = experience(model, processor, batch)
    metrics = actor_lib.update_policy(policy, optimizer, scheduler, exp, processor, CPU, ActorConfig(),
                                      AlgorithmConfig(), temperature=1.0, mini_batch_size=len(batch) // 2)
    assert metrics["actor/grad_norm"] > 0 and len(optimizer.state) > 0  # it did step
    assert [name for name, p in policy.named_parameters() if p.grad is not None] == []


def test_update_policy_gradient_is_that_of_the_whole_mini_batch_loss(model, processor, batch):
    """The layouts below are compared with each other; this pins the gradient itself, element by element: plain
    autograd of the token-mean PPO loss plus kl_coef x the token-mean KL, over the whole mini-batch in one padded
    forward (a flipped sign or a doubled scale in update_policy's backward passed every layout test)."""
    from pebr.algorithms.losses import agg_loss, kl_penalty

    exp = experience(model, processor, batch)
    policy = copy.deepcopy(model)
    optimizer, scheduler = actor_lib.build_optimizer(policy, OptimConfig(lr=1e-3), total_steps=4)
    stepped_with: dict[str, torch.Tensor] = {}
    optimizer.register_step_pre_hook(lambda *_: stepped_with.update(
        {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}))
    # (no clipping: the optimizer steps with the loss's own gradient, which here has a norm above the default 1.0)
    cfg = ActorConfig(micro_batch_size_per_device_for_update=2, max_grad_norm=1e6)
    algo = AlgorithmConfig()
    assert algo.use_kl_loss and algo.kl_coef > 0  # (the KL term is in the loss)
    actor_lib.update_policy(policy, optimizer, scheduler, exp, processor, CPU, cfg, algo, temperature=1.0,
                            mini_batch_size=len(batch))
    reference = copy.deepcopy(model)
    inputs = actor_lib.collate(batch, processor, CPU)
    logp, _ = actor_lib.response_logprobs(reference, inputs)
    width, mask = logp.shape[1], inputs["response_mask"]
    pg, _ = ppo_policy_loss(exp.tensors["old_logprobs"][:, :width], logp, exp.tensors["advantages"][:, :width], mask,
                            clip_ratio_low=cfg.clip_ratio_low, clip_ratio_high=cfg.clip_ratio_high,
                            clip_ratio_dual=cfg.clip_ratio_dual, loss_agg_mode="token-mean")
    kl = agg_loss(kl_penalty(logp, exp.tensors["ref_logprobs"][:, :width], algo.kl_penalty), mask, "token-mean")
    (pg + algo.kl_coef * kl).backward()
    want = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert stepped_with.keys() == want.keys() and want
    for name, grad in want.items():
        torch.testing.assert_close(stepped_with[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("loss_avg_mode", ["token", "seq"])
def test_update_policy_is_the_same_for_every_micro_batch_layout(model, varlen_model, processor, batch, loss_avg_mode):
    exp = experience(model, processor, batch)
    base = run_update(model, processor, exp, loss_avg_mode=loss_avg_mode)
    assert base["actor/grad_norm"] > 0 and base["actor/kl_loss"] > 0
    # The value itself: the PPO loss of the whole mini-batch at the starting weights, averaged over tokens
    # (token) or over sequences of token means (seq), which differ on these responses of 1 to 24 tokens.
    logp, _ = actor_lib.compute_logprobs(model, batch, processor, CPU, 8, 1.0)
    cfg = ActorConfig()
    modes = {"token": "token-mean", "seq": "seq-mean-token-mean"}
    whole = {mode: ppo_policy_loss(exp.tensors["old_logprobs"], logp, exp.tensors["advantages"],
                                   exp.tensors["response_mask"], clip_ratio_low=cfg.clip_ratio_low,
                                   clip_ratio_high=cfg.clip_ratio_high, clip_ratio_dual=cfg.clip_ratio_dual,
                                   loss_agg_mode=agg)[0].item() for mode, agg in modes.items()}
    assert abs(whole["token"] - whole["seq"]) > 1e-3
    assert base["actor/pg_loss"] == pytest.approx(whole[loss_avg_mode], rel=1e-4, abs=1e-6)
    variants = {"dynamic": {"dynamic_batching": True, "max_token_len_per_gpu": 150},
                "dynamic packed": {"dynamic_batching": True, "max_token_len_per_gpu": 150, "padding_free": True},
                "packed": {"padding_free": True}}
    for name, kw in variants.items():
        got = run_update(varlen_model if kw.get("padding_free") else model, processor, exp,
                         loss_avg_mode=loss_avg_mode, **kw)
        # The per-token metrics too: token means over the mini-batch, not means of micro-batch means.
        for key in ("actor/pg_loss", "actor/kl_loss", "actor/grad_norm", "actor/entropy", "actor/ppo_kl",
                    "actor/pg_clipfrac", "actor/pg_clipfrac_lower"):
            assert got[key] == pytest.approx(base[key], rel=1e-4, abs=1e-7), (name, key)


def test_an_empty_response_leaves_the_seq_mode_loss_the_same_for_every_micro_batch_size(model, processor, batch):
    """agg_loss's row mean leaves out a row without tokens; the micro-batch weights and the global row count must
    too, or the gradient depends on which micro-batch the empty row falls in (it did: -0.239 / -0.181 / -0.273)."""
    short = Batch(prompt_ids=batch.prompt_ids, response_ids=[[]] + batch.response_ids[1:], images=batch.images,
                  non_tensors={})
    exp = experience(model, processor, short)
    logp, _ = actor_lib.compute_logprobs(model, short, processor, CPU, 8, 1.0)
    whole = ppo_policy_loss(exp.tensors["old_logprobs"], logp, exp.tensors["advantages"], exp.tensors["response_mask"],
                            loss_agg_mode="seq-mean-token-mean")[0].item()
    runs = {size: run_update(model, processor, exp, loss_avg_mode="seq", micro_batch_size_per_device_for_update=size)
            for size in (1, 2, 8)}
    for size, got in runs.items():
        assert got["actor/pg_loss"] == pytest.approx(whole, rel=1e-4, abs=1e-6), size
        assert got["actor/grad_norm"] == pytest.approx(runs[8]["actor/grad_norm"], rel=1e-4), size


def test_a_skipped_optimizer_step_is_counted_and_the_others_norms_stay_readable(model, processor, batch):
    exp = experience(model, processor, batch)
    exp.tensors["advantages"][1, 0] = float("nan")  # poisons the first of two mini-batches
    half = len(batch) // 2
    metrics = run_update(model, processor, exp, mini_batch_size=half)
    second = exp.select(range(half, len(batch)))
    alone = run_update(model, processor, second)
    assert metrics["actor/skipped_optimizer_steps"] == 1
    assert metrics["actor/grad_norm"] == pytest.approx(alone["actor/grad_norm"], rel=1e-5)  # was nan
    assert alone["actor/skipped_optimizer_steps"] == 0


@pytest.mark.parametrize("ppo_epochs", [1, 2])
def test_the_first_mini_batch_takes_its_old_logprobs_from_the_update(model, processor, batch, ppo_epochs):
    """Two mini-batches: the update computing the first one's old log-probs itself gives what the old
    log-prob pass gives, and hands those log-probs and entropies back (a second epoch then uses them)."""
    exp = experience(model, processor, batch)
    old, entropy = actor_lib.compute_logprobs(model, batch, processor, CPU, 8, 1.0)
    exp.tensors["old_logprobs"] = old
    half = len(batch) // 2
    with_pass = run_update(model, processor, exp, mini_batch_size=half, ppo_epochs=ppo_epochs)

    exp = experience(model, processor, batch)
    exp.tensors["old_logprobs"] = old.clone()
    exp.tensors["old_logprobs"][:half] = 0.0  # never read: the update writes them
    from_update = run_update(model, processor, exp, mini_batch_size=half, first_on_policy=True,
                             ppo_epochs=ppo_epochs)
    for key in ("actor/pg_loss", "actor/kl_loss", "actor/grad_norm", "actor/ppo_kl"):
        assert from_update[key] == pytest.approx(with_pass[key], rel=1e-4, abs=1e-6), key
    mask = batch.response_mask()
    torch.testing.assert_close(exp.tensors["old_logprobs"] * mask, old * mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(exp.tensors["entropy"][:half] * mask[:half], entropy[:half] * mask[:half],
                               atol=1e-5, rtol=0)


def test_one_on_policy_mini_batch_needs_no_old_logprobs_at_all(model, processor, batch):
    exp = experience(model, processor, batch)
    del exp.tensors["old_logprobs"]
    metrics = run_update(model, processor, exp, first_on_policy=True)
    assert metrics["actor/ppo_kl"] == 0.0 and metrics["actor/pg_clipfrac"] == 0.0  # ratio exactly 1
    assert exp.tensors["old_logprobs"].shape == (len(batch), int(batch.response_lengths.max()))
    off_policy = experience(model, processor, batch)
    del off_policy.tensors["old_logprobs"]
    with pytest.raises(KeyError, match="old_logprobs"):  # not on-policy, and no old log-probs given
        run_update(model, processor, off_policy)


def test_dynamic_batching_needs_a_positive_token_budget(tiny_model_dir, synthetic_data_dir):
    argv = [f"config={ROOT}/examples/pebr_stage2.yaml", f"config={ROOT}/examples/pebr_cpu.yaml",
            f"worker.actor.model.model_path={tiny_model_dir}", f"data.train_files={synthetic_data_dir}/train.json",
            "worker.actor.dynamic_batching=true"]
    assert load_config([*argv, "worker.actor.max_token_len_per_gpu=1"]).worker.actor.dynamic_batching
    with pytest.raises(ConfigError, match="worker.actor.max_token_len_per_gpu"):
        load_config([*argv, "worker.actor.max_token_len_per_gpu=0"])
    # Without dynamic batching the budget is unused, so it is not checked.
    load_config([*argv[:-1], "worker.actor.dynamic_batching=false", "worker.actor.max_token_len_per_gpu=0"])


def _update_on_rank(rank: int, world: int, init_method: str, out: str, model_dir: str, exp: Batch,
                    shares: list[list[int]]) -> None:
    """One gloo rank of an FSDP2 update of its share, in a spawned process (a forked one can hang in an OpenMP
    pool the test process started before the fork)."""
    import torch.distributed as dist
    from transformers import AutoProcessor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        model = actor_lib.load_hf_model(model_dir)
        policy = actor_lib.shard_model(model, param_dtype=torch.float32, cpu_offload=False)
        optimizer, scheduler = actor_lib.build_optimizer(policy, OptimConfig(lr=1e-3), total_steps=4)
        mine = exp.select(shares[rank])
        metrics = actor_lib.update_policy(policy, optimizer, scheduler, mine, AutoProcessor.from_pretrained(model_dir),
                                          CPU, ActorConfig(micro_batch_size_per_device_for_update=2),
                                          AlgorithmConfig(), temperature=1.0, mini_batch_size=len(mine))
        full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for n, p in policy.named_parameters()}
        if rank == 0:
            torch.save({"weights": full, "grad_norm": metrics["actor/grad_norm"]}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_rank_whose_micro_batch_has_no_image_trains_with_the_others(tiny_model_dir, model, processor, batch,
                                                                      tmp_path):
    """Rank 0's first micro-batch is the text-only prompt's two responses while rank 1 has images in every one;
    with the vision tower trained, the ranks used to reduce different gradients and the update aborted."""
    exp = experience(model, processor, batch)
    assert [bool(exp.images[i]) for i in (4, 5)] == [False, False]
    shares = [[4, 5, 0, 1], [2, 3, 6, 7]]
    out = str(tmp_path / "rank0.pt")
    torch.multiprocessing.start_processes(
        _update_on_rank, args=(2, f"file://{tmp_path}/rendezvous", out, tiny_model_dir, exp, shares), nprocs=2,
        start_method="spawn")
    saved = torch.load(out)
    two_ranks = saved["weights"]
    one_rank = copy.deepcopy(model)
    optimizer, scheduler = actor_lib.build_optimizer(one_rank, OptimConfig(lr=1e-3), total_steps=4)
    metrics = actor_lib.update_policy(one_rank, optimizer, scheduler, exp, processor, CPU,
                                      ActorConfig(micro_batch_size_per_device_for_update=2), AlgorithmConfig(),
                                      temperature=1.0, mini_batch_size=len(exp))
    # A first AdamW step is nearly m / sqrt(v), blind to the gradient's scale: the norm before clipping is what
    # shows a gradient summed instead of averaged over the ranks, or scaled by their number.
    assert saved["grad_norm"] == pytest.approx(metrics["actor/grad_norm"], rel=1e-4)
    before = {n: p.detach() for n, p in model.named_parameters()}
    for name, p in one_rank.named_parameters():
        torch.testing.assert_close(two_ranks[name], p.detach(), atol=1e-5, rtol=1e-4, msg=name)
    assert max(float((two_ranks[n] - before[n]).abs().max()) for n in before) > 1e-4  # the update did something
    assert any("visual" in n and not torch.equal(two_ranks[n], before[n]) for n in before)  # the vision tower too


def test_warm_up_then_cosine_to_the_floor_by_hand():
    """worker.actor.optim: lr_warmup_steps=2, warmup_style=cosine, min_lr_ratio=0.1, over 6 steps; the schedule
    advances once per RL step."""
    optimizer, scheduler = actor_lib.build_optimizer(
        torch.nn.Linear(1, 1), OptimConfig(lr=1.0, lr_warmup_steps=2, warmup_style="cosine", min_lr_ratio=0.1),
        total_steps=6)
    rates = []
    for _ in range(7):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    # Warm-up (k + 1) / 2; then 0.1 + 0.9 * (1 + cos(pi * (k - 2) / 4)) / 2.
    assert rates == pytest.approx([0.5, 1.0, 1.0, 0.868198, 0.55, 0.231802, 0.1], abs=1e-6)
