"""Make, measure and register the candidate's compressed variants (compress.*: ONNX today).

spark-submit jobs/compress.py [--env NAME] [--parent-run-id ID] [key.path=value ...]
"""

import sys

from dlpipe.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("compress", sys.argv[1:]))
