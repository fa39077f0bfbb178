"""Transfer to downstream tasks: classifiers (VolTA-3D ViT, Swin), segmenters (UNETR, U-Net), their
shared training loop, cross-validated classification and segmentation runs, embeddings and probes."""
