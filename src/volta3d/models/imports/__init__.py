"""Import public 3D ViT encoders (MONAI ViT / ViTAutoEnc / UNETR across versions, BrainIAC, DINO-style
checkpoints) into volta3d's own encoder export."""

from volta3d.models.imports.importer import ImportOptions, cube_edge, import_encoder, resized
from volta3d.models.imports.locate import choose_root, encoder_roots
from volta3d.models.imports.reader import UnsafeCheckpointError, read_checkpoint_tensors

__all__ = [
    "ImportOptions",
    "UnsafeCheckpointError",
    "choose_root",
    "cube_edge",
    "encoder_roots",
    "import_encoder",
    "read_checkpoint_tensors",
    "resized",
]
