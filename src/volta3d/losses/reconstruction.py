"""GMML masked-voxel reconstruction loss, paper eq. 1."""

from __future__ import annotations

from torch import Tensor


def masked_mse(reconstruction: Tensor, target: Tensor, voxel_mask: Tensor) -> Tensor:
    """Mean squared error over the corrupted voxels only (all channels), in float32.

    reconstruction, target: (B, C, D, H, W); voxel_mask: (B, 1, D, H, W) bool, True where the
    student saw zeros/noise. Only those voxels carry a learning signal: the clean ones could be
    copied through. The error is averaged over each volume's masked voxels, then over volumes:
    every volume weighs the same, and the loss is a plain mean over volumes, so k accumulated
    micro-batches (or k ranks) give exactly the gradient of one batch of k. A volume with no
    masked voxel contributes 0; nothing masked at all gives 0 (with a gradient path).
    """
    if reconstruction.dim() != 5 or reconstruction.shape != target.shape:
        raise ValueError(
            f"reconstruction {tuple(reconstruction.shape)} and target {tuple(target.shape)} "
            "must both be (B, C, D, H, W)"
        )
    b, c, *spatial = reconstruction.shape
    if (
        voxel_mask.dim() != 5
        or voxel_mask.shape[0] != b
        or voxel_mask.shape[1] not in (1, c)
        or list(voxel_mask.shape[2:]) != spatial
    ):
        raise ValueError(
            f"voxel_mask has shape {tuple(voxel_mask.shape)}, expected (B, 1, D, H, W) = {(b, 1, *spatial)}"
        )
    squared_error = (reconstruction.float() - target.detach().float()) ** 2  # (B, C, D, H, W)
    weight = voxel_mask.to(squared_error.dtype).expand_as(
        squared_error
    )  # (B, 1|C, D, H, W) -> (B, C, D, H, W)
    per_volume = (squared_error * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp(min=1.0)  # (B,)
    return per_volume.mean()
