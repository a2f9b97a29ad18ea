"""Run the whole pipeline in one Spark application: generate, ingest, preprocess, (tune), train, (compress),
infer, evaluate.

    python -m pipelines.run [--env NAME] [--force] [--from STAGE] [key.path=value ...]
    spark-submit pipelines/run.py [--env NAME] [--force] [--from STAGE] [key.path=value ...]

The same as `python -m dlpipe run`, as a file spark-submit can take. Ends by printing the test score,
`predictions: ...`, `tracking_uri: ...` and `run_id: ...`.
"""

import sys

from dlpipe.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
