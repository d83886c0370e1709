"""A job the tests define: fit y = 3x - 1 with a tiny MLP. It declares no serving and no data folder:
what a job does not declare must work everywhere (training, reports, sweeps, registration)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click
import torch
from torch import nn

from training.jobs import JobRun, JobSpec, Optimization, RunConfig
from training.jobs.run import EpochContext
from training.metrics import TRAIN_LOSS, VAL_LOSS
from training.options import option


@dataclass(frozen=True, kw_only=True)
class ToyConfig(RunConfig):
    width: int = option(8, type=click.IntRange(1), help="hidden units")
    lr: float = option(0.1, type=click.FloatRange(0, min_open=True))
    experiment: str = option("toy")
    registered_model: str = option("toy-regression")


def build_model(*, width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, 1))


class ToyRun(JobRun):
    config: ToyConfig

    def build_data(self) -> dict[str, Any]:
        x = torch.linspace(-1, 1, 64)[:, None]
        self.x, self.y = x, 3 * x - 1
        return {"dataset": "y = 3x - 1"}

    def model_config(self) -> dict[str, Any]:
        return {"width": self.config.width}

    def example_input(self) -> torch.Tensor:
        return self.x[:1]

    def build_optimization(self, model: nn.Module, steps_per_epoch: int) -> Optimization:
        return Optimization(optimizer=torch.optim.SGD(model.parameters(), lr=self.config.lr))

    def train_epoch(self, model: nn.Module, context: EpochContext) -> dict[str, float]:
        for _ in range(20):
            loss = nn.functional.mse_loss(model(self.x), self.y)
            context.optimization.optimizer.zero_grad()
            loss.backward()
            context.optimization.optimizer.step()
        return {TRAIN_LOSS: loss.item()}

    def evaluate(self, model: nn.Module, reduce) -> dict[str, float]:
        with torch.no_grad():
            return {VAL_LOSS.name: float(nn.functional.mse_loss(model(self.x), self.y))}


TOY = JobSpec(kind="toy", description="Fit y = 3x - 1 with a tiny MLP.", config=ToyConfig, run=ToyRun,
              build_model=build_model, data_hint="nothing (the data are generated)", metrics=(), best=VAL_LOSS,
              data_required=lambda given: False)  # fmt: skip
