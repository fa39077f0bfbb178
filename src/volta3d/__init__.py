"""volta3d: self-supervised learning on 3D brain MRI with the VolTA-3D method."""

__version__ = "0.1.0"
