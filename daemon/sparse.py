"""Sparse embedding tables in the step: their own optimizer, the global gradient norm, the sum over ranks.

A table of ``data.hash_buckets`` rows (``nn.Embedding``/``nn.EmbeddingBag`` with
``sparse=True``) gets a sparse gradient: the rows of the batch only.  The dense
optimizers (AdamW, SGD with momentum) would touch every row every step, so the tables
have an optimizer of their own that updates only the rows a batch holds (Adagrad by
default, as Vowpal Wabbit's adaptive updates and TorchRec's row-wise Adagrad; SparseAdam
or SGD by ``trainer.sparse_optimizer``).  Clipping and the non-finite check use the
norm of every gradient, dense and sparse together.  Over several ranks the sparse
gradients travel as (row, values) lists gathered from every rank in rank order and
summed into one: every rank holds the same sum, bit for bit, and no rank sends the whole
table.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# What learns best on hashed categorical streams at batch size 1, measured on bench.learning's click stream
# (100k rows, log loss; docs/LEARNING.md, Categorical features): (optimizer, lr).  The fm's tables at Adagrad
# 0.05 / 0.1 / 0.2: 0.5798 / 0.5762 / 0.5865; SparseAdam 0.01: 0.5954; logistic at 0.1 and 0.2 alike.
SPARSE_AUTO = {"linear": ("adagrad", 0.1), "logistic": ("adagrad", 0.1), "fm": ("adagrad", 0.1)}
SPARSE_OTHER = ("adagrad", 0.05)
SPARSE_DEFAULT_LR = {"adagrad": 0.05, "sparse_adam": 1e-3, "sgd": 0.01}


def sparse_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the model's sparse tables (their gradients are sparse tensors)."""
    out = []
    for m in model.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad:
            out.append(m.weight)
    return out


def sparse_defaults(model: str, name: str, lr: float | None) -> tuple[str, float]:
    """What ``trainer.sparse_optimizer: auto`` and ``trainer.sparse_lr: null`` stand for."""
    auto_name, auto_lr = SPARSE_AUTO.get(model, SPARSE_OTHER)
    chosen = auto_name if name == "auto" else name
    if lr is None:
        lr = auto_lr if chosen == auto_name else SPARSE_DEFAULT_LR[chosen]
    return chosen, lr


def make_sparse_optimizer(name: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if name == "sparse_adam":
        return torch.optim.SparseAdam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


def clip_all(dense: list[nn.Parameter], sparse: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip every gradient, dense and sparse, by their global norm; returns it (``clip_grad_norm_`` takes no sparse gradient)."""
    norms = []
    for p in sparse:
        if p.grad is not None:
            p.grad = p.grad.coalesce()
            norms.append(torch.linalg.vector_norm(p.grad._values()))
    norms += [torch.linalg.vector_norm(p.grad) for p in dense if p.grad is not None]
    if not norms:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(norms))
    if math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in dense + sparse:
            if p.grad is not None:
                p.grad.mul_(coef)
    return total


def sum_over_ranks(params: list[nn.Parameter], coll: object) -> None:
    """Replace each sparse gradient by its sum over the ranks: (rows, values) gathered in rank order, then coalesced."""
    pieces = []
    for p in params:
        g = (
            p.grad.coalesce()
            if p.grad is not None
            else torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.int64), p.new_empty(0, p.shape[1]), p.shape)
        )
        rows, values = g._indices()[0], g._values()
        pieces.append((rows, values))
    # one float64 buffer per rank: [nnz of each table], then each table's rows and values (rows < 2^53: exact)
    local = torch.cat(
        [torch.tensor([float(len(r)) for r, _ in pieces], dtype=torch.float64)]
        + [torch.cat([r.to(torch.float64), v.to(torch.float64).reshape(-1)]) for r, v in pieces]
    )
    every = coll.all_gather(local)
    for k, p in enumerate(params):
        dim = p.shape[1]
        rows_all, values_all = [], []
        for buf in every:
            counts = buf[: len(params)].long().tolist()
            at = len(params) + sum(c * (1 + params[j].shape[1]) for j, c in enumerate(counts[:k]))
            n = counts[k]
            rows_all.append(buf[at : at + n].long())
            values_all.append(buf[at + n : at + n + n * dim].reshape(n, dim))
        rows = torch.cat(rows_all).unsqueeze(0)
        values = torch.cat(values_all).to(p.dtype)
        p.grad = torch.sparse_coo_tensor(rows.to(p.device), values.to(p.device), p.shape).coalesce()


class Optimizers:
    """The dense and the sparse optimizer as one, for what acts on both (a drift's reset or LR boost)."""

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer) -> None:
        self.dense = dense
        self.sparse = sparse
        self.state = _States(self)

    @property
    def param_groups(self) -> list[dict]:
        return self.dense.param_groups + self.sparse.param_groups


class _States:
    def __init__(self, both: Optimizers) -> None:
        self.both = both

    def clear(self) -> None:
        """Forget both optimizers' state (Adagrad's sums start again at zero: it keeps them from its start)."""
        self.both.dense.state.clear()
        sparse = self.both.sparse
        if isinstance(sparse, torch.optim.Adagrad):
            for group in sparse.param_groups:
                for p in group["params"]:
                    st = sparse.state[p]
                    st["sum"].fill_(group["initial_accumulator_value"])
                    st["step"].zero_()
        else:
            sparse.state.clear()
