"""Trackio, locally: the EU-plane picture lands in the run's media at its steps (where trackio is installed)."""

from test_trl import sft_trainer

from qtuning_plugin import QTuning


def test_trackio_run_holds_the_picture_at_its_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path))
    cb = QTuning(sample_ratio=0.25, token_ratio=0.5, plot_every=2)
    trainer = sft_trainer([cb], ga=2, bs=4, steps=4, report_to=["trackio"], project="qtuning-test")
    trainer.train()
    images = sorted(tmp_path.glob("media/qtuning-test/*/*/*.png"))
    assert sorted(int(p.parent.name) for p in images) == [2, 4]
    assert all(p.stat().st_size > 10_000 for p in images)
