"""Layer tables (layer, input shape, output shape, parameters) through torchinfo."""

from __future__ import annotations

import torch
import torchinfo
from torch import nn


def layer_table(model: nn.Module, example_input: torch.Tensor, depth: int = 3) -> str:
    stats = torchinfo.summary(
        model,
        input_data=[example_input],
        depth=depth,
        col_names=("input_size", "output_size", "num_params"),
        row_settings=("var_names",),
        device=example_input.device,
        verbose=0,
    )
    return str(stats)
