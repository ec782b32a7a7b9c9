"""MLflow, on a local file store: the EU-plane picture is an artifact of the run at each plot_every
step (where mlflow or mlflow-skinny is installed: the `latest` environment)."""

from test_trl import sft_trainer

from qtuning_plugin import QTuning


def test_mlflow_run_holds_the_picture_as_an_artifact_per_step(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # (mlflow >= 3.x: a file store must be opted into)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "qtuning-test")
    monkeypatch.setenv("DISABLE_MLFLOW_INTEGRATION", "FALSE")
    cb = QTuning(sample_ratio=0.25, token_ratio=0.5, plot_every=2)
    trainer = sft_trainer([cb], ga=2, bs=4, steps=5, report_to=["mlflow"])
    trainer.train()
    if mlflow.active_run() is not None:  # the Trainer's MLflowCallback leaves the run open
        mlflow.end_run()
    images = sorted((tmp_path / "mlruns").rglob("qtuning/eu_plane/step_*.png"))
    assert [p.name for p in images] == ["step_000002.png", "step_000004.png"]
    assert all(p.stat().st_size > 10_000 for p in images)
