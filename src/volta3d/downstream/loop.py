"""The one supervised training loop that classification and segmentation share: AdamW, cosine
LR decay per epoch, a progress bar with ETA, periodic log lines, and (optionally) keeping the
weights of the epoch with the best validation score."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from volta3d.errors import InputError
from volta3d.runtime import get_logger


def train_model(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    batch_loss: Callable[[nn.Module, dict[str, Any]], torch.Tensor],
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    validate: Callable[[nn.Module], float] | None = None,
    val_every: int = 1,
    grad_clip: float = 0.0,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` in place for ``epochs`` epochs; ``batch_loss(model, batch)`` returns the loss.

    With ``validate`` (higher is better), the weights of the best validated epoch are restored at
    the end (paper III-C: 'Dice was used to select the best epoch'); otherwise the last epoch's stay.
    Returns ``{"best_epoch", "best_score", "history": [{"epoch", "loss", "val"}]}``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, epochs))
    best, history, start = _BestEpoch(epochs), [], time.time()
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        loss = _train_epoch(model, loader, batch_loss, optimiser, params, grad_clip, f"{desc}: ", epoch, lr)
        row: dict[str, Any] = {"epoch": epoch, "loss": loss, "val": None}
        scheduler.step()
        if validate is not None and (epoch % val_every == 0 or epoch == epochs):
            row["val"] = best.validate(model, validate, epoch)
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", val="-" if row["val"] is None else f"{row['val']:.4f}")
        _log_epoch(desc, row, epochs, best, time.time() - start)
    return {**best.restore(model), "history": history}


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
    params: list[nn.Parameter],
    grad_clip: float,
    prefix: str,
    epoch: int,
    lr: float,
) -> float:
    """One pass over the training data; returns the mean batch loss. A non-finite loss stops at once:
    epochs of NaN end in an error that names nothing."""
    total, batches = 0.0, 0
    for batch in loader:
        loss = batch_loss(model, batch)
        if not torch.isfinite(loss):
            raise InputError(
                f"{prefix}non-finite loss ({float(loss)}) at epoch {epoch}, batch {batches + 1}; check the input "
                f"volumes for NaN/Inf or lower the learning rate (now {lr})"
            )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimiser.step()
        total += float(loss.detach())
        batches += 1
    return total / max(1, batches)
