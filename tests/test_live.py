"""The EU plane in the trackers (qtuning_plugin.live): an image every plot_every steps to the
reporters that take one; nothing, and no error, for the others; training unchanged either way."""

import logging

import pytest
import torch
from test_trl import losses, sft_trainer
from transformers import TrainerCallback

from qtuning_plugin import QTuning
from qtuning_plugin import live as live_module
from qtuning_plugin.live import LivePlot, pool_rows


def test_tensorboard_gets_the_picture_at_every_plot_every_steps(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # (transformers >= 5: not an argument)
    cb = QTuning(sample_ratio=0.25, token_ratio=0.5, plot_every=2)
    trainer = sft_trainer([cb], ga=2, bs=4, steps=5, report_to=["tensorboard"])
    trainer.train()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={IMAGES: 0})
    events.Reload()
    assert "qtuning/eu_plane" in events.Tags()["images"]
    images = events.Images("qtuning/eu_plane")
    assert [i.step for i in images] == [2, 4]
    assert all(i.width > 400 and i.height > 200 and len(i.encoded_image_string) > 10_000 for i in images)


def tensorboard_images(folder):
    """The steps of the EU-plane images in a TensorBoard log folder."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={IMAGES: 0})
    events.Reload()
    return [i.step for i in events.Images(live_module.TAG)] if live_module.TAG in events.Tags()["images"] else []


def test_other_reporters_and_a_missing_matplotlib_change_nothing(monkeypatch, caplog, tmp_path):
    """A reporter that takes no image gets nothing; without matplotlib one warning at train start.
    Either way the losses are those of a run without pictures."""

    class OwnReporter(TrainerCallback):  # a reporter qtuning does not know: it gets nothing
        logs = 0

        def on_log(self, *a, **kw):
            self.logs += 1

    def run(plot_every, **kw):
        torch.manual_seed(0)
        cb = QTuning(sample_ratio=0.25, token_ratio=0.5, plot_every=plot_every)
        trainer = sft_trainer([cb, OwnReporter()], ga=2, bs=4, steps=3, **kw)
        trainer.train()
        return cb, trainer

    _, quiet = run(0)
    cb, other = run(1)  # report_to: none, and an unknown reporter
    assert not cb.live.active and losses(other) == losses(quiet)

    real = live_module.importlib.util.find_spec
    monkeypatch.setattr(live_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    with caplog.at_level(logging.WARNING, logger="qtuning_plugin.live"):
        cb, no_matplotlib = run(1, report_to=["tensorboard"])
    warnings = [r for r in caplog.records if "matplotlib is not installed" in r.getMessage()]
    assert len(warnings) == 1 and tensorboard_images(tmp_path / "tb") == []
    assert losses(no_matplotlib) == losses(quiet)


def test_a_failing_reporter_is_reported_and_training_goes_on(caplog):
    class TensorBoardCallback(TrainerCallback):  # stands in for transformers' own: its writer breaks
        class tb_writer:  # noqa: N801
            @staticmethod
            def add_image(*a, **kw):
                raise OSError("disk full")

    cb = QTuning(sample_ratio=0.25, token_ratio=0.5, plot_every=1)
    trainer = sft_trainer([cb, TensorBoardCallback()], ga=2, bs=4, steps=2)
    with caplog.at_level(logging.WARNING, logger="qtuning_plugin.live"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert sum("could not send the EU-plane picture to TensorBoardCallback (OSError: disk full)" in r.getMessage()
               for r in caplog.records) == 2


def test_a_picture_that_fails_to_draw_never_stops_training(monkeypatch, caplog, tmp_path):
    """The figure builder raising (matplotlib broken, say): one warning, no picture for the rest of
    the run, training to the end with the losses of a run without pictures."""
    from qtuning_plugin import plots

    def run(plot_every, **kw):
        torch.manual_seed(0)
        cb = QTuning(sample_ratio=0.25, token_ratio=0.5, plot_every=plot_every)
        trainer = sft_trainer([cb], ga=2, bs=4, steps=3, **kw)
        trainer.train()
        return trainer

    quiet = run(0)

    def broken(rows, title):
        raise RuntimeError("no font")

    monkeypatch.setattr(plots, "pool_figure", broken)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    with caplog.at_level(logging.WARNING, logger="qtuning_plugin.live"):
        drawn = run(1, report_to=["tensorboard"])
    warnings = [r.getMessage() for r in caplog.records if "could not draw the EU-plane picture" in r.getMessage()]
    assert warnings == ["QTuning: could not draw the EU-plane picture of step 1 (RuntimeError: no font); training "
                        "goes on without pictures"]
    assert drawn.state.global_step == 3 and losses(drawn) == losses(quiet)
    assert tensorboard_images(tmp_path / "tb") == []


def test_pool_rows_carry_what_the_picture_draws():
    pool = {"ppl": torch.tensor([2.0, float("nan"), 5.0], dtype=torch.float64),
            "entropy": torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64), "quadrant": torch.tensor([4, 3, 2]),
            "keep": torch.tensor([True, False, False]), "prune_tokens": torch.tensor([False, False, False]),
            "excluded": torch.tensor([False, False, True]), "surprising": torch.tensor([False, True, False])}
    rows = pool_rows(pool)
    assert [r["kept"] for r in rows] == [True, False, False] and [r["excluded"] for r in rows] == [False, False, True]
    assert [r["surprising"] for r in rows] == [False, True, False]
    assert rows[0] == {"ppl": 2.0, "entropy": 1.0, "quadrant": 4, "kept": True, "excluded": False, "surprising": False}
    assert "suspect" not in rows[0]


def test_plot_every_is_validated_and_zero_is_off():
    from qtuning_plugin.core import QTuningConfig

    assert QTuningConfig().plot_every == 50 and not LivePlot(0).every
    with pytest.raises(ValueError, match=r"QTuningConfig\.plot_every must be an integer >= 0, got -1"):
        QTuning(plot_every=-1)
