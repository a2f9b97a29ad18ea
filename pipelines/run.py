"""Run the whole pipeline in one Spark application: generate, ingest, preprocess, train, infer, evaluate.

    python -m pipelines.run [--env NAME] [key.path=value ...]
    spark-submit pipelines/run.py [--env NAME] [key.path=value ...]

Ends by printing `tracking_uri: ...`, `run_id: ...` and `predictions: ...`.
"""

import sys

from dlpipe.cli import load_or_exit, parser, setup_logging
from dlpipe.pipeline import run_pipeline
from dlpipe.session import build_spark


def main(argv: list[str]) -> int:
    args = parser("pipelines/run.py", __doc__.splitlines()[0]).parse_args(argv)
    cfg = load_or_exit(args)
    setup_logging()
    spark = build_spark(cfg)
    try:
        result = run_pipeline(spark, cfg, force=args.force)
    finally:
        spark.stop()
    ev = result.metrics.get("evaluate", {})
    if "accuracy" in ev:
        print(f"test accuracy: {ev['accuracy']:.4f} (majority baseline {ev['majority_baseline_accuracy']:.4f})")
    elif "rmse" in ev:
        print(f"test RMSE: {ev['rmse']:.4f} (predicting the training mean {ev['mean_baseline_rmse']:.4f})")
    print(f"predictions: {result.predictions}")
    print(f"tracking_uri: {result.tracking_uri}")
    print(f"run_id: {result.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
