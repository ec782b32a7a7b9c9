"""The EU plane in the tracker you already watch: every ``plot_every`` optimizer steps, the latest
pool drawn as an image and sent to each reporter of the Trainer's ``report_to`` that takes images:

- TensorBoard: an image summary ``qtuning/eu_plane`` at the step;
- Weights & Biases: ``qtuning/eu_plane`` as a ``wandb.Image``, on the step axis the Trainer uses;
- MLflow: an artifact ``qtuning/eu_plane/step_NNNNNN.png``;
- Trackio: ``qtuning/eu_plane`` as a ``trackio.Image``.

Any other reporter gets nothing and raises nothing. Drawing runs on the main process only, after
the optimizer step, from the scores the step's decision already copied to the host (no device
sync). Without matplotlib there is one warning at train start and training is unchanged; a
picture that fails to draw is one warning, and the run goes on without pictures (:class:`LivePlot`).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Callable

logger = logging.getLogger(__name__)

TAG = "qtuning/eu_plane"


def _tensorboard(reporter, fig, image, step: int) -> bool:
    writer = getattr(reporter, "tb_writer", None)
    if writer is None:
        return False
    writer.add_image(TAG, image, step, dataformats="HWC")
    writer.flush()
    return True


def _wandb(reporter, fig, image, step: int) -> bool:
    if not getattr(reporter, "_initialized", False):
        return False
    wandb = reporter._wandb
    wandb.log({TAG: wandb.Image(image), "train/global_step": step})  # the step axis WandbCallback defines
    return True


def _mlflow(reporter, fig, image, step: int) -> bool:
    if not getattr(reporter, "_initialized", False):
        return False
    reporter._ml_flow.log_figure(fig, f"{TAG}/step_{step:06d}.png")
    return True


def _trackio(reporter, fig, image, step: int) -> bool:
    if not getattr(reporter, "_initialized", False):
        return False
    trackio = reporter._trackio
    trackio.log({TAG: trackio.Image(image)}, step=step)
    return True


# transformers' reporter callbacks (class names) -> how each takes an image
SENDERS: dict[str, Callable[[Any, Any, Any, int], bool]] = {
    "TensorBoardCallback": _tensorboard, "WandbCallback": _wandb, "MLflowCallback": _mlflow,
    "TrackioCallback": _trackio,
}


def image_reporters(trainer) -> list:
    """The trainer's reporter callbacks that take an image (see :data:`SENDERS`)."""
    return [cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ in SENDERS]


class LivePlot:
    """Sends the latest pool's EU plane to the trainer's image reporters every ``every`` steps
    (0: never). ``start`` at train start; ``step_end`` after each optimizer step.

    A picture never stops training: a failure while drawing is one warning and no picture for the
    rest of the run; a reporter that fails to take one is one warning per picture (the next may
    go through). Training goes on unchanged either way."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.active = False

    def start(self, trainer) -> None:
        self.active = False
        if not self.every or not trainer.state.is_world_process_zero or not image_reporters(trainer):
            return
        if importlib.util.find_spec("matplotlib") is None:
            logger.warning("QTuning: plot_every is set and %s take images, but matplotlib is not installed: no "
                           "EU-plane picture will be logged (pip install matplotlib)",
                           ", ".join(type(r).__name__ for r in image_reporters(trainer)))
            return
        self.active = True

    def step_end(self, trainer, step: int, pool: dict | None, title: str) -> None:
        if not self.active or pool is None or step % self.every:
            return
        fig = None
        try:
            import numpy as np

            from . import plots

            fig = plots.pool_figure(pool_rows(pool), title)
            fig.canvas.draw()
            image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
            for reporter in image_reporters(trainer):
                try:
                    SENDERS[type(reporter).__name__](reporter, fig, image, step)
                except Exception as err:  # noqa: BLE001 (a reporter's failure must not stop training)
                    logger.warning("QTuning: could not send the EU-plane picture to %s (%s: %s)",
                                   type(reporter).__name__, type(err).__name__, err)
        except Exception as err:  # noqa: BLE001 (a picture must not stop training)
            self.active = False
            logger.warning("QTuning: could not draw the EU-plane picture of step %d (%s: %s); training goes on "
                           "without pictures", step, type(err).__name__, err)
        finally:
            if fig is not None:
                try:
                    plots._pyplot().close(fig)
                except Exception:  # noqa: BLE001 (already warned about, or nothing to close)
                    pass


def pool_rows(pool: dict) -> list[dict]:
    """The rows :func:`~qtuning_plugin.plots.pool_figure` draws, from a callback's ``last_pool``:
    each sample's ppl, entropy, quadrant, kept, and every rule's decision-log field the pool
    carries (:func:`~qtuning_plugin.decision_log.rule_fields`)."""
    from .decision_log import rule_fields

    n = pool["ppl"].numel()
    flags = [name for name in rule_fields() if name in pool]
    return [{"ppl": float(pool["ppl"][i]), "entropy": float(pool["entropy"][i]), "quadrant": int(pool["quadrant"][i]),
             "kept": bool(pool["keep"][i]), **{f: bool(pool[f][i]) for f in flags}} for i in range(n)]
