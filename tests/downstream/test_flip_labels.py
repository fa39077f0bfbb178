from __future__ import annotations

import numpy as np
import pytest
import torch

from volta3d.cli import main
from volta3d.downstream.flip import RandLeftRightFlipd, check_label_pairs

from .conftest import TINY_OVERRIDES, config_section
from .synthetic import write_sphere_segmentation


def _lateral_item() -> dict[str, torch.Tensor]:
    """Label 1 on the low half of axis 0 ('left'), label 2 on the mirrored high half ('right')."""
    mask = torch.zeros(1, 6, 2, 2, dtype=torch.int64)
    mask[0, 1] = 1
    mask[0, 4] = 2
    image = torch.arange(6, dtype=torch.float32).view(1, 6, 1, 1).expand(1, 6, 2, 2).clone()
    return {"image": image, "mask": mask}


def test_flip_swaps_the_named_label_pairs():
    item = _lateral_item()
    out = RandLeftRightFlipd(["image", "mask"], "mask", [(1, 2)], prob=1.0)(item)
    assert torch.equal(torch.as_tensor(out["image"]), item["image"].flip(1))  # voxels mirrored
    # the mirrored left structure now lies on the right and is called right: the mask is unchanged
    assert torch.equal(torch.as_tensor(out["mask"]).long(), item["mask"])


def test_flip_without_pairs_only_mirrors():
    item = _lateral_item()
    out = RandLeftRightFlipd(["image", "mask"], "mask", [], prob=1.0)(item)
    assert torch.equal(torch.as_tensor(out["mask"]).long(), item["mask"].flip(1))
    unflipped = RandLeftRightFlipd(["image", "mask"], "mask", [(1, 2)], prob=0.0)(item)
    assert torch.equal(torch.as_tensor(unflipped["mask"]), item["mask"])


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([[1, 1]], "pair [1, 1] must name two different labels in 1..2"),
        ([[1, 3]], "pair [1, 3] must name two different labels in 1..2"),
        ([[1]], "each entry must be a pair of integer labels"),
        ([[1, 2], [2, 1]], "label 1 appears in more than one pair"),
    ],
)
def test_bad_label_pairs_name_the_field(pairs, message):
    with pytest.raises(ValueError, match=r"segment\.flip_label_pairs") as err:
        check_label_pairs(pairs, 3)
    assert message in str(err.value)


def test_segment_cli_checks_flip_label_pairs_against_the_masks(tmp_path, capsys):
    data = write_sphere_segmentation(tmp_path / "sph", n_subjects=4)
    code = main(
        [
            "finetune",
            "segment",
            "--data",
            str(data),
            "--output",
            str(tmp_path / "run"),
            "--model",
            "unet",
            "--no-progress",
            *TINY_OVERRIDES,
            "segment.epochs=1",
            "segment.flip_label_pairs=[[1, 2]]",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "segment.flip_label_pairs: pair [1, 2] must name two different labels in 1..1" in err[0]
    assert np.load(data / "lab00.npy").max() == 1


def test_segmentation_training_flips_with_the_configured_pairs(tmp_path, monkeypatch):
    import volta3d.downstream.train_segment as ts
    from volta3d.data.dataset import read_manifest
    from volta3d.protocol.splits import make_holdout_split

    data = write_sphere_segmentation(tmp_path / "sph", n_subjects=4)
    for i in range(4):  # the ball's high-x half becomes label 2 ('right')
        mask = np.load(data / f"lab{i:02d}.npy")
        mask[0, 16:][mask[0, 16:] == 1] = 2
        np.save(data / f"lab{i:02d}.npy", mask)
    used = []
    real = ts.RandLeftRightFlipd

    def spy(keys, label_key, pairs, prob):
        used.append((label_key, list(pairs), prob))
        return real(keys, label_key, pairs, prob=prob)

    monkeypatch.setattr(ts, "RandLeftRightFlipd", spy)
    table = read_manifest(data)
    section = config_section(
        "segment",
        model="unet",
        crop_size=16,
        samples_per_volume=1,
        epochs=1,
        val_fraction=0,
        flip_label_pairs=[[1, 2]],
    )
    res = ts.run_segmentation(
        table,
        tmp_path / "run",
        make_holdout_split(table["subject_id"], None, 0.25),
        section,
        unet_kwargs={"channels": (4, 8), "strides": (2,), "num_res_units": 0},
        seed=0,
        device="cpu",
        progress=False,
    )
    assert used == [("mask", [(1, 2)], 0.5)] and res["flip_label_pairs"] == [[1, 2]]
