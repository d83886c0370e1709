"""Convolutions over tiny feature maps as one matrix product: a CPU speed-up for 64x64 inputs.

With the ImageNet stem a 64x64 image reaches a ResNet's last stage as a 2x2 map. There, oneDNN's
convolution kernels (forward, and above all the weight gradient) run far below the CPU's matrix
throughput: on a 2-core Xeon with AMX, resnet18's layer4 took a third of each training step. The
same convolution is a dense linear map from the H*W*C input values to the OH*OW*O outputs, whose
matrix places the kernel's taps by position; for a handful of positions that matrix is small and
one matrix product (forward and both gradients) is fast on every CPU.

`TinyMapConv2d` is an nn.Conv2d (same parameters, same state_dict: checkpoints, serving and DDP see
no difference) whose forward takes that path when the input has at most MAX_POSITIONS positions,
and the library's convolution otherwise. `use_matmul_for_tiny_maps(model)` converts a model's plain
convolutions in place. Measured in bench/tiny_maps.py; chosen per device by the ResNet job
(`--tiny-maps`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - torch's own alias

MAX_POSITIONS = 4  # 2x2 maps: the measured win; at 4x4 the dense matrix is larger than the convolution's work


def _placement(conv: nn.Conv2d, height: int, width: int) -> tuple[torch.Tensor, int, int]:
    """A 0/1 tensor (output positions, input positions, kernel taps): which tap of the kernel joins
    each input position to each output position, for a (height, width) input; and the output size."""
    kh, kw = conv.kernel_size
    positions = torch.arange(1, height * width + 1, dtype=torch.float32).view(1, 1, height, width)
    reads = F.unfold(positions, (kh, kw), dilation=conv.dilation, padding=conv.padding, stride=conv.stride)[0]
    taps, outputs = reads.shape  # reads[t, p]: 1 + the input position tap t reads for output p, 0 = padding
    placement = torch.zeros(outputs, height * width, taps)
    tap, output = torch.nonzero(reads, as_tuple=True)
    placement[output, reads[tap, output].long() - 1, tap] = 1.0
    out_h = (height + 2 * conv.padding[0] - conv.dilation[0] * (kh - 1) - 1) // conv.stride[0] + 1
    out_w = (width + 2 * conv.padding[1] - conv.dilation[1] * (kw - 1) - 1) // conv.stride[1] + 1
    return placement, out_h, out_w


class TinyMapConv2d(nn.Conv2d):
    """nn.Conv2d computed as one matrix product on inputs of at most MAX_POSITIONS positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = x.shape
        if height * width > MAX_POSITIONS or self.groups != 1 or self.padding_mode != "zeros":
            return super().forward(x)
        placement, out_h, out_w = self._placement(height, width, x.device)
        weight = self.weight
        if torch.is_autocast_enabled(x.device.type):  # the product runs in autocast's dtype, as a conv would
            dtype = torch.get_autocast_dtype(x.device.type)
            weight, x = weight.to(dtype), x.to(dtype)
        # dense[(p, o), (q, c)] = weight[o, c, tap joining q to p]
        dense = torch.einsum("pqt,oct->poqc", placement.to(weight.dtype), weight.flatten(2))
        dense = dense.reshape(out_h * out_w * self.out_channels, height * width * channels)
        out = x.permute(0, 2, 3, 1).reshape(n, height * width * channels) @ dense.t()
        if self.bias is not None:
            out = out + self.bias.to(out.dtype).repeat(out_h * out_w)
        return out.view(n, out_h, out_w, self.out_channels).permute(0, 3, 1, 2)

    def _placement(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, int, int]:
        cache = self.__dict__.setdefault("_placements", {})  # not a buffer: the state_dict stays nn.Conv2d's
        key = (height, width, device)
        if key not in cache:
            placement, out_h, out_w = _placement(self, height, width)
            cache[key] = (placement.to(device), out_h, out_w)
        return cache[key]


def use_matmul_for_tiny_maps(model: nn.Module) -> int:
    """Make every plain nn.Conv2d of `model` a TinyMapConv2d, in place; return how many."""
    converted = 0
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = TinyMapConv2d
            converted += 1
    return converted
