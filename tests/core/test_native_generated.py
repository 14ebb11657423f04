"""The C and pure-Python Native encoders on generated columns: byte for byte alike, decoded back, and
refusing the same bad values."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterhouse.core import native
from meterhouse.core._native import native_block

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
