"""The run-folder layout: every file and folder name a volta3d command writes or reads.

Writers and readers both take their names from here, so a stage that renames a file cannot leave
its reader behind (``tests/test_structure.py`` refuses a layout file name written anywhere else).
Input formats of other tools (BIDS' ``dataset_description.json``, the bundled data's CSVs) are not
part of the layout and stay with their readers.
"""

from __future__ import annotations

# every run folder
CONFIG = "config.yaml"  # the resolved config the run used (also a data folder's preprocessing record)
LOG = "log.txt"
LOCK = ".volta3d.lock"  # the claim of a folder by one running command (run_folder.py)

# a preprocessed data folder (`volta3d preprocess`)
MANIFEST = "manifest.csv"
REJECTED = "rejected.csv"  # also `predict`'s list of scans it could not read
PREPROCESS_LOG = "preprocess.log"
CACHE_VOLUMES = "volumes"  # one .npy per preprocessed volume
RECORDS = "records"  # one .json per volume: its source, checks and content hash

# a pretraining run (`volta3d pretrain`)
METRICS = "metrics.csv"  # one row per logged step: losses and health
ONLINE_EVAL = "online_eval.csv"  # the online probe's rows
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.pt"
ENCODER_WEIGHTS = "encoder.safetensors"  # the export downstream commands load
ENCODER_META = "encoder.json"
PRETRAIN_DATA = "pretrain_data.json"  # which subjects and volumes it saw

# an evaluation run (`finetune`, `probe`, `predict`)
RESULTS = "results.json"
SPLITS = "splits.json"
PREDICTIONS = "predictions.csv"
FINGERPRINT = "fingerprint.json"  # what a finetune run was started from, for its resume
FOLDS = "folds"  # per-fold results kept for a resume
MODELS = "models"  # saved fold models: MODELS/<key>/MODEL_WEIGHTS and MODEL_META
MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
PROBE_SUMMARY = "summary.json"
SEGMENT_INDEX = "index.csv"  # a segmentation run's predicted masks
PREDICTED_VOLUMES = "volumes.csv"  # predict: one row per scan

# a selection (`volta3d select`)
SELECTION_CSV = "selection.csv"
SELECTION_META = "selection.json"
EVALUATION_CSV = "evaluation.csv"

# the demo and the report
STAGES = "stages.json"
DEMO_LOG = "demo.log"
DEMO_IXI_MANIFEST = "ixi-demo.csv"
DEMO_MSD_MANIFEST = "msd-demo.csv"
REPORT_HTML = "report.html"
REPORT_SUMMARY = "summary.md"
REPORT_FIGURES = "figures"
FOREST_PLOT = "forest.png"
PRETRAINING_PLOT = "pretraining.png"
HEALTH_PLOT = "pretraining_health.png"
ONLINE_PROBE_PLOT = "online_probe.png"

# Files or folders that only one command leaves in its output folder: another command there would
# overwrite that run's config, log or results (run_folder.py refuses it).
SIGNATURES = {
    "preprocess": (RECORDS,),
    "select": (SELECTION_META,),
    "pretrain": (CHECKPOINTS, PRETRAIN_DATA),
    "finetune": (FINGERPRINT, FOLDS),
    "probe": (PROBE_SUMMARY,),
    "report": (REPORT_HTML,),
    "demo": (STAGES,),
}


def file_names() -> set[str]:
    """Every name above that has an extension: the ones no other module may spell out."""
    return {v for k, v in globals().items() if k.isupper() and isinstance(v, str) and "." in v}
