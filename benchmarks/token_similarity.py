"""Why network inputs are z-scored and why tiny-cpu's CLS teacher temperature is 0.01.

Prints, for a freshly initialised tiny-cpu VolTA-3D model on real preprocessed volumes:
- the mean cosine similarity of patch tokens across positions, with [0, 1] input vs z-scored input;
- the spread of the global head's logits across volumes vs across prototypes, and the entropy of
  the centered teacher distribution at several teacher temperatures (log K is the uniform value).

    python benchmarks/token_similarity.py runs/demo/prep/ixi [--n 16]
"""

from __future__ import annotations

import argparse
import math

import torch

from volta3d.config import load_config, to_kwargs
from volta3d.data.dataset import VolumeDataset
from volta3d.engine.meta_arch import build_volta3d


def mean_offdiag_cosine(rows: torch.Tensor) -> float:
    """(M, E) -> mean cosine similarity over distinct pairs of rows."""
    unit = torch.nn.functional.normalize(rows, dim=1)
    sim = unit @ unit.T
    m = len(rows)
    return float((sim.sum() - m) / (m * m - m))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", help="a folder written by `volta3d preprocess`")
    parser.add_argument("--n", type=int, default=16, help="volumes to use")
    args = parser.parse_args()

    ds = VolumeDataset(args.data)
    x = torch.stack([ds[i]["image"] for i in range(min(args.n, len(ds)))])  # (B, 1, D, H, W)
    for norm in ("none", "zscore"):
        cfg = load_config(["tiny-cpu"], [f"model.input_norm={norm}", f"model.img_size={x.shape[-1]}"])
        torch.manual_seed(cfg.seed)
        student = build_volta3d(to_kwargs(cfg.model), to_kwargs(cfg.head), to_kwargs(cfg.loss)).student.eval()
        with torch.no_grad():
            tokens = student.encoder.forward_features(x)["patch_tokens"]  # (B, N, E)
            logits = student.global_head(student.summariser(tokens))  # (B, K)
        print(f"input_norm={norm}: patch-token cosine across positions "
              f"{sum(mean_offdiag_cosine(t) for t in tokens) / len(tokens):.2f}")  # fmt: skip
        if norm == "zscore":
            centered = logits - logits.mean(0, keepdim=True)
            print(
                f"  logit spread across volumes {centered.std(0).mean():.3f}, across prototypes {logits.std(1).mean():.3f}"
            )
            for temp in (0.04, 0.02, 0.01):
                p = torch.softmax(centered / temp, dim=-1)
                entropy = float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
                print(
                    f"  centered teacher entropy at temperature {temp}: {entropy:.2f} (log K = {math.log(logits.shape[1]):.2f})"
                )


if __name__ == "__main__":
    main()
