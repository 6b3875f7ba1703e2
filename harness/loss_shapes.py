"""Clean loss curves of the shapes users train, from real (small) training: the global loss a
guard judges at two ranks (the mean of two ranks' batch losses; DDP averages their gradients, so
one model stepping on both batches together is the same training).

Used by the false-rollback benchmark and tests: the default detectors must judge every one of
these clean for 10,000 steps, while a 10x spike or a NaN in any of them is caught.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

RANKS = 2


def _mlp(i: int, o: int, hidden: int = 32) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(i, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, o))


def _schedule(opt: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LRScheduler:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _train(steps: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
           batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
           loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           sched: torch.optim.lr_scheduler.LRScheduler | None = None) -> list[float]:
    out = []
    for step in range(steps):
        x, y = batch(step)
        per_sample = loss_of(model(x), y)
        ranks = per_sample.view(RANKS, -1).mean(dim=1)  # each rank's batch loss
        opt.zero_grad(set_to_none=True)
        ranks.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        if sched is not None:
            sched.step()
        out.append(float(ranks.detach().mean()))
    return out


def regression(steps: int, seed: int = 0) -> list[float]:
    """launch/train_ddp.py's task: a converging regression (MSE towards a noise floor of 0.0025),
    AdamW at lr 0.05, 8 samples per rank: heavy-tailed batch losses, 7x the median in places."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(512, 16, generator=g)
    y = (x @ torch.randn(16, 1, generator=g)).tanh() + 0.05 * torch.randn(512, 1, generator=g)
    model = _mlp(16, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, 512, (8 * RANKS,), generator=g)
        return x[idx], y[idx]
    return _train(steps, model, opt, batch, lambda out, t: F.mse_loss(out, t, reduction="none").mean(dim=1))


def classification(steps: int, seed: int = 0, *, curriculum: bool = False) -> list[float]:
    """Ten overlapping Gaussian classes, cross-entropy, SGD with momentum (a loss that levels off
    well above 0). ``curriculum``: the inputs get noisier at three stages (easy examples first),
    each a step up in the loss."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    centers = 0.3 * torch.randn(10, 20, generator=g)
    model = _mlp(20, 10, hidden=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = 0.7 if not curriculum else (0.4, 0.6, 0.8, 1.0)[min(3, step * 4 // steps)]
        y = torch.randint(0, 10, (32 * RANKS,), generator=g)
        return centers[y] + noise * torch.randn(32 * RANKS, 20, generator=g), y
    return _train(steps, model, opt, batch, lambda out, t: F.cross_entropy(out, t, reduction="none"))


def language_model(steps: int, seed: int = 0, *, warmup: int = 0) -> list[float]:
    """Next-token cross-entropy on text from a random Markov chain (vocabulary 64), a one-layer
    GRU, AdamW with a cosine decay (and a linear warm-up of ``warmup`` steps)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vocab, seq = 64, 32
    transition = torch.softmax(torch.randn(vocab, vocab, generator=g) * 2.0, dim=1)

    class GRU(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, 32)
            self.rnn = torch.nn.GRU(32, 64, batch_first=True)
            self.head = torch.nn.Linear(64, vocab)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(self.embed(tokens))[0])

    model = GRU()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3 if not warmup else 1e-2, weight_decay=0.01)
    sched = _schedule(opt, steps, warmup)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = 4 * RANKS
        tokens = torch.empty(n, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (n,), generator=g)
        for t in range(seq):
            tokens[:, t + 1] = torch.multinomial(transition[tokens[:, t]], 1, generator=g).squeeze(1)
        return tokens[:, :-1], tokens[:, 1:]

    def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="none").view(
            targets.shape).mean(dim=1)
    return _train(steps, model, opt, batch, loss_of, sched)


SHAPES: dict[str, Callable[[int], list[float]]] = {
    "regression converging to 0": regression,
    "classification": classification,
    "language-model cross-entropy": language_model,
    "curriculum (noisier inputs in 3 stages)": lambda steps: classification(steps, curriculum=True),
    "warm-up then cosine decay": lambda steps: language_model(steps, warmup=steps // 10),
}
