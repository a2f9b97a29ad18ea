"""Package the project and its Python environment for executors that have nothing installed, the way
Spark documents it (https://spark.apache.org/docs/latest/api/python/user_guide/python_packaging.html):

- the code (`dlpipe/`, `udfs/`) as a zip on the executors' path, through `--py-files`;
- the environment as a packed virtualenv (`venv-pack`) unpacked in each executor's working directory as
  `./environment`, through `--archives`, and used with `spark.pyspark.python=./environment/bin/python`.

    python -m dlpipe.ops.ship build [--dist dist]   # dist/dlpipe-code.zip and dist/dlpipe-env.tar.gz
    python -m dlpipe.ops.ship args [--dist dist]    # the spark-submit arguments that ship them

The packed environment holds dlpipe's runtime dependencies at the locked versions (constraints.txt),
the CPU torch build, Petastorm and the cached Horovod wheel; not pyspark (each worker adds its own
Spark's pyspark to the path) and not dlpipe (the code zip is what runs). A virtualenv links to its base
interpreter, so Python 3.11 must sit at the same path on every node (venv-pack's own rule); it is rebuilt
only when the lock, the dependencies or the Horovod wheel change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]  # dlpipe/ops/ship.py -> the project folder
CODE_PACKAGES = ("dlpipe", "udfs")
ENV_NAME = "environment"  # the folder the archive is unpacked into, in each executor's working directory
# What no executor imports or runs, left out of the packed environment (a sixth of its 1.6 GiB, and as much
# of every pack, fetch and unpack): the packages' own test suites, torch's C++ test binaries, and pip.
# Headers stay (torch.compile builds C++ with them). fnmatch patterns on the archive's paths.
ENV_EXCLUDES = (
    "lib/python*/site-packages/*/tests/*",
    "lib/python*/site-packages/torch/test/*",
    "lib/python*/site-packages/torch/bin/test_*",
    "lib/python*/site-packages/pip/*",
)


@dataclass(frozen=True)
class Shipment:
    code_zip: Path
    env_archive: Path

    def spark_submit_args(self, driver_python: str | None = None) -> list[str]:
        """--py-files, --archives and the Python settings: executors run the shipped interpreter; the
        driver (client mode, this machine) keeps driver_python (default: this process's)."""
        return [
            "--py-files",
            str(self.code_zip),
            "--archives",
            f"{self.env_archive}#{ENV_NAME}",
            "--conf",
            f"spark.pyspark.python=./{ENV_NAME}/bin/python",
            "--conf",
            f"spark.pyspark.driver.python={driver_python or sys.executable}",
        ]


def build_code_zip(dist: Path) -> Path:
    """dlpipe/ and udfs/ (Python files only) as one zip, importable from the executors' path."""
    out = dist / "dlpipe-code.zip"
    tmp = out.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for package in CODE_PACKAGES:
            for path in sorted((REPO / package).rglob("*.py")):
                zf.write(path, path.relative_to(REPO).as_posix())
    tmp.replace(out)
    return out


def _runtime_requirements() -> list[str]:
    """dlpipe's own dependencies (pyproject), less pyspark: the workers bring theirs."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if not d.replace(" ", "").startswith("pyspark")]


def _horovod_wheel(cache: Path) -> Path:
    wheels = sorted((cache / "wheels").rglob("horovod-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"no Horovod wheel under {cache / 'wheels'}: run `make setup` first")
    return wheels[-1]


def _env_key(cache: Path) -> str:
    parts = [
        (REPO / "constraints.txt").read_text(),
        json.dumps(_runtime_requirements()),
        _horovod_wheel(cache).name,
        sys.version,
        json.dumps(ENV_EXCLUDES),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build_env_archive(dist: Path, cache: Path, python: str = sys.executable) -> Path:
    """A fresh virtualenv with the runtime dependencies, packed with venv-pack (reused while unchanged)."""
    out = dist / "dlpipe-env.tar.gz"
    key = _env_key(cache)
    stamp = dist / "dlpipe-env.key"
    if out.is_file() and stamp.is_file() and stamp.read_text() == key:
        log.info("ship: %s is up to date", out)
        return out
    venv = cache / "ship-venv"
    shutil.rmtree(venv, ignore_errors=True)
    base = subprocess.run(
        [python, "-c", "import sys; print(sys.base_prefix)"], check=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run([f"{base}/bin/python3.11", "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    constraints = ["-c", str(REPO / "constraints.txt")]
    log.info("ship: installing the runtime dependencies into %s", venv)
    subprocess.run([*pip, *constraints, "torch==2.13.0"], check=True)  # the CPU build first, as setup does
    subprocess.run([*pip, *constraints, *_runtime_requirements()], check=True)
    subprocess.run([*pip, *constraints, "--no-deps", "petastorm==0.13.1", str(_horovod_wheel(cache))], check=True)
    tmp = dist / "dlpipe-env.tmp.tar.gz"
    log.info("ship: packing %s into %s", venv, out)
    pack_env(venv, tmp)
    tmp.replace(out)
    stamp.write_text(key)
    shutil.rmtree(venv, ignore_errors=True)
    return out


def pack_env(venv: Path, out: Path) -> Path:
    """venv packed as a .tar.gz for --archives, less ENV_EXCLUDES. gzip level 1: a third of the bytes;
    level 0 packs faster but moves and writes three times the bytes on every executor, which unpacks it
    more slowly. .tar.gz because Spark hands it to tar, which keeps the interpreter executable; its own
    .tar unpacking drops file modes (SPARK-38632)."""
    import venv_pack  # a dev dependency: what builds the shipment, not what it ships

    env = venv_pack.Env(str(venv))
    for pattern in ENV_EXCLUDES:
        env = env.exclude(pattern)
    env.pack(output=str(out), format="tar.gz", compress_level=1, force=True)
    return out


def build(dist: Path = REPO / "dist", cache: Path = REPO / ".cache") -> Shipment:
    dist.mkdir(parents=True, exist_ok=True)
    return Shipment(build_code_zip(dist), build_env_archive(dist, cache))


def shipment(dist: Path = REPO / "dist") -> Shipment:
    """The artifacts `build` made (checked to exist)."""
    s = Shipment(dist / "dlpipe-code.zip", dist / "dlpipe-env.tar.gz")
    missing = [str(p) for p in (s.code_zip, s.env_archive) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing: run `python -m dlpipe.ops.ship build` (make ship)")
    return s


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m dlpipe.ops.ship", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["build", "args"])
    p.add_argument("--dist", type=Path, default=REPO / "dist")
    p.add_argument("--cache", type=Path, default=REPO / ".cache")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = build(args.dist, args.cache) if args.command == "build" else shipment(args.dist)
    print(" ".join(s.spark_submit_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
