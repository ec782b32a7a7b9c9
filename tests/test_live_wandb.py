"""wandb, offline: the EU-plane picture lands in the offline run's media (where wandb is installed)."""

from test_trl import sft_trainer

from qtuning_plugin import QTuning


def test_wandb_offline_run_holds_the_picture(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "qtuning-test")
    cb = QTuning(sample_ratio=0.25, token_ratio=0.5, plot_every=2)
    trainer = sft_trainer([cb], ga=2, bs=4, steps=4, report_to=["wandb"])
    trainer.train()
    import wandb

    wandb.finish()
    images = sorted(tmp_path.glob("wandb/offline-run-*/files/media/images/qtuning/eu_plane_*.png"))
    assert len(images) == 2
    assert all(p.stat().st_size > 10_000 for p in images)
