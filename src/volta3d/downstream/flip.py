"""Left-right flip augmentation for segmentation crops that keeps lateralised labels right.

Mirroring a brain turns its left hippocampus into a right one: when the masks name the two sides
with different labels (e.g. 1 = left, 2 = right), flipping the voxels without swapping those label
values would teach the model to call a right structure 'left'. MSD-style anterior / posterior
labels are not lateralised, so the default is no swap.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.transforms import Flipd, MapLabelValued, MapTransform, RandomizableTransform

from volta3d.errors import InputError

FIELD = "segment.flip_label_pairs"


def check_label_pairs(pairs: Sequence[Sequence[int]] | None, num_classes: int) -> list[tuple[int, int]]:
    """Validate ``[[a, b], ...]``: distinct foreground labels below ``num_classes``, each in one pair."""
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    for pair in pairs or []:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(v, int) for v in pair):
            raise InputError(f"{FIELD}: each entry must be a pair of integer labels [a, b] (got {pair!r})")
        a, b = pair
        if a == b or not (0 < a < num_classes and 0 < b < num_classes):
            raise InputError(f"{FIELD}: pair {[a, b]} must name two different labels in 1..{num_classes - 1}")
        if {a, b} & seen:
            raise InputError(f"{FIELD}: label {sorted({a, b} & seen)[0]} appears in more than one pair")
        seen |= {a, b}
        out.append((a, b))
    return out


class RandLeftRightFlipd(RandomizableTransform, MapTransform):
    """With probability ``prob``, flip ``keys`` along RAS axis 0 (left-right) and swap each label
    pair of ``label_pairs`` in ``label_key``, so the mirrored mask names the sides correctly."""

    def __init__(
        self,
        keys: Sequence[Hashable],
        label_key: Hashable,
        label_pairs: Sequence[tuple[int, int]],
        prob: float = 0.5,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.flip = Flipd(keys, spatial_axis=0)
        orig = [v for a, b in label_pairs for v in (a, b)]
        target = [v for a, b in label_pairs for v in (b, a)]
        self.swap = MapLabelValued(label_key, orig, target, dtype=np.int64) if label_pairs else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize(None)
        d = dict(data)
        if not self._do_transform:
            return d
        d = self.flip(d)
        return self.swap(d) if self.swap is not None else d
