"""pyspark's daemon for the test session's Spark, with the executor-side imports done once, before it forks.

Spark forks a Python worker per concurrent task from one daemon per application and kills a worker after a
minute idle; the next task's new worker imports torch, MLflow and dlpipe's executor code all over again. A
test session's tasks come in bursts minutes apart, so its workers spent half their CPU on those imports
(measured with py-spy over tests/test_stages.py). This daemon imports them once; every worker it forks
starts with them, as pyspark's own daemon starts its workers with pyspark. The conftest's `spark` fixture
names it in spark.python.daemon.module; the applications the tests start as subprocesses keep pyspark's.
"""

from __future__ import annotations

import gc
import importlib

from dlpipe.runtime import tune_gc

# What the training ranks, the scorers and the tuning trials import (tests/test_layers.py lists that code):
# the frameworks, MLflow's model loading and its SQLite store (rank 0 logs live metrics), and torch's lazy
# parts a rank or a load reaches (an optimizer imports torch._dynamo; an exported model torch.export's
# archive reader).
PRELOAD = (
    "pandas",
    "pyarrow",
    "torch",
    "torch._dynamo",
    "torch.export.pt2_archive",
    "mlflow",
    "mlflow.pyfunc",
    "mlflow.pytorch",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "horovod.torch",
    "petastorm",
    "dlpipe.train.worker",
    "dlpipe.train.launcher",
    "dlpipe.serve.scoring",
    "dlpipe.tune.trial",
    "udfs.score",
)

tune_gc()  # the workers it forks collect as dlpipe's processes do
for _name in PRELOAD:
    importlib.import_module(_name)
gc.collect()
gc.freeze()  # what the imports made stays out of each worker's collections (and its pages shared)

if __name__ == "__main__":
    from pyspark.daemon import manager

    manager()
