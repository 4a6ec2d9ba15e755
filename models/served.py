"""What serving runs, and the trainer feeds its model: raw numbers (NaN where missing) and table rows in.

:func:`model_inputs` is the one definition of a model's numeric input: standardized, and
with missing numbers imputed each NaN its running mean (0 once standardized) and a 0/1
"was missing" mark after the numbers.  :class:`Served` wraps a model with it (and for
regression the label's units): the exported program and ``streamtrain serve`` run it.
"""

from __future__ import annotations

import torch
from torch import nn


def model_inputs(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, standardize: bool = True, missing: bool = False
) -> torch.Tensor:
    """Raw rows as the model takes them: ``(x - shift) * scale``; with ``missing``, NaN -> 0 (the mean) and the 0/1 marks after.

    The trainer, the exported program and the server all go through here: one definition.
    """
    xn = (x - shift) * scale if standardize else x
    if not missing:
        return xn
    absent = torch.isnan(x)
    return torch.cat([torch.where(absent, torch.zeros_like(xn), xn), absent.to(xn.dtype)], dim=1)


class Served(nn.Module):
    """What serving runs: raw numbers (NaN where missing) and table rows in, the trainer's prediction out.

    Standardization (with a missing number the running mean and its "was missing" mark,
    :func:`~streamtrain.daemon.normalizer.model_inputs`, the trainer's own), the model,
    for regression the output back in label units, and for a classifier with a fitted
    temperature the logits times its inverse (``logit_scale``).  The program format exports this
    module; ``streamtrain serve`` runs it over the state-dict format.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: torch.Tensor,
        scale: torch.Tensor,
        y_mean: torch.Tensor | None = None,
        y_std: torch.Tensor | None = None,
        missing: bool = False,
        takes_ids: bool = False,
        logit_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)
        self.missing = missing
        self.takes_ids = takes_ids
        self.destandardize = y_mean is not None and y_std is not None
        if self.destandardize:
            self.register_buffer("y_mean", y_mean)
            self.register_buffer("y_std", y_std)
        self.calibrated = logit_scale is not None and logit_scale != 1.0
        if self.calibrated:  # a fitted temperature (trainer.calibration): the logits served are these times its inverse
            self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        xn = model_inputs(x, self.mean, self.scale, True, self.missing)
        out = self.model(xn, ids) if self.takes_ids else self.model(xn)
        if self.destandardize:
            out = out * self.y_std + self.y_mean  # as the trainer's prequential prediction
        if self.calibrated:
            out = out * self.logit_scale
        return out
