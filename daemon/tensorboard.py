"""Loss curves where people look for them: TensorBoard scalars (``logging.tensorboard_dir``).

Optional: it needs the ``tensorboard`` package (``pip install 'streamtrain[tensorboard]'``);
a config that asks for it without the package is a config error, before anything starts.
Points are written every ``logging.tensorboard_every_steps`` steps, by the step number;
``drift/detected`` gets a point at each drift.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from streamtrain.daemon.errors import ConfigError

if TYPE_CHECKING:
    from streamtrain.daemon.step import Learner, StepResult


def step_scalars(learner: Learner, result: StepResult) -> dict[str, float]:
    """A step's scalars: the prequential loss, the EWMAs, the LR, the gradient norm, the cumulative metrics.

    TensorBoard's tags, and the MLflow run's metric names (publish.mlflow).
    """
    metric = learner.metric_name
    scalars = {
        "loss/prequential": result.loss,
        "loss/ewma": learner.loss_ewma,
        f"{metric}/ewma": learner.metric_ewma,
        "learning_rate": learner.lr,
        "grad_norm": result.grad_norm,
    }
    summary = learner.prequential.summary(learner.cfg.trainer.task)
    scalars.update({f"{k}/cumulative": v for k, v in summary.items() if k != "samples" and v is not None})
    return scalars


class TensorBoard:
    def __init__(self, directory: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            need = "needs the tensorboard package: pip install 'streamtrain[tensorboard]'"
            raise ConfigError([f"logging.tensorboard_dir: writing TensorBoard logs {need} ({exc})"]) from exc
        self.writer = SummaryWriter(log_dir=directory)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def step(self, learner: Learner, result: StepResult) -> None:
        self.scalars(learner.step_count, step_scalars(learner, result))

    def drift(self, step: int, count: int) -> None:
        self.writer.add_scalar("drift/detected", count, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
