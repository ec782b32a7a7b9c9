import importlib.util

# The Axolotl tests run in the environments of tests/run.sh that have Axolotl installed; elsewhere
# they are not collected at all (rather than reported as skipped). Likewise the tests of TRL's fused
# LM head run where TRL has it (TRL >= 1.16).
collect_ignore = [] if importlib.util.find_spec("axolotl") else ["test_axolotl.py"]
# The wandb and trackio tests run where they are installed (the Axolotl environments bring them)
# and the Trainer can report to them: transformers 5.16's TrackioCallback passes `bucket_id`, which
# the trackio of Axolotl 0.19's stack (0.19.0) does not take, so report_to trackio fails there
# with or without Q-Tuning.
collect_ignore += [f"test_live_{name}.py" for name in ("wandb", "trackio", "mlflow") if importlib.util.find_spec(name) is None]
if "test_live_trackio.py" not in collect_ignore:  # (not imported here: trackio reads TRACKIO_DIR at import)
    from importlib.metadata import version

    if tuple(int(x) for x in version("trackio").split(".")[:2]) < (0, 21):
        collect_ignore.append("test_live_trackio.py")
try:
    from trl.trainer.utils import add_fused_lm_head  # noqa: F401
except ImportError:
    collect_ignore.append("test_fused_head.py")
