"""`strata cache stats` as a table: the admin API's `/admin/cache/stats` answer, for people.

Guarantees: one row per layer, in the gateway's order, then one for coalesced requests; numbers
right-aligned under their headings; bytes in binary units; a value the gateway does not know (a
remote layer's size, a ratio before the first lookup) is `-`; a layer whose stats could not be read
is marked `(unavailable)`. An answer of another shape is a `ValueError`, not a traceback deep in
the formatting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

COLUMNS = (
    "layer", "entries", "bytes", "hits", "misses", "errors", "hit ratio",
    "prompt saved", "completion saved",
)  # fmt: skip
UNKNOWN = "-"


def human_bytes(size: int | None) -> str:
    if size is None:
        return UNKNOWN
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _count(value: Any) -> str:
    return UNKNOWN if value is None else f"{value:,}"


def _ratio(value: Any) -> str:
    return UNKNOWN if value is None else f"{value:.1%}"


def _row(layer: Mapping[str, Any]) -> list[str]:
    saved = layer["tokens_saved"]
    name = str(layer["layer"])
    if not layer.get("available", True):
        name += " (unavailable)"
    return [
        name,
        _count(layer["entries"]),
        human_bytes(layer["bytes"]),
        _count(layer["hits"]),
        _count(layer["misses"]),
        _count(layer["errors"]),
        _ratio(layer["hit_ratio"]),
        _count(saved["prompt"]),
        _count(saved["completion"]),
    ]


def rows(stats: Mapping[str, Any]) -> list[list[str]]:
    """The table's rows, heading first."""
    try:
        body = [_row(layer) for layer in stats["layers"]]
        coalesced = stats["coalesced"]
        saved = coalesced["tokens_saved"]
        body.append(
            ["coalesced", UNKNOWN, UNKNOWN, _count(coalesced["answers"]), UNKNOWN, UNKNOWN,
             UNKNOWN, _count(saved["prompt"]), _count(saved["completion"])]
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the gateway's stats are not in the expected shape ({exc!r})") from None
    return [list(COLUMNS), *body]


def render(stats: Mapping[str, Any]) -> str:
    table: Sequence[list[str]] = rows(stats)
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = []
    for row in table:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
