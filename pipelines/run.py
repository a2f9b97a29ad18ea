"""Run the whole pipeline in one Spark application: generate, ingest, preprocess, train, infer, evaluate.

    python -m pipelines.run [--env NAME] [key.path=value ...]
    spark-submit pipelines/run.py [--env NAME] [key.path=value ...]

Ends by printing `tracking_uri: ...`, `run_id: ...` and `predictions: ...`.
"""

import sys

from dlpipe.cli import load_or_exit, parser, setup_logging
from dlpipe.pipeline import run_pipeline, summary
from dlpipe.session import build_spark, stop_spark


def main(argv: list[str]) -> int:
    args = parser("pipelines/run.py", __doc__.splitlines()[0]).parse_args(argv)
    cfg = load_or_exit(args)
    setup_logging()
    spark = build_spark(cfg)
    try:
        result = run_pipeline(spark, cfg, force=args.force)
    finally:
        stop_spark(spark)
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
