"""Pretraining engine: the VolTA-3D meta-architecture, EMA, schedules, optimiser set-up, the
resumable sampler, checkpoints, process-group helpers, the train loop and the step benchmark."""
