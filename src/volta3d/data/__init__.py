"""Ingest and data views: readers (io), input discovery (sources), the offline preprocessing
pipeline and its cache, the dataset over ``manifest.csv``, the bundled real data, and the
pretraining views (GMML masking, 3D multi-crop)."""
