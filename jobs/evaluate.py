"""Compute test metrics and a confusion matrix; log them to MLflow.

spark-submit jobs/evaluate.py [--env NAME] [--parent-run-id ID] [key.path=value ...]
"""

import sys

from dlpipe.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("evaluate", sys.argv[1:]))
