"""Ingest: raw files -> a clean Parquet dataset and a quarantine dataset with one reason per bad row.

Every value is checked here, so a bad value becomes a reason instead of a silent null: malformed line,
missing value, wrong type, NaN/inf, out of the declared range, not an allowed value, undecodable image,
wrong image shape. CSV is parsed to the declared types by Spark's own reader and only the lines it cannot
parse are split again as text to find the reason; JSON lines and Parquet are read as text and cast here;
images are decoded on the executors.

The input is read once: each row is written either to clean or to quarantine in the same pass
(dlpipe.storage.parquet_io), with nothing cached. The stage checks its own books: rows in (counted in that pass)
= rows kept + rows quarantined (counted from the footers of what was written), or it fails and commits
nothing. More bad rows than `dataset.max_bad_fraction` also fail it.

Valid rows that share a key are counted from the key column of what was written (`duplicate_keys`,
`duplicate_rows`) and handled as `dataset.duplicates` declares: kept (keep_all, the default, which costs no
extra pass over the input), or all but the first by file and line (keep_first), or none (quarantine)
quarantined with reason_code duplicate_key, which one shuffle by key decides.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import pandas as pd
from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dlpipe.config import ColumnSpec, Config, ConfigError, datetime_regex
from dlpipe.session import job_description
from dlpipe.stage import Plan, Stage, execute, require_input
from dlpipe.storage import dataset_paths, lineage, storage_settings
from dlpipe.storage.parquet_io import Output, write_routed

log = logging.getLogger(__name__)

CORRUPT = "_corrupt_record"
PRE_REASON = "_pre_reason"  # a reason found while reading (image decoding)
SPARK_DATA_TYPES = {
    "int": T.IntegerType(),
    "long": T.LongType(),
    "float": T.FloatType(),
    "double": T.DoubleType(),
    "string": T.StringType(),
    "boolean": T.BooleanType(),
    "date": T.DateType(),
    "timestamp": T.TimestampNTZType(),  # the wall-clock time as written: no time zone shifts its hour
}
SPARK_TYPES = {name: t.simpleString() for name, t in SPARK_DATA_TYPES.items()}  # as SQL names: long -> bigint
NUMERIC = {"int", "long", "float", "double"}
# Parsed from text by ingest (`_typed`), never by a reader: CSV reads them as strings, so that yes/no or a
# date in dd/MM/yyyy is parsed by the dataset's own rules, and a bad value gets its reason.
PARSED_FROM_TEXT = {"boolean", "date", "timestamp"}
TRUE_WORDS = ("true", "yes", "1", "t", "y")
FALSE_WORDS = ("false", "no", "0", "f", "n")


class BadDataError(ValueError):
    """More rows failed validation than dataset.max_bad_fraction allows."""


class SchemaMismatchError(ValueError):
    """The files do not have the columns the dataset declares."""


# --- reading ---------------------------------------------------------------------------------------------
# Spark 3.5's reader options per format (lower case: Spark matches option names case-insensitively). Spark
# ignores an option it does not know, so a typo would silently read the files wrong: ingest refuses it.
_FILE_OPTIONS = {
    "pathglobfilter": "pathGlobFilter",
    "recursivefilelookup": "recursiveFileLookup",
    "modifiedbefore": "modifiedBefore",
    "modifiedafter": "modifiedAfter",
    "ignorecorruptfiles": "ignoreCorruptFiles",
    "ignoremissingfiles": "ignoreMissingFiles",
}
_FORMAT_OPTIONS = {
    "csv": """sep encoding quote escape comment header ignoreLeadingWhiteSpace ignoreTrailingWhiteSpace nullValue
        emptyValue nanValue positiveInf negativeInf dateFormat timestampFormat timestampNTZFormat
        enableDateTimeParsingFallback maxColumns maxCharsPerColumn multiLine charToEscapeQuoteEscaping locale
        lineSep unescapedQuoteHandling timeZone""",
    "jsonl": """encoding timeZone primitivesAsString prefersDecimal allowComments allowUnquotedFieldNames
        allowSingleQuotes allowNumericLeadingZeros allowBackslashEscapingAnyCharacter allowUnquotedControlChars
        allowNonNumericNumbers dateFormat timestampFormat timestampNTZFormat enableDateTimeParsingFallback
        multiLine lineSep locale""",
    "parquet": "datetimeRebaseMode int96RebaseMode mergeSchema",
    "image": "",
}
_ALIASES = {"delimiter": "sep", "charset": "encoding"}  # Spark's own aliases, one spelling for ingest
_OWNED = {"mode", "columnnameofcorruptrecord", "enforceschema", "inferschema", "samplingratio", "schema"}


def reader_options(cfg: Config) -> dict[str, str]:
    """dataset.source.options as Spark reader options (YAML booleans as Spark's "true"/"false"), with Spark's
    aliases under one name (delimiter -> sep, charset -> encoding). Unknown options, options ingest sets
    itself and impossible values raise a ConfigError naming dataset.source.options."""
    fmt = cfg.dataset.source.format
    known = {**_FILE_OPTIONS, **{name.lower(): name for name in _FORMAT_OPTIONS[fmt].split()}}
    out: dict[str, str] = {}
    for key, value in cfg.dataset.source.options.items():
        low = _ALIASES.get(key.lower(), key.lower())
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if low in _OWNED:
            raise ConfigError(
                f"dataset.source.options.{key}: ingest sets this option itself (it reads every row and "
                "quarantines the bad ones with their reason); remove it"
            )
        if low not in known:
            raise ConfigError(
                f"dataset.source.options.{key}: not a Spark {fmt} reader option (Spark would ignore it "
                f"silently); allowed: {', '.join(sorted(known.values()))}"
            )
        name = known[low]
        if name in out:
            raise ConfigError(f"dataset.source.options: {name} is given twice (as {key} and another spelling)")
        out[name] = text
    if fmt == "csv":
        for name in ("quote", "escape"):
            if name in out and len(_unescape(out[name])) > 1:
                raise ConfigError(f"dataset.source.options.{name}: one character, got {out[name]!r}")
        if "sep" in out and not _unescape(out["sep"]):
            raise ConfigError("dataset.source.options.sep: the delimiter cannot be empty")
        if out.get("header", "true") not in ("true", "false"):
            raise ConfigError(f"dataset.source.options.header: true or false, got {out['header']!r}")
    return out


def _unescape(text: str) -> str:
    """A separator or quote as Spark reads it: `\\t` is a tab, `\\u0001` that character."""
    if text.startswith("\\") and len(text) > 1:
        import codecs

        try:
            return codecs.decode(text, "unicode_escape")
        except UnicodeDecodeError:
            return text
    return text


def _java_charset(spark: SparkSession, name: str) -> str:
    """The charset name Spark (Java) knows for `name`; Python spellings such as latin-1 or utf-8-sig are
    translated. A ConfigError names dataset.source.options.encoding if there is none."""
    import codecs

    charset = spark.sparkContext._jvm.java.nio.charset.Charset
    candidates = [name]
    try:
        python = codecs.lookup(name).name  # latin-1 -> iso8859-1, cp1252 -> cp1252
        candidates += ["UTF-8"] if python == "utf-8-sig" else [python]  # Spark drops a UTF-8 BOM itself
    except LookupError:
        pass
    for candidate in candidates:
        try:
            if charset.isSupported(candidate):
                return candidate
        except Exception:  # IllegalCharsetNameException  # noqa: BLE001
            continue
    raise ConfigError(f"dataset.source.options.encoding: unknown charset {name!r} (e.g. UTF-8, ISO-8859-1, cp1252)")


def _spark_options(spark: SparkSession, cfg: Config) -> dict[str, str]:
    """reader_options with the charset spelled as Java knows it."""
    opts = reader_options(cfg)
    if "encoding" in opts:
        opts["encoding"] = _java_charset(spark, opts["encoding"])
    return opts


def q(name: str) -> str:
    """A column name quoted for Spark SQL."""
    return "`" + name.replace("`", "``") + "`"


def sql_str(text: str) -> str:
    """A Spark SQL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Source:
    """Raw rows as read, and how the checks see them, as Spark SQL text.

    `df` has a typed column `__t_<name>` per declared column (null where the text is not of the type),
    `_source_file` and `_pre_reason`. `raw(col)` is the value's text and `empty(col)` says it is missing;
    `malformed` marks a line that could not be split into the declared fields, whose text is `line`.
    Reasons and raw lines are built from these only for bad rows, so a good row pays for none of them.
    The expressions are SQL text, not Column objects: one projection is then one call to the JVM, not
    hundreds (each a round trip that costs milliseconds).
    """

    df: DataFrame
    columns: tuple[ColumnSpec, ...]  # declared
    read: tuple[ColumnSpec, ...]  # present in the files (new data to score may lack the label)
    raw: Callable[[ColumnSpec], str]
    empty: Callable[[ColumnSpec], str]
    malformed: str
    line: str


MISSING_COLUMN = "missing column"  # the start of a _pre_reason: a file lacks a declared column


@dataclass(frozen=True)
class _Layout:
    """Files that share one header (CSV) or one schema (Parquet), read together with their own schema.

    `fields`: the read schema's names in the files' order (header names, made unique); `columns`: declared
    name -> field, for the declared columns these files have; `files`: None for every file at the uri."""

    files: tuple[str, ...] | None
    fields: tuple[str, ...]
    columns: dict[str, str]
    members: tuple[str, ...] = ()  # the files, always (for messages)

    def where(self, uri: str) -> str | list[str]:
        return uri if self.files is None else list(self.files)


def read_source(spark: SparkSession, cfg: Config, uri: str, label_optional: bool = False) -> Source:
    """The rows at uri, in the dataset's format. label_optional (scoring new data): files may lack the label
    column; it then reads as null. The caller has checked that uri exists (it must, to fingerprint it first).

    CSV is parsed straight to the declared types by Spark's own reader (what a plain typed CSV read costs);
    only lines it cannot parse are parsed again as text, to find which field is wrong and why. JSON lines,
    Parquet and images are read as text (or decoded) first and cast here.

    CSV and Parquet columns are found by name, file by file (the CSV header, the Parquet footer): columns
    may come in any order and undeclared ones are ignored. Files with the same columns are read together,
    each set with its own schema, and the sets are unioned: still one pass over the data. The rows of a
    file that lacks a declared column are quarantined with a reason naming the column and the file; a
    declared column that no file has is a SchemaMismatchError."""
    fmt = cfg.dataset.source.format
    columns = tuple(cfg.dataset.columns)
    label = cfg.dataset.column("label").name
    if fmt == "image":
        df = _read_images(spark, cfg, uri)
    else:
        opts = _spark_options(spark, cfg)
        layouts = _layouts(spark, cfg, uri, opts)
        if layouts is not None:
            columns = _present(cfg, uri, layouts, label if label_optional else None)
        optional = {label} if label_optional else set()
        if fmt == "csv":
            return _typed_csv(spark, cfg, uri, columns, layouts, opts, optional)
        df = _read_text(spark, cfg, uri, columns, layouts, opts, optional)
    if len(columns) < len(cfg.dataset.columns):
        df = df.withColumn(label, F.lit(None).cast("string"))
    typed = [f"{_typed(c, q(c.name))} AS {q(_t_name(c.name))}" for c in cfg.dataset.columns]
    return Source(
        df=df.selectExpr("*", *typed),
        columns=tuple(cfg.dataset.columns),
        read=columns,
        raw=lambda c: q(c.name),
        empty=lambda c: _blank(q(c.name), c),
        malformed=f"{q(CORRUPT)} IS NOT NULL",
        line=q(CORRUPT),
    )


def _input_files(spark: SparkSession, uri: str, opts: dict[str, str]) -> list[str]:
    """The files Spark reads at uri (its own listing: hidden files skipped, pathGlobFilter and
    recursiveFileLookup applied), without reading them."""
    listing = {k: v for k, v in opts.items() if k in _FILE_OPTIONS.values()}
    files = spark.read.options(**listing).format("text").load(uri).inputFiles()
    # as Hadoop path strings, which is what a reader takes (inputFiles() gives URIs: a space is %20)
    to_path = spark.sparkContext._jvm.org.apache.hadoop.fs.Path
    uri_of = spark.sparkContext._jvm.java.net.URI
    return sorted(str(to_path(uri_of(f)).toString()) for f in files)


def _per_file(spark: SparkSession, files: Sequence[str], read: Callable) -> list:
    """read(jvm, conf, path) for each file, a few at a time (each is a small remote read on S3 or HDFS)."""
    from concurrent.futures import ThreadPoolExecutor

    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()

    def one(f: str):
        return read(jvm, conf, jvm.org.apache.hadoop.fs.Path(f))

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:
        return list(pool.map(one, files))


def _csv_header(opts: dict[str, str]) -> Callable:
    """A reader of one CSV file's header: its first line that is neither empty nor a comment, decompressed
    by the file's extension (as Spark does: .gz, .bz2, ...), decoded with the source's encoding, split with
    its separator and quote; a UTF-8 byte order mark is dropped. None for a file without one."""
    charset = opts.get("encoding", "UTF-8")
    comment = _unescape(opts.get("comment", ""))
    codecs: dict = {}  # one CompressionCodecFactory (it scans the codec classes when made)

    def read(jvm, conf, path) -> list[str] | None:
        stream = path.getFileSystem(conf).open(path)
        if "factory" not in codecs:
            codecs["factory"] = jvm.org.apache.hadoop.io.compress.CompressionCodecFactory(conf)
        codec = codecs["factory"].getCodec(path)
        if codec is not None:
            stream = codec.createInputStream(stream)
        reader = jvm.java.io.BufferedReader(jvm.java.io.InputStreamReader(stream, charset))
        try:
            for _ in range(1000):
                line = reader.readLine()
                if line is None:
                    return None
                line = line.lstrip("\ufeff")
                if line.strip() and not (comment and line.startswith(comment)):
                    return _split_header(line, opts)
            return None
        finally:
            reader.close()

    return read


def _split_header(line: str, opts: dict[str, str]) -> list[str]:
    import csv

    sep, quote = _unescape(opts.get("sep", ",")), _unescape(opts.get("quote", '"'))
    escape = _unescape(opts.get("escape", "\\"))
    if len(sep) != 1:  # Spark takes a multi-character separator; Python's csv does not
        fields = [f.strip().strip(quote) if quote else f for f in line.split(sep)]
    elif quote:
        esc = escape if escape and escape != quote else None
        fields = next(csv.reader([line], delimiter=sep, quotechar=quote, escapechar=esc))
    else:
        fields = next(csv.reader([line], delimiter=sep, quoting=csv.QUOTE_NONE))
    return [f.strip() for f in fields]


def _parquet_schema(jvm, conf, path) -> str:
    """One Parquet file's schema (names and types), from its footer."""
    footer = jvm.org.apache.parquet.hadoop.ParquetFileReader.readFooter(conf, path)
    return str(footer.getFileMetaData().getSchema().toString())


def _parquet_names(jvm, conf, path) -> list[str]:
    """One Parquet file's top-level column names, from its footer."""
    footer = jvm.org.apache.parquet.hadoop.ParquetFileReader.readFooter(conf, path)
    return [str(f.getName()) for f in footer.getFileMetaData().getSchema().getFields()]


def _layouts(spark: SparkSession, cfg: Config, uri: str, opts: dict[str, str]) -> list[_Layout] | None:
    """The files at uri grouped by their columns (CSV: the header; Parquet: the footer's schema, types
    included, since Spark reads one schema per scan). None where columns are not named in the files
    (JSON lines: each line names its own fields; CSV without a header: by position)."""
    fmt = cfg.dataset.source.format
    if fmt == "jsonl" or (fmt == "csv" and opts.get("header", "true") == "false"):
        return None
    files = _input_files(spark, uri, opts)
    read = _csv_header(opts) if fmt == "csv" else _parquet_schema
    groups: dict[object, list[str]] = {}
    for f, key in zip(files, _per_file(spark, files, read), strict=True):
        if key is not None:  # an empty CSV file has no header and no rows
            groups.setdefault(tuple(key) if isinstance(key, list) else key, []).append(f)
    case_sensitive = spark.conf.get("spark.sql.caseSensitive", "false") == "true"
    layouts = []
    for key, members in groups.items():
        where = None if len(groups) == 1 else tuple(members)
        names = list(key) if fmt == "csv" else _per_file(spark, members[:1], _parquet_names)[0]
        fields, matched = _match(names, cfg.dataset.columns, case_sensitive)
        layouts.append(_Layout(where, tuple(fields), matched, tuple(members)))
    if fmt == "csv":
        _check_separator(cfg, layouts, opts, case_sensitive)
    return layouts


_SEPARATORS = (",", ";", "\t", "|")  # the usual separators of CSV files


def _check_separator(cfg: Config, layouts: list[_Layout], opts: dict[str, str], case_sensitive: bool) -> None:
    """A CSV file read with the wrong separator has one column, its whole header (`id;x;label` read with
    `,`): none of the declared columns, and every row would be quarantined. Stop at once instead, naming
    the files, the columns expected and the separator their header is split by."""
    sep = _unescape(opts.get("sep", ","))
    fold = (lambda s: s) if case_sensitive else str.lower  # noqa: E731
    declared = {fold(c.name) for c in cfg.dataset.columns}
    for lay in layouts:
        if lay.columns or len(lay.fields) != 1:
            continue
        header = lay.fields[0]
        for other in _SEPARATORS:
            if other == sep or other not in header:
                continue
            found = [n for n in _split_header(header, {**opts, "sep": other}) if fold(n) in declared]
            if found:
                more = f" (and {len(lay.members) - 3} more)" if len(lay.members) > 3 else ""
                raise SchemaMismatchError(
                    f"ingest: {', '.join(lay.members[:3])}{more}: the expected columns "
                    f"{[c.name for c in cfg.dataset.columns]} (dataset.columns) were not found: read with the "
                    f"separator {_shown(sep)}, the header is one column {header!r}, which {_shown(other)} splits "
                    f"into columns {found}. Set dataset.source.options.sep: {_shown(other)} (or fix the files)"
                )


def _shown(sep: str) -> str:
    """A separator as YAML takes it in double quotes: "\\t" for a tab."""
    return '"' + sep.replace("\t", "\\t") + '"'


def _match(names: Sequence[str], declared: Sequence[ColumnSpec], case_sensitive: bool) -> tuple[list[str], dict]:
    """Read-schema fields for the file columns `names` (unique; a blank or repeated name gets a placeholder)
    and declared name -> field, matching names as Spark does (case-insensitively unless
    spark.sql.caseSensitive)."""
    fold = (lambda s: s) if case_sensitive else str.lower  # noqa: E731
    by_name = {fold(c.name): c.name for c in declared}
    fields: list[str] = []
    matched: dict[str, str] = {}
    for i, name in enumerate(names):
        field = name if name and fold(name) not in {fold(f) for f in fields} else f"__extra_{i}"
        fields.append(field)
        col = by_name.get(fold(name))
        if col is not None and col not in matched and field == name:
            matched[col] = field
    return fields, matched


def _present(cfg: Config, uri: str, layouts: list[_Layout], optional_label: str | None) -> tuple[ColumnSpec, ...]:
    """The declared columns some file has. A declared column that no file has is a SchemaMismatchError
    (but for the label of new data to score); undeclared file columns are named once in the log."""
    declared = cfg.dataset.columns
    if not layouts:  # only empty files: nothing to check, and no rows
        return tuple(declared)
    found = {name for lay in layouts for name in lay.columns}
    headers = sorted({f for lay in layouts for f in lay.fields})
    absent = [c.name for c in declared if c.name not in found and c.name != optional_label]
    if absent:
        raise SchemaMismatchError(
            f"ingest: {uri}: no file has the column(s) {absent} declared in dataset.columns; the files have "
            f"{headers}. Rename the columns in dataset.columns, or fix the files"
        )
    extra = sorted({f for lay in layouts for f in lay.fields if f not in lay.columns.values()})
    if extra:
        log.info("ingest: %s: column(s) %s are not in dataset.columns; ignored", uri, extra)
    return tuple(c for c in declared if c.name in found)


def _lacking(spark: SparkSession, uri: str, layouts: list[_Layout], columns, optional: set[str]) -> list[list[str]]:
    """Per layout, the declared columns its files lack (their rows are quarantined); logged once."""
    lacking = [[c.name for c in columns if c.name not in lay.columns and c.name not in optional] for lay in layouts]
    files = [f for lay, miss in zip(layouts, lacking, strict=True) if miss for f in lay.files or [uri]]
    if files:
        names = sorted({n for miss in lacking for n in miss})
        log.warning(
            "ingest: %d file(s) lack declared column(s) %s; their rows are quarantined (reason_code "
            "missing_column), e.g. %s",
            len(files),
            names,
            files[:3],
        )
    return lacking


def _pre_reason(missing: Sequence[str]) -> str:
    """SQL: the reading reason of a row from a file that lacks the declared columns `missing`."""
    if not missing:
        return "CAST(NULL AS STRING)"
    what = f"{MISSING_COLUMN}{'s' if len(missing) > 1 else ''} {', '.join(missing)} in file "
    return f"concat({sql_str(what)}, input_file_name())"


def _union(parts: list[DataFrame]) -> DataFrame:
    out = parts[0]
    for part in parts[1:]:
        out = out.union(part)
    return out


def _json_schema(columns: Sequence[ColumnSpec]) -> tuple[T.StructType, list[str]]:
    """JSON lines: the read schema (declared fields as text, nested where a column has a dotted `path`) and
    the selection of each column under its own name."""
    tree: dict = {}
    select = []
    for c in columns:
        parts = c.path.split(".") if c.path else [c.name]
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = None
        select.append(f"{'.'.join(q(p) for p in parts)} AS {q(c.name)}")

    def struct(node: dict) -> T.StructType:
        return T.StructType([T.StructField(k, T.StringType() if v is None else struct(v)) for k, v in node.items()])

    return struct(tree), select


def _read_text(
    spark: SparkSession,
    cfg: Config,
    uri: str,
    columns: Sequence[ColumnSpec],
    layouts: list[_Layout] | None,
    opts: dict[str, str],
    optional: set[str],
) -> DataFrame:
    """JSON lines or Parquet: the declared columns as text, the malformed record, the source file and the
    reading reason (a file that lacks a column)."""
    tail = ["input_file_name() AS _source_file"]
    if cfg.dataset.source.format == "jsonl":
        schema, select = _json_schema(columns)
        schema = schema.add(T.StructField(CORRUPT, T.StringType()))
        reader = spark.read.schema(schema).options(**opts).option("mode", "PERMISSIVE")
        df = reader.option("columnNameOfCorruptRecord", CORRUPT).json(uri)
        return df.selectExpr(*select, q(CORRUPT), *tail, f"CAST(NULL AS STRING) AS {PRE_REASON}")
    # parquet: typed already; each set of files with one schema is read with it, then the same text-first checks
    layouts = layouts or [_Layout(None, tuple(c.name for c in columns), {c.name: c.name for c in columns})]
    lacking = _lacking(spark, uri, layouts, columns, optional)
    parts = []
    for lay, missing in zip(layouts, lacking, strict=True):
        df = spark.read.options(**opts).parquet(*(lay.files or [uri]))
        cells = [
            f"CAST({q(lay.columns[c.name])} AS STRING) AS {q(c.name)}"
            if c.name in lay.columns
            else f"CAST(NULL AS STRING) AS {q(c.name)}"
            for c in columns
        ]
        parts.append(df.selectExpr(*cells, f"NULL AS {q(CORRUPT)}", *tail, f"{_pre_reason(missing)} AS {PRE_REASON}"))
    return _union(parts)


REPARSED = "_reparsed"
REPARSE_FAILED = "_reparse_failed"  # the line is malformed even as text: wrong number of fields, bad quoting
_NOT_FOR_LINES = {"header", "enforceSchema", "encoding", "lineSep", "multiLine", *_FILE_OPTIONS.values()}


def _typed_csv(
    spark: SparkSession,
    cfg: Config,
    uri: str,
    columns: Sequence[ColumnSpec],
    layouts: list[_Layout] | None,
    opts: dict[str, str],
    optional: set[str],
) -> Source:
    """CSV read with the declared types. A line Spark cannot parse keeps its text in CORRUPT; only those
    lines are split again into text fields (`from_csv`, same options) and checked like JSON's text.
    Each layout (files with one header) is read with a schema of its own header's columns, in its order
    (undeclared ones as text, dropped after parsing), then the layouts are unioned."""
    if not layouts:  # no header (header: false) or only empty files: the declared columns, in order
        names = [c.name for c in columns]
        layouts = [_Layout(None, tuple(names), {n: n for n in names})]
        lacking = [[] for _ in layouts]
    else:
        lacking = _lacking(spark, uri, layouts, columns, optional)
    # booleans, dates and timestamps are read as text and parsed by `_typed`, like the other formats' text
    types = {c.name: T.StringType() if c.type in PARSED_FROM_TEXT else SPARK_DATA_TYPES[c.type] for c in columns}
    line_opts = {k: v for k, v in opts.items() if k not in _NOT_FOR_LINES}
    line_opts.update(mode="PERMISSIVE", columnNameOfCorruptRecord=CORRUPT)
    options = ", ".join(f"{sql_str(k)}, {sql_str(v)}" for k, v in line_opts.items())
    ok = f"{q(CORRUPT)} IS NULL"
    parts = []
    for lay, missing in zip(layouts, lacking, strict=True):
        declared_of = {field: name for name, field in lay.columns.items()}
        schema = T.StructType(
            [T.StructField(f, types.get(declared_of.get(f, ""), T.StringType())) for f in lay.fields]
            + [T.StructField(CORRUPT, T.StringType())]
        )
        # the header's names are the schema's: enforceSchema only spares Spark checking them again.
        # columnPruning off: Spark 3.5 otherwise parses only the selected fields and no longer sees that a
        # line has too few fields for its header (the undeclared ones are never selected)
        forced = {"enforceSchema": "true", "columnPruning": "false"}
        reader = spark.read.schema(schema).options(**{"header": "true", **opts, **forced})
        df = reader.option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", CORRUPT).csv(lay.where(uri))
        text_schema = ", ".join([*(f"{q(f)} string" for f in lay.fields), f"{q(CORRUPT)} string"])
        reparsed = f"CASE WHEN NOT {ok} THEN from_csv({q(CORRUPT)}, {sql_str(text_schema)}, map({options})) END"
        df = df.selectExpr(
            *[
                f"{q(lay.columns[c.name])} AS {q(_f_name(c.name))}"
                if c.name in lay.columns
                else f"CAST(NULL AS {types[c.name].simpleString()}) AS {q(_f_name(c.name))}"
                for c in columns
            ],
            q(CORRUPT),
            f"{reparsed} AS {REPARSED}",
            "input_file_name() AS _source_file",
            f"{_pre_reason(missing)} AS {PRE_REASON}",
        )
        # the same columns for every layout, so that they union (from_csv stays in the projection above,
        # evaluated once per line: Spark does not inline an expensive expression used more than once)
        parts.append(
            df.selectExpr(
                *[q(_f_name(c.name)) for c in columns],
                q(CORRUPT),
                *[
                    f"{REPARSED}.{q(lay.columns[c.name])} AS {q(_r_name(c.name))}"
                    if c.name in lay.columns
                    else f"CAST(NULL AS STRING) AS {q(_r_name(c.name))}"
                    for c in columns
                ],
                f"{REPARSED}.{q(CORRUPT)} IS NOT NULL AS {REPARSE_FAILED}",
                "_source_file",
                PRE_REASON,
            )
        )
    df = _union(parts)
    present = {c.name for c in columns}

    def text(c: ColumnSpec) -> str:
        return q(_r_name(c.name))

    typed = []
    for c in cfg.dataset.columns:
        if c.name in present:
            parsed = _typed(c, q(_f_name(c.name))) if c.type in PARSED_FROM_TEXT else q(_f_name(c.name))
            value = f"CASE WHEN {ok} THEN {parsed} ELSE {_typed(c, text(c))} END"
        else:
            value = f"CAST(NULL AS {SPARK_TYPES[c.type]})"
        typed.append(f"{value} AS {q(_t_name(c.name))}")

    def raw(c: ColumnSpec) -> str:
        if c.name not in present:
            return "CAST(NULL AS STRING)"
        return f"CASE WHEN {ok} THEN CAST({q(_f_name(c.name))} AS STRING) ELSE {text(c)} END"

    def empty(c: ColumnSpec) -> str:
        if c.name not in present:
            return "true"
        parsed = q(_f_name(c.name))
        as_text = c.type == "string" or c.type in PARSED_FROM_TEXT
        parsed_empty = _blank(parsed, c) if as_text else f"{parsed} IS NULL"
        return f"CASE WHEN {ok} THEN {parsed_empty} ELSE {_blank(text(c), c)} END"

    return Source(
        df=df.selectExpr("*", *typed),
        columns=tuple(cfg.dataset.columns),
        read=tuple(columns),
        raw=raw,
        empty=empty,
        malformed=f"coalesce({REPARSE_FAILED}, false)",
        line=q(CORRUPT),
    )


def _t_name(name: str) -> str:
    return f"__t_{name}"


def _f_name(name: str) -> str:
    return f"__f_{name}"


def _r_name(name: str) -> str:
    return f"__r_{name}"


def _blank(text: str, col: ColumnSpec) -> str:
    return f"({text} IS NULL)" if col.type == "image" else f"({text} IS NULL OR trim({text}) = '')"


def _decode_images(shape: tuple[int, ...], image: str):
    def decode(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import io

        import numpy as np
        from PIL import Image, UnidentifiedImageError

        from dlpipe.data.tensors import encode_rows

        mode = "L" if len(shape) == 2 or shape[2] == 1 else "RGB"
        for pdf in batches:
            cells, reasons = [], []
            for content in pdf["content"]:
                try:
                    with Image.open(io.BytesIO(content)) as img:
                        arr = np.asarray(img.convert(mode), dtype=np.uint8).reshape(-1)
                        size = img.size
                except (UnidentifiedImageError, OSError, ValueError) as exc:
                    cells.append(None)
                    reasons.append(f"not a decodable image: {type(exc).__name__}")
                    continue
                if (size[1], size[0]) != tuple(shape[:2]) or arr.size != int(np.prod(shape)):
                    cells.append(None)
                    reasons.append(f"image shape {size[1]}x{size[0]} is not the declared {'x'.join(map(str, shape))}")
                    continue
                cells.append(encode_rows(arr.reshape(1, *shape))[0])
                reasons.append(None)
            yield pd.DataFrame({"path": pdf["path"], image: cells, PRE_REASON: reasons})

    return decode


def _read_images(spark: SparkSession, cfg: Config, uri: str) -> DataFrame:
    src = cfg.dataset.source
    opts = reader_options(cfg)
    files = spark.read.format("binaryFile").options(**opts).load(uri)
    col = cfg.dataset.image_column
    key, label = cfg.dataset.column("key").name, cfg.dataset.column("label").name
    out_schema = f"path string, {col.name} binary, {PRE_REASON} string"
    decoded = files.select("path", "content").mapInPandas(_decode_images(tuple(col.shape), col.name), schema=out_schema)
    extracted = F.regexp_extract("path", src.label_from_path, 1)
    return decoded.select(
        F.col("path").alias(key),
        F.col(col.name),
        F.when(extracted == "", None).otherwise(extracted).alias(label),
        F.lit(None).cast("string").alias(CORRUPT),
        F.col("path").alias("_source_file"),
        F.col(PRE_REASON),
    )


# --- validating ----------------------------------------------------------------------------------------
def _typed(col: ColumnSpec, ref: str) -> str:
    """SQL for the typed value of the text at `ref`, or null when it is not of the declared type.

    Integers also accept integral decimal text ("3.0", "1e3": what a float column or a spreadsheet export
    holds for a whole number), exactly within 2**53; "1.5" stays a type error.
    """
    if col.type in ("string", "image"):
        return ref
    text = f"trim({ref})"
    if col.type == "boolean":
        word = f"lower({text})"
        yes, no = (", ".join(sql_str(w) for w in ws) for ws in (TRUE_WORDS, FALSE_WORDS))
        return f"CASE WHEN {word} IN ({yes}) THEN true WHEN {word} IN ({no}) THEN false END"
    if col.type in ("date", "timestamp"):
        # only text of the pattern's exact shape reaches the parser: Spark 3.5 throws on other text
        fmt, shape = sql_str(col.datetime_format), sql_str(datetime_regex(col.datetime_format))
        parsed = f"try_to_timestamp({text}, {fmt})"  # null for an impossible day (31/02): no exception
        if col.type == "timestamp":  # the same wall-clock time, without a zone (to_timestamp_ntz can throw)
            parsed = f"to_timestamp_ntz({text}, {fmt})"
        return f"CASE WHEN {text} RLIKE {shape} THEN CAST({parsed} AS {SPARK_TYPES[col.type]}) END"
    if col.type in ("int", "long"):
        whole = f"try_cast({text} AS double)"
        via_double = (
            f"CASE WHEN {whole} = floor({whole}) AND abs({whole}) < 9007199254740992 THEN CAST({whole} AS bigint) END"
        )
        return f"try_cast(coalesce(try_cast({text} AS bigint), {via_double}) AS {SPARK_TYPES[col.type]})"
    return f"try_cast({text} AS {SPARK_TYPES[col.type]})"


def _t(name: str) -> str:
    """The typed value of a column, computed once per row by `read_source`."""
    return q(_t_name(name))


@dataclass(frozen=True)
class Check:
    """One rule: rows where `when` (SQL) holds fail it with the reason `message` + the text of column
    `value_of` (a declared column, or PRE_REASON; None: the message alone)."""

    when: str
    message: str
    value_of: str | None
    code: str


def _checks(src: Source, cfg: Config, scoring: bool = False) -> list[Check]:
    """The rules in the order they are tried; a row gets the first that applies.

    Conditions read the typed columns computed once per row; reasons are only built for bad rows.
    scoring: rows to be scored, not learned from; the label is not checked (new data has none).
    """
    checks = [
        Check(src.malformed, "malformed line: wrong number of fields or bad syntax", None, "malformed"),
        # issue 12: a file lacks a declared column (read_source's reason names it and the file); before the
        # image line, which takes any other reason found while reading
        Check(f"startswith({PRE_REASON}, {sql_str(MISSING_COLUMN)})", "", PRE_REASON, "missing_column"),
        Check(f"{PRE_REASON} IS NOT NULL", "", PRE_REASON, "image"),
    ]
    label = cfg.dataset.column("label")
    for col in src.columns:
        if scoring and col.name == label.name:
            continue
        typed, empty, name = _t(col.name), src.empty(col), col.name
        if col.missing_policy == "quarantine":
            checks.append(Check(empty, f"missing value: {name}", None, "missing"))
        if col.type in NUMERIC:
            article = "an" if col.type == "int" else "a"
            type_error = f"NOT {empty} AND {typed} IS NULL"
            checks.append(Check(type_error, f"not {article} {col.type}: {name}=", name, "type"))
            if col.type in ("float", "double"):
                bad = f"(isnan({typed}) OR abs({typed}) = double('infinity'))"
                checks.append(Check(bad, f"not finite: {name}=", name, "not_finite"))
            if col.min is not None or col.max is not None:
                low = f"{typed} < {float(col.min)!r}" if col.min is not None else "false"
                high = f"{typed} > {float(col.max)!r}" if col.max is not None else "false"
                checks.append(
                    Check(f"({low} OR {high})", f"out of range [{col.min}, {col.max}]: {name}=", name, "range")
                )
        if col.type in PARSED_FROM_TEXT:
            what = "boolean" if col.type == "boolean" else col.type
            type_error = f"NOT {empty} AND {typed} IS NULL"
            checks.append(Check(type_error, f"not a {what}: {name}=", name, "type"))
        if col.type == "string" and col.values is not None:
            allowed = ", ".join(sql_str(v) for v in col.values)
            bad = f"NOT {empty} AND NOT {typed} IN ({allowed})"
            if col.name == label.name:
                checks.append(Check(bad, f"label is not a declared class of {name}: ", name, "label_value"))
            else:
                checks.append(Check(bad, f"not an allowed value of {name}: ", name, "value"))
    if scoring or cfg.dataset.task == "regression" or label.type == "string":
        return checks  # a regression label is checked like any number; a string label by its values
    k, typed_label = cfg.dataset.num_classes, _t(label.name)
    bad = f"({typed_label} < 0 OR {typed_label} >= {k})"
    checks.append(Check(bad, f"label out of range [0, {k}): {label.name}=", label.name, "label_range"))
    return checks


@dataclass(frozen=True)
class Checked:
    """Rows with `_check`: the index of the first failed check, null for a good row."""

    df: DataFrame
    checks: list[Check]
    src: Source

    def typed(self) -> list[str]:
        """The declared columns' typed values, null in bad rows but for the key (null only where it is
        itself unreadable): it names a quarantined row. SQL, for selectExpr."""

        def good_only(c: ColumnSpec) -> str:
            if c.missing_policy == "quarantine":
                return f"CASE WHEN {CHECK} IS NULL THEN {_t(c.name)} END"
            # a missing value let through (to be imputed): null, whatever blank text stood for it
            return f"CASE WHEN {CHECK} IS NULL AND NOT {self.src.empty(c)} THEN {_t(c.name)} END"

        return [f"{_t(c.name) if c.role == 'key' else good_only(c)} AS {q(c.name)}" for c in self.src.columns]

    def reasons(self) -> list[str]:
        """reason, reason_code, raw_line (the line as read, or its fields joined) and source_file; null in
        good rows. Each is a lookup by `_check` in arrays of literals, and the text of the few columns a
        reason quotes: small generated code, whatever the number of rules. SQL, for selectExpr."""

        def at(values: list[str]) -> str:
            return f"element_at(array({', '.join(values)}), {CHECK} + 1)"

        spec = {c.name: c for c in self.src.columns}
        quoted = list(dict.fromkeys(c.value_of for c in self.checks if c.value_of))
        texts = ["''", *(PRE_REASON if n == PRE_REASON else self.src.raw(spec[n]) for n in quoted)]
        which = at([str(quoted.index(c.value_of) + 1 if c.value_of else 0) for c in self.checks])
        quoted_text = f"element_at(array({', '.join(texts)}), {which} + 1)"
        reason = f"concat({at([sql_str(c.message) for c in self.checks])}, {quoted_text})"
        fields = ", ".join(f"coalesce({self.src.raw(c)}, '')" for c in self.src.read if c.type != "image")
        bad = f"{CHECK} IS NOT NULL"
        return [
            f"CASE WHEN {bad} THEN {reason} END AS reason",
            f"CASE WHEN {bad} THEN {at([sql_str(c.code) for c in self.checks])} END AS reason_code",
            f"CASE WHEN {bad} THEN coalesce({self.src.line}, concat_ws(',', {fields})) END AS raw_line",
            f"CASE WHEN {bad} THEN _source_file END AS source_file",
        ]

    def rows(self) -> DataFrame:
        """typed() and reasons(): what ingest and infer route to their outputs."""
        return self.df.selectExpr(*self.typed(), *self.reasons())


CHECK = "_check"
QUARANTINE_COLUMNS = ("reason", "reason_code", "raw_line", "source_file")


def validate(src: Source, cfg: Config, scoring: bool = False) -> Checked:
    """Add `_check` to the source's rows. A projection of its own, over the typed columns: Spark does not merge
    projections when that would repeat the casts, so each value is parsed once per row, not once per check."""
    checks = _checks(src, cfg, scoring)
    check = "coalesce(" + ", ".join(f"CASE WHEN {c.when} THEN {i} END" for i, c in enumerate(checks)) + ")"
    return Checked(src.df.selectExpr("*", f"{check} AS {CHECK}"), checks, src)


DUPLICATE_KEY = "duplicate_key"  # the reason code of a valid row dropped by dataset.duplicates
_ORDER = "_input_order"  # a row's position in its file's split (monotonic within one split)
_BLOCK = "_input_block"  # where that split starts in the file


def with_input_order(df: DataFrame) -> DataFrame:
    """df with where each row was read: the start of its file split and its position within it. Computed in
    the reading stage (input_file_block_start is only known there); with _source_file, ordering by these
    puts the rows of a file in line order, whatever the number of cores or splits."""
    return df.selectExpr("*", f"input_file_block_start() AS {_BLOCK}", f"monotonically_increasing_id() AS {_ORDER}")


def mark_duplicates(checked: Checked, policy: str) -> Checked:
    """dataset.duplicates on valid rows that share a key (rows failing a check are not counted: their key
    is what quarantines them). keep_first: every row after the first (by input file, the split's start in
    it and line order) fails a last check, reason_code duplicate_key; quarantine: every row of such a key
    fails it. keep_all: unchanged.

    One shuffle by key (a window, sort-based, spilling: bounded memory whatever a key's count); a row that
    failed another check is a group of its own, so the bad rows never form one large group."""
    if policy == "keep_all":
        return checked
    key = next(c for c in checked.src.columns if c.role == "key")
    group = f"PARTITION BY {_t(key.name)}, CASE WHEN {CHECK} IS NOT NULL THEN {_ORDER} END"
    if policy == "keep_first":
        dup = f"{CHECK} IS NULL AND row_number() OVER ({group} ORDER BY _source_file, {_BLOCK}, {_ORDER}) > 1"
        message = f"duplicate key (dataset.duplicates: keep_first kept its first row): {key.name}="
    else:
        dup = f"{CHECK} IS NULL AND count(1) OVER ({group}) > 1"
        message = f"duplicate key (dataset.duplicates: quarantine, every row of it): {key.name}="
    index = len(checked.checks)
    df = checked.df.selectExpr("*", f"{dup} AS _duplicate")
    df = df.selectExpr(
        *[q(c) for c in df.columns if c not in (CHECK, "_duplicate")],
        f"coalesce({CHECK}, CASE WHEN _duplicate THEN {index} END) AS {CHECK}",
    )
    return Checked(df, [*checked.checks, Check("_duplicate", message, key.name, DUPLICATE_KEY)], checked.src)


def duplicate_report(spark: SparkSession, key: str, clean: str, quarantine: str | None) -> dict[str, int]:
    """duplicate_keys (keys that more than one valid row has) and duplicate_rows (the rows beyond the first
    of each), from the key column of what was written: the clean keys, and those quarantined as
    duplicate_key (None: nothing was). A hash aggregation of one column; two numbers come back."""
    keys = spark.read.parquet(clean).select(key)
    if quarantine is not None:
        dropped = spark.read.parquet(quarantine).where(F.col("reason_code") == DUPLICATE_KEY).select(key)
        keys = keys.unionByName(dropped)
    row = (
        keys.groupBy(key)
        .count()
        .where(F.col("count") > 1)
        .agg(F.count(F.lit(1)).alias("keys"), F.sum(F.col("count") - 1).alias("rows"))
        .first()
    )
    return {"duplicate_keys": int(row["keys"] or 0), "duplicate_rows": int(row["rows"] or 0)}


def quarantine_by_code(spark: SparkSession, uri: str) -> dict[str, int]:
    """Rows per reason code of a written quarantine (a small job: at most max_bad_fraction of the rows)."""
    return {r["reason_code"]: int(r["count"]) for r in spark.read.parquet(uri).groupBy("reason_code").count().collect()}


def read_clean(spark: SparkSession, cfg: Config, uri: str | None = None) -> DataFrame:
    """The clean dataset's declared columns, typed."""
    return spark.read.parquet(uri or dataset_paths(cfg).clean).select(*[c.name for c in cfg.dataset.columns])


def _explain_spark_error(exc: Exception, uri: str) -> Exception | None:
    text = str(exc)
    if "does not conform to the schema" in text:
        detail = [
            ln.strip() for ln in text.splitlines() if ln.strip().startswith(("Expected:", "CSV file:", "Header:"))
        ]
        return SchemaMismatchError(
            f"ingest: {uri}: CSV header does not match dataset.columns: " + "; ".join(detail[:3])
        )
    return None


def _separator_hint(cfg: Config, by_code: dict[str, int], failed: int) -> str:
    """When most bad CSV rows are malformed lines, the separator or quote is the usual cause: say so."""
    if cfg.dataset.source.format != "csv" or by_code.get("malformed", 0) * 2 <= failed:
        return ""
    opts = reader_options(cfg)
    sep, quote = (_shown(_unescape(opts.get(name, default))) for name, default in (("sep", ","), ("quote", '"')))
    return (
        f"Most are malformed lines: are the files separated by {sep} and quoted with {quote}? "
        "(dataset.source.options.sep, quote) "
    )


# --- the stage -----------------------------------------------------------------------------------------
class Ingest(Stage):
    """Raw input -> clean (typed) + quarantine (a reason per row); every row lands in exactly one."""

    name = "ingest"
    accounting = ("rows_in", ("rows_kept", "rows_quarantined"))

    def plan(self, spark: SparkSession, cfg: Config) -> Plan:
        paths = dataset_paths(cfg)
        require_input(spark, paths.raw, f"ingest: input path {paths.raw} does not exist (dataset.source.uri)")
        inputs = {paths.raw: lineage.source_fingerprint(spark, paths.raw)}
        # the default duplicates policy is left out: datasets ingested before it existed keep their fingerprint
        default = {"duplicates"} if cfg.dataset.duplicates == "keep_all" else set()
        spec = cfg.dataset.model_dump(mode="json", exclude={"generator", "split", *default})
        fp = lineage.digest({"stage": "ingest", "inputs": inputs, "dataset": spec})
        return Plan(fp, inputs, {"clean": paths.clean, "quarantine": paths.quarantine})

    def compute(self, spark: SparkSession, cfg: Config, plan: Plan, tmp: dict[str, str]) -> dict:
        try:
            return _ingest(spark, cfg, dataset_paths(cfg).raw, tmp["clean"], tmp["quarantine"])
        except Exception as exc:
            clear = _explain_spark_error(exc, dataset_paths(cfg).raw)
            if clear is not None:
                raise clear from None
            raise


def run(spark: SparkSession, cfg: Config, force: bool = False) -> dict:
    """The ingest stage. Returns metrics: rows_in, rows_kept, rows_quarantined, quarantined_<code>."""
    return execute(Ingest(), spark, cfg, force)


def _ingest(spark: SparkSession, cfg: Config, raw: str, clean_tmp: str, q_tmp: str) -> dict:
    """One pass over the input: every row is parsed and checked once and written either to clean (typed)
    or to quarantine (its reason); the counts come from that pass and from the footers of what it wrote."""
    policy = cfg.dataset.duplicates
    src = read_source(spark, cfg, raw)
    if policy != "keep_all":
        src = replace(src, df=with_input_order(src.df))
    checked = mark_duplicates(validate(src, cfg), policy)
    seen = Observation("ingest")  # rows in, counted on the way, apart from the outputs' footers
    rows = checked.rows().observe(seen, F.count(F.lit(1)).alias("rows_in"))
    with job_description(spark, "ingest: read, check and write clean + quarantine"):
        written = write_routed(
            spark,
            rows,
            F.when(F.col("reason_code").isNull(), "clean").otherwise("quarantine"),
            {
                "clean": Output(clean_tmp, [c.name for c in cfg.dataset.columns]),
                "quarantine": Output(q_tmp, [cfg.dataset.column("key").name, *QUARANTINE_COLUMNS]),
            },
            staging=f"{clean_tmp}-routing",
            settings=storage_settings(cfg),
        )
    n_in = int(seen.get["rows_in"])
    if n_in == 0:
        raise ValueError(f"ingest: no rows in {raw} (dataset.source.uri): the input is empty")
    kept = sum(f.rows for f in written["clean"])
    quarantined = sum(f.rows for f in written["quarantine"])
    log.info("ingest: %d rows in from %s", n_in, raw)
    by_code = quarantine_by_code(spark, q_tmp) if quarantined else {}
    log.info("ingest: kept %d, quarantined %d %s", kept, quarantined, by_code)
    # rows dropped by the declared duplicates policy are not bad data: they do not count here
    failed = quarantined - by_code.get(DUPLICATE_KEY, 0)
    bad_share = failed / n_in
    if bad_share > cfg.dataset.max_bad_fraction:
        bad = spark.read.parquet(q_tmp).where(F.col("reason_code") != DUPLICATE_KEY).limit(3).collect()
        examples = [f"{r['reason']} ({r['source_file']})" for r in bad]
        raise BadDataError(
            f"ingest: {failed} of {n_in} rows ({bad_share:.1%}) failed validation, more than "
            f"dataset.max_bad_fraction={cfg.dataset.max_bad_fraction}; by reason {by_code}; e.g. {examples}. "
            f"{_separator_hint(cfg, by_code, failed)}"
            "Fix the input, or raise dataset.max_bad_fraction to accept it. Nothing was written."
        )
    key = cfg.dataset.column("key").name
    dups = duplicate_report(spark, key, clean_tmp, q_tmp if by_code.get(DUPLICATE_KEY) else None)
    if dups["duplicate_keys"]:
        log.warning(
            "ingest: %d key(s) of %s have more than one valid row (%d rows beyond the first); dataset.duplicates: %s%s",
            dups["duplicate_keys"],
            key,
            dups["duplicate_rows"],
            policy,
            " keeps them all (keep_first or quarantine drops them)" if policy == "keep_all" else "",
        )
    return {
        "rows_in": n_in,
        "rows_kept": kept,
        "rows_quarantined": quarantined,
        "bad_fraction": bad_share,
        **dups,
        **{f"quarantined_{c}": n for c, n in sorted(by_code.items())},
    }
