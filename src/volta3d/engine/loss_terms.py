"""The method's loss terms, declared once: the ``metrics.csv`` column each writes, the ``loss:`` weight
that switches it on, and how the health report reads it.

Everything that lists losses (the metrics writer, the progress line, the config's non-negative weights,
the report's plots, tables and health rows) reads this tuple, so a new term is its module in
``losses/``, its computation in ``meta_arch.compute_losses``, its weight in ``default.yaml`` and one
entry here. Pure Python: the report and the config checks import it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class LossTerm:
    column: str  # the key in compute_losses' output and the metrics.csv column
    weight: str  # its weight in the loss: section (0 switches the term off)
    # alignment: a cross-entropy to the teacher's targets, read against its uniform-guess level log K;
    # reconstruction: a loss of its own scale; regulariser: logged, kept out of the loss plots
    kind: Literal["alignment", "reconstruction", "regulariser"]


LOSS_TERMS = (
    LossTerm("loss_global", "global_weight", "alignment"),  # paper eq. 3: the CLS-style token (DINO)
    LossTerm("loss_local", "local_weight", "alignment"),  # eq. 4: the patch tokens (iBOT)
    LossTerm("loss_rec", "rec_weight", "reconstruction"),  # eq. 5: masked voxels (GMML)
    LossTerm("koleo", "koleo_weight", "regulariser"),  # DINOv2's KoLeo spread of the CLS embeddings
)
TERM_COLUMNS = tuple(t.column for t in LOSS_TERMS)
LOSS_COLUMNS = tuple(t.column for t in LOSS_TERMS if t.kind != "regulariser")  # plotted with the total
ALIGNMENT_LOSSES = tuple(t.column for t in LOSS_TERMS if t.kind == "alignment")
WEIGHT_KEYS = tuple(f"loss.{t.weight}" for t in LOSS_TERMS)
