import importlib.util

# The Axolotl tests run in the environments of tests/run.sh that have Axolotl installed; elsewhere
# they are not collected at all (rather than reported as skipped). Likewise the tests of TRL's fused
# LM head run where TRL has it (TRL >= 1.16).
collect_ignore = [] if importlib.util.find_spec("axolotl") else ["test_axolotl.py"]
# The wandb test runs where wandb is installed (the Axolotl environments bring it).
if importlib.util.find_spec("wandb") is None:
    collect_ignore.append("test_live_wandb.py")
try:
    from trl.trainer.utils import add_fused_lm_head  # noqa: F401
except ImportError:
    collect_ignore.append("test_fused_head.py")
