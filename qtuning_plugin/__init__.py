"""Q-Tuning (Wang et al., arXiv 2509.23873): joint sample and token pruning during supervised
fine-tuning, for TRL and Axolotl. The algorithm lives in :mod:`qtuning_plugin.core`."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qtuning-plugin")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["QTuning", "QTuningPlugin", "QTuningConfig", "decide", "score_batch", "token_keep_mask", "triage", "__version__"]


def __getattr__(name: str):
    # Everything loads lazily: `import qtuning_plugin` imports neither torch, the Trainer nor Axolotl.
    if name in ("QTuningConfig", "decide", "score_batch", "token_keep_mask", "triage"):
        from . import core

        return getattr(core, name)
    if name == "QTuning":
        from .callback import QTuning

        return QTuning
    if name == "QTuningPlugin":  # Axolotl's plugin loader asks for `qtuning_plugin.QTuningPlugin`
        from .axolotl import QTuningPlugin

        return QTuningPlugin
    raise AttributeError(f"module 'qtuning_plugin' has no attribute {name!r}")
