"""Write the built-in example's raw CSV files (known ground truth, a few malformed lines).

spark-submit jobs/generate.py [--env NAME] [--parent-run-id ID] [key.path=value ...]
"""

import sys

from dlpipe.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("generate", sys.argv[1:]))
