"""`strata engine plan`: KV bytes per token and capacity, checked against hand computations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.plan import KVPlan, ModelShape, PlanError, find_config, load_shape, parse_size

# SmolLM2-135M-Instruct (the default model): 30 layers, 9 heads, 3 KV heads, hidden 576.
SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
}
# Llama-3-8B: 32 layers, 32 heads, 8 KV heads (grouped-query), hidden 4096.
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
}


def write(tmp_path: Path, name: str, config: dict[str, object]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_smollm2_by_hand(tmp_path: Path) -> None:
    shape = load_shape(str(write(tmp_path, "smol", SMOLLM2)))
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (30, 3, 64)
    plan = KVPlan(shape, "bfloat16", memory_bytes=2 * 2**30, block_size=16, max_len=2048)
    # 2 (K and V) x 30 layers x 3 KV heads x 64 dims x 2 bytes
    assert plan.bytes_per_token == 2 * 30 * 3 * 64 * 2 == 23_040
    assert plan.blocks == (2 * 2**30) // (23_040 * 16) == 5_825
    assert plan.tokens == 5_825 * 16 == 93_200
    assert plan.sequences == 5_825 // (2048 // 16) == 45


def test_llama3_8b_grouped_query_by_hand(tmp_path: Path) -> None:
    shape = load_shape(str(write(tmp_path, "llama", LLAMA3_8B) / "config.json"))
    assert (shape.kv_heads, shape.attention_heads, shape.head_dim) == (8, 32, 128)
    plan = KVPlan(shape, "bfloat16", memory_bytes=80 * 2**30, block_size=16, max_len=8192)
    # With all 32 heads it would be 4x as much: grouped-query attention stores 8.
    assert plan.bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131_072
    assert plan.tokens == 80 * 2**30 // 131_072 == 655_360
    assert plan.sequences == 655_360 // 8192 == 80
    fp8 = KVPlan(shape, "fp8", memory_bytes=80 * 2**30, block_size=16, max_len=8192)
    assert fp8.bytes_per_token == 65_536
    assert fp8.sequences == 160


def test_partial_blocks_are_counted_whole(tmp_path: Path) -> None:
    shape = load_shape(str(write(tmp_path, "smol", SMOLLM2)))
    plan = KVPlan(shape, "bfloat16", memory_bytes=23_040 * 16 * 10, block_size=16, max_len=17)
    assert plan.blocks_per_sequence == 2
    assert plan.sequences == 5


def test_explicit_head_dim_wins() -> None:
    shape = ModelShape.from_config({**LLAMA3_8B, "head_dim": 256})
    assert shape.head_dim == 256


def test_multimodal_config_uses_text_config() -> None:
    shape = ModelShape.from_config({"text_config": LLAMA3_8B, "architectures": ["X"]})
    assert shape.layers == 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80GiB", 80 * 2**30),
        ("80 GB", 80 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1024", 1024),
        ("1.5GiB", int(1.5 * 2**30)),
        ("2g", 2 * 2**30),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "80 parsecs", "-1GiB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(PlanError):
        parse_size(text)


def test_missing_model_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(PlanError, match="nothing is downloaded"):
        find_config("no-such-org/no-such-model")


def test_hf_name_found_in_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    snapshot = tmp_path / "hub" / "models--org--llama" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert load_shape("org/llama").layers == 32


def test_cli_prints_the_plan(tmp_path: Path) -> None:
    folder = write(tmp_path, "llama", LLAMA3_8B)
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "engine", "plan", "--model", str(folder),
         "--memory", "80GiB", "--max-len", "8192"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "131,072" in result.stdout
    assert "655,360" in result.stdout
    assert "80 concurrent" in result.stdout
    assert "grouped-query" in result.stdout


def test_cli_plan_with_unknown_dtype_fails_cleanly(tmp_path: Path) -> None:
    folder = write(tmp_path, "llama", LLAMA3_8B)
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "engine", "plan", "--model", str(folder),
         "--memory", "80GiB", "--kv-dtype", "int3"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "unknown KV dtype" in result.stderr
