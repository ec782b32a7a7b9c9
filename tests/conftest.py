import importlib.util

# The Axolotl tests run in the environments of tests/run.sh that have Axolotl installed; elsewhere
# they are not collected at all (rather than reported as skipped).
collect_ignore = [] if importlib.util.find_spec("axolotl") else ["test_axolotl.py"]
