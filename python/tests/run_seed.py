"""One seed for the whole test run: fresh each run, printed after pytest's results (conftest);
LKCONV_SEED=N reproduces a run. Exported to the environment so that worker processes (the
data-parallel test's ranks) draw the same data as the parent."""

import os
import time

SEED = int(os.environ.get("LKCONV_SEED", time.time_ns() % 2**31))
os.environ["LKCONV_SEED"] = str(SEED)
# The line that reports it (pytest's summary, gpu_check.py's log).
BANNER = f"lkconv test seed: {SEED} (LKCONV_SEED={SEED} reproduces this run's data)"
