"""The evaluation protocol that pretraining (the online probe) and transfer (finetune, probe) share:
labels, subject-grouped splits and the saved selection split, metrics and scoring, the one fold loop
and its results.json layout, leakage checks, frozen embeddings and probes. It sits below ``engine`` and
``downstream`` and imports neither."""
