"""The Native-format encoder (meterhouse/core/_native.c) against clickhouse-connect's serializer:
the same columns inserted both ways must read back identical from the real engine."""

from __future__ import annotations

import math
import struct

import pytest

from meterhouse.core import native
from meterhouse.core._native import native_block

NAMES = ("s", "u8", "i64", "u64", "f64", "t", "arr")
TYPES = ("String", "UInt8", "Int64", "UInt64", "Float64", "DateTime64(9, 'UTC')", "Array(String)")
COLUMNS = [
    ["", "plain", "ünïcødé ✓", "x" * 300, "tab\tnew\nline", "\x00nul"],
    [0, 1, 255, 7, 0, 1],
    [0, -1, 2**63 - 1, -(2**63), 42, 10**15],
    [0, 1, 2**64 - 1, 2**63, 12345678901234567890, 9],
    [0.0, -1.5, 1e308, -0.0, math.pi, 2.0**53 + 1],
    [0, 1, 1_795_849_200_123_456_789, 10**18, 5, 2**62],
    [[], ["a"], ["k1", "k2", "ünï"], [""], ["x" * 200] * 3, ["z"]],
]


def test_the_extension_is_built():
    # The suite exercises the native path: a build without it would silently test the fallback.
    assert native._c_encode is native_block


def test_native_block_reads_back_exactly_like_clickhouse_connect(store):
    db = store.database
    cols = ", ".join(f"{n} {t}" for n, t in zip(NAMES, TYPES, strict=True))
    for table in ("via_native", "via_connect"):
        store.client.command(
            f"CREATE TABLE {db}.{table} ({cols}, row UInt32) ENGINE = MergeTree ORDER BY row"
        )
    rows = list(range(len(COLUMNS[0])))
    store.client.raw_insert(
        f"{db}.via_native", [*NAMES, "row"], native_block([*NAMES, "row"], [*TYPES, "UInt64"], [*COLUMNS, rows]),
        fmt="Native",
    )  # fmt: skip
    store.client.insert(f"{db}.via_connect", [*COLUMNS, rows], column_names=[*NAMES, "row"],
                        column_type_names=[*TYPES, "UInt32"], column_oriented=True)  # fmt: skip
    a = store.rows(f"SELECT * FROM {db}.via_native ORDER BY row")
    b = store.rows(f"SELECT * FROM {db}.via_connect ORDER BY row")
    assert len(a) == len(COLUMNS[0])
    assert a == b
    assert a[2][2] == 2**63 - 1 and a[2][3] == 2**64 - 1 and a[2][6] == ["k1", "k2", "ünï"]


@pytest.mark.parametrize(
    ("types", "columns", "error"),
    [
        (("String",), [[1]], TypeError),
        (("UInt8",), [[256]], OverflowError),
        (("Int64",), [[2**63]], OverflowError),
        (("UInt64",), [[-1]], OverflowError),
        (("Float64",), [["1.0"]], TypeError),
        (("Array(String)",), [["abc"]], TypeError),
        (("Array(String)",), [[[1]]], TypeError),
        (("Map(String, String)",), [[{}]], ValueError),
    ],
)
def test_a_bad_value_raises_and_names_its_column(types, columns, error):
    with pytest.raises(error, match="column c|unsupported column type"):
        native_block(["c"], list(types), columns)


def test_columns_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        native_block(["a", "b"], ["UInt8", "UInt8"], [[1, 2], [1]])


def test_the_c_and_python_encoders_agree_and_decode_reads_either_back():
    names, types = [*NAMES, "n", "i32", "au", "af"], [*TYPES, "Nullable(Float64)", "Int32", "Array(UInt64)",
                                                       "Array(Float64)"]  # fmt: skip
    cols = [*COLUMNS, [None, 1.5, None, -0.0, 2.0, None], [0, -1, 2**31 - 1, -(2**31), 5, 6],
            [[], [1, 2**64 - 1], [0], [], [3, 4, 5], [7]], [[0.5], [], [1e-300, -2.0], [], [], [3.0]]]  # fmt: skip
    block = native_block(names, types, cols)
    assert block == native.encode_python(names, types, cols)
    got_names, got_types, got, rows = native.decode(block)
    assert (got_names, got_types, rows) == (names, types, 6)
    assert [got[n] for n in names] == [[list(v) if isinstance(v, list) else v for v in c] for c in cols]


def test_with_constant_adds_a_column_the_engine_reads(store):
    db = store.database
    store.client.command(f"CREATE TABLE {db}.k (s String, batch_id String) ENGINE = MergeTree ORDER BY s")
    block = native.with_constant(
        native.encode(["s"], ["String"], [["a", "b", "c"]]), 3, "batch_id", "String", "t:n"
    )
    store.insert_native("k", ["s", "batch_id"], block, "tok")
    assert store.rows(f"SELECT s, batch_id FROM {db}.k ORDER BY s") == [
        ("a", "t:n"),
        ("b", "t:n"),
        ("c", "t:n"),
    ]
    assert native.rows_of(block) == 3


# -- the C and Python encoders on generated columns --------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # any encodable str
_VALUES = {
    "String": _TEXT,
    "UInt8": st.integers(0, 255),
    "Int32": st.integers(-(2**31), 2**31 - 1),
    "Int64": st.integers(-(2**63), 2**63 - 1),
    "DateTime64(9, 'UTC')": st.integers(-(2**63), 2**63 - 1),
    "UInt64": st.integers(0, 2**64 - 1),
    "Float64": st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**53), 2**53),
    "Nullable(Float64)": st.none() | st.floats(),
    "Array(String)": st.lists(_TEXT, max_size=5) | st.tuples(_TEXT),
    "Array(UInt64)": st.lists(st.integers(0, 2**64 - 1), max_size=5),
    "Array(Float64)": st.lists(st.floats(), max_size=5),
}


@st.composite
def _blocks(draw):
    types = draw(st.lists(st.sampled_from(sorted(_VALUES)), min_size=1, max_size=8))
    rows = draw(st.integers(0, 12))
    names = draw(st.lists(_TEXT.filter(lambda s: "\x00" not in s), min_size=len(types), max_size=len(types)))
    columns = [draw(st.lists(_VALUES[t], min_size=rows, max_size=rows)) for t in types]
    return names, types, columns


def _same(a, b):
    """Equal as stored: floats by their bits (NaN, -0.0), sequences element-wise."""
    if isinstance(a, float) or isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_blocks())
def test_generated_columns_encode_byte_for_byte_alike_and_decode_back(block):
    names, types, columns = block
    c = native_block(names, types, columns)
    assert c == native.encode_python(names, types, columns)
    got_names, got_types, got, rows = native.decode(c)
    assert (got_names, got_types, rows) == (list(names), list(types), len(columns[0]))
    for name, column in zip(names, columns, strict=True):
        if names.count(name) == 1:  # a repeated name keeps its last column in the dict
            assert _same(got[name], [float(v) if isinstance(v, int) and "Float" in t else v
                                     for v, t in zip(column, [types[names.index(name)]] * len(column),
                                                     strict=True)])  # fmt: skip
    assert native.rows_of(c) == len(columns[0])
    extended = native.with_constant(c, len(columns[0]), "batch_id", "String", "tok:n")
    assert native.decode(extended)[2]["batch_id"] == ["tok:n"] * len(columns[0])


@pytest.mark.parametrize(
    ("types", "columns"),
    [
        (("Int64",), [[2**63]]),
        (("Int64",), [[1.5]]),
        (("UInt64",), [[2**64]]),
        (("Int32",), [[2**31]]),
        (("UInt8",), [[-1]]),
        (("Float64",), [[None]]),
        (("Nullable(Float64)",), [["x"]]),
        (("Array(UInt64)",), [[[-1]]]),
        (("Array(Float64)",), [[["x"]]]),
        (("String",), [[None]]),
        (("String",), [["\ud800"]]),
    ],
)
def test_both_encoders_refuse_the_same_bad_values(types, columns):
    with pytest.raises((TypeError, OverflowError, ValueError)) as c_error:
        native_block(["c"], list(types), columns)
    with pytest.raises((TypeError, OverflowError, ValueError)) as py_error:
        native.encode_python(["c"], list(types), columns)
    assert isinstance(py_error.value, type(c_error.value)) or isinstance(c_error.value, type(py_error.value))
