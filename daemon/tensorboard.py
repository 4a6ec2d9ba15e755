"""Loss curves where people look for them: TensorBoard scalars (``logging.tensorboard_dir``).

Optional: it needs the ``tensorboard`` package (``pip install 'streamtrain[tensorboard]'``);
a config that asks for it without the package is a config error, before anything starts.
Points are written every ``logging.tensorboard_every_steps`` steps, by the step number;
``drift/detected`` gets a point at each drift.
"""

from __future__ import annotations

from streamtrain.daemon.errors import ConfigError


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

    def drift(self, step: int, count: int) -> None:
        self.writer.add_scalar("drift/detected", count, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
