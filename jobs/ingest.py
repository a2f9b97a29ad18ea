"""Read raw CSV with the declared schema into clean Parquet; quarantine malformed rows with a reason.

spark-submit jobs/ingest.py [--env NAME] [--parent-run-id ID] [key.path=value ...]
"""

import sys

from dlpipe.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("ingest", sys.argv[1:]))
