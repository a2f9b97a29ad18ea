# dlpipe: `make run` and `make test` are all a new machine needs; both set up .venv first.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dlpipe-setup
ARGS   ?=
PYTEST_ARGS ?=
ONLY   ?=
WORKERS ?= 2
CORES  ?= 1
CLUSTER_DIR ?= .cache/cluster

AIRFLOW_VENV  := .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.dlpipe-airflow-setup
AIRFLOW_HOME  ?= $(abspath .cache/airflow)
DAG_CONF      ?= {}
AIRFLOW       := AIRFLOW_HOME=$(AIRFLOW_HOME) AIRFLOW__CORE__DAGS_FOLDER=$(abspath pipelines) AIRFLOW__CORE__LOAD_EXAMPLES=False $(AIRFLOW_VENV)/bin/airflow

# Spark (and Gloo) bind loopback unless told otherwise: the first non-loopback address may be unreachable.
export SPARK_LOCAL_IP ?= 127.0.0.1
export PYSPARK_PYTHON ?= $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON ?= $(abspath $(PY))

.PHONY: setup run test test-fast test-gpu lint ui bench clean clean-data cluster-up cluster-down ship airflow-setup airflow-run

setup: $(STAMP)

# Re-runs only when the pinned inputs change; a second `make setup` does nothing.
$(STAMP): pyproject.toml constraints.txt tools/setup.sh tools/build_horovod.sh tools/provision_servers.sh
	PYTHON=$(PYTHON) bash tools/setup.sh
	@touch $@

run: $(STAMP)
	$(PY) -m pipelines.run $(ARGS)

# Three pytest-xdist workers on two cores, a test module to each (its module fixtures made once): each
# worker spends much of its time waiting on JVM starts, subprocesses and servers, which a third worker fills
# (the whole suite: 18 min 22 s against about 20 with two, measured). Modules go out in the order
# tests/conftest.py collects them, longest first (xdist would order them by their number of tests).
# TEST_WORKERS=0 runs the tests in this process.
TEST_WORKERS ?= 3
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMP) $(AIRFLOW_STAMP) ship
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# The everyday loop (README, "Testing"): no cluster, Airflow, storage servers, GPU or slow tests.
FAST_MARKS := not cluster and not airflow and not servers and not slow and not gpu
test-fast: $(STAMP)
	$(PY) -m pytest $(XDIST) -m "$(FAST_MARKS)" $(PYTEST_ARGS)

# The CUDA paths, on a machine with a GPU (elsewhere they skip, saying so).
test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

# Benchmarks print `name: value` lines (and data/bench/<group>.json); ONLY=data runs one group.
bench: $(STAMP)
	$(PY) -m bench $(if $(ONLY),--only $(ONLY))

# Airflow in its own venv (.venv-airflow), apart from the Spark/PyTorch stack; re-runs only when its inputs change.
airflow-setup: $(AIRFLOW_STAMP)

$(AIRFLOW_STAMP): tools/setup_airflow.sh airflow-constraints.txt
	PYTHON=$(PYTHON) bash tools/setup_airflow.sh
	@touch $@

# One run of the Airflow DAG without a scheduler: make airflow-run DAG_CONF='{"overrides": ["train.epochs=5"]}'
airflow-run: $(STAMP) $(AIRFLOW_STAMP)
	$(AIRFLOW) db migrate
	$(AIRFLOW) dags test dlpipe -c '$(DAG_CONF)'

# What spark-submit ships to executors that have nothing installed: dist/dlpipe-code.zip (--py-files) and
# dist/dlpipe-env.tar.gz (a venv-pack archive for --archives); `python -m dlpipe.ops.ship args` prints the flags.
ship: $(STAMP)
	$(PY) -m dlpipe.ops.ship build

# A Spark standalone master + workers on 127.0.0.1, for `make run ARGS="spark.master=spark://..."`.
cluster-up: $(STAMP)
	$(PY) -m dlpipe.ops.cluster up --dir $(CLUSTER_DIR) --workers $(WORKERS) --cores $(CORES)

cluster-down:
	$(PY) -m dlpipe.ops.cluster down --dir $(CLUSTER_DIR)

lint: $(STAMP)
	$(PY) -m ruff check .

ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000

clean-data:
	rm -rf data mlruns spark-warehouse

clean: clean-data
	rm -rf $(VENV) $(AIRFLOW_VENV) .pytest_cache .ruff_cache *.egg-info dist
