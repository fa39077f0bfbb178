"""SFCN, the field's standard brain-age CNN, as a from-scratch baseline (issue 20).

Written from the paper: Peng, Gong, Beckmann, Vedaldi, Smith, "Accurate brain age prediction with
lightweight deep neural networks", Medical Image Analysis 68 (2021) 101871, Fig. 1:
five blocks Conv 3x3x3 -> BatchNorm -> MaxPool 2 -> ReLU, a sixth block with a 1x1x1 convolution and
no pooling, then average pooling, dropout and a 1x1x1 convolution to the outputs. The paper's widths
are [32, 64, 128, 256, 256, 64] (about 3 M parameters) on 160 x 192 x 160 volumes.

One deviation: the paper's last convolution predicts a soft label distribution over 1-year age bins
(log-softmax, trained with the KL divergence to a Gaussian around the true age). Here it predicts
``num_outputs`` values with no softmax, trained like every other classifier of the project
(standardised MSE for numbers, cross-entropy for classes; ``train_classify._criterion``): a comparison
of models is fair only when they share one training loss, so the architecture is what differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from volta3d.errors import InputError
from volta3d.models.input_norm import standardise


def _block(c_in: int, c_out: int, *, pool: bool) -> nn.Sequential:
    """Conv -> BN (-> MaxPool 2) -> ReLU. The convolution has no bias: BatchNorm subtracts the batch
    mean right after it, so a bias would be a parameter without effect."""
    k = 3 if pool else 1
    layers: list[nn.Module] = [nn.Conv3d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm3d(c_out)]
    if pool:
        layers.append(nn.MaxPool3d(2))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SFCN(nn.Module):
    """``(B, C, D, H, W) -> (B, num_outputs)``. ``channels``: widths of the blocks, the last one 1x1x1
    without pooling and every earlier one 3x3x3 with a 2x max-pool, so input sides must be at least
    ``2 ** (len(channels) - 1)`` (32 for the paper's six blocks). The paper's fixed average-pool
    window covers its whole last feature map, so it is a global average pool here, for any input size.
    ``channels`` and ``dropout`` are the ``classify.sfcn:`` keys (default.yaml holds the paper's)."""

    def __init__(
        self,
        num_outputs: int,
        *,
        channels: Sequence[int],
        dropout: float,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if len(channels) < 2 or not all(isinstance(c, int) and c >= 1 for c in channels):
            raise InputError(
                f"SFCN needs at least two positive integer channel widths (got {list(channels)})"
            )
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"SFCN dropout must be in [0, 1) (got {dropout})")
        widths = [in_channels, *channels]
        n = len(channels)
        self.blocks = nn.Sequential(*(_block(widths[i], widths[i + 1], pool=i < n - 1) for i in range(n)))
        self.min_side = 2 ** (n - 1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Conv3d(channels[-1], num_outputs, 1)
        self.architecture = {"in_channels": in_channels, "channels": list(channels), "dropout": dropout}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[2:]) < self.min_side:
            raise InputError(
                f"SFCN with {len(self.blocks) - 1} pooling blocks needs input sides >= {self.min_side} "
                f"(got {tuple(x.shape[2:])})"
            )
        # the project's input standardisation, as every network gets (volta3d.models.input_norm)
        maps = self.blocks(standardise(x))  # (B, C, D, H, W) -> (B, F, D/2^p, H/2^p, W/2^p)
        return maps.mean(dim=(2, 3, 4))  # (B, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.dropout(self.features(x))[:, :, None, None, None]  # (B, F) -> (B, F, 1, 1, 1)
        return self.head(f).flatten(1)  # (B, K, 1, 1, 1) -> (B, K)

    def set_trainable(self, mode: str, unfreeze_last: int = 0) -> None:
        if mode != "full":
            raise InputError("the SFCN baseline is trained from scratch: only mode 'full' applies")


def sfcn_kwargs(*, channels: Sequence[int], dropout: float) -> dict[str, Any]:
    """The ``classify.sfcn:`` config section as ``SFCN`` keyword arguments."""
    return {"channels": list(channels), "dropout": dropout}
