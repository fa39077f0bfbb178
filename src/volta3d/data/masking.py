"""GMML masking (group masked model learning, MC-SSL/DiCoM): corrupt ~50 % of a 3D view in blocks.

The student sees the corrupted global view and must reconstruct the original voxels (paper eq. 1)
and match the teacher's patch tokens (eq. 5). Blocks are cubes of ``block_size`` voxels placed at
random, not aligned to the patch grid (GMML's default), so a token is called masked when at least
``token_masked_fraction`` of its voxels are (METHOD-NOTES pitfall 9).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

FILLS = ("noise", "zeros")
BLOCK_SHAPES = ("cube", "random")
_POSITIONS_PER_DRAW = 256  # block corners drawn per generator call; only affects speed


class GMMLMasker:
    """Replace ``ratio`` of a volume's voxels, in random 3D blocks, with U(0, 1) noise or zeros.

    ``block_shape="cube"``: cubes of ``block_size`` voxels. ``"random"``: boxes whose every edge is
    drawn uniformly between ``block_size`` and ``max_block_fraction`` of the view's side (MC-SSL's
    ``GMML_drop_rand_patches`` draws rectangles up to 0.3 of each side), so whole tokens and groups
    of tokens disappear, where small cubes leave almost every token partly visible.

    Noise is uniform on [0, 1] because the MRI is scaled to [0, 1]; N(0, 1) suits ImageNet-normalised
    images only (pitfall 8). All randomness comes from the generator passed in, never global state.
    """

    def __init__(
        self,
        ratio: float = 0.5,
        block_size: int = 8,
        fill: str = "noise",
        token_masked_fraction: float = 0.5,
        patch_size: int = 16,
        block_shape: str = "cube",
        max_block_fraction: float = 0.3,
    ) -> None:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        if int(block_size) != block_size or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size}")
        if fill not in FILLS:
            raise ValueError(f"fill must be one of {', '.join(FILLS)}, got '{fill}'")
        if not 0.0 < token_masked_fraction <= 1.0:
            raise ValueError(f"token_masked_fraction must be in (0, 1], got {token_masked_fraction}")
        if int(patch_size) != patch_size or patch_size < 1:
            raise ValueError(f"patch_size must be an integer >= 1, got {patch_size}")
        if block_shape not in BLOCK_SHAPES:
            raise ValueError(f"block_shape must be one of {', '.join(BLOCK_SHAPES)}, got '{block_shape}'")
        if not 0.0 < max_block_fraction <= 1.0:
            raise ValueError(f"max_block_fraction must be in (0, 1], got {max_block_fraction}")
        self.block_shape = block_shape
        self.max_block_fraction = float(max_block_fraction)
        self.ratio = float(ratio)
        self.block_size = int(block_size)
        self.fill = fill
        self.token_masked_fraction = float(token_masked_fraction)
        self.patch_size = int(patch_size)

    def __call__(self, volume: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(C, D, H, W) -> corrupted (C, D, H, W), voxel_mask (1, D, H, W) bool, token_mask (N,) bool.

        token_mask follows the patch grid in a Conv3d patch embedding's flattening order
        (d-major, then h, then w): N = (D/p) * (H/p) * (W/p).
        """
        if volume.dim() != 4:
            raise ValueError(f"volume must be (C, D, H, W), got shape {tuple(volume.shape)}")
        spatial = tuple(int(s) for s in volume.shape[1:])
        if any(s % self.patch_size for s in spatial):
            raise ValueError(f"patch_size {self.patch_size} does not divide the volume's spatial shape {spatial}")
        mask = torch.from_numpy(self._block_mask(spatial, generator)).to(volume.device)  # (D, H, W)
        if self.fill == "noise":
            filler = torch.rand(volume.shape, generator=generator, device=generator.device)
            filler = filler.to(device=volume.device, dtype=volume.dtype)
        else:
            filler = torch.zeros_like(volume)
        corrupted = torch.where(mask.unsqueeze(0), filler, volume)  # (D, H, W) -> (1, D, H, W), broadcast over C
        return corrupted, mask.unsqueeze(0), self.token_mask(mask)

    def token_mask(self, voxel_mask: Tensor) -> Tensor:
        """(D, H, W) bool -> (N,) bool: a token is masked when >= token_masked_fraction of it is."""
        p = self.patch_size
        d, h, w = voxel_mask.shape
        # (D, H, W) -> (D/p, p, H/p, p, W/p, p) -> (D/p, H/p, W/p) share of masked voxels per patch
        share = voxel_mask.float().reshape(d // p, p, h // p, p, w // p, p).mean(dim=(1, 3, 5))
        return (share >= self.token_masked_fraction).flatten()  # (D/p, H/p, W/p) -> (N,), d-major

    def _block_mask(self, spatial: tuple[int, int, int], generator: torch.Generator) -> np.ndarray:
        """Union of random blocks until exactly round(ratio * voxels) are masked.

        The last block is cut short (its first new voxels in raster order) so the realised ratio
        does not overshoot the target by up to a whole block.
        """
        mask = np.zeros(spatial, dtype=bool)
        remaining = round(self.ratio * mask.size)
        sides = torch.tensor(spatial)
        low = torch.clamp(torch.full((3,), self.block_size), max=sides)
        high = low if self.block_shape == "cube" else torch.maximum(low, (self.max_block_fraction * sides).long())
        while remaining > 0:
            unit = torch.rand((_POSITIONS_PER_DRAW, 6), generator=generator, device=generator.device).cpu()
            edges = low + (unit[:, 3:] * (high - low + 1)).long().clamp(max=high - low)  # (n, 3) block edges
            span = sides - edges + 1
            corners = (unit[:, :3] * span).long().clamp(max=span - 1)  # (n, 3) uniform block corners
            for (d0, h0, w0), (ed, eh, ew) in zip(corners.tolist(), edges.tolist(), strict=True):
                block = mask[d0 : d0 + ed, h0 : h0 + eh, w0 : w0 + ew]  # a view into mask
                new = ~block
                n_new = int(np.count_nonzero(new))
                if n_new > remaining:
                    keep = np.flatnonzero(new)[:remaining]
                    flat = block.reshape(-1)  # copy for non-contiguous views; written back below
                    flat[keep] = True
                    block[...] = flat.reshape(block.shape)
                    remaining = 0
                    break
                block[new] = True
                remaining -= n_new
                if remaining == 0:
                    break
        return mask
