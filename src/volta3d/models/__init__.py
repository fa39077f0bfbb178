"""volta3d.models: the VolTA-3D encoder (MONAI ViTAutoEnc), CLS-style summariser, projection heads, export."""

from volta3d.models.encoder import VolTAEncoder, build_encoder, interpolate_pos_embed, split_model_section
from volta3d.models.export import (
    EncoderLoadError,
    build_from_export,
    load_vit_weights,
    read_encoder_export,
    save_encoder_export,
)
from volta3d.models.heads import ProjectionHead, build_heads
from volta3d.models.summariser import CLSSummariser, build_summariser

__all__ = [
    "CLSSummariser",
    "EncoderLoadError",
    "ProjectionHead",
    "VolTAEncoder",
    "build_encoder",
    "build_from_export",
    "build_heads",
    "build_summariser",
    "interpolate_pos_embed",
    "load_vit_weights",
    "read_encoder_export",
    "save_encoder_export",
    "split_model_section",
]
