"""The VolTA-3D meta-architecture (paper II-B): a student and an EMA teacher of the same shape, the
two loss centers, and ``compute_losses`` which turns one collated batch of views into the losses
of eq. 1-6. The train loop owns optimisation; this module owns the method.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from volta3d.config_rules import CHOICES, loss_weights_error
from volta3d.engine.distributed import all_gather_rows, all_reduce_max, all_reduce_sum
from volta3d.engine.ema import ema_update
from volta3d.engine.health import cls_spread, cross_volume_cosine, entropy_stats, view_agreement
from volta3d.errors import InputError
from volta3d.losses import (
    Center,
    GlobalDistillationLoss,
    PatchDistillationLoss,
    koleo_loss,
    masked_mse,
    sinkhorn_knopp_probs,
)
from volta3d.models.encoder import VolTAEncoder, build_encoder
from volta3d.models.heads import ProjectionHead, build_heads
from volta3d.models.summariser import CLSSummariser, build_summariser


def _views_first(x: torch.Tensor) -> torch.Tensor:
    """(V, B, ...) -> (V * B, ...): one batched forward per crop size (views of one size together)."""
    return x.flatten(0, 1)


class Student(nn.Module):
    """Encoder + CLS-style summariser + projection heads; the teacher is a copy of this module.

    This is the unit DDP wraps, so everything that needs gradients runs inside ``forward``.
    """

    def __init__(
        self,
        encoder: VolTAEncoder,
        summariser: CLSSummariser,
        global_head: ProjectionHead,
        patch_head: ProjectionHead,
    ):
        super().__init__()
        self.encoder = encoder
        self.summariser = summariser
        self.global_head = global_head
        self.patch_head = patch_head  # the same object as global_head when heads are shared (iBOT option)

    def forward(
        self,
        global_views: torch.Tensor,
        local_views: torch.Tensor | None = None,
        *,
        need_cls: bool = True,
        need_patch: bool = True,
        need_reconstruction: bool = False,
    ) -> dict[str, torch.Tensor]:
        """global_views (Vg*B, C, G, G, G); local_views (Vl*B, C, L, L, L) or None.

        Returns patch_tokens (Vg*B, N, E) and, as requested: cls_embed (Vg*B, E) (the CLS-style
        summary), cls_logits (Vg*B, K), local_cls_logits (Vl*B, K), patch_logits (Vg*B, N, K),
        reconstruction (Vg*B, C, G, G, G).
        """
        feats = self.encoder.forward_features(global_views)
        tokens = feats["patch_tokens"]  # (Vg*B, N, E)
        out: dict[str, torch.Tensor] = {"patch_tokens": tokens}
        if need_cls:
            out["cls_embed"] = self.summariser(tokens)  # (Vg*B, N, E) -> (Vg*B, E)
            out["cls_logits"] = self.global_head(out["cls_embed"])  # (Vg*B, E) -> (Vg*B, K)
            if local_views is not None and local_views.shape[0] > 0:
                local_tokens = self.encoder.forward_features(local_views)["patch_tokens"]  # (Vl*B, n, E)
                out["local_cls_logits"] = self.global_head(self.summariser(local_tokens))
        if need_patch:
            out["patch_logits"] = self.patch_head(tokens)  # (Vg*B, N, E) -> (Vg*B, N, K)
        if need_reconstruction:
            out["reconstruction"] = self.encoder.decode(tokens, feats["grid"])  # (Vg*B, C, G, G, G)
        return out

    def last_layer_parameters(self) -> list[nn.Parameter]:
        params = list(self.global_head.last_layer.parameters())
        if self.patch_head is not self.global_head:
            params += list(self.patch_head.last_layer.parameters())
        return [p for p in params if p.requires_grad]


PATCH_TOKENS_FOR_RANK = 8  # patch tokens per view fed to the rolling effective-rank buffer


class VolTA3D(nn.Module):
    """The VolTA-3D method (paper II-B): the student, its EMA teacher and the two EMA centers, with
    ``compute_losses`` for eq. 1-6 (global CLS-style and local patch-token distillation as in DINO and
    iBOT, plus masked reconstruction) and the updates that follow an optimiser step.

    Only ``student`` is trained (and wrapped in DDP); the teacher and the centers change only through
    ``update_teacher`` and ``update_centers``, once per optimiser step, so gradient accumulation and data
    parallelism give the same result as one large batch. ``centering="sinkhorn"`` replaces the EMA
    centers by Sinkhorn-Knopp targets (DINOv2 ``sinkhorn_knopp_teacher``).
    """

    def __init__(
        self,
        student: Student,
        *,
        out_dim: int,
        global_weight: float,
        local_weight: float,
        rec_weight: float,
        student_temp: float,
        local_tokens: str,
        center_momentum: float,
        centering: str,
        sinkhorn_iterations: int,
        koleo_weight: float,
    ) -> None:
        """``out_dim`` is ``head.out_dim``; the others are the ``loss:`` keys of the same names, checked
        with the rest of the config (``volta3d.config_rules``)."""
        super().__init__()
        for key, value in (("loss.centering", centering), ("loss.local_tokens", local_tokens)):
            if value not in CHOICES[key]:  # built without load_config: a programming error, not bad input
                raise ValueError(f"{key} must be one of {CHOICES[key]} (got {value!r})")
        self.student = student
        self.teacher = copy.deepcopy(student)  # DINO: the teacher starts equal to the student
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.global_center = Center(out_dim, center_momentum)
        self.patch_center = Center(out_dim, center_momentum)
        self.global_loss = GlobalDistillationLoss()
        self.patch_loss = PatchDistillationLoss()
        self.weights = {"global": global_weight, "local": local_weight, "rec": rec_weight}
        self.centering, self.sinkhorn_iterations, self.koleo_weight = (
            centering,
            sinkhorn_iterations,
            koleo_weight,
        )
        self.student_temp = student_temp
        self.local_tokens = local_tokens
        self.log_k = math.log(out_dim)

    def train(self, mode: bool = True) -> VolTA3D:
        super().train(mode)
        self.teacher.eval()  # the teacher never leaves eval mode
        return self

    # ------------------------------------------------------------------ losses
    def compute_losses(
        self,
        batch: Mapping[str, torch.Tensor],
        teacher_temp: float,
        teacher_patch_temp: float,
        student: nn.Module | None = None,
    ) -> dict[str, Any]:
        """One micro-batch of collated views -> losses (eq. 1-6) and the statistics the step needs.

        ``batch``: "global" (2, B, C, G, G, G) clean; "local" (Vl, B, C, L, L, L) clean;
        optionally "global_masked" (2, B, C, G, G, G), "voxel_mask" (2, B, 1, G, G, G) and
        "token_mask" (2, B, N) from GMML. ``student`` is the DDP wrapper when distributed.
        Returns "loss" (weighted total), one entry per active branch, detached statistics, and
        "center_stats": {name: (sum (K,), count)} to feed ``update_centers`` after the step.
        """
        student = student if student is not None else self.student
        use_g, use_l, use_r = (self.weights[k] > 0 for k in ("global", "local", "rec"))
        clean = batch["global"]
        n_global = clean.shape[0]
        masked = batch.get("global_masked")
        student_in = _views_first(masked if masked is not None else clean)
        local = batch.get("local")
        n_local = local.shape[0] if local is not None else 0
        local_in = _views_first(local) if (use_g and local is not None and local.shape[0] > 0) else None

        with torch.no_grad():
            t_out = self.teacher(_views_first(clean), None, need_cls=use_g, need_patch=use_l)
        s_out = student(student_in, local_in, need_cls=use_g, need_patch=use_l, need_reconstruction=use_r)

        out: dict[str, Any] = {"center_stats": {}, "embeddings": _rank_rows(t_out, n_global)}
        total = clean.new_zeros(())
        if use_g:
            total = total + self._global_branch(s_out, t_out, n_global, n_local, teacher_temp, out)
        if use_l:
            t_logits = t_out["patch_logits"].float()  # (2B, N, K)
            t_probs = self._teacher_probs("patch", t_logits, teacher_patch_temp, out["center_stats"])
            weight = _views_first(batch["token_mask"]).float() if self.local_tokens == "masked" else None
            s_chunks, t_chunks = s_out["patch_logits"].chunk(n_global), t_probs.chunk(n_global)
            w_chunks = weight.chunk(n_global) if weight is not None else [None] * n_global
            # iBOT pairs each teacher view's tokens with the same view's (masked) student tokens.
            per_view = [
                self.patch_loss(s, t, self.student_temp, w)
                for s, t, w in zip(s_chunks, t_chunks, w_chunks, strict=True)
            ]
            out["loss_local"] = torch.stack(per_view).mean()
            total = total + self.weights["local"] * out["loss_local"]
            # per token: brains share anatomy, so the same position in two volumes may rightly get the same
            # target; collapse is every token on the same target, whatever it shows
            out.update(entropy_stats(t_probs.flatten(0, 1), "teacher_patch_", 1))  # (2B, N, K) -> (2B*N, K)
        if use_r:
            out["loss_rec"] = masked_mse(
                s_out["reconstruction"].float(),
                _views_first(clean).float(),
                _views_first(batch["voxel_mask"]),
            )
            total = total + self.weights["rec"] * out["loss_rec"]
        out["loss"] = total
        return out

    def _global_branch(
        self,
        s_out: Mapping[str, torch.Tensor],
        t_out: Mapping[str, torch.Tensor],
        n_global: int,
        n_local: int,
        teacher_temp: float,
        out: dict[str, Any],
    ) -> torch.Tensor:
        """L_global (eq. 3, DINO: every student view against each other teacher view) and the KoLeo
        term; records them and their statistics in ``out``; returns their weighted sum."""
        t_logits = t_out["cls_logits"].float()
        t_probs = self._teacher_probs("global", t_logits, teacher_temp, out["center_stats"])  # (2B, K)
        s_views = list(s_out["cls_logits"].chunk(n_global))
        if "local_cls_logits" in s_out:
            s_views += list(s_out["local_cls_logits"].chunk(n_local))
        out["loss_global"] = self.global_loss(s_views, list(t_probs.chunk(n_global)), self.student_temp)
        total = self.weights["global"] * out["loss_global"]
        out.update(entropy_stats(t_probs, "teacher_", n_global), **_cls_stats(s_out, t_out, n_global))
        out["teacher_view_agreement"] = view_agreement(t_probs, n_global)
        if self.koleo_weight > 0:
            # KoLeo on the student's summary of each global view separately (DINOv2); neighbours from all ranks
            views = s_out["cls_embed"].chunk(n_global)
            out["koleo"] = torch.stack([koleo_loss(v, gather=all_gather_rows) for v in views]).mean()
            total = total + self.koleo_weight * out["koleo"]
        return total

    def _teacher_probs(
        self, branch: str, logits: torch.Tensor, temp: float, center_stats: dict[str, Any]
    ) -> torch.Tensor:
        """Centered and sharpened (eq. 2, 4) or Sinkhorn-Knopp targets; records the EMA center's statistics."""
        if self.centering == "sinkhorn":
            return sinkhorn_knopp_probs(
                logits, temp, self.sinkhorn_iterations, reduce_sum=all_reduce_sum, reduce_max=all_reduce_max
            )
        center = self.global_center if branch == "global" else self.patch_center
        center_stats[branch] = Center.batch_stats(logits)
        return center.teacher_probs(logits, temp)

    # ------------------------------------------------------------------ updates after an optimiser step
    @torch.no_grad()
    def update_centers(self, stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Once per optimiser step, from the statistics of the whole effective batch: the micro-batch
        sums are added up by the caller and across ranks here, so the center matches one big batch."""
        centers = {"global": self.global_center, "patch": self.patch_center}
        for name, (sum_, count) in stats.items():
            count = torch.as_tensor(count, dtype=sum_.dtype, device=sum_.device).clone()
            sum_ = sum_.clone()
            all_reduce_sum(sum_, count)
            centers[name].update(sum_, count)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        ema_update(list(self.teacher.parameters()), list(self.student.parameters()), momentum)

    def center_norms(self) -> dict[str, float]:
        return {
            "center_norm": float(self.global_center.center.norm()),
            "patch_center_norm": float(self.patch_center.center.norm()),
        }


def _cls_stats(
    s_out: Mapping[str, torch.Tensor], t_out: Mapping[str, torch.Tensor], n_global: int
) -> dict[str, torch.Tensor]:
    """Mean cosine between the CLS-style embeddings of different volumes, and their centred spread
    (``health.cls_spread``, 1 = isotropic), student and teacher."""
    out = {}
    for who, o in (("student", s_out), ("teacher", t_out)):
        embeddings = o["cls_embed"].detach().unflatten(0, (n_global, -1))  # (V*B, E) -> (V, B, E)
        out[f"{who}_cls_cosine"] = cross_volume_cosine(embeddings)
        out[f"{who}_cls_spread"] = cls_spread(embeddings)
    return out


def rank_token_indices(n_tokens: int, n: int = PATCH_TOKENS_FOR_RANK) -> torch.Tensor:
    """``min(n, n_tokens)`` token indices evenly spaced over 0..n_tokens-1, both ends included.

    Tokens are flattened depth-major (index = (i*h + j)*w + k), so a stride from 0 that divides h*w
    stays on one face (4^3 grid, stride 8: every token at k = 0; 8^3, stride 64: one line along
    depth). Evenly spaced indices over the whole range reach every depth slice when n >= d, and on
    the cubic grids of global views every height and width too (4^3: (i, j, k) = (0, 0, 0),
    (0, 2, 1), (1, 0, 2), ..., (3, 3, 3); 8^3: the main diagonal), the same tokens at every step.
    """
    count = min(n, n_tokens)
    return torch.linspace(0, n_tokens - 1, count).round().long()


def _rank_rows(t_out: Mapping[str, torch.Tensor], n_global: int) -> dict[str, torch.Tensor]:
    """Teacher embeddings for the rolling effective rank: the CLS-style summaries and a fixed subset of
    each view's patch tokens spread through the grid (all of them would swamp the buffer in one step)."""
    tokens = t_out["patch_tokens"].detach()  # (2B, N, E)
    picked = rank_token_indices(tokens.shape[1]).to(tokens.device)
    rows = {"patch": tokens[:, picked].flatten(0, 1)}  # (2B, n, E) -> (2B * n, E)
    if "cls_embed" in t_out:
        rows["cls"] = t_out["cls_embed"].detach()
    return rows


def build_volta3d(model: Mapping[str, Any], head: Mapping[str, Any], loss: Mapping[str, Any]) -> VolTA3D:
    """Config sections (plain dicts) -> the meta-architecture."""
    problem = loss_weights_error(loss)
    if problem:
        raise InputError(problem)
    summariser = build_summariser(**model)
    encoder = build_encoder(**model)
    global_head, patch_head = build_heads(embed_dim=model["hidden_size"], **head)
    return VolTA3D(
        Student(encoder, summariser, global_head, patch_head),
        out_dim=head["out_dim"],
        global_weight=loss["global_weight"],
        local_weight=loss["local_weight"],
        rec_weight=loss["rec_weight"],
        student_temp=loss["student_temp"],
        local_tokens=loss["local_tokens"],
        center_momentum=loss["center_momentum"],
        centering=loss["centering"],
        sinkhorn_iterations=loss["sinkhorn_iterations"],
        koleo_weight=loss["koleo_weight"],
    )
