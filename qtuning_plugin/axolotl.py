"""Q-Tuning for Axolotl: ``plugins: [qtuning_plugin.QTuningPlugin]`` plus a ``qtuning:`` block.

.. code-block:: yaml

    plugins:
      - qtuning_plugin.QTuningPlugin
    qtuning:
      sample_ratio: 0.25
      token_ratio: 0.5
      neighbor_lambda: 0.5
      log_decisions: ./outputs/decisions.jsonl   # optional: per-step decision log (qtuning plot)

The block is validated by :class:`~qtuning_plugin.core.QTuningConfig` when Axolotl validates the
config, before the model loads. The plugin attaches the same :class:`~qtuning_plugin.QTuning`
callback the TRL front end uses, through ``add_callbacks_post_trainer`` (the hook that hands over
the trainer); it overrides neither the trainer class nor the collator, so it composes with other
plugins (Liger, cut-cross-entropy). Without a ``qtuning:`` block it does nothing at all, which
matters because Axolotl >= 0.21 loads every installed plugin of the ``axolotl.plugins`` entry
point on every run.
"""

from __future__ import annotations

import difflib
from typing import Any

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, field_validator, model_validator

from .core import QTuningConfig

# Keys of the block that configure the callback rather than the method.
CALLBACK_OPTIONS = ("log_decisions", "chunk_size")


def split_block(block: dict[str, Any]) -> tuple[QTuningConfig, dict[str, Any]]:
    """The ``qtuning:`` block as (method config, callback options), both validated."""
    if not isinstance(block, dict):
        raise ValueError(f"qtuning: expected a mapping of fields, got {type(block).__name__}")
    options = {k: block[k] for k in CALLBACK_OPTIONS if k in block}
    fields = {k: v for k, v in block.items() if k not in CALLBACK_OPTIONS}
    try:
        config = QTuningConfig.from_dict(fields)
    except ValueError as err:
        if "unknown field" in str(err):
            raise ValueError(f"{err}; callback options: {list(CALLBACK_OPTIONS)}") from None
        raise
    log = options.get("log_decisions")
    if log is not None and not (isinstance(log, str) and log):
        raise ValueError(f"qtuning.log_decisions must be a file path (jsonl), got {log!r}")
    size = options.get("chunk_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"qtuning.chunk_size must be a positive integer, got {size!r}")
    return config, options


class QTuningPluginArgs(BaseModel):
    """The ``qtuning:`` block of an Axolotl config (merged into Axolotl's schema)."""

    qtuning: dict[str, Any] | None = None

    @field_validator("qtuning", mode="before")
    @classmethod
    def _qtuning_check_block(cls, value: Any) -> dict[str, Any] | None:  # unique: the schema merges all plugins
        if value is None:
            return None
        # Raises ValueError naming the key and the allowed values: pydantic reports it as a
        # validation error of `qtuning`, and `axolotl train` stops before loading the model.
        config, options = split_block(value)
        return {**config.to_dict(), **options}

    @model_validator(mode="after")
    def _qtuning_check_run(self):  # runs on Axolotl's merged config: sees rl, sample_packing, ...
        check_axolotl_config(self)
        return self


def _get(cfg, key: str, default=None):
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def check_axolotl_config(cfg) -> None:
    """Refuse, with what to change, the runs Q-Tuning cannot prune exactly (only when the
    ``qtuning:`` block is present)."""
    if _get(cfg, "qtuning") is None:
        return
    if _get(cfg, "rl"):
        raise ValueError(f"qtuning: Q-Tuning prunes supervised fine-tuning batches; this is an RL / "
                         f"preference run (rl: {_get(cfg, 'rl')}). Remove the qtuning: block.")
    for key in ("sequence_parallel_degree", "context_parallel_size"):
        value = _get(cfg, key)
        if isinstance(value, int) and value > 1:
            raise ValueError(f"qtuning: sequence / context parallelism ({key}: {value}) is not "
                             "supported: each rank would see only a shard of every sample.")


class QTuningPlugin(BasePlugin):
    """Axolotl plugin: validates the ``qtuning:`` block and attaches the Q-Tuning callback."""

    def get_input_args(self) -> str:
        return "qtuning_plugin.axolotl.QTuningPluginArgs"

    def register(self, cfg: dict) -> None:
        # A misspelt block name would be dropped silently by Axolotl's schema: catch it here.
        for key in cfg or {}:
            if key != "qtuning" and isinstance(key, str) and difflib.get_close_matches(key, ["qtuning"], 1, 0.8):
                raise ValueError(f"unknown config key {key!r}: did you mean 'qtuning'?")

    def pre_model_load(self, cfg) -> None:
        check_axolotl_config(cfg)

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        block = _get(cfg, "qtuning")
        if block is None:
            return []
        check_axolotl_config(cfg)
        from .callback import QTuning

        config, options = split_block(dict(block))
        QTuning(config, **options).attach(trainer)  # adds itself to the trainer
        return []
