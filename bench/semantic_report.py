"""Semantic-cache accuracy on labelled pairs: cosine alone vs the shipped verifier, with a plot.

    .venv/bin/python -m bench.semantic_report [--pairs ../shared/data/semantic/qqp_val.jsonl]
        [--png docs/semantic-pr.png]

Prints `strata semantic eval` for cosine alone (at the threshold where its false-hit rate is
closest to, without exceeding, 2%) and for the default configuration (verifier on), then plots
precision and false-hit rate against recall for both methods.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from caches.embedder import Embedding, SentenceTransformerEmbedder
from caches.semantic_eval import evaluate, load_pairs, operating_curve, score_pairs
from caches.verifier import Verifier

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PAIRS = ROOT.parent / "shared" / "data" / "semantic" / "qqp_val.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS)
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "semantic-pr.png")
    parser.add_argument("--max-false-hit-rate", type=float, default=0.02)
    args = parser.parse_args()

    embedder = SentenceTransformerEmbedder(dtype="auto")  # as the gateway runs it
    pairs = load_pairs(args.pairs)
    texts = sorted({p.cached for p in pairs} | {p.query for p in pairs})
    embedded = dict(zip(texts, embedder.embed_many(texts), strict=True))
    u = np.stack([embedded[p.cached].vector for p in pairs])
    v = np.stack([embedded[p.query].vector for p in pairs])
    tokens = {
        "cached_tokens": [embedded[p.cached].tokens for p in pairs],
        "query_tokens": [embedded[p.query].tokens for p in pairs],
    }
    verifier = Verifier.default()
    curves = {
        "cosine alone": operating_curve(score_pairs(pairs, u, v, None), points=400),
        "Strata verifier": operating_curve(
            score_pairs(pairs, u, v, verifier, **tokens),  # type: ignore[arg-type]
            points=400,
        ),
    }
    within = [p for p in curves["cosine alone"] if p.false_hit_rate <= args.max_false_hit_rate]
    cosine_cut = max(within, key=lambda p: p.recall).threshold if within else 0.96

    def embed(batch: list[str]) -> list[Embedding]:
        # Latency is timed on queries one at a time: those go through the model again.
        if len(batch) == 1:
            return embedder.embed_many(batch)
        return [embedded[t] for t in batch]

    for title, verify, cut in (
        (f"cosine alone at its {args.max_false_hit_rate:.0%} false-hit point", None, cosine_cut),
        ("default configuration (verifier on)", verifier, None),
    ):
        print(f"## {title}\n")
        report = evaluate(args.pairs, embed=embed, verifier=verify, threshold=cut)
        print(report.render(), "\n")

    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, curve in curves.items():
        recall = [p.recall for p in curve]
        left.plot(recall, [p.precision for p in curve], label=name)
        right.plot(recall, [p.false_hit_rate * 100 for p in curve], label=name)
    default = verifier.threshold
    point = min(curves["Strata verifier"], key=lambda p: abs(p.threshold - default))
    left.scatter([point.recall], [point.precision], color="black", zorder=3, label="default")
    right.scatter([point.recall], [point.false_hit_rate * 100], color="black", zorder=3)
    right.axhline(2.0, color="grey", linestyle="--", linewidth=1, label="2% false hits")
    left.set(xlabel="recall (paraphrases served)", ylabel="precision", title="Precision")
    right.set(xlabel="recall (paraphrases served)", ylabel="false-hit rate (%)",
              title="Wrong answers served", ylim=(0, 10))  # fmt: skip
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(loc="best")
    fig.suptitle(f"{args.pairs.name}: {len(pairs):,} pairs, all-MiniLM-L6-v2")
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
