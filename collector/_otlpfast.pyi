"""The native fast path of the decoder (collector/_otlpfast.c)."""

from typing import Any

#: The columns it builds, in model.BATCH_COLUMNS order.
COLUMNS: tuple[str, ...]

def decode_numbers(
    body: bytes,
    org_key: str,
    min_t: int,
    max_t: int,
    max_attrs: int,
    max_len: int,
    max_name: int,
    max_unit: int,
    max_scope: int,
    max_desc: int,
    max_double: float,
    received_at: int,
    /,
) -> tuple[dict[str, list[Any]], int, int, int] | None: ...
def count_points(body: bytes, /) -> int:
    """Data points in a protobuf request, from its wire format; -1 when it is not one."""
