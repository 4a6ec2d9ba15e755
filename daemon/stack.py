"""Stacked candidates: learners of one shape trained as one model.

K candidates of one model config (other learning rates, weight decays, seeds) cost K
steps when looped: K forward and backward passes and K optimizer updates, each a few
dozen small ops, and at the batch sizes online training runs at it is the ops' overhead,
not their arithmetic, that makes a step.  :class:`Stack` holds their parameters stacked
along a leading dim and runs the model over all of them at once (``torch.func``'s
``functional_call`` under ``vmap``): one forward gives every candidate's outputs for the
batch, one backward every candidate's gradients (the losses are summed, and each slice's
gradient is its own loss's), and one update applies each candidate's own optimizer
settings to its slice.

The learners stay whole.  Each one's parameters are views of its slice, and its
optimizer's state holds views of its slice of the stacked moments (the step counts are
written in at :meth:`Stack.sync`, before a snapshot), so what reads or acts
on a learner -- its ``state_dict`` (a snapshot), its ``model`` (export, publishing), a
drift's reset of its optimizer or boost of its learning rate, a schedule -- finds it as
when it is looped, and a snapshot of stacked candidates is one of looped ones.  The stack
takes each learner's settings from its optimizer's ``param_groups`` at every step, and its
state as it finds it (a state cleared by a drift starts at zero, one loaded from a
snapshot is copied in).

One shape: the same model config (the candidates differ in ``trainer.*`` only), dense
parameters (no sparse table), SGD (momentum, weight decay) or Adam/AdamW, no fp16 loss
scaler, and the same standardizer state (shared by the stack: the standardizers follow the
data alone).  Candidates that are not (another width, a candidate added since the
snapshot, with standardizers of its own) step on their own beside it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math

import torch
from torch.func import functional_call, vmap

from streamtrain.daemon.ranks import Collectives, Turn
from streamtrain.daemon.step import Learner, StepResult, sum_over_ranks
from streamtrain.streams.ring import Batch

log = logging.getLogger("streamtrain.candidates")

MOMENTS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq")}


def shape_of(learner: Learner) -> tuple | None:
    """What learners must share to be stacked; None: this one cannot be."""
    opt = learner.optimizer
    if learner.sparse_params or learner.scaler.is_enabled() or len(opt.param_groups) != 1:
        return None
    g = opt.param_groups[0]
    if isinstance(opt, torch.optim.SGD):
        family = "sgd"
        if g.get("nesterov") or g.get("dampening") or g.get("maximize"):
            return None
    elif isinstance(opt, torch.optim.Adam):  # AdamW is an Adam
        family = "adam"
        if g.get("amsgrad") or g.get("maximize"):
            return None
    else:
        return None
    tc = learner.cfg.trainer
    model = dataclasses.asdict(learner.cfg.model)
    return (
        repr(model),
        family,
        type(opt).__name__,
        str(learner.device),
        str(learner.amp_dtype),
        tc.task,
        tc.loss,
        tc.huber_delta,
        tc.standardize,
        tc.standardize_target,
        learner.temperature is not None,
        learner.inputs,
    )


def same_data_state(a: Learner, b: Learner) -> bool:
    """Whether the two standardizers (features and label) hold the same statistics: then one can serve both."""
    for x, y in ((a.normalizer, b.normalizer), (a.target, b.target)):
        sx, sy = x.state_dict(), y.state_dict()
        if sx.keys() != sy.keys():
            return False
        for key in sx:
            u, v = sx[key], sy[key]
            same = torch.equal(u, v) if isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor) else u == v
            if not same:
                return False
    return True


def groups(learners: list[Learner]) -> list[list[Learner]]:
    """The learners that can be stacked, in groups of two or more (in their order); the others are not in any."""
    by_shape: dict[tuple, list[Learner]] = {}
    for learner in learners:
        key = shape_of(learner)
        if key is None:
            continue
        group = by_shape.setdefault(key, [])
        if not group or same_data_state(group[0], learner):
            group.append(learner)
    return [g for g in by_shape.values() if len(g) > 1]


class Stack:
    """Learners of one shape (:func:`groups`) as one stacked model; :meth:`step` steps them all, :meth:`dissolve` ends it."""

    def __init__(self, learners: list[Learner]) -> None:
        self.learners = learners
        self.k = len(learners)
        lead = self.lead = learners[0]
        self.family = "sgd" if isinstance(lead.optimizer, torch.optim.SGD) else "adam"
        self.decoupled = isinstance(lead.optimizer, torch.optim.AdamW)
        self.own = [dict(learner.model.named_parameters()) for learner in learners]
        self.names = list(self.own[0])
        self.params: dict[str, torch.Tensor] = {}
        for name in self.names:
            stacked = torch.stack([own[name].detach() for own in self.own]).requires_grad_(self.own[0][name].requires_grad)
            self.params[name] = stacked
            for k, own in enumerate(self.own):
                own[name].data = stacked.detach()[k]  # the learner's parameter is its slice: it sees every update
        self.trained = [n for n in self.names if self.params[n].requires_grad]
        self.moments = {m: {n: torch.zeros_like(self.params[n]) for n in self.trained} for m in MOMENTS[self.family]}
        self.steps = [0.0] * self.k  # Adam's step count, one per learner (in its state at sync())
        # what each learner's optimizer state holds for a parameter: the views of its slices (see _adopt)
        self.views = [{n: {m: self.moments[m][n][k] for m in self.moments} for n in self.trained} for k in range(self.k)]
        for learner in learners[1:]:  # the standardizers follow the data alone: one for all
            learner.normalizer, learner.target = lead.normalizer, lead.target
        self.forward = vmap(self._forward_one, in_dims=(0, None, None), randomness="different")

    def _forward_one(self, params: dict[str, torch.Tensor], xn: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        return functional_call(self.lead.model, params, (xn, ids) if self.lead.takes_ids else (xn,))

    def probe(self) -> str | None:
        """Run the stacked model on a zero batch; why it cannot be stacked (the error), or None."""
        lead = self.lead
        x = torch.zeros(2, lead.inputs.in_features, device=lead.device)
        ids = torch.zeros(2, lead.inputs.categorical, dtype=torch.int64, device=lead.device) if lead.takes_ids else None
        try:
            with torch.no_grad():
                self.forward(self.params, x, ids)
        except Exception as exc:  # a model vmap cannot run (an in-place buffer update, data-dependent control flow)
            return f"{type(exc).__name__}: {exc}"
        return None

    # ------------------------------------------------------------------ the step
    def step(self, batch: Batch, ranked: tuple[Turn, Collectives] | None = None) -> list[StepResult]:
        """One prequential step of every learner on ``batch``: their results, in their order (as each one's ``step``)."""
        lead = self.lead
        self._adopt()
        x, y, ids, n, fold_labels = lead._inputs(batch, ranked)
        xn = lead.normalizer.inputs(x)
        with torch.autocast(lead.device.type, dtype=lead.amp_dtype or torch.float32, enabled=lead.amp_dtype is not None):
            out = self.forward(self.params, xn, ids)
        beta = None
        if lead.temperature is not None:  # each candidate's own fitted temperature
            beta = torch.tensor([learner.temperature.beta for learner in self.learners], device=out.device)
        loss, stats = lead._loss(out.float(), y, None if ranked is None else n, fold_labels, stacked=True, beta=beta)
        loss.sum().backward()  # each slice's gradient is its own candidate's
        sums = torch.cat([torch.stack([loss.detach(), *stats], dim=1), *lead.calibration_sums(out, y, beta, stacked=True)], dim=1)
        for name in self.trained:  # a parameter the forward did not use has no gradient: a zero one
            if self.params[name].grad is None:
                self.params[name].grad = torch.zeros_like(self.params[name])
        grads = [self.params[n].grad for n in self.trained]
        if ranked is not None:
            sums = sum_over_ranks([self.params[n] for n in self.trained], sums, ranked[1])
            grads = [self.params[n].grad for n in self.trained]
        norm = self._clip(grads)
        values = torch.cat([sums, norm[:, None].to(sums)], dim=1).tolist()  # the one device sync, for every candidate
        results = [learner.judge(v, n) for learner, v in zip(self.learners, values)]
        self._update(grads, results, [v[0] for v in values])
        for name in self.trained:
            self.params[name].grad = None
        return [learner.account(r, n, v) for learner, r, v in zip(self.learners, results, values)]

    def _clip(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Each candidate's gradients clipped to its own norm (as ``clip_grad_norm_``); the norms before, (k,)."""
        total = sum(g.reshape(self.k, -1).float().square().sum(1) for g in grads)
        norm = total.sqrt()
        limit = torch.tensor([learner.clip_norm for learner in self.learners], device=norm.device)
        coef = (limit / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(_per(coef, g))
        return norm

    def _update(self, grads: list[torch.Tensor], results: list[StepResult], losses: list[float]) -> None:
        """The optimizer step of every candidate whose step is not skipped, each with its own settings."""
        keep = [k for k, r in enumerate(results) if r.skipped]
        if len(keep) == self.k:
            return
        saved = self._save(keep)
        boosted = [None if r.skipped else learner.drift.boost(learner._drift_target) for learner, r in zip(self.learners, results)]
        groups_ = [learner.optimizer.param_groups[0] for learner in self.learners]
        device = self.params[self.names[0]].device

        def each(key: str, f=float) -> torch.Tensor:
            return torch.tensor([f(g[key]) for g in groups_], dtype=torch.float32, device=device)

        lr, wd = each("lr"), each("weight_decay")
        with torch.no_grad():
            if self.family == "sgd":
                momentum = each("momentum")
                for name, g in zip(self.trained, grads):
                    p, buf = self.params[name], self.moments["momentum_buffer"][name]
                    d = g.add(p * _per(wd, p))
                    buf.mul_(_per(momentum, buf)).add_(d)  # dampening 0: a fresh (zero) buffer takes the gradient itself
                    p.sub_(buf * _per(lr, p))
            else:
                for k, r in enumerate(results):
                    if not r.skipped:
                        self.steps[k] += 1
                step = self.steps
                b1 = [g["betas"][0] for g in groups_]
                b2 = [g["betas"][1] for g in groups_]
                step = [t or 1.0 for t in step]  # a skipped first step: its slice is restored, but no division by zero
                step_size = torch.tensor([a / (1 - b**t) for a, b, t in zip(lr.tolist(), b1, step)], device=device)
                root = torch.tensor([math.sqrt(1 - b**t) for b, t in zip(b2, step)], device=device)
                b1t, b2t, eps = torch.tensor(b1, device=device), torch.tensor(b2, device=device), each("eps")
                for name, g in zip(self.trained, grads):
                    p, m, v = self.params[name], self.moments["exp_avg"][name], self.moments["exp_avg_sq"][name]
                    if self.decoupled:
                        p.mul_(1 - _per(lr * wd, p))
                    else:
                        g = g.add(p * _per(wd, p))
                    m.lerp_(g, _per(1 - b1t, m))
                    v.mul_(_per(b2t, v)).addcmul_(g, g * _per(1 - b2t, v))
                    denom = (v.sqrt() / _per(root, v)).add_(_per(eps, v))
                    p.sub_(m / denom * _per(step_size, p))
        self._restore(saved)
        for learner, r, b, loss in zip(self.learners, results, boosted, losses):
            if not r.skipped:
                learner.drift.unboost(learner._drift_target, b)
                learner.schedule(loss)

    def _save(self, ks: list[int]) -> list:
        """The slices of the candidates whose step is skipped: the update over all of them must leave theirs untouched."""
        out = []
        for k in ks:
            tensors = [self.params[n] for n in self.trained] + [m[n] for m in self.moments.values() for n in self.trained]
            out.append((k, tensors, [t.detach()[k].clone() for t in tensors]))
        return out

    @staticmethod
    def _restore(saved: list) -> None:
        with torch.no_grad():
            for k, tensors, copies in saved:
                for t, c in zip(tensors, copies):
                    t[k] = c

    # ------------------------------------------------------------------ the learners' optimizer state
    def _adopt(self) -> None:
        """Make each learner's optimizer state the views of its slices, taking in what replaced them.

        A drift's reset clears a learner's state (its slices start at zero, as a fresh
        optimizer's would); a snapshot's load replaces it with tensors of its own (copied
        into the slices).  Otherwise the state already is the views, and this is a check.
        """
        first = MOMENTS[self.family][0]
        for k, learner in enumerate(self.learners):
            state = learner.optimizer.state
            if self.family == "sgd" and learner.optimizer.param_groups[0]["momentum"] == 0:
                continue  # torch's SGD keeps no state without momentum; the buffer here is only the step's gradient
            for name in self.trained:
                p = self.own[k][name]
                st = state.get(p)
                view = self.views[k][name]
                if st is not None and st.get(first) is view[first]:
                    continue
                with torch.no_grad():
                    for m, t in view.items():
                        if st is not None and st.get(m) is not None:
                            t.copy_(st[m])
                        else:
                            t.zero_()
                    if self.family == "adam":
                        self.steps[k] = float(st["step"]) if st is not None and "step" in st else 0.0
                # a step count of its own per parameter, as torch keeps it (a shared one would count once per parameter)
                state[p] = {"step": torch.tensor(self.steps[k]), **view} if self.family == "adam" else dict(view)

    def sync(self) -> None:
        """Write the step counts (kept here as numbers while training) into the learners' optimizer state: before a state_dict."""
        if self.family != "adam":
            return
        for k, learner in enumerate(self.learners):
            for name in self.trained:
                st = learner.optimizer.state.get(self.own[k][name])
                if st is not None and st.get("exp_avg") is self.views[k][name]["exp_avg"]:
                    st["step"].fill_(self.steps[k])

    def dissolve(self) -> None:
        """The learners on their own again: parameters, optimizer state and standardizers their own copies."""
        self.sync()
        for k, learner in enumerate(self.learners):
            for name in self.names:
                p = self.own[k][name]
                p.data = p.data.clone()
            for p in self.own[k].values():
                st = learner.optimizer.state.get(p)
                if st:
                    learner.optimizer.state[p] = {m: t.clone() if isinstance(t, torch.Tensor) else t for m, t in st.items()}
            if k:
                learner.normalizer = copy.deepcopy(self.lead.normalizer)
                learner.target = copy.deepcopy(self.lead.target)


def _per(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-candidate ``values`` (k,) shaped to broadcast over a stacked tensor (k, ...)."""
    return values.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)
