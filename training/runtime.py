"""Where and how this process trains: the trainer resolves it once; jobs read it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.devices import DeviceChoice
from training.distributed import ProcessGroup
from training.hardware import Precision


@dataclass(kw_only=True)
class Runtime:
    choice: DeviceChoice  # the device asked for and why it was chosen
    device: torch.device  # this process's device (cuda:LOCAL_RANK under DDP)
    group: ProcessGroup  # DDP's process group (disabled in a single process)
    precision: Precision  # the resolved --amp
