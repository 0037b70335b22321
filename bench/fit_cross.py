"""Fit the verifier's token-level model (`caches.cross_model.CrossModel`) with PyTorch.

Used by `bench/fit_verifier.py`; training only (the gateway runs the fitted weights in numpy).
The network is the one `CrossModel` documents; dropout on the projected tokens and in the head,
AdamW with a one-cycle learning rate, and each batch's two sides swapped at random so that the
model does not learn which side was cached. Feature rows are standardised for training and the
scaling is folded into the head's weights. Deterministic for a given seed (on one machine).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from caches.cross_model import MAX_TOKENS, CrossModel
from caches.embedder import Tokens


@dataclass(frozen=True, slots=True)
class CrossTraining:
    width: int = 128
    epochs: int = 6
    batch: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0


def fit_cross(
    cached: Sequence[Tokens],
    queries: Sequence[Tokens],
    rows: np.ndarray,
    labels: np.ndarray,
    cfg: CrossTraining,
) -> CrossModel:
    """Fit on pairs (cached[i], queries[i], feature row rows[i], label labels[i])."""
    import torch  # noqa: PLC0415 - training only
    from torch import nn  # noqa: PLC0415

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    h = cfg.width
    mean = rows.mean(axis=0)
    scale = rows.std(axis=0)
    scale[scale == 0] = 1.0
    x_all = torch.from_numpy(((rows - mean) / scale).astype(np.float32))
    y_all = torch.from_numpy(labels.astype(np.float32))
    dim = cached[0].vectors.shape[1]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(dim, h)
            self.compare = nn.Linear(4 * h, h)
            self.head = nn.Linear(4 * h + rows.shape[1], h)
            self.out = nn.Linear(h, 1)
            self.drop_tokens = nn.Dropout(0.2)
            self.drop_head = nn.Dropout(0.3)

        def side(
            self, a: torch.Tensor, a_mask: torch.Tensor, b: torch.Tensor, b_mask: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            scores = (a @ b.transpose(1, 2) / math.sqrt(h)).masked_fill(~b_mask[:, None, :], -1e4)
            gathered = torch.softmax(scores, -1) @ b
            c = torch.relu(self.compare(torch.cat([a, gathered, a - gathered, a * gathered], -1)))
            c = c * a_mask[..., None]
            mean = c.sum(1) / a_mask.sum(1, keepdim=True).clamp(min=1)
            top = c.masked_fill(~a_mask[..., None], -1e4).max(1).values
            return mean, top

        def forward(
            self,
            a: torch.Tensor,
            a_mask: torch.Tensor,
            b: torch.Tensor,
            b_mask: torch.Tensor,
            x: torch.Tensor,
        ) -> torch.Tensor:
            a = self.drop_tokens(torch.relu(self.proj(a)))
            b = self.drop_tokens(torch.relu(self.proj(b)))
            mean_a, top_a = self.side(a, a_mask, b, b_mask)
            mean_b, top_b = self.side(b, b_mask, a, a_mask)
            pooled = [
                mean_a + mean_b,
                (mean_a - mean_b).abs(),
                top_a + top_b,
                (top_a - top_b).abs(),
            ]
            hidden = self.drop_head(torch.relu(self.head(torch.cat([*pooled, x], -1))))
            return self.out(hidden).squeeze(-1)

    def padded(side: Sequence[Tokens], picks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        mats = [side[int(i)].vectors[:MAX_TOKENS] for i in picks]
        length = max(1, *(len(m) for m in mats))
        out = np.zeros((len(mats), length, dim), np.float32)
        mask = np.zeros((len(mats), length), bool)
        for k, m in enumerate(mats):
            out[k, : len(m)] = m
            mask[k, : len(m)] = True
        return torch.from_numpy(out), torch.from_numpy(mask)

    net = Net()
    optimiser = torch.optim.AdamW(
        net.parameters(), lr=cfg.learning_rate / 2, weight_decay=cfg.weight_decay
    )
    steps = cfg.epochs * math.ceil(len(labels) / cfg.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, cfg.learning_rate, total_steps=steps)
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(labels))
        for start in range(0, len(order), cfg.batch):
            picks = order[start : start + cfg.batch]
            a, a_mask = padded(cached, picks)
            b, b_mask = padded(queries, picks)
            if rng.random() < 0.5:
                (a, a_mask), (b, b_mask) = (b, b_mask), (a, a_mask)
            logits = net(a, a_mask, b, b_mask, x_all[picks])
            loss = nn.functional.binary_cross_entropy_with_logits(logits, y_all[picks])
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            schedule.step()
        print(
            f"  cross model: epoch {epoch + 1}/{cfg.epochs} loss {float(loss.detach()):.3f} "
            f"({time.perf_counter() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    def weights(layer: nn.Linear) -> tuple[np.ndarray, np.ndarray]:
        return layer.weight.detach().numpy().T.copy(), layer.bias.detach().numpy().copy()

    proj, proj_bias = weights(net.proj)
    compare, compare_bias = weights(net.compare)
    head, head_bias = weights(net.head)
    out, out_bias = weights(net.out)
    # Fold the standardisation of the feature row into the head.
    x_rows = head[4 * h :]
    head_bias = head_bias - (mean / scale) @ x_rows
    head[4 * h :] = x_rows / scale[:, None]
    return CrossModel(
        proj=proj.astype(np.float32),
        proj_bias=proj_bias.astype(np.float32),
        compare=compare.astype(np.float32),
        compare_bias=compare_bias.astype(np.float32),
        head=head.astype(np.float32),
        head_bias=head_bias.astype(np.float32),
        out=out[:, 0].astype(np.float32),
        out_bias=float(out_bias[0]),
    )
