"""Score the test split with a pandas UDF; write predictions to Parquet.

spark-submit jobs/infer.py [--env NAME] [--parent-run-id ID] [key.path=value ...]
"""

import sys

from dlpipe.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("infer", sys.argv[1:]))
