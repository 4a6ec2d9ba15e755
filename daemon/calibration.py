"""How far a classifier's probabilities can be trusted: calibration, prequential.

A click model's output is a bid and a fraud model's a threshold, so what users consume is
the probability, not the arg-max.  Each step adds, for the predictions it scored before
learning (the same test-then-train samples as the other prequential totals), the sums
these measures are made of -- sums, so that they add over batches, over ranks and in
Prometheus' ``rate()`` alike:

- **Brier score**: the mean squared error of the probabilities.  Binary: ``(p - y)^2``
  with ``p`` the predicted probability of the positive class; multiclass: the sum over
  the classes of ``(p_k - [y = k])^2`` (0 is perfect, 2 the worst).
- **Calibration ratio** (binary): the mean predicted probability over the observed
  positive rate, the figure ad-click systems watch (He et al. 2014): 1 is calibrated,
  above 1 over-predicts positives.
- **Normalized entropy** (binary): the log loss over the entropy of the observed base
  rate; below 1 the model does better than always predicting the base rate.
- **Expected calibration error** over ``BINS`` equal-width bins: the samples' share of
  each bin times the gap between the mean predicted and the observed frequency, summed;
  as sums, ``sum_b |predicted_b - observed_b| / n``.  Binary bins the predicted
  probability of the positive class against the positives (a reliability diagram);
  multiclass bins the top class's probability against whether the top class was right
  (the top-label ECE).

The per-batch sums come out of :func:`batch_sums` on the device, in the step's one read of
its statistics; :func:`measures` turns totals into the figures (without torch).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BINS = 10
PARTS = ("samples", "predicted", "observed", "brier")  # per bin: samples, their predicted probability, what happened, Brier
WIDTH = len(PARTS) * BINS
EDGES = tuple(f"{b / BINS:.1f}" for b in range(BINS))  # each bin by its lower edge (the Prometheus label)


def batch_sums(out: torch.Tensor, y: torch.Tensor, task: str, stacked: bool = False) -> torch.Tensor:
    """The calibration sums of one batch's prequential predictions: ``WIDTH`` values, ``PARTS`` by bin.

    ``out``: the model's logits (n, 1) or (n,) for binary, (n, classes) for multiclass;
    ``y``: the labels.  One scatter of the four per-sample values into their bins (the
    totals are the bins' sums): a dozen small ops (``python -m bench.step --cases ''
    --calibration`` times them).  ``stacked``: ``out`` leads with k candidates' outputs for
    the same batch (``daemon/stack.py``), and the sums are (k, ``WIDTH``), still one scatter.
    """
    import torch  # here, not at the top: the metrics and the totals are read where torch is not loaded

    out = out.detach().float()
    if task == "binary":
        p = torch.sigmoid(out.reshape(len(out), -1) if stacked else out.reshape(-1))
        observed = (y.reshape(-1) > 0.5).to(p.dtype).expand_as(p)
        miss = p - observed
        brier = miss * miss
    else:
        probs = torch.softmax(out, dim=-1)
        p, top = probs.max(-1)
        labels = y.reshape(-1).long().expand(p.shape)
        observed = (top == labels).to(p.dtype)
        # sum_k (p_k - [y = k])^2 = sum_k p_k^2 - 2 p_y + 1
        brier = torch.linalg.vector_norm(probs, dim=-1).square_().sub_(probs.gather(-1, labels[..., None])[..., 0], alpha=2).add_(1)
    bins = torch.bucketize(p, _boundaries(p.device), right=True)
    values = torch.stack([torch.ones_like(p), p, observed, brier])
    if not stacked:
        return p.new_zeros(len(PARTS), BINS).index_add_(1, bins, values).reshape(-1)
    k = len(p)  # each candidate's bins after the one before's: one scatter for all of them
    bins = bins + torch.arange(0, k * BINS, BINS, device=p.device)[:, None]
    sums = p.new_zeros(len(PARTS), k * BINS).index_add_(1, bins.reshape(-1), values.reshape(len(PARTS), -1))
    return sums.reshape(len(PARTS), k, BINS).transpose(0, 1).reshape(k, -1)


_BOUNDARIES: dict = {}


def _boundaries(device) -> torch.Tensor:
    """The inner bin edges 0.1 .. 0.9 on ``device`` (made once)."""
    b = _BOUNDARIES.get(device)
    if b is None:
        import torch

        b = _BOUNDARIES[device] = torch.tensor([k / BINS for k in range(1, BINS)], device=device)
    return b


def totals(bins: list[float]) -> tuple[float, float, float, float]:
    """The samples, predicted, observed and Brier sums over every bin."""
    return tuple(sum(bins[k * BINS : (k + 1) * BINS]) for k in range(len(PARTS)))  # type: ignore[return-value]


def measures(task: str, mean_loss: float, bins: list[float]) -> dict:
    """Brier, ECE and (binary) calibration ratio and normalized entropy from the bins' totals; None where undefined."""
    samples, predicted, positives, brier = totals(bins)
    if not samples:
        out = {"brier": None, "ece": None}
        return {**out, "calibration_ratio": None, "normalized_entropy": None} if task == "binary" else out
    pred_b, obs_b = bins[BINS : 2 * BINS], bins[2 * BINS : 3 * BINS]
    out = {"brier": brier / samples, "ece": sum(abs(a - b) for a, b in zip(pred_b, obs_b)) / samples}
    if task == "binary":
        rate = positives / samples
        out["calibration_ratio"] = predicted / positives if positives else None
        entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)) if 0 < rate < 1 else 0.0
        out["normalized_entropy"] = mean_loss / entropy if entropy else None
    return out


# ---------------------------------------------------------------------- online temperature scaling
class Temperature:
    """Online temperature scaling (``trainer.calibration: temperature``): the served probabilities are those of the
    logits times an inverse temperature ``beta``, fitted on the prequential stream.

    The fit uses what every prequential figure uses: each step's logits for its batch
    *before* the model learns it, data the model has not seen.  The log loss of ``beta *
    logits`` is convex in ``beta`` (its second derivative is the variance of the logits
    under the predicted distribution), so each step takes one Newton step: the batch's
    summed gradient over the curvature summed over the last ``half_life`` samples
    (decayed).  That is a step of about one over the samples remembered, the same at any
    batch size, and it follows a model whose confidence changes as it trains.  ``beta``
    stays 1 until ``warm_samples`` have been seen, and within ``[BETA_MIN, BETA_MAX]``.

    The batch sums come from :func:`temperature_sums` in the step's one read; ranks sum
    them like the other totals, so every rank holds the same ``beta``.
    """

    BETA_MIN, BETA_MAX = 0.02, 50.0

    def __init__(self, half_life: float, warm_samples: int = 1000) -> None:
        self.half_life = half_life
        self.warm_samples = warm_samples
        self.beta = 1.0
        self.curvature = 0.0  # decayed sum of the per-sample second derivatives
        self.samples = 0

    @property
    def temperature(self) -> float:
        return 1.0 / self.beta

    def update(self, gradient: float, curvature: float, n: int) -> None:
        """One step's sums (over its ``n`` samples, at the current ``beta``): the Newton step."""
        if not (n > 0 and math.isfinite(gradient) and math.isfinite(curvature)):
            return
        self.curvature = 0.5 ** (n / self.half_life) * self.curvature + curvature
        self.samples += n
        if self.samples >= self.warm_samples and self.curvature > 0:
            self.beta = min(max(self.beta - gradient / self.curvature, self.BETA_MIN), self.BETA_MAX)

    def state_dict(self) -> dict:
        return {"beta": self.beta, "curvature": self.curvature, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.beta = float(state["beta"])
            self.curvature = float(state["curvature"])
            self.samples = int(state["samples"])


def temperature_sums(logits: torch.Tensor, y: torch.Tensor, task: str, beta: torch.Tensor | float, stacked: bool = False) -> torch.Tensor:
    """The gradient and the curvature, in ``beta``, of the log loss of ``beta * logits``, summed over the batch: (2,).

    Binary, ``s = beta z``: ``(sigmoid(s) - y) z`` and ``sigmoid(s) (1 - sigmoid(s)) z^2``; multiclass, ``p =
    softmax(beta z)``: ``E_p[z] - z_y`` and ``Var_p[z]``.  ``stacked``: ``logits`` lead with k candidates' and ``beta``
    is (k,), one each; the sums are (k, 2).
    """
    import torch

    z = logits.detach().float()
    if task == "binary":
        z = z.reshape(len(z), -1) if stacked else z.reshape(-1)
        b = beta.reshape(-1, 1) if stacked else beta
        p = torch.sigmoid(b * z)
        g = (p - (y.reshape(-1) > 0.5).to(p.dtype)) * z
        h = p * (1 - p) * z * z
    else:
        b = beta.reshape(-1, 1, 1) if stacked else beta
        p = torch.softmax(b * z, dim=-1)
        mean = (p * z).sum(-1)
        g = mean - z.gather(-1, y.long().reshape(-1, 1).expand(*z.shape[:-1], 1))[..., 0]
        h = (p * z * z).sum(-1) - mean * mean
    return torch.stack([g.sum(-1), h.sum(-1)], dim=-1)
