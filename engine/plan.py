"""KV-cache capacity planning from a model's configuration.

Guarantees: the KV bytes per token are 2 (K and V) x layers x KV heads x head dim x bytes per
element, with KV heads from `num_key_value_heads` (grouped-query attention) and head dim from
`head_dim` when the config has one, else hidden size / attention heads; sequences are counted in
whole KV blocks, as PagedAttention allocates them. No model weights are read and nothing is
downloaded: a Hugging Face name is looked up in the local cache only.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1,
}  # fmt: skip

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40,
}  # fmt: skip


class PlanError(ValueError):
    """The model's configuration cannot be found or lacks what the plan needs."""


def parse_size(text: str) -> int:
    """Bytes in '80GiB', '80 GB', '512MiB', '1024'. Bare K/M/G/T are binary, as in vLLM's flags."""
    match = _SIZE.match(text)
    if not match:
        raise PlanError(f"not a size: {text!r} (try 80GiB)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").lower()])


@dataclass(frozen=True, slots=True)
class ModelShape:
    layers: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    max_position: int | None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        text = config.get("text_config")
        if isinstance(text, dict):  # multimodal configs nest the language model's shape
            config = {**config, **text}
        try:
            layers = int(config["num_hidden_layers"])
            heads = int(config["num_attention_heads"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"config lacks {exc} (num_hidden_layers, num_attention_heads)") from exc
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = config.get("head_dim")
        if not head_dim:
            hidden = config.get("hidden_size")
            if not hidden:
                raise PlanError("config has neither head_dim nor hidden_size")
            head_dim = int(hidden) // heads
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
        max_position = config.get("max_position_embeddings")
        return cls(
            layers,
            heads,
            kv_heads,
            int(head_dim),
            dtype,
            int(max_position) if max_position else None,
        )


@dataclass(frozen=True, slots=True)
class KVPlan:
    shape: ModelShape
    kv_dtype: str
    memory_bytes: int
    block_size: int
    max_len: int

    @property
    def bytes_per_token(self) -> int:
        dtype_bytes = DTYPE_BYTES.get(self.kv_dtype.lower())
        if dtype_bytes is None:
            raise PlanError(f"unknown KV dtype {self.kv_dtype!r}; one of {sorted(DTYPE_BYTES)}")
        s = self.shape
        return 2 * s.layers * s.kv_heads * s.head_dim * dtype_bytes

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    @property
    def blocks(self) -> int:
        return self.memory_bytes // self.bytes_per_block

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size

    @property
    def blocks_per_sequence(self) -> int:
        return -(-self.max_len // self.block_size)

    @property
    def sequences(self) -> int:
        return self.blocks // self.blocks_per_sequence


def find_config(model: str) -> Path:
    """`model`'s config.json: a folder, a file, or a Hugging Face name in the local cache."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if (path / "config.json").is_file():
        return path / "config.json"
    hub = Path(
        os.environ.get("HF_HUB_CACHE")
        or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    )
    snapshots = hub / f"models--{model.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1]
    raise PlanError(
        f"no config.json for {model!r}: not a folder or file, and not in the local Hugging Face "
        f"cache ({hub}); nothing is downloaded"
    )


def load_shape(model: str) -> ModelShape:
    path = find_config(model)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path}: {exc}") from exc
    if not isinstance(config, dict):
        raise PlanError(f"{path}: not a JSON object")
    return ModelShape.from_config(config)


def render(plan: KVPlan) -> str:
    s = plan.shape
    gib = 2**30
    per_token = plan.bytes_per_token  # raises PlanError for an unknown KV dtype
    element = DTYPE_BYTES[plan.kv_dtype.lower()]
    rows = [
        ("layers", f"{s.layers}"),
        (
            "attention heads / KV heads",
            f"{s.attention_heads} / {s.kv_heads}"
            + ("  (grouped-query)" if s.kv_heads < s.attention_heads else ""),
        ),
        ("head dim", f"{s.head_dim}"),
        ("KV dtype", f"{plan.kv_dtype} ({element} B)"),
        (
            "KV bytes per token",
            f"{per_token:,} (2 x {s.layers} x {s.kv_heads} x {s.head_dim} x {element})",
        ),
        ("KV memory", f"{plan.memory_bytes / gib:,.2f} GiB"),
        ("block size", f"{plan.block_size} tokens ({plan.bytes_per_block:,} B per block)"),
        ("tokens that fit", f"{plan.tokens:,} ({plan.blocks:,} blocks)"),
        (f"sequences of {plan.max_len:,} tokens", f"{plan.sequences:,} concurrent"),
    ]
    if s.max_position is not None and plan.max_len > s.max_position:
        rows.append(("warning", f"max len exceeds the model's {s.max_position:,} positions"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
