"""The raw-volume probe baseline: features against a NumPy reference, `embed --raw-volume` then
`probe` end to end, and how the report names and pairs the baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from volta3d.cli import main
from volta3d.data.dataset import read_manifest
from volta3d.evaluation.report import Run, default_name, initialisation, pair_runs
from volta3d.protocol.embeddings import load_embeddings, raw_volume_features, save_embeddings

from ..config_kwargs import section, tiny_encoder


def _reference(volume: np.ndarray, grid: int) -> np.ndarray:
    """(C, D, H, W), every side a multiple of ``grid``: z-score over the whole volume (population
    SD, as MONAI's NormalizeIntensity), then the mean of each block, channel-major."""
    z = (volume - volume.mean()) / (volume.std() + 1e-6)
    c, *sides = z.shape
    b = [s // grid for s in sides]
    blocks = z.reshape(c, grid, b[0], grid, b[1], grid, b[2])
    return blocks.mean(axis=(2, 4, 6)).reshape(-1)


def test_raw_features_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    volumes = rng.gamma(2.0, 3.0, (3, 2, 32, 16, 48)).astype(np.float64)
    volumes[1] *= 50  # scale: removed by the z-score
    got = raw_volume_features(torch.from_numpy(volumes), grid=8)
    assert got.dtype == torch.float32 and got.shape == (3, 2 * 8**3)
    want = np.stack([_reference(v, 8) for v in volumes])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    # channel-major: the first grid^3 features are channel 0's
    np.testing.assert_allclose(got[0, : 8**3].numpy(), _reference(volumes[0], 8)[: 8**3], atol=1e-5)


def test_raw_features_shapes_for_sides_not_multiple_of_the_grid():
    images = torch.rand(2, 1, 30, 17, 41, dtype=torch.float16)
    assert raw_volume_features(images).shape == (2, 4096)
    assert raw_volume_features(images, grid=5).shape == (2, 125)
    assert raw_volume_features(torch.rand(1, 3, 20, 20, 20), grid=4).shape == (1, 3 * 64)
    with pytest.raises(ValueError, match=r"expects \(B, C, D, H, W\) images, got shape \(1, 20, 20, 20\)"):
        raw_volume_features(torch.rand(1, 20, 20, 20))
    with pytest.raises(ValueError, match="grid must be a positive integer, got 0"):
        raw_volume_features(torch.rand(1, 1, 8, 8, 8), grid=0)


def test_load_embeddings_accepts_raw_only_and_names_what_is_missing(tmp_path):
    ids = np.asarray(["a", "b"], dtype=str)
    path = save_embeddings(
        tmp_path / "raw.npz",
        {"subject_id": ids, "path": ids, "raw": np.zeros((2, 8))},
        {"init": "raw-volume"},
    )
    data, meta = load_embeddings(path)
    assert set(data) == {"subject_id", "path", "raw"} and meta == {"init": "raw-volume"}
    bad = save_embeddings(tmp_path / "bad.npz", {"subject_id": ids, "other": np.zeros((2, 8))}, {})
    with pytest.raises(
        ValueError,
        match=r"bad.npz is not a volta3d embeddings file \(needs subject_id and one of "
        r"mean, cls, tokens, raw arrays\)",
    ):
        load_embeddings(bad)


def test_embed_raw_volume_then_probe(blob_data, tmp_path):
    emb = tmp_path / "raw.npz"
    assert (
        main(["embed", "--raw-volume", "--data", str(blob_data), "--output", str(emb), "--no-progress"]) == 0
    )
    data, meta = load_embeddings(emb)
    assert set(data) == {"subject_id", "path", "raw"} and data["raw"].shape == (24, 4096)
    assert {k: meta[k] for k in ("init", "encoder", "grid", "features")} == {
        "init": "raw-volume",
        "encoder": None,
        "grid": 16,
        "features": ["raw"],
    }
    table = read_manifest(blob_data)
    assert data["path"].tolist() == table["path"].tolist()
    first = np.load(table["path"][0]).astype(np.float64)  # (1, 32, 32, 32) on disk as float16
    np.testing.assert_allclose(data["raw"][0], _reference(first, 16), atol=1e-4)

    out = tmp_path / "probe"
    assert (
        main(
            [
                "probe",
                "--embeddings",
                str(emb),
                "--data",
                str(blob_data),
                "--label",
                "diagnosis",
                "--output",
                str(out),
                "probe.n_splits=3",
                "probe.knn_k=5",
                "probe.features=[cls]",
            ]
        )
        == 0
    )
    assert set(json.loads((out / "summary.json").read_text())) == {"linear_raw", "knn_raw"}
    res = json.loads((out / "linear_raw" / "results.json").read_text())
    assert res["model"] == "probe-linear-raw" and res["encoder"] is None
    assert res["embedding_init"] == "raw-volume" and res["embedding_grid"] == 16
    assert len(res["folds"]) == 3 and 0.0 <= res["aggregate"]["auroc"]["mean"] <= 1.0

    run = Run(default_name(res), res)
    assert run.name == "probe-linear-raw (raw volume 16^3)" and not run.pretrained
    assert initialisation(run) == "raw volume (16^3)"


@pytest.mark.parametrize("flag", [["--encoder", "some/export"], ["--random-init"]])
def test_raw_volume_with_an_encoder_flag_is_a_one_line_error(blob_data, tmp_path, capsys, flag):
    argv = ["embed", "--raw-volume", *flag, "--data", str(blob_data), "--output", str(tmp_path / "x.npz")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"volta3d embed: error: --raw-volume embeds the volumes themselves and takes no {flag[0]}"]
    assert not (tmp_path / "x.npz").exists()
    assert (
        main(["embed", "--raw-grid", "8", "--data", str(blob_data), "--output", str(tmp_path / "x.npz")]) == 2
    )
    assert (
        capsys.readouterr().err.strip() == "volta3d embed: error: --raw-grid applies only with --raw-volume"
    )


def _probe_run(probe: str, feature: str, init: str, encoder: str | None = "/enc") -> Run:
    results = {
        "model": f"probe-{probe}-{feature}",
        "encoder": encoder,
        "embedding_init": init,
        "embedding_grid": 16,
    }
    return Run(default_name(results), results)


def test_report_pairs_the_raw_floor_with_every_pretrained_probe_of_its_kind():
    pretrained = [_probe_run(p, f, "pretrained") for p in ("linear", "knn") for f in ("cls", "mean")]
    raw = [_probe_run(p, "raw", "raw-volume", encoder=None) for p in ("linear", "knn")]
    random = _probe_run("linear", "cls", "random-init")
    assert [initialisation(r) for r in (pretrained[0], random, raw[0])] == [
        "VolTA-3D",
        "random init",
        "raw volume (16^3)",
    ]
    assert not _probe_run(
        "linear", "raw", "raw-volume", encoder="/enc"
    ).pretrained  # never mistaken for VolTA-3D
    refs, pairs = pair_runs([*pretrained, *raw, random], None)
    assert {r.name for r in refs} == {r.name for r in pretrained}
    assert [(a.name, b.name) for a, b in pairs] == [
        ("probe-knn-cls (pretrained)", "probe-knn-raw (raw volume 16^3)"),
        ("probe-knn-mean (pretrained)", "probe-knn-raw (raw volume 16^3)"),
        ("probe-linear-cls (pretrained)", "probe-linear-cls (random-init)"),
        ("probe-linear-cls (pretrained)", "probe-linear-raw (raw volume 16^3)"),
        ("probe-linear-mean (pretrained)", "probe-linear-raw (raw volume 16^3)"),
    ]


def test_token_grid_embedding_is_the_flattened_patch_tokens(tmp_path):
    import pandas as pd

    from volta3d.data.dataset import VolumeDataset
    from volta3d.protocol.embeddings import extract_embeddings

    torch.manual_seed(0)
    images = torch.rand(3, 1, 32, 32, 32)
    for i, image in enumerate(images):
        np.save(tmp_path / f"v{i}.npy", image.numpy())
    table = pd.DataFrame(
        {"subject_id": [f"s{i}" for i in range(3)], "path": [str(tmp_path / f"v{i}.npy") for i in range(3)]}
    )
    encoder = tiny_encoder()
    emb = extract_embeddings(encoder, None, VolumeDataset(table), batch_size=2, progress=False, tokens=True)
    with torch.no_grad():
        expected = encoder.forward_features(images)["patch_tokens"]  # (3, 8, 16)
    assert emb["tokens"].shape == (3, 8 * 16)
    np.testing.assert_allclose(emb["tokens"], expected.flatten(1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb["mean"], expected.mean(1).numpy(), rtol=1e-5, atol=1e-6)
    assert "tokens" not in extract_embeddings(
        encoder, None, VolumeDataset(table), batch_size=section("probe")["batch_size"], progress=False
    )
