"""The verifier's token-level model: the two questions' words attend to each other.

A sentence vector blurs the one word that makes two questions different. This model reads the
embedding model's contextual token vectors of both texts (kept from the embedding pass, never
recomputed for the query) and compares them word by word, after the decomposable attention model
(Parikh et al., 2016):

1. project every token: p = relu(t @ proj + proj_bias), for each side;
2. attend: each token of one side gathers the other side's tokens, softmax(p_a . p_b / sqrt(h));
3. compare: c = relu([p, gathered, p - gathered, p * gathered] @ compare + compare_bias);
4. aggregate: mean and max of c over each side's tokens, combined symmetrically
   (sum and absolute difference of the two sides), next to the pair's feature row
   (`caches.pair_features`), into a one-hidden-layer head that gives a logit.

Pure numpy, a few small matrix products per pair (~0.3 ms for two ordinary questions).
Weights ship as int8 with one scale per input row; `to_json` / `from_json` round-trip them.
`bench/fit_verifier.py` fits it (PyTorch, training only).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
KIND = "decomposable-attention/1"
MAX_TOKENS = 40  # per side; longer questions are compared on their first 40 tokens


def _int8(matrix: FloatArray) -> dict[str, Any]:
    scale = np.abs(matrix).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    quantised = np.clip(np.rint(matrix / scale[:, None]), -127, 127).astype(np.int8)
    return {
        "shape": list(matrix.shape),
        "int8": base64.b64encode(quantised.tobytes()).decode("ascii"),
        "scale": [float(f"{v:.6g}") for v in scale.tolist()],
    }


def _from_int8(data: Mapping[str, Any]) -> FloatArray:
    rows, cols = (int(n) for n in data["shape"])
    raw = np.frombuffer(base64.b64decode(data["int8"]), dtype=np.int8)
    if raw.size != rows * cols:
        raise ValueError("cross model params: a matrix has the wrong size")
    scale = np.asarray(data["scale"], dtype=np.float32)
    out: FloatArray = raw.reshape(rows, cols).astype(np.float32) * scale[:, None]
    return out


def _vector(values: Any) -> FloatArray:
    return np.asarray(values, dtype=np.float32)


@dataclass(frozen=True, slots=True)
class CrossModel:
    """Weights are (inputs, outputs) matrices; the feature-row standardisation is folded in."""

    proj: FloatArray  # (token_dim, h)
    proj_bias: FloatArray  # (h,)
    compare: FloatArray  # (4h, h)
    compare_bias: FloatArray  # (h,)
    head: FloatArray  # (4h + n_features, hidden)
    head_bias: FloatArray  # (hidden,)
    out: FloatArray  # (hidden,)
    out_bias: float

    def __post_init__(self) -> None:
        h = self.proj.shape[1]
        if self.compare.shape != (4 * h, h) or self.head.shape[0] <= 4 * h:
            raise ValueError(f"cross model shapes do not fit: {self.proj.shape}, {self.head.shape}")

    @property
    def n_features(self) -> int:
        return int(self.head.shape[0] - 4 * self.proj.shape[1])

    def _project(self, tokens: FloatArray) -> FloatArray:
        out: FloatArray = np.maximum(tokens[:MAX_TOKENS] @ self.proj + self.proj_bias, 0.0)
        return out

    def _side(self, a: FloatArray, b: FloatArray) -> tuple[FloatArray, FloatArray]:
        scores = a @ b.T / np.sqrt(np.float32(a.shape[1]))
        scores -= scores.max(axis=1, keepdims=True)
        weights = np.exp(scores)
        weights /= weights.sum(axis=1, keepdims=True)
        gathered = weights @ b
        compared = np.maximum(
            np.concatenate([a, gathered, a - gathered, a * gathered], axis=1) @ self.compare
            + self.compare_bias,
            0.0,
        )
        return compared.mean(axis=0), compared.max(axis=0)

    def logit(self, a_tokens: FloatArray, b_tokens: FloatArray, features: FloatArray) -> float:
        """The logit for one pair: token matrices (n, token_dim), (m, token_dim); a feature row."""
        h = self.proj.shape[1]
        if len(a_tokens) == 0 or len(b_tokens) == 0:
            pooled = np.zeros(4 * h, dtype=np.float32)
        else:
            a, b = self._project(a_tokens), self._project(b_tokens)
            mean_a, max_a = self._side(a, b)
            mean_b, max_b = self._side(b, a)
            pooled = np.concatenate(
                [mean_a + mean_b, np.abs(mean_a - mean_b), max_a + max_b, np.abs(max_a - max_b)]
            )
        x = np.concatenate([pooled, np.asarray(features, dtype=np.float32)])
        hidden = np.maximum(x @ self.head + self.head_bias, 0.0)
        return float(hidden @ self.out + self.out_bias)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "proj": _int8(self.proj),
            "proj_bias": self.proj_bias.tolist(),
            "compare": _int8(self.compare),
            "compare_bias": self.compare_bias.tolist(),
            "head": _int8(self.head),
            "head_bias": self.head_bias.tolist(),
            "out": self.out.tolist(),
            "out_bias": self.out_bias,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CrossModel:
        if data.get("kind") != KIND:
            raise ValueError(f"unsupported cross model {data.get('kind')!r}")
        return cls(
            proj=_from_int8(data["proj"]),
            proj_bias=_vector(data["proj_bias"]),
            compare=_from_int8(data["compare"]),
            compare_bias=_vector(data["compare_bias"]),
            head=_from_int8(data["head"]),
            head_bias=_vector(data["head_bias"]),
            out=_vector(data["out"]),
            out_bias=float(data["out_bias"]),
        )

    def quantised(self) -> CrossModel:
        """This model as it reads back from `to_json` (what ships, and what to measure)."""
        return CrossModel.from_json(self.to_json())
