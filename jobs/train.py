"""Train with Horovod ranks in a Spark barrier stage; log and register the model.

spark-submit jobs/train.py [--env NAME] [--parent-run-id ID] [key.path=value ...]
"""

import sys

from dlpipe.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("train", sys.argv[1:]))
