"""VolTA-3D losses (paper eq. 1-6): one concept per module, temperatures passed per call."""

from volta3d.losses.centering import Center, sinkhorn_knopp_probs
from volta3d.losses.global_loss import GlobalDistillationLoss
from volta3d.losses.koleo import koleo_loss
from volta3d.losses.local_loss import PatchDistillationLoss
from volta3d.losses.reconstruction import masked_mse

__all__ = [
    "Center",
    "GlobalDistillationLoss",
    "PatchDistillationLoss",
    "koleo_loss",
    "masked_mse",
    "sinkhorn_knopp_probs",
]
