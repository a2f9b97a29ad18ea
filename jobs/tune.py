"""Search the training settings with Optuna, trials as Spark tasks; the best feed train (tune.enabled).

spark-submit jobs/tune.py [--env NAME] [--parent-run-id ID] [key.path=value ...]
"""

import sys

from dlpipe.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("tune", sys.argv[1:]))
