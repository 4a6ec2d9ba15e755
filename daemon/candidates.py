"""Candidates: learners trained side by side on the same batches; the best one is the champion.

``trainer.candidates`` lists overrides of ``trainer.*`` and ``model.*`` (``{trainer.lr:
0.01}``, ``{model.params.hidden: [128]}``); with ``drift.action: challenger`` a drift
*warning* adds a challenger (a fresh model of the champion's config) that lives until it
wins or ``drift.challenger_max_samples`` pass.  Every learner is a whole
:class:`~streamtrain.daemon.step.Learner` (its own optimizer, standardizers, prequential
totals) and takes every batch: each is scored on the batch before it learns it, so their
scores are paired, sample for sample.

**The comparison.**  Per step, each candidate's mean loss on the batch minus the
champion's is one paired observation; :class:`Race` keeps their exponentially decayed
mean and variance (half-life ``trainer.candidates_half_life`` samples).  A candidate is
promoted when its decayed mean loss is lower than the champion's by more than
``trainer.candidates_margin`` (relative) *and* the paired difference is significant
(z > ``trainer.candidates_z``) over at least ``trainer.candidates_min_samples`` samples
since the champion was last chosen.  The paired z-test is what makes a noisy stream safe:
the two models see the same rows, so most of the batch-to-batch noise cancels.

**What the daemon serves and reports** is the champion: snapshots publish its model, and
the daemon's prequential totals (``streamtrain_prequential_*``) add, step by step, the
scores of whichever learner was champion at that step -- what serving would have scored.
Each candidate's own totals are ``streamtrain_candidate_*{candidate}``.

**State.**  A snapshot holds the champion at the top level (its model is what is exported
and served), the others under ``candidates``, with the race and who is champion, so a
restart mid-comparison resumes it exactly.  Several ranks: every learner's step is
collective, in the same order on every rank, and the race sees the same summed numbers on
every rank, so every rank promotes at the same step.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Any

from streamtrain.config.candidates import DEFAULT, candidate_configs
from streamtrain.config.schema import Config, config_to_dict
from streamtrain.daemon.prequential import Prequential
from streamtrain.daemon.ranks import ALONE, World
from streamtrain.daemon.stack import Stack, groups
from streamtrain.daemon.step import Learner, StepResult
from streamtrain.streams.errors import ConfigError
from streamtrain.streams.ring import Batch

log = logging.getLogger("streamtrain.candidates")


class Race:
    """Paired, decayed loss differences of every candidate against the champion."""

    def __init__(self, names: list[str], half_life: float) -> None:
        self.names = list(names)
        self.half_life = half_life
        self.loss = {n: 0.0 for n in names}  # decayed sum of loss
        self.weight = {n: 0.0 for n in names}  # decayed sum of samples
        # vs the champion, on the rows both scored: decayed sums of 1, d, d^2 and 1 (squared decay) per step, of the
        # champion's mean loss per step, and the samples paired (not decayed)
        self.diff = {n: [0.0] * 6 for n in names}

    def add(self, name: str) -> None:
        self.names.append(name)
        self.loss[name] = self.weight[name] = 0.0
        self.diff[name] = [0.0] * 6

    def rename(self, old: str, new: str) -> None:
        self.names[self.names.index(old)] = new
        for d in (self.loss, self.weight, self.diff):
            d[new] = d.pop(old)

    def remove(self, name: str) -> None:
        self.names.remove(name)
        for d in (self.loss, self.weight, self.diff):
            d.pop(name, None)

    def observe(self, n: int, losses: dict[str, float], champion: str) -> None:
        """One step: ``losses`` are each learner's summed loss over the same ``n`` samples."""
        if n <= 0:
            return
        decay = 0.5 ** (n / self.half_life)
        base = losses[champion] / n
        for name, total in losses.items():
            if not math.isfinite(total):
                continue
            self.loss[name] = decay * self.loss[name] + total
            self.weight[name] = decay * self.weight[name] + n
            d = self.diff[name]
            x = base - total / n  # > 0: the candidate did better on these rows
            d[0], d[1], d[2], d[3] = decay * d[0] + 1.0, decay * d[1] + x, decay * d[2] + x * x, decay**2 * d[3] + 1.0
            d[4], d[5] = decay * d[4] + base, d[5] + n

    def mean_loss(self, name: str) -> float:
        return self.loss[name] / self.weight[name] if self.weight[name] else math.nan

    def gain(self, name: str) -> float:
        """How much lower the candidate's loss is than the champion's on the same rows (relative; decayed)."""
        w, s, _, _, base, _ = self.diff[name]
        return (s / w) / (base / w) if w and base else 0.0

    def paired(self, name: str) -> int:
        """Samples the candidate and the champion both scored since the champion was chosen (or the candidate came)."""
        return int(self.diff[name][5])

    def z(self, name: str) -> float:
        """The paired difference's mean over its standard error (decayed; steps as the observations)."""
        w, s, s2, w2, _, _ = self.diff[name]
        if w < 2:
            return 0.0
        mean = s / w
        var = max(s2 / w - mean * mean, 1e-24)
        n_eff = w * w / w2
        return mean / math.sqrt(var / n_eff)

    def reset(self) -> None:
        """A new champion: differences start over against it."""
        for d in self.diff.values():
            d[:] = [0.0] * 6

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "loss": dict(self.loss),
            "weight": dict(self.weight),
            "diff": {k: list(v) for k, v in self.diff.items()},  # copies: the snapshot is written off the training thread
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.names:
            if name in state.get("loss", {}):
                self.loss[name] = float(state["loss"][name])
                self.weight[name] = float(state["weight"][name])
                self.diff[name] = [float(v) for v in state["diff"][name]] + [0.0] * (6 - len(state["diff"][name]))


class Candidates:
    """Several learners as one: the trainer's ``learner``; attributes it does not define are the champion's."""

    def __init__(self, cfg: Config, world: World = ALONE) -> None:
        self.cfg = cfg
        self.world = world
        tc = cfg.trainer
        self.learners: dict[str, Learner] = {}
        for name, c in candidate_configs(cfg):
            self.learners[name] = Learner(c, world)
        self.champion = DEFAULT
        self.race = Race(list(self.learners), tc.candidates_half_life)
        self.prequential = Prequential()  # the champion's scores, step by step: what serving would have scored
        self.promotions: dict[str, int] = {}  # reason -> promotions (counted by this process)
        self.challenger_born = 0  # samples at which the drift challenger started (0: none)
        self.on_promotion = lambda old, new, reason: None
        self.stacks: list[Stack] | None = None  # learners of one shape trained as one (daemon/stack.py); None: to be planned

    def __getattr__(self, name: str) -> Any:  # model, device, metric_name, lr, drift, ...: the champion's
        return getattr(self.learners[self.__dict__["champion"]], name)

    @property
    def lead(self) -> Learner:
        return self.learners[self.champion]

    def initial_weights(self) -> dict[str, Any]:
        return {n: learner.initial_weights() for n, learner in self.learners.items()}

    def load_initial_weights(self, weights: dict[str, Any]) -> None:
        for n, w in weights.items():
            self.learners[n].load_initial_weights(w)

    def describe(self) -> str:
        others = ", ".join(n for n in self.learners if n != self.champion)
        return f"{self.lead.describe()}; champion {self.champion!r} of {len(self.learners)} candidates (also: {others})"

    # ------------------------------------------------------------------ the step
    def step(self, batch: Batch, ranked=None) -> StepResult:
        results: dict[str, StepResult] = {}
        losses: dict[str, float] = {}
        before = {n: _totals(learner.prequential) for n, learner in self.learners.items()}
        stepped: dict[int, StepResult] = {}
        for stack in self._stacked():  # the same order on every rank: the plan follows from the config and the state
            stepped.update(zip(map(id, stack.learners), stack.step(batch, ranked)))
        for name, learner in self.learners.items():
            results[name] = stepped[id(learner)] if id(learner) in stepped else learner.step(batch, ranked)
        n = 0
        for name, learner in self.learners.items():
            after = _totals(learner.prequential)
            delta = [a - b for a, b in zip(after[:5], before[name][:5])]
            if name == self.champion:
                n = int(delta[0])
                if n:
                    self._track(learner.prequential, before[name])
            losses[name] = delta[1] if delta[0] else math.nan
        if n:
            self.race.observe(n, {k: v for k, v in losses.items() if not math.isnan(v)}, self.champion)
            self._maybe_promote()
        self._drift_challenger(results[self.champion])
        return results[self.champion]

    def _stacked(self) -> list[Stack]:
        """The stacks of the learners as they are now (planned after any change to who they are)."""
        if self.stacks is None:
            self.stacks = []
            if self.cfg.trainer.candidates_stack == "auto":
                for group in groups(list(self.learners.values())):
                    stack = Stack(group)
                    why = stack.probe()
                    if why is not None:
                        stack.dissolve()
                        log.info("candidates: %d of one shape each step on their own (the stacked model fails: %s)", len(group), why)
                        continue
                    self.stacks.append(stack)
            if self.stacks:
                names = {id(learner): name for name, learner in self.learners.items()}
                log.info("candidates stacked: %s", "; ".join(", ".join(names[id(m)] for m in s.learners) for s in self.stacks))
        return self.stacks

    def _unstack(self) -> None:
        """Before the learners change (one added, dropped, renamed, or loaded): each its own again; planned anew at the next step."""
        for stack in self.stacks or ():
            stack.dissolve()
        self.stacks = None

    def _track(self, own: Prequential, before: tuple) -> None:
        """Add the champion's scores of this step to the served track."""
        p = self.prequential
        p.samples += own.samples - before[0]
        p.loss += own.loss - before[1]
        p.correct += own.correct - before[2]
        p.abs_error += own.abs_error - before[3]
        p.squared_error += own.squared_error - before[4]
        p.bins = [t + a - b for t, a, b in zip(p.bins, own.bins, before[5])]

    def _maybe_promote(self) -> None:
        """The candidate that beats the champion on the same rows by the most, if by enough, often enough, long enough."""
        tc = self.cfg.trainer
        race = self.race
        best, best_gain = None, tc.candidates_margin
        for name in race.names:
            if name == self.champion or race.paired(name) < tc.candidates_min_samples:
                continue
            gain = race.gain(name)
            if gain > best_gain and race.z(name) > tc.candidates_z:
                best, best_gain = name, gain
        if best is not None:
            self._promote(best, "challenger" if best == "challenger" else "better", best_gain)

    def _promote(self, name: str, reason: str, gain: float) -> None:
        old = self.champion
        log.warning(
            "promoted candidate %r over %r (%s) at step %d: its loss %.1f %% lower on the same %d samples (z %.1f)",
            name,
            old,
            reason,
            self.lead.step_count,
            100 * gain,
            self.race.paired(name),
            self.race.z(name),
        )
        self.promotions[reason] = self.promotions.get(reason, 0) + 1
        if reason == "challenger":  # it takes the place, and the name, of the champion it beat; that one is dropped
            self._unstack()
            beaten = self.learners.pop(old)
            del beaten
            self.race.remove(old)
            self.learners[old] = self.learners.pop(name)
            self.race.rename(name, old)
            self.challenger_born = 0
            name = old
        self.champion = name
        self.race.reset()
        self.on_promotion(old, name, reason)

    # ------------------------------------------------------------------ drift: a challenger
    def _drift_challenger(self, result: StepResult) -> None:
        dc = self.cfg.drift
        if dc.action != "challenger":
            return
        name = "challenger"
        lead = self.lead
        if self.challenger_born and name in self.learners and name != self.champion:
            age = lead.samples - self.challenger_born
            if result.drift and age > 5 * dc.cooldown_samples:  # a confirmed drift long after the warning that made it
                log.info("drift at sample %d: the challenger (from a warning %d samples ago) starts over", lead.samples, age)
                self._drop(name)
                self._start_challenger(name, lead)
                return
            if age > dc.challenger_max_samples:
                log.info("challenger dropped: not better after %d samples", lead.samples - self.challenger_born)
                self.promotions["challenger_dropped"] = self.promotions.get("challenger_dropped", 0) + 1
                self._drop(name)
            return
        if not (lead.drift.warned or result.drift) or name in self.learners:
            return
        self._start_challenger(name, lead)

    def _start_challenger(self, name: str, lead: Learner) -> None:
        self._unstack()
        fresh = Learner(self._challenger_config(), self.world)
        if self.cfg.drift.challenger == "reset":  # the champion as it is, with a fresh optimizer (its moments forgotten)
            fresh.load_state_dict(copy.deepcopy(lead.state_dict()), "the champion", self.cfg.model.name)
            fresh.optimizer.state.clear()
            if fresh.sparse_optimizer is not None:
                fresh.sparse_optimizer.state.clear()
        else:  # a fresh model: the data's scale is known, the mapping is not
            fresh.normalizer.load_state_dict(lead.normalizer.state_dict())
            fresh.target.load_state_dict(lead.target.state_dict())
        fresh.samples = lead.samples
        self.learners[name] = fresh
        self.race.add(name)
        self.challenger_born = lead.samples
        what = "the champion with a fresh optimizer" if self.cfg.drift.challenger == "reset" else "a fresh model"
        log.warning("drift warning at sample %d: a challenger (%s) trains beside the champion %r", lead.samples, what, self.champion)

    def _challenger_config(self) -> Config:
        return self.lead.cfg  # the champion's config: a fresh model of it (drift.action challenger: it warns, acts on nothing)

    def _drop(self, name: str) -> None:
        self._unstack()
        del self.learners[name]
        self.race.remove(name)
        self.challenger_born = 0

    def report(self) -> dict[str, Any]:
        """For the scrape: who is champion, each candidate's own totals and recent loss, the promotions."""
        return {
            "champion": self.champion,
            "own": {n: (learner.prequential.samples, learner.prequential.loss) for n, learner in self.learners.items()},
            "recent": {n: self.race.mean_loss(n) for n in self.learners},
            "promotions": dict(self.promotions),
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        for stack in self.stacks or ():
            stack.sync()
        state = self.lead.state_dict()
        own = state["prequential"]
        state["prequential"] = self.prequential.state_dict()
        state["candidates"] = {
            "champion": self.champion,
            "own_prequential": own,
            "states": {n: learner.state_dict() for n, learner in self.learners.items() if n != self.champion},
            "race": self.race.state_dict(),
            "challenger_born": self.challenger_born,
        }
        return state

    def load_state_dict(self, state: dict[str, Any], where: str, trained_with: str) -> None:
        self._unstack()
        cand = state.get("candidates")
        if cand is None:  # a snapshot of one learner: it is the default, the others start fresh
            self.learners[DEFAULT].load_state_dict(state, where, trained_with)
            self.prequential.load_state_dict(state.get("prequential", {}))
            return
        champion = cand["champion"]
        if champion not in self.learners and champion == "challenger":
            self.learners["challenger"] = Learner(self._challenger_config(), self.world)
        for name in cand["states"]:
            if name == "challenger" and name not in self.learners:
                self.learners[name] = Learner(self._challenger_config(), self.world)
        if champion not in self.learners:
            raise ConfigError([f"trainer.candidates: snapshot {where} was trained with champion {champion!r}, not among them now"])
        self.champion = champion
        self.race = Race(list(self.learners), self.cfg.trainer.candidates_half_life)
        self.race.load_state_dict(cand.get("race", {}))
        self.challenger_born = int(cand.get("challenger_born", 0))
        self.learners[champion].load_state_dict({**state, "prequential": cand["own_prequential"]}, where, trained_with)
        for name, sub in cand["states"].items():
            if name in self.learners:
                self.learners[name].load_state_dict(sub, where, trained_with)
        configs = dict(candidate_configs(self.cfg))
        for name in [n for n in self.learners if n != champion and n not in cand["states"]]:  # not in the snapshot
            if name in configs:  # a candidate added to the config since: it starts now
                self.learners[name] = Learner(configs[name], self.world)
            else:  # a challenger started after the snapshot (a roll-back to it): gone with what came after
                self._drop(name)
        self.prequential.load_state_dict(state.get("prequential", {}))


def _totals(p: Prequential) -> tuple:
    return (p.samples, p.loss, p.correct, p.abs_error, p.squared_error, list(p.bins))


def served_meta(learner: Learner | Candidates, cfg: Config) -> dict[str, Any]:
    """A snapshot's meta.json entries for what it serves: the config its model was built from -- the champion's, its
    overrides applied (a candidate of another width is exported as one) -- and, with candidates, who is champion and the
    model and trainer sections of each of the others (``publish.candidates`` exports them)."""
    if not isinstance(learner, Candidates):
        return {"model": cfg.model.name, "config": config_to_dict(cfg)}
    lead = learner.lead.cfg
    served = dataclasses.replace(lead, trainer=dataclasses.replace(lead.trainer, candidates=cfg.trainer.candidates))
    others = {}
    for name, other in learner.learners.items():
        if name != learner.champion:
            sections = config_to_dict(other.cfg)
            others[name] = {"model": sections["model"], "trainer": sections["trainer"]}
    return {"model": lead.model.name, "config": config_to_dict(served), "candidates": {"champion": learner.champion, "others": others}}


def make_learner(cfg: Config, world: World = ALONE) -> Learner | Candidates:
    """One learner, or several side by side (``trainer.candidates``, ``drift.action: challenger``)."""
    if cfg.trainer.candidates or cfg.drift.action == "challenger":
        return Candidates(cfg, world)
    return Learner(cfg, world)
