"""Q-Tuning for Axolotl: ``plugins: [qtuning_plugin.QTuningPlugin]`` plus a ``qtuning:`` block.

.. code-block:: yaml

    plugins:
      - qtuning_plugin.QTuningPlugin
    qtuning:
      sample_ratio: 0.25
      token_ratio: 0.5
      neighbor_lambda: 0.5
      log_decisions: ./outputs/decisions.jsonl   # optional: per-step decision log (qtuning plot)

The block's keys are :class:`~qtuning_plugin.core.QTuningConfig`'s fields (README's options table;
``preset:`` names a combination); it is validated there when Axolotl validates the config,
before the model loads. The plugin attaches the same :class:`~qtuning_plugin.QTuning`
callback the TRL front end uses, through ``add_callbacks_post_trainer`` (the hook that hands over
the trainer); it overrides neither the trainer class nor the collator, so it composes with other
plugins (Liger, cut-cross-entropy). Without a ``qtuning:`` block it does nothing at all, which
matters because Axolotl >= 0.21 loads every installed plugin of the ``axolotl.plugins`` entry
point on every run.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, Field, field_validator, model_validator

from .core.config import OPTIONS, PRESETS, QTuningConfig
from .support import refuse_sequence_parallelism


def block_config(block: Any) -> QTuningConfig:
    """The ``qtuning:`` block as a :class:`QTuningConfig` (validated there: an unknown or retired
    key, or a value out of range, raises ``ValueError`` naming it)."""
    if not isinstance(block, Mapping):
        raise ValueError(f"qtuning: expected a mapping of fields, got {type(block).__name__}")
    return QTuningConfig.from_dict(dict(block))


def _block_schema() -> dict[str, Any]:
    """The JSON schema of the block's keys, from the options (for Axolotl's schema and docs)."""
    properties = {"preset": {"enum": list(PRESETS), "description": "a named combination of the fields below"}}
    for o in OPTIONS:
        properties[o.name] = {"description": f"{o.help} ({o.allowed()})", "default": o.default,
                              **({"enum": list(o.choices)} if o.choices else {})}
    return {"type": "object", "properties": properties, "additionalProperties": False}


class QTuningPluginArgs(BaseModel):
    """The ``qtuning:`` block of an Axolotl config (merged into Axolotl's schema)."""

    qtuning: dict[str, Any] | None = Field(default=None, description="Q-Tuning's settings (qtuning_plugin)",
                                           json_schema_extra=_block_schema())

    @field_validator("qtuning", mode="before")
    @classmethod
    def _qtuning_check_block(cls, value: Any) -> dict[str, Any] | None:  # unique: the schema merges all plugins
        if value is None:
            return None
        # Raises ValueError naming the key and the allowed values: pydantic reports it as a
        # validation error of `qtuning`, and `axolotl train` stops before loading the model.
        return block_config(value).to_dict()

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
    refuse_sequence_parallelism(cfg, who="qtuning")


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

        QTuning(block_config(block)).attach(trainer)  # adds itself to the trainer
        return []
