"""LoRA adapters on the actor's text decoder (worker.actor.model.lora_rank > 0), through peft.

With LoRA only the adapters train; the base weights, the vision tower included, stay frozen. That has two
consequences the worker uses:

* the reference policy is the actor with its adapters switched off (`adapters_disabled`), so no second
  model is loaded;
* the rollout engine and a merged checkpoint get plain weights, W + (alpha / rank) * B @ A, under the base
  model's names (`fold_lora`), so vLLM and transformers load them like any fine-tuned model.

The adapters are injected in place (peft's `inject_adapter_in_model`): the model keeps its class, config and
module paths, and only the targeted linears gain `base_layer`, `lora_A` and `lora_B` children.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterable, Iterator

import torch

# A targeted linear's parameters, as named_parameters() lists them: X.base_layer.weight (and .bias),
# X.lora_A.<adapter>.weight, X.lora_B.<adapter>.weight.
_BASE = ".base_layer."
_ADAPTER = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.(?P<adapter>[^.]+)\.weight$")


def target_pattern(module_names: Iterable[str]) -> str:
    """A regular expression (peft matches it against whole module paths) for the named linears of the text
    decoder's layers. The vision blocks reuse names such as gate_proj, which a plain name list would catch."""
    names = "|".join(re.escape(name) for name in module_names)
    return rf"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({names})"


# The linear layers of a Qwen2.5-VL text decoder layer; "all-linear" (peft's and verl's name) means all of them.
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def target_modules(names: Iterable[str]) -> list[str]:
    """The decoder linears named, "all-linear" expanded, in the decoder's order (so that settings listed in
    another order compare equal).

    Raises:
        ValueError: a name that is not one of `DECODER_LINEARS` or "all-linear".
    """
    names = list(names)
    unknown = sorted(set(names) - {*DECODER_LINEARS, "all-linear"})
    if unknown or not names:
        raise ValueError(f"worker.actor.model.lora_target_modules={names}: {unknown or 'empty'}; name linear layers "
                         f"of the text decoder, {list(DECODER_LINEARS)}, or all-linear")
    return [name for name in DECODER_LINEARS if name in names or "all-linear" in names]


def requested_settings(model_cfg: Any) -> dict[str, Any] | None:
    """{"rank", "alpha", "target_modules"} asked for by a worker.actor.model config; None without LoRA. The same
    dict is stored in checkpoints, and a resume compares the two."""
    if not model_cfg.lora_rank:
        return None
    return {"rank": int(model_cfg.lora_rank), "alpha": float(model_cfg.lora_alpha),
            "target_modules": target_modules(str(name) for name in model_cfg.lora_target_modules)}


def add_lora(model: torch.nn.Module, settings: dict[str, Any]) -> torch.nn.Module:
    """Inject LoRA adapters (B zero, so the model is unchanged until trained) and freeze everything else.

    Raises:
        ValueError: no module of the text decoder matches the target modules.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=settings["rank"], lora_alpha=settings["alpha"], lora_dropout=0.0, bias="none",
                        target_modules=target_pattern(settings["target_modules"]))
    try:
        model = inject_adapter_in_model(config, model)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"worker.actor.model.lora_target_modules={settings['target_modules']} matches no linear "
                         f"layer of the text decoder ({err})") from err
    model.lora_settings = dict(settings)
    return model


def lora_settings(model: torch.nn.Module) -> dict[str, Any] | None:
    """{"rank", "alpha", "target_modules"} of a model given adapters by `add_lora`, else None."""
    return getattr(model, "lora_settings", None)


def scaling(settings: dict[str, Any] | None) -> float:
    """alpha / rank, the factor of B @ A (0 without adapters, for which `fold_lora` never uses it)."""
    return settings["alpha"] / settings["rank"] if settings else 0.0


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` as its base model: every LoRA layer passes its input through `base_layer` only.

    Only the layers' switch is flipped. peft's `enable_adapters` would also clear and then set the adapters'
    requires_grad, and under FSDP2 that reaches only the copies in use at that moment: entered while the
    parameters were sharded (the reference pass first in a step), it left the sharded adapters frozen, every
    later unshard copied the flag, and the next optimizer step had no trainable parameter.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer._disable_adapters = True  # what `disable_adapters` reads
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


def base_name(name: str) -> str:
    """The base model's name of a parameter (`...q_proj.base_layer.weight` -> `...q_proj.weight`)."""
    return name.replace(_BASE, ".")


def folded_names(names: Iterable[str]) -> list[str]:
    """The parameter names `fold_lora` yields for a model with these parameter names (a folded weight comes
    after its bias there, once its B has come by)."""
    return [base_name(name) for name in names if not _ADAPTER.match(name)]


def peft_adapter(state: dict[str, torch.Tensor], settings: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
    """The adapters of a LoRA model's full state dict as peft saves them: (LoraConfig, tensors under peft's file
    names, `base_model.model.<module>.lora_A.weight`), for `PeftModel.from_pretrained(base model, directory)`.

    Raises:
        ValueError: the state holds no adapter.
    """
    from peft import LoraConfig

    config = LoraConfig(r=settings["rank"], lora_alpha=settings["alpha"], lora_dropout=0.0, bias="none",
                        target_modules=target_pattern(settings["target_modules"]))
    tensors = {}
    for name, tensor in state.items():
        match = _ADAPTER.match(name)
        if match:
            tensors[f"base_model.model.{match['module']}.lora_{match['part']}.weight"] = tensor.contiguous()
    if not tensors:
        raise ValueError("no LoRA adapter weights (names with .lora_A. / .lora_B.) in the state dict")
    return config, tensors


def fold_lora(named_tensors: Iterable[tuple[str, torch.Tensor]], scaling: float) -> Iterator[tuple[str, torch.Tensor]]:
    """Plain weights from a LoRA model's (name, tensor) stream: W + scaling * B @ A under the base name.

    Tensors of other parameters pass through (renamed from `.base_layer.`), so a model without adapters streams
    unchanged. A base weight is held until its A and B have come by (named_parameters lists them right after
    it); the sum is new memory, the input tensors are not modified. Computed in fp32, returned in W's dtype.

    Raises:
        ValueError: a LoRA layer whose base weight, A or B never came, or a second adapter.
    """
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in named_tensors:
        match = _ADAPTER.match(name)
        if match is None and not name.endswith(_BASE + "weight"):
            yield base_name(name), tensor
            continue
        if match is None:
            module, part = name[: -len(_BASE + "weight")], "W"
        else:
            if match["adapter"] != "default":
                raise ValueError(f"{name}: only one LoRA adapter ('default') is supported")
            module, part = match["module"], match["part"]
        parts = pending.setdefault(module, {})
        parts[part] = tensor
        if len(parts) == 3:
            del pending[module]
            w = parts["W"]
            delta = parts["B"].float() @ parts["A"].float()
            yield module + ".weight", (w.float() + scaling * delta).to(w.dtype)
    if pending:
        module, parts = next(iter(pending.items()))
        raise ValueError(f"LoRA layer {module!r} lacks {sorted({'W', 'A', 'B'} - set(parts))} "
                         f"({len(pending)} layers incomplete)")
