"""What the Trainer hook refuses, and the one setting it repairs, before training starts.

Q-Tuning prunes supervised fine-tuning batches of a decoder-only causal LM whose step loss is the
sum of its micro-batches' cross-entropy over the step's label tokens. Anything else is refused
with a ``ValueError`` that says what to change, never half-applied."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
from transformers import Trainer

from .core import scoring_mode
from .core.config import QTuningConfig
from .core.wrappers import unwrap_causal_lm

logger = logging.getLogger(__name__)


def refuse_unsupported(trainer: Trainer, config: QTuningConfig, rules: Sequence = ()) -> None:
    """Raise ``ValueError`` for a setup Q-Tuning cannot prune exactly (see the module's doc);
    ``rules``: the active rules, each of which may check the model (``check_model``)."""
    _refuse_trl_trainers_but_sft(trainer)
    refuse_sequence_parallelism(trainer.args, getattr(trainer, "accelerator", None))
    if getattr(trainer.args, "torch_compile", False) or any(
            type(m).__name__ == "OptimizedModule" for m in (trainer.model, getattr(trainer, "model_wrapped", None))):
        raise ValueError("QTuning does not support torch.compile (torch_compile=True or a compiled model): "
                         "the scoring pass reads the backbone's hidden state through a module hook, which a "
                         "compiled graph does not run. Train with torch_compile=False.")
    peft_config = getattr(trainer.model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        raise ValueError(
            f"QTuning does not support PEFT prompt learning ({type(peft_config).__name__}: prompt / prefix / "
            "p-tuning add virtual tokens that the scorer's per-token alignment with the labels does not "
            "account for). Use LoRA / QLoRA or full fine-tuning."
        )
    for rule in rules:
        if hasattr(rule, "check_model"):
            rule.check_model(trainer.model)
    lm = unwrap_causal_lm(trainer.model)
    if not is_causal_lm(lm):
        raise ValueError(f"QTuning needs a decoder-only causal LM (a *ForCausalLM model); got {type(lm).__name__}.")
    if config.prunes_nothing:
        return  # every step passes through untouched: the trainer's loss normalisation stays its own
    if not (getattr(trainer, "model_accepts_loss_kwargs", False) or getattr(trainer, "compute_loss_func", None)):
        # The Trainer would average per-micro-batch means instead of dividing the step's summed
        # loss by its label-token count. Axolotl 0.19 switches this off for every model whose
        # forward() does not name `num_items_in_batch`; turn it back on when the model's loss
        # does use it (checked on a 4-token input), else refuse.
        if not loss_uses_num_items(getattr(trainer, "model_wrapped", None) or trainer.model):
            raise ValueError(
                f"QTuning: {type(trainer).__name__} averages per-micro-batch losses "
                "(model_accepts_loss_kwargs is False, no compute_loss_func) and the model's loss "
                "ignores num_items_in_batch, so the loss over the kept tokens could not be exact."
            )
        logger.info("QTuning: setting model_accepts_loss_kwargs=True so that each step's loss is "
                    "the mean over its kept label tokens")
        trainer.model_accepts_loss_kwargs = True


# What splits every sample across ranks (sequence / context parallelism): settings of the
# TrainingArguments (TRL, Axolotl's trainer) or of an Axolotl config, and the fields of
# Accelerate's ``parallelism_config`` (on the arguments or the accelerator).
SEQUENCE_PARALLEL_KEYS = ("sequence_parallel_degree", "context_parallel_size", "sequence_parallel_size")
PARALLELISM_CONFIG_KEYS = ("cp_size", "sp_size")


def refuse_sequence_parallelism(*owners: Any, who: str = "QTuning") -> None:
    """Raise ``ValueError`` (prefixed ``who``) when one of ``owners`` (TrainingArguments, an
    accelerator, an Axolotl config: objects or mappings; None is skipped) sets sequence / context
    parallelism: each rank would then see only a shard of every sample."""
    def get(owner, key):
        return owner.get(key) if isinstance(owner, Mapping) else getattr(owner, key, None)

    for owner in (o for o in owners if o is not None):
        settings = [(key, get(owner, key)) for key in SEQUENCE_PARALLEL_KEYS]
        pc = get(owner, "parallelism_config")
        if pc is not None:
            settings += [(f"parallelism_config.{key}", get(pc, key)) for key in PARALLELISM_CONFIG_KEYS]
        for key, value in settings:
            if isinstance(value, int) and value > 1:
                raise ValueError(f"{who}: sequence / context parallelism ({key}: {value}) is not supported: "
                                 "each rank would see only a shard of every sample.")


def loss_uses_num_items(model: torch.nn.Module) -> bool:
    """Whether the model's own loss divides by ``num_items_in_batch`` when it is given: two forwards
    on 4 tokens, through the model as training calls it (a DDP / FSDP wrapper once the Trainer has
    wrapped it: sharded weights are gathered as in training, and every rank runs the same forwards)."""
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2, 3, 4]], device=device)
    try:
        with scoring_mode(model), torch.no_grad():
            mean = model(input_ids=ids, labels=ids, use_cache=False).loss
            summed = model(input_ids=ids, labels=ids, use_cache=False, num_items_in_batch=1).loss
    except TypeError:
        return False
    return bool(torch.isclose(summed, mean * 3, rtol=1e-3))


def is_causal_lm(model: torch.nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    names = [c.__name__ for c in type(model).__mro__]
    named_causal = any(n in causal_names or n.endswith("ForCausalLM") for n in names)
    backbone = getattr(model, getattr(model, "base_model_prefix", "") or "_", None)
    return (named_causal and not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
            and isinstance(backbone, torch.nn.Module) and model.get_output_embeddings() is not None)


def _refuse_trl_trainers_but_sft(trainer: Trainer) -> None:
    """TRL's trainers other than SFTTrainer (RL, preference, distillation: DPO, GRPO, KTO, Reward,
    GKD...) train batches that are not SFT samples with labels: refuse any class of TRL in the
    trainer's lineage that is not SFTTrainer or one of its bases (GKD subclasses SFTTrainer, and is
    refused; a user's own subclass of SFTTrainer is not TRL's, and passes)."""
    trl_classes = [c for c in type(trainer).__mro__ if c.__module__.split(".")[0] == "trl"]
    if not trl_classes:
        return
    try:  # (loaded already: the trainer's class comes from it)
        from trl import SFTTrainer

        sft_lineage = set(SFTTrainer.__mro__)
    except ImportError:
        sft_lineage = set()
    others = [c.__name__ for c in trl_classes if c not in sft_lineage]
    if others:
        raise ValueError(
            f"QTuning prunes supervised fine-tuning batches; {others[0]} is an RL / preference / "
            "distillation trainer whose batches are not SFT samples. Use it without QTuning."
        )
