"""Real S3 (SeaweedFS) and HDFS (Hadoop 2.7.3) servers on 127.0.0.1, used the way dlpipe uses them.

No mocks: pyarrow's S3 client and Spark's s3a:// talk to a server that checks signatures; HdfsCLI, Spark's hdfs://
and dlpipe.storage.webhdfs talk to a real NameNode and DataNode. The servers start once per session (tests/conftest.py).
"""

from __future__ import annotations

import pickle
import uuid
from collections.abc import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hdfs import InsecureClient
from py4j.protocol import Py4JJavaError
from pyarrow import fs

from dlpipe.ops.processes import pid_alive
from dlpipe.storage.webhdfs import webhdfs_filesystem
from tests.servers import HdfsCluster, S3Server, ServerError, s3a_hadoop_conf

TABLE = pa.table({"id": pa.array(range(100), pa.int64()), "x": pa.array([i * 0.5 for i in range(100)], pa.float64())})


def _s3(server, access_key: str | None = None, secret_key: str | None = None) -> fs.S3FileSystem:
    return fs.S3FileSystem(
        endpoint_override=server.endpoint,
        scheme="http",
        region="us-east-1",
        access_key=access_key or server.access_key,
        secret_key=secret_key or server.secret_key,
        retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=1),
    )


def _frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["id", "x"]).sort_values("id").reset_index(drop=True)


# --- S3 -------------------------------------------------------------------------------------------------------------
def test_pyarrow_s3_writes_and_reads_parquet(s3_server):
    s3 = _s3(s3_server)
    path = f"{s3_server.bucket}/pyarrow/{uuid.uuid4().hex}.parquet"
    pq.write_table(TABLE, path, filesystem=s3)
    assert s3.get_file_info(path).type == fs.FileType.File
    assert pq.read_table(path, filesystem=s3).equals(TABLE)


@pytest.mark.parametrize(
    "access_key, secret_key, error",
    [
        (None, "not-the-secret", "SIGNATURE_DOES_NOT_MATCH"),
        ("no-such-key", "not-the-secret", "INVALID_ACCESS_KEY_ID"),
    ],
    ids=["wrong-secret", "unknown-key"],
)
def test_s3_rejects_wrong_credentials(s3_server, access_key, secret_key, error):
    s3 = _s3(s3_server, access_key=access_key, secret_key=secret_key)
    with pytest.raises(OSError, match=error):
        pq.write_table(TABLE, f"{s3_server.bucket}/denied/{uuid.uuid4().hex}.parquet", filesystem=s3)
    with pytest.raises(OSError, match=error):
        s3.get_file_info(fs.FileSelector(s3_server.bucket))


@pytest.fixture
def s3a_conf(spark, s3_server) -> Iterator[dict[str, str]]:
    """The s3a settings on the session's Hadoop configuration for one test, restored afterwards."""
    if "hadoop-aws" not in spark.sparkContext.getConf().get("spark.jars", ""):
        pytest.fail("the session's Spark started without the s3a jars on spark.jars (see the spark fixture)")
    hconf = spark.sparkContext._jsc.hadoopConfiguration()
    conf = s3a_hadoop_conf(s3_server.endpoint, s3_server.access_key, s3_server.secret_key)
    saved = {key: hconf.get(key) for key in conf}
    for key, value in conf.items():
        hconf.set(key, value)
    yield conf
    for key, value in saved.items():
        if value is None:
            hconf.unset(key)
        else:
            hconf.set(key, value)


def test_spark_s3a_writes_and_reads_parquet(spark, s3_server, s3a_conf):
    key = f"spark/{uuid.uuid4().hex}"
    url = f"s3a://{s3_server.bucket}/{key}"
    spark.createDataFrame(TABLE.to_pandas()).repartition(2).write.parquet(url)
    back = spark.read.parquet(url)
    assert back.count() == TABLE.num_rows
    pd.testing.assert_frame_equal(_frame(back.collect()), TABLE.to_pandas())
    # The objects really are on the server: pyarrow's own S3 client reads what Spark wrote.
    assert pq.read_table(f"{s3_server.bucket}/{key}", filesystem=_s3(s3_server)).num_rows == TABLE.num_rows


def test_spark_s3a_with_a_wrong_secret_is_denied(spark, s3_server, s3a_conf):
    # A bucket of its own, so the per-bucket secret applies to a FileSystem instance Hadoop has not cached.
    bucket = f"dlpipe-denied-{uuid.uuid4().hex[:8]}"
    hconf = spark.sparkContext._jsc.hadoopConfiguration()
    option = f"fs.s3a.bucket.{bucket}.secret.key"
    hconf.set(option, "not-the-secret")
    try:
        with pytest.raises(Py4JJavaError, match=r"403|Access ?Denied") as err:  # Hadoop's AccessDeniedException
            spark.range(3).write.parquet(f"s3a://{bucket}/x")
    finally:
        hconf.unset(option)
    assert "SignatureDoesNotMatch" in str(err.value) or "AccessDenied" in str(err.value)


# --- HDFS -----------------------------------------------------------------------------------------------------------
def test_hdfscli_writes_lists_and_reads_over_webhdfs(hdfs_cluster):
    client = InsecureClient(hdfs_cluster.webhdfs_url, user="dlpipe-tester")
    folder = f"/dlpipe/hdfscli-{uuid.uuid4().hex}"
    client.makedirs(folder)
    client.write(f"{folder}/hello.txt", data=b"hello, hdfs\n")
    assert client.list(folder) == ["hello.txt"]
    status = client.status(f"{folder}/hello.txt")
    assert (status["type"], status["length"], status["owner"]) == ("FILE", 12, "dlpipe-tester")
    with client.read(f"{folder}/hello.txt") as reader:
        assert reader.read() == b"hello, hdfs\n"
    with client.read(f"{folder}/hello.txt", offset=7, length=4) as reader:
        assert reader.read() == b"hdfs"
    client.delete(folder, recursive=True)
    assert client.status(folder, strict=False) is None


@pytest.fixture(scope="module")
def hdfs_parquet(spark, hdfs_cluster) -> str:
    """A Parquet dataset (2 files) Spark wrote to HDFS; its absolute HDFS path."""
    path = f"/dlpipe/spark-{uuid.uuid4().hex}"
    spark.createDataFrame(TABLE.to_pandas()).repartition(2).write.parquet(hdfs_cluster.namenode_uri + path)
    return path


def test_spark_writes_and_reads_parquet_on_hdfs(spark, hdfs_cluster, hdfs_parquet):
    back = spark.read.parquet(hdfs_cluster.namenode_uri + hdfs_parquet)
    assert back.rdd.getNumPartitions() >= 1
    pd.testing.assert_frame_equal(_frame(back.collect()), TABLE.to_pandas())


def test_webhdfs_filesystem_reads_what_spark_wrote(hdfs_cluster, hdfs_parquet):
    hdfs = webhdfs_filesystem(hdfs_cluster.webhdfs_url, user="dlpipe-reader")
    table = pq.read_table(hdfs_parquet, filesystem=hdfs)
    pd.testing.assert_frame_equal(table.to_pandas().sort_values("id").reset_index(drop=True), TABLE.to_pandas())
    parts = [
        info
        for info in hdfs.get_file_info(fs.FileSelector(hdfs_parquet, recursive=True))
        if info.base_name.endswith(".parquet")
    ]
    assert len(parts) == 2 and all(info.size > 0 for info in parts)
    # Random access: the footer first, then the column chunks, through ranged WebHDFS reads.
    with hdfs.open_input_file(parts[0].path) as f:
        assert f.size() == parts[0].size
        rows = pq.ParquetFile(f).metadata.num_rows
    assert 0 < rows < TABLE.num_rows
    # Picklable (it is rebuilt from url and user), so it can travel to Spark executors.
    assert pq.read_table(hdfs_parquet, filesystem=pickle.loads(pickle.dumps(hdfs))).num_rows == TABLE.num_rows


def test_webhdfs_filesystem_operations(hdfs_cluster):
    hdfs = webhdfs_filesystem(hdfs_cluster.webhdfs_url, user="dlpipe-writer")
    root = f"/dlpipe/ops-{uuid.uuid4().hex}"
    hdfs.create_dir(f"{root}/a/b", recursive=True)
    with pytest.raises(FileNotFoundError):
        hdfs.create_dir(f"{root}/missing/c", recursive=False)
    with hdfs.open_output_stream(f"{root}/a/b/data.bin") as out:
        out.write(b"0123456789" * 1000)
    info = hdfs.get_file_info(f"{root}/a/b/data.bin")
    assert (info.type, info.size) == (fs.FileType.File, 10_000)
    assert hdfs.get_file_info(f"{root}/nope").type == fs.FileType.NotFound
    assert hdfs.get_file_info(f"{root}/a").type == fs.FileType.Directory

    with hdfs.open_input_file(f"{root}/a/b/data.bin") as f:
        f.seek(9_995)
        assert f.read() == b"56789"
        assert f.read_at(3, 4) == b"456"  # nbytes, offset
    with hdfs.open_input_stream(f"{root}/a/b/data.bin") as f:
        assert f.read(12) == b"012345678901"

    listed = hdfs.get_file_info(fs.FileSelector(root, recursive=True))
    assert sorted(i.path for i in listed) == [f"{root}/a", f"{root}/a/b", f"{root}/a/b/data.bin"]
    assert [i.path for i in hdfs.get_file_info(fs.FileSelector(root))] == [f"{root}/a"]
    assert hdfs.get_file_info(fs.FileSelector(f"{root}/nope", allow_not_found=True)) == []
    with pytest.raises(FileNotFoundError):
        hdfs.get_file_info(fs.FileSelector(f"{root}/nope"))

    hdfs.move(f"{root}/a/b/data.bin", f"{root}/moved.bin")
    assert hdfs.get_file_info(f"{root}/a/b/data.bin").type == fs.FileType.NotFound
    hdfs.copy_file(f"{root}/moved.bin", f"{root}/copy.bin")
    with hdfs.open_input_stream(f"{root}/copy.bin") as f:
        assert f.read() == b"0123456789" * 1000

    pq.write_table(TABLE, f"{root}/t.parquet", filesystem=hdfs)
    assert pq.read_table(f"{root}/t.parquet", filesystem=hdfs).equals(TABLE)

    hdfs.delete_file(f"{root}/moved.bin")
    with pytest.raises(FileNotFoundError):
        hdfs.delete_file(f"{root}/moved.bin")
    hdfs.delete_dir_contents(f"{root}/a")
    assert hdfs.get_file_info(fs.FileSelector(f"{root}/a")) == []
    hdfs.delete_dir(root)
    assert hdfs.get_file_info(root).type == fs.FileType.NotFound


# --- lifecycle --------------------------------------------------------------------------------------------------------
def test_a_stopped_server_leaves_no_process(servers_cache, tmp_path):
    # Runs beside the session's S3 server when that one is up: free ports mean no collision.
    server = S3Server(servers_cache, tmp_path / "s3", "lifecycle-key", "lifecycle-secret-0123")
    server.start()
    pid = server.pid
    assert pid is not None and pid_alive(pid)
    assert _s3(server).get_file_info(fs.FileSelector("/")) == []  # a fresh server: signed listing, no buckets
    server.stop()
    assert not pid_alive(pid)


def test_an_unprovisioned_cache_fails_with_a_clear_message(tmp_path):
    with pytest.raises(ServerError, match="provision_servers.sh"):
        S3Server(tmp_path / "empty-cache", tmp_path / "s3", "k", "s").start()
    with pytest.raises(ServerError, match="provision_servers.sh"):
        HdfsCluster(tmp_path / "empty-cache", tmp_path / "hdfs").start()


def test_a_server_that_does_not_come_up_raises_with_its_log_and_is_stopped(servers_cache, tmp_path):
    with pytest.raises(ServerError, match=r"(?s)NameNode -format exited.*last \d+ lines of .*format\.log"):
        HdfsCluster(servers_cache, tmp_path / "hdfs", heap_mb=1).start()  # the JVM refuses a 1 MB heap
    server = S3Server(servers_cache, tmp_path / "s3", "k", "s", startup_timeout=0)
    with pytest.raises(ServerError, match=r"(?s)not ready after 0 s.*weed\.log"):
        server.start()
    assert server.pid is not None and not pid_alive(server.pid)
