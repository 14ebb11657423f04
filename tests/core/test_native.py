"""The Native-format encoder (meterhouse/core/_native.c) against clickhouse-connect's serializer:
the same columns inserted both ways must read back identical from the real engine."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_a_block_past_its_bound_is_refused_by_both_encoders_before_it_is_built():
    """A bound at the block's exact size passes; one byte less raises BlockTooLarge in both encoders, and
    the C one allocates nothing beyond the bound (a column of 100,000 copies of one 4,000-character
    string, 400 MB whole, is refused at 1 MB without taking the memory)."""
    names, types = ["s", "a"], ["String", "Array(String)"]
    cols = [["x" * 100, "ü"], [["k" * 50, ""], ["v"]]]
    size = len(native.encode(names, types, cols))
    assert native.encode(names, types, cols, size) == native.encode_python(names, types, cols, size)
    for encode in (native.encode, native.encode_python):
        with pytest.raises(native.BlockTooLarge):
            encode(names, types, cols, size - 1)
    column = [["w" * 4000]] * 100_000  # one list, shared: 800 KB of references
    status = Path("/proc/self/status")

    def kib(key: str) -> int:
        return int(status.read_text().split(key + ":")[1].split()[0])

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = kib("VmRSS")
    with pytest.raises(native.BlockTooLarge, match="column a"):
        native.encode(["a"], ["Array(String)"], [column], 1 << 20)
    assert kib("VmHWM") - before < 50_000  # KiB: not the 400 MB of the whole block


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


# Converting a value can run Python code (``__index__``, ``__float__``) that changes the very lists being
# read; the encoder must notice and raise, not read freed memory (a crash, or garbage written into the
# spool). Run in a subprocess: on a broken encoder the interpreter may die.
REENTRANT = r"""
import sys
from meterhouse.core._native import native_block

case = sys.argv[1]
column, inner = [], []


class Shrinks:
    def __index__(self):
        column.clear()
        inner.clear()
        return 1

    def __float__(self):
        column.clear()
        inner.clear()
        return 1.0


class Grows:
    def __float__(self):
        inner.extend([1.0] * 1000)
        return 1.0


tail = [float(i) + 0.5 for i in range(2000)]
if case == "int64":
    column += [Shrinks()] + list(range(1000, 3000))
    types = ["Int64"]
elif case == "float64":
    column += [Shrinks()] + tail
    types = ["Float64"]
elif case == "nullable":
    column += [Shrinks()] + tail
    types = ["Nullable(Float64)"]
elif case == "array":
    inner += [Shrinks()] + tail
    column += [inner, [0.5]]
    types = ["Array(Float64)"]
elif case == "array-grows":
    inner += [0.5]
    column += [[Grows()], inner]  # the second row's length is written before the first row's values
    types = ["Array(Float64)"]
try:
    native_block(["c"], types, [column])
except RuntimeError as e:
    print("raised", e)
else:
    print("encoded")
"""


@pytest.mark.parametrize("case", ["int64", "float64", "nullable", "array", "array-grows"])
def test_a_value_whose_conversion_changes_the_columns_raises(case):
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", REENTRANT, case], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("raised"), run.stdout


@pytest.mark.parametrize(
    ("names", "types"),
    [(["a\x00b"], ["String"]), (["a"], ["String\x00junk"]), (["a"], ["UInt64\x00"])],
)
def test_names_and_types_with_nul_characters_are_encoded_like_the_python_encoder(names, types):
    cols = [["x"]] if types[0].startswith("String") else [[1]]
    try:
        expected = native.encode_python(names, types, cols)
    except ValueError:
        with pytest.raises(ValueError, match="unsupported column type"):
            native_block(names, types, cols)
    else:
        assert native_block(names, types, cols) == expected


_UINT64 = st.integers(0, 2**64 - 1)
_FLOAT = st.floats(allow_nan=False) | st.just(math.nan) | st.sampled_from([-0.0, math.inf, -math.inf])
_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
_TYPES = {
    "String": _TEXT,
    "UInt8": st.integers(0, 255) | st.booleans(),
    "Int32": st.integers(-(2**31), 2**31 - 1),
    "Int64": st.integers(-(2**63), 2**63 - 1),
    "UInt64": _UINT64,
    "DateTime64(9, 'UTC')": st.integers(0, 2**63 - 1),
    "Float64": _FLOAT | st.integers(-(2**53), 2**53),
    "Nullable(Float64)": st.none() | _FLOAT,
    "Array(String)": st.lists(_TEXT, max_size=4) | st.lists(_TEXT, max_size=4).map(tuple),
    "Array(UInt64)": st.lists(_UINT64, max_size=4),
    "Array(Float64)": st.lists(_FLOAT, max_size=4),
}


@st.composite
def _blocks(draw):
    types = draw(st.lists(st.sampled_from(sorted(_TYPES)), min_size=1, max_size=6))
    rows = draw(st.integers(0, 8))
    names = [draw(_TEXT) for _ in types]
    columns = [draw(st.lists(_TYPES[t], min_size=rows, max_size=rows)) for t in types]
    return names, types, columns


@settings(max_examples=300, deadline=None)
@given(_blocks())
def test_generated_columns_encode_byte_for_byte_like_the_python_encoder(block):
    names, types, columns = block
    assert native_block(names, types, columns) == native.encode_python(names, types, columns)


@st.composite
def _block_runs(draw):
    """Columns of unique names, as several blocks of a few rows each."""
    types = draw(st.lists(st.sampled_from(sorted(_TYPES)), min_size=1, max_size=6))
    names = [f"c{i}" for i in range(len(types))]
    runs = [
        [draw(st.lists(_TYPES[t], min_size=rows, max_size=rows)) for t in types]
        for rows in draw(st.lists(st.integers(0, 6), min_size=1, max_size=5))
    ]
    return names, types, runs


@settings(max_examples=300, deadline=None)
@given(_block_runs())
def test_concatenated_blocks_are_the_block_of_the_concatenated_columns(case):
    """What the writer sends for a group of records (one block per table) is byte for byte the block the
    encoder makes of their columns one after another: the engine reads the same rows either way."""
    names, types, runs = case
    blocks = [native.encode_python(names, types, columns) for columns in runs]
    merged = [[v for columns in runs for v in columns[c]] for c in range(len(types))]
    want = native.encode_python(names, types, merged)
    assert native.concat(blocks) == want
    assert native.concat_python(blocks) == want
    assert native.split(b"".join(blocks)) == blocks


def test_concatenation_refuses_blocks_it_cannot_join():
    from meterhouse.core._native import concat_blocks

    one = native.encode(["a", "b"], ["String", "Array(String)"], [["x"], [["k"]]])
    other = native.encode(["a", "c"], ["String", "Array(String)"], [["x"], [["k"]]])
    fewer = native.encode(["a"], ["String"], [["x"]])
    for join in (concat_blocks, native.concat_python):
        with pytest.raises(ValueError, match="differ in their columns"):
            join([one, other])
        with pytest.raises(ValueError, match="differ in their columns"):
            join([one, fewer])
        with pytest.raises(ValueError):
            join([one, one[:-1]])  # truncated
        with pytest.raises(ValueError):
            join([])
    with pytest.raises(ValueError, match="trailing bytes"):
        concat_blocks([one, one + b"\x00"])
    with pytest.raises(ValueError, match="unsupported column type"):
        concat_blocks([b"\x01\x01\x01a\x04Int8\x00"] * 2)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 200))
def test_concatenation_of_damaged_bytes_raises_or_joins_never_crashes(tail, cut):
    """A block cut or followed by noise is refused with ValueError (or, where the damage still reads as a
    block, joined); never read past its end."""
    from meterhouse.core._native import concat_blocks

    good = native.encode(["a", "n", "arr"], ["String", "Nullable(Float64)", "Array(UInt64)"],
                         [["x", "yy"], [None, 1.0], [[1, 2], []]])  # fmt: skip
    damaged = (good[:cut] + tail) if cut < len(good) else good + tail
    try:
        concat_blocks([good, damaged])
    except ValueError:
        pass


def test_a_concatenated_group_reads_back_like_its_records(store):
    """Rows of several blocks sent as one block land exactly as the blocks sent one after another."""
    db = store.database
    store.client.command(f"CREATE TABLE {db}.cat (s String, a Array(String), n Nullable(Float64), "
                         "t DateTime64(9, 'UTC')) ENGINE = MergeTree ORDER BY tuple()")  # fmt: skip
    names, types = (
        ["s", "a", "n", "t"],
        ["String", "Array(String)", "Nullable(Float64)", "DateTime64(9, 'UTC')"],
    )
    runs = [[[f"r{k}{i}" for i in range(k)], [[str(i)] * i for i in range(k)], [None if i % 2 else i / 3
             for i in range(k)], [10**18 + i for i in range(k)]] for k in (3, 0, 5, 1)]  # fmt: skip
    blocks = [native.encode(names, types, columns) for columns in runs]
    store.client.raw_insert(f"{db}.cat", names, b"".join(blocks), fmt="Native")
    store.client.raw_insert(f"{db}.cat", names, native.concat([b for b in blocks]), fmt="Native")
    rows = store.rows(f"SELECT s, a, n, t, count() FROM {db}.cat GROUP BY s, a, n, t ORDER BY s")
    assert len(rows) == 9 and all(r[4] == 2 for r in rows)


_SUMMARY_NAMES = ("org_id", "metric", "kind", "unit", "time", "attr_keys", "attr_values", "other")
_SUMMARY_TYPES = ("String", "String", "String", "String", "DateTime64(9, 'UTC')", "Array(String)",
                  "Array(String)", "UInt64")  # fmt: skip


@st.composite
def _summary_blocks(draw):
    """Rows drawn from few orgs, metrics, units and sets, so that they repeat."""
    small = st.sampled_from(["", "a", "b", "ünï", "x" * 40])
    rows = draw(st.integers(0, 30))

    def pick(s):  # noqa: ANN001, ANN202
        return draw(st.lists(s, min_size=rows, max_size=rows))

    keys = pick(st.lists(small, max_size=3))
    values = [draw(st.lists(small, min_size=len(k), max_size=len(k))) for k in keys]
    return [pick(small), pick(small), pick(st.sampled_from(["sum", "gauge"])), pick(small),
            pick(st.integers(0, 2**62)), keys, values, pick(_UINT64)]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(_summary_blocks(), st.booleans())
def test_the_group_summary_is_the_python_reference_s(columns, orgs):
    """What the writer derives from a group's block (``_native.group_summary``) against the pure-Python
    reference: orgs, catalog, and the attribute sets not seen yet, each once, as a block."""
    block = native.encode_python(_SUMMARY_NAMES, _SUMMARY_TYPES, columns)
    seen = native.KeySet(64)
    c_orgs, c_catalog, c_sets, c_keys, c_pairs = native.group_summary(block, seen, orgs)
    p_orgs, p_catalog, p_sets, p_keys, p_pairs = native.group_summary_python(block, seen, orgs)
    assert (sorted(c_orgs) if orgs else c_orgs) == p_orgs
    # The catalog's unit is the last row's of its (metric, kind) in both.
    assert sorted(c_catalog) == p_catalog
    assert sorted(c_keys) == sorted(p_keys) and len(set(c_keys)) == len(c_keys)

    def rows(b: bytes, names=native.SET_NAMES) -> list:  # noqa: ANN001
        return sorted(zip(*(pair_columns(b)[n] for n in names), strict=True)) if b else []

    assert rows(c_sets) == rows(p_sets)
    hours = [native.hour_of(t) for t in columns[4]]
    pairs = list(
        zip(columns[0], columns[1], map(tuple, columns[5]), map(tuple, columns[6]), hours, strict=True)
    )
    want = set(pairs)
    assert len(c_keys) == len(set(zip(pairs, columns[2], strict=True)))  # each (pair, kind) once
    assert {(o, m, tuple(k), tuple(v)) for o, m, k, v in rows(c_sets)} == {p[:4] for p in want}
    # The sums' pairs, for the attribute cardinality: (metric, hour, org, keys, values), each once.
    sums = {
        (m, min(max(h, 0), 2**32 - 1), o, k, v)
        for (o, m, k, v, h), kind in zip(pairs, columns[2], strict=True)
        if kind == "sum"
    }
    assert rows(c_pairs, native.PAIR_NAMES) == rows(p_pairs, native.PAIR_NAMES)
    assert {(m, h, o, tuple(k), tuple(v)) for m, h, o, k, v in rows(c_pairs, native.PAIR_NAMES)} == sums
    assert len(rows(c_pairs, native.PAIR_NAMES)) == len(sums)
    # Once stored, the sets are seen: a group of the same rows has none left (30 rows at most: under
    # the 70% of 64 slots that empties the set).
    seen.add(c_keys)
    assert native.group_summary(block, seen, orgs)[2:] == (b"", [], b"")
    assert native.group_summary_python(block, seen, orgs)[2:] == (b"", [], b"")


def test_a_key_set_full_to_its_bound_is_emptied_and_keeps_working():
    seen = native.KeySet(16)
    keys = [native.set_key(f"org-{i}", "m", [], [], 0) for i in range(30)]
    seen.add(keys[:11])
    assert all(k in seen for k in keys[:11]) and seen.count == 11
    seen.add(keys[11:20])  # past 70%: emptied first
    assert seen.count == 9 and keys[0] not in seen and all(k in seen for k in keys[11:20])
    with pytest.raises(ValueError):
        native.group_summary(native.encode(["a"], ["String"], [["x"]]), native.KeySet(4), True)


def pair_columns(block: bytes) -> dict[str, list]:
    """A sets or pairs block's columns (``DateTime`` read as Int32 seconds: not an ingest type)."""
    columns = native.decode(block.replace(b"\x0fDateTime('UTC')", b"\x05Int32"))[2]
    if "hour" in columns:
        columns["hour"] = [v & 0xFFFFFFFF for v in columns["hour"]]
    return columns
