"""The one supervised training loop that classification and segmentation share: AdamW over the
recipe's parameter groups (``volta3d.downstream.recipe``), a per-step warm-up and cosine, an optional
linear-probe phase before fine-tuning, a progress bar with ETA, periodic log lines, and (optionally)
keeping the weights of the epoch with the best validation score."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from volta3d.downstream.recipe import FinetuneRecipe, lr_factors, param_groups
from volta3d.errors import InputError
from volta3d.runtime import get_logger


def train_model(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    batch_loss: Callable[[nn.Module, dict[str, Any]], torch.Tensor],
    *,
    epochs: int,
    recipe: FinetuneRecipe,
    num_layers: int = 0,
    validate: Callable[[nn.Module], float] | None = None,
    val_every: int = 1,
    grad_clip: float = 0.0,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` in place for ``epochs`` epochs; ``batch_loss(model, batch)`` returns the loss.

    The first ``recipe.lp_epochs`` epochs train the head alone (LP), the rest every trainable parameter
    (FT), each phase with a fresh AdamW and its own warm-up and cosine; ``num_layers`` is the backbone's
    depth for layer-wise decay. With ``validate`` (higher is better), the weights of the best validated
    epoch are restored at the end (paper III-C: 'Dice was used to select the best epoch'); otherwise the
    last epoch's stay. Returns ``{"best_epoch", "best_score", "history": [{"epoch", "loss", "val"}]}``.
    """
    if recipe.lp_epochs and recipe.lp_epochs >= epochs:
        raise InputError(
            f"lp_epochs ({recipe.lp_epochs}) must be below epochs ({epochs}): no epoch would fine-tune"
        )
    groups = param_groups(model, recipe, num_layers)
    steps = len(loader) if isinstance(loader, Sized) else 1
    run = _Run(model, loader, batch_loss, epochs, grad_clip, desc, _BestEpoch(epochs), validate, val_every)
    bar = tqdm(total=epochs, desc=desc, unit="epoch", disable=not progress, leave=False)
    for length, head_only in ((recipe.lp_epochs, True), (epochs - recipe.lp_epochs, False)):
        if length > 0:
            phase_groups = [g for g in groups if g["head"]] if head_only else groups
            with _only_training(model, phase_groups):
                run.phase(phase_groups, lr_factors(recipe, length, steps), length, recipe.lr, bar)
    bar.close()
    return {**run.best.restore(model), "history": run.history}


@dataclass
class _Run:
    """One training run's state across its phases: the epochs so far, their history and the best epoch."""

    model: nn.Module
    loader: Iterable[dict[str, Any]]
    batch_loss: Callable[[nn.Module, dict[str, Any]], torch.Tensor]
    epochs: int
    grad_clip: float
    desc: str
    best: _BestEpoch
    validate: Callable[[nn.Module], float] | None
    val_every: int
    history: list[dict[str, Any]] = field(default_factory=list)
    start: float = field(default_factory=time.time)

    def phase(
        self, groups: list[dict[str, Any]], factors: torch.Tensor, length: int, lr: float, bar: Any
    ) -> None:
        """``length`` epochs with a fresh AdamW over ``groups``, learning rates scaled per step by ``factors``
        (AdamW keeps a group's extra keys, such as ``names``, untouched)."""
        optimiser = torch.optim.AdamW(groups)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda s: float(factors[min(s, len(factors) - 1)])
        )
        for _ in range(length):
            epoch = len(self.history) + 1
            self.model.train()
            loss = _train_epoch(self.model, self.loader, self.batch_loss, optimiser, scheduler, self.grad_clip,
                                f"{self.desc}: ", epoch, lr)  # fmt: skip
            row: dict[str, Any] = {"epoch": epoch, "loss": loss, "val": None}
            if self.validate is not None and (epoch % self.val_every == 0 or epoch == self.epochs):
                row["val"] = self.best.validate(self.model, self.validate, epoch)
            self.history.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", val="-" if row["val"] is None else f"{row['val']:.4f}")
            _log_epoch(self.desc, row, self.epochs, self.best, time.time() - self.start)


@contextmanager
def _only_training(model: nn.Module, groups: list[dict[str, Any]]) -> Iterator[None]:
    """Within the block only ``groups``' parameters require gradients (the LP phase freezes the rest, so
    its backward pass stops at the head); the flags are restored on exit."""
    keep = {id(p) for g in groups for p in g["params"]}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


class _BestEpoch:
    """The best validated epoch's score and weights (higher is better), restored at the end."""

    def __init__(self, epochs: int) -> None:
        self.score, self.epoch = float("-inf"), epochs
        self.state: dict[str, torch.Tensor] | None = None

    def validate(self, model: nn.Module, validate: Callable[[nn.Module], float], epoch: int) -> float:
        model.eval()
        with torch.no_grad():
            score = float(validate(model))
        if score > self.score:
            self.score, self.epoch = score, epoch
            self.state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        return score

    def restore(self, model: nn.Module) -> dict[str, Any]:
        """Load the best weights (if any epoch was validated); leave the model in eval mode."""
        if self.state is not None:
            model.load_state_dict(self.state)
        model.eval()
        return {"best_epoch": self.epoch, "best_score": self.score if self.state is not None else None}


def _log_epoch(desc: str, row: dict[str, Any], epochs: int, best: _BestEpoch, elapsed: float) -> None:
    eta = elapsed / row["epoch"] * (epochs - row["epoch"])
    val_txt = "" if row["val"] is None else f" val {row['val']:.4f} (best {best.score:.4f} @ {best.epoch})"
    get_logger().info(
        f"{desc} epoch {row['epoch']}/{epochs} loss {row['loss']:.4f}{val_txt} [{elapsed:.0f}s, ETA {eta:.0f}s]"
    )


def _train_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    batch_loss: Callable[[nn.Module, dict[str, Any]], torch.Tensor],
    optimiser: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    grad_clip: float,
    prefix: str,
    epoch: int,
    lr: float,
) -> float:
    """One pass over the training data, the learning rates stepped per batch; returns the mean batch loss.
    A non-finite loss stops at once: epochs of NaN end in an error that names nothing."""
    params = [p for g in optimiser.param_groups for p in g["params"]]
    total, batches = 0.0, 0
    for batch in loader:
        loss = batch_loss(model, batch)
        if not torch.isfinite(loss):
            raise InputError(
                f"{prefix}non-finite loss ({float(loss.detach())}) at epoch {epoch}, batch {batches + 1}; check the input "
                f"volumes for NaN/Inf or lower the learning rate (now {lr})"
            )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimiser.step()
        scheduler.step()
        total += float(loss.detach())
        batches += 1
    return total / max(1, batches)
