"""Per-volume intensity standardisation at every network's input.

Volumes are cached on the paper's [0, 1] scale (GMML fill values and intensity augmentations
are defined there), but a ViT fed all-positive [0, 1] voxels starts with patch tokens that share
one dominant direction (the patch embedding of the mean intensity): measured on the bundled IXI
scans at initialisation, tokens at different positions had cosine similarity 0.98, so the teacher's
outputs were the same for every volume and centering flattened them to a uniform distribution
(collapse within one epoch). Z-scoring each input volume (MONAI ``NormalizeIntensity`` semantics,
the usual MRI normalisation in nnU-Net and 3DINO) brings that similarity to 0.57 (benchmarks/token_similarity.py). Every network in
volta3d (the VolTA-3D encoder, UNETR, the U-Net and Swin baselines) applies the same step, so the
comparisons stay fair and an exported encoder sees in fine-tuning what it saw in pretraining.
"""

from __future__ import annotations

import torch

from volta3d.config_rules import CHOICES
from volta3d.errors import InputError

INPUT_NORMS = CHOICES["model.input_norm"]


def standardise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, C, D, H, W) -> same shape, zero mean and unit variance per volume (over C, D, H, W)."""
    dims = tuple(range(1, x.ndim))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, unbiased=False)
    return (x - mean) / (std + eps)


def apply_input_norm(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "zscore":
        return standardise(x)
    if kind == "none":
        return x
    raise InputError(f"input_norm must be one of {', '.join(INPUT_NORMS)}, got '{kind}'")


class StandardisedInput:
    """Mixin for MONAI networks: z-score the input, then run the network unchanged (same state-dict keys)."""

    def forward(self, x: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        return super().forward(standardise(x), *args, **kwargs)  # type: ignore[misc]
