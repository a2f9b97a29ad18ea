"""Score the test split (or new raw data: infer.source=URI) with the registered model; write predictions.

spark-submit jobs/infer.py [--env NAME] [--parent-run-id ID] [key.path=value ...]
"""

import sys

from dlpipe.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("infer", sys.argv[1:]))
