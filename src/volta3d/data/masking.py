"""GMML masking (group masked model learning, MC-SSL/DiCoM): corrupt ~50 % of a 3D view in blocks.

The student sees the corrupted global view and must reconstruct the original voxels (paper eq. 1)
and match the teacher's patch tokens (eq. 5). Blocks are cubes of ``block_size`` voxels placed at
random, not aligned to the patch grid (GMML's default), so a token is called masked when at least
``token_masked_fraction`` of its voxels are: a token a block only grazes still shows the student
most of its voxels, so its patch loss would not be a prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from volta3d.config_rules import CHOICES

FILLS = CHOICES["masking.fill"]
BLOCK_SHAPES = CHOICES["masking.block_shape"]
_POSITIONS_PER_DRAW = 256  # block corners drawn per generator call (fixes the random stream)
_NEVER = 2**31 - 1  # block number of a voxel no block covers
_MAX_SCATTER = 1 << 22  # block-voxel indices per scatter chunk: bounds memory, not the result


class GMMLMasker:
    """Replace ``ratio`` of a volume's voxels, in random 3D blocks, with U(0, 1) noise or zeros.

    ``block_shape="cube"``: cubes of ``block_size`` voxels. ``"random"``: boxes whose every edge is
    drawn uniformly between ``block_size`` and ``max_block_fraction`` of the view's side (MC-SSL's
    ``GMML_drop_rand_patches`` draws rectangles up to 0.3 of each side), so whole tokens and groups
    of tokens disappear, where small cubes leave almost every token partly visible.

    Noise is uniform on [0, 1] because the MRI is scaled to [0, 1]; N(0, 1) suits ImageNet-normalised
    images only, and would put the noise far outside the range of every real voxel. All randomness
    comes from the generator passed in, never global state.
    """

    def __init__(
        self,
        *,
        ratio: float,
        block_size: int,
        fill: str,
        token_masked_fraction: float,
        patch_size: int,
        block_shape: str,
        max_block_fraction: float,
    ) -> None:
        """The ``masking:`` config section's keys and the encoder's ``model.patch_size``."""
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
        spatial = self._check_spatial(tuple(int(s) for s in volume.shape[1:]))
        mask = torch.from_numpy(self._block_mask(spatial, generator)).to(volume.device)  # (D, H, W)
        if self.fill == "noise":
            filler = torch.rand(volume.shape, generator=generator, device=generator.device)
            filler = filler.to(device=volume.device, dtype=volume.dtype)
        else:
            filler = torch.zeros_like(volume)
        # the (D, H, W) mask as (1, D, H, W), broadcast over C
        corrupted = torch.where(mask.unsqueeze(0), filler, volume)
        return corrupted, mask.unsqueeze(0), self.token_mask(mask)

    def mask_batch(self, views: Tensor, seeds: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """(N, C, D, H, W) views, one seed each -> corrupted (N, C, D, H, W), voxel_mask (N, 1, D, H, W),
        token_mask (N, T): ``__call__`` for the whole batch at once, on the views' device.

        Each view gets the mask ``__call__`` gives it with ``torch.Generator().manual_seed(seed)``: the
        blocks come from that generator, and on a CPU so does the noise fill (a CUDA generator with the
        same seed draws it on a GPU, the same distribution). On a GPU the blocks of all views are painted
        at once (``_batched_block_mask``); on a CPU one at a time.
        """
        if views.dim() != 5 or len(seeds) != views.shape[0]:
            raise ValueError(
                f"views must be (N, C, D, H, W) with one seed each, got {tuple(views.shape)}, {len(seeds)} seeds"
            )
        spatial = self._check_spatial(tuple(int(s) for s in views.shape[2:]))
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        if views.device.type == "cpu":  # one block at a time is faster on a CPU
            mask = torch.from_numpy(np.stack([self._block_mask(spatial, g) for g in generators]))
        else:
            mask = self._batched_block_mask(spatial, generators, views.device)  # (N, D, H, W)
        if self.fill == "noise":
            fills = [
                torch.rand(views.shape[1:], generator=g, device=g.device).to(views.device)
                if views.device.type == "cpu"
                else torch.rand(views.shape[1:], generator=torch.Generator(views.device).manual_seed(int(s)),
                                device=views.device)
                for g, s in zip(generators, seeds, strict=True)
            ]  # fmt: skip
            filler = torch.stack(fills).to(views.dtype)
        else:
            filler = torch.zeros_like(views)
        # the (N, D, H, W) mask as (N, 1, D, H, W), broadcast over C
        corrupted = torch.where(mask.unsqueeze(1), filler, views)
        return corrupted, mask.unsqueeze(1), self.token_mask(mask)

    def token_mask(self, voxel_mask: Tensor) -> Tensor:
        """(..., D, H, W) bool -> (..., N) bool: a token is masked when >= token_masked_fraction of it is."""
        p = self.patch_size
        *lead, d, h, w = voxel_mask.shape
        # (..., D, H, W) -> (..., D/p, p, H/p, p, W/p, p) -> (..., D/p, H/p, W/p) share of masked voxels per patch
        share = voxel_mask.float().reshape(*lead, d // p, p, h // p, p, w // p, p).mean(dim=(-5, -3, -1))
        return (share >= self.token_masked_fraction).flatten(-3)  # (..., D/p, H/p, W/p) -> (..., N), d-major

    def _check_spatial(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        if any(s % self.patch_size for s in spatial):
            raise ValueError(
                f"patch_size {self.patch_size} does not divide the volume's spatial shape {spatial}"
            )
        return spatial

    def _edge_bounds(self, sides: Tensor) -> tuple[Tensor, Tensor]:
        """Smallest and largest block edge per axis (both block_size for cubes)."""
        low = torch.clamp(torch.full((3,), self.block_size), max=sides)
        high = (
            low
            if self.block_shape == "cube"
            else torch.maximum(low, (self.max_block_fraction * sides).long())
        )
        return low, high

    def _block_mask(self, spatial: tuple[int, ...], generator: torch.Generator) -> np.ndarray:
        """Union of random blocks until exactly round(ratio * voxels) are masked.

        The last block is cut short (its first new voxels in raster order) so the realised ratio
        does not overshoot the target by up to a whole block. One block at a time: the reference
        for ``_batched_block_mask``.
        """
        mask = np.zeros(spatial, dtype=bool)
        remaining = round(self.ratio * mask.size)
        sides = torch.tensor(spatial)
        low, high = self._edge_bounds(sides)
        while remaining > 0:
            unit = torch.rand((_POSITIONS_PER_DRAW, 6), generator=generator, device=generator.device).cpu()
            corners, edges = _block_boxes(unit, sides, low, high)
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

    def _batched_block_mask(
        self, spatial: tuple[int, ...], generators: Sequence[torch.Generator], device: torch.device
    ) -> Tensor:
        """``_block_mask`` for N views at once, as tensor operations on ``device`` (a GPU): (N, D, H, W) bool.

        Every voxel gets the number of the first block that covers it (a scatter-min over the blocks'
        voxels). Masking blocks one at a time and cutting the last one short in raster order keeps
        exactly the ``target`` voxels that come first in (block number, raster index) order.
        """
        n, total = len(generators), math.prod(spatial)
        target = round(self.ratio * total)
        if target == 0 or n == 0:
            return torch.zeros((n, *spatial), dtype=torch.bool, device=device)
        sides = torch.tensor(spatial)
        low, high = self._edge_bounds(sides)
        # each voxel's first covering block; the last column collects the voxels outside a smaller block
        arrival = torch.full((n, total + 1), _NEVER, dtype=torch.int32, device=device)
        pending, first = list(range(n)), 0
        while pending:
            unit = torch.stack(
                [torch.rand((_POSITIONS_PER_DRAW, 6), generator=generators[i]) for i in pending]
            )
            corners, edges = _block_boxes(unit, sides, low, high)  # (m, P, 3) each
            rows = torch.tensor(pending, device=device)
            part = arrival if len(pending) == n else arrival[rows]
            part = _paint_blocks(part, corners.to(device), edges.to(device), first, spatial, high, low)
            if len(pending) == n:
                arrival = part
            else:
                arrival[rows] = part
            first += _POSITIONS_PER_DRAW
            covered = (part[:, :total] < _NEVER).sum(dim=1).tolist()
            pending = [i for i, c in zip(pending, covered, strict=True) if c < target]
        return _first_voxels(arrival[:, :total], first, target).view(n, *spatial)


def _first_voxels(arrival: Tensor, n_blocks: int, target: int) -> Tensor:
    """(N, V) first covering block of each voxel -> (N, V) bool: the ``target`` voxels first in
    (block number, raster index) order, i.e. whole blocks up to the one that reaches the target, and
    that block's first new voxels in raster order."""
    n = arrival.shape[0]
    rows = torch.arange(n, device=arrival.device).unsqueeze(1)
    new_per_block = torch.zeros((n, n_blocks + 1), dtype=torch.int64, device=arrival.device)
    new_per_block.index_put_((rows, arrival.clamp(max=n_blocks).long()), torch.ones_like(arrival, dtype=torch.int64),
                             accumulate=True)  # fmt: skip
    reached = new_per_block[:, :n_blocks].cumsum(dim=1)  # (N, blocks): voxels masked once block b is in
    last = (reached < target).sum(dim=1, keepdim=True)  # (N, 1): the block that reaches the target
    before = torch.where(last > 0, reached.gather(1, (last - 1).clamp(min=0)), 0)  # voxels of earlier blocks
    in_last = arrival == last
    return (arrival < last) | (in_last & (in_last.cumsum(dim=1) <= target - before))


def _block_boxes(unit: Tensor, sides: Tensor, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """(..., 6) uniform numbers -> block corners and edges (..., 3): edges uniform in [low, high],
    corners uniform over the positions where the block fits."""
    edges = low + (unit[..., 3:] * (high - low + 1)).long().clamp(max=high - low)
    span = sides - edges + 1
    corners = (unit[..., :3] * span).long().clamp(max=span - 1)
    return corners, edges


def _paint_blocks(
    arrival: Tensor,
    corners: Tensor,
    edges: Tensor,
    first: int,
    spatial: tuple[int, ...],
    high: Tensor,
    low: Tensor,
) -> Tensor:
    """Scatter-min block numbers ``first + p`` over the voxels of blocks (m, P, 3) into arrival (m, V + 1).

    Each block's voxels are enumerated over the largest block's box; those beyond its own edges go to
    the extra last column. Chunks of blocks keep the index tensor near _MAX_SCATTER entries.
    """
    _, h, w = spatial
    total = arrival.shape[1] - 1
    grids = torch.meshgrid(*(torch.arange(int(e), device=arrival.device) for e in high), indexing="ij")
    offsets = torch.stack([g.flatten() for g in grids], dim=1)  # (E, 3) offsets in the largest block
    offset_lin = (offsets[:, 0] * h + offsets[:, 1]) * w + offsets[:, 2]  # (E,)
    corner_lin = (corners[..., 0] * h + corners[..., 1]) * w + corners[..., 2]  # (m, P)
    m, n_blocks = corner_lin.shape
    chunk = max(1, _MAX_SCATTER // max(1, m * offsets.shape[0]))
    for lo in range(0, n_blocks, chunk):
        sl = slice(lo, lo + chunk)
        lin = corner_lin[:, sl, None] + offset_lin  # (m, p, E)
        if not torch.equal(low, high):  # blocks of other sizes: voxels beyond a block's own edges go nowhere
            lin = torch.where((offsets < edges[:, sl, None, :]).all(dim=-1), lin, total)  # (m, p, E)
        number = torch.arange(
            first + lo, first + lo + lin.shape[1], dtype=arrival.dtype, device=arrival.device
        )
        number = number.view(1, -1, 1).expand_as(lin)
        arrival = arrival.scatter_reduce(1, lin.flatten(1), number.flatten(1), reduce="amin")
    return arrival
