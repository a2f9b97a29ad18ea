"""Fit feature statistics on the train split and write train/val/test Petastorm datasets.

spark-submit jobs/preprocess.py [--env NAME] [--parent-run-id ID] [key.path=value ...]
"""

import sys

from dlpipe.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("preprocess", sys.argv[1:]))
