"""Gated attention-MIL (ABMIL; Ilse, Tomczak and Welling, ICML 2018) and its training on one fold.

For a bag of N tile features x (N x D), standardised with the training tiles' mean and standard
deviation per dimension:

    h_i = Dropout(ReLU(W_1 x_i + b_1))                          (hidden)
    e_i = w^T (tanh(V h_i + b_V) * sigmoid(U h_i + b_U))        (attention_dim wide V, U)
    a   = softmax_i(e)                                          (over the slide's tiles; sums to 1)
    z   = sum_i a_i h_i,   logits = W_2 z + b_2                 (one per class)

Training (``train_fold``) feeds one slide per optimizer step (bags differ in size), in a seeded
order, with Adam (``mil.lr``, ``mil.weight_decay``) on cross-entropy, weighted by the inverse
class frequency of the training slides when ``mil.class_weights``. After each epoch the loss on
the validation slides decides: the weights of the epoch with the lowest validation loss are kept,
and training stops after ``mil.patience`` epochs without a lower one. Without validation slides
every epoch runs and the last weights are kept. Everything random (initialisation, dropout, slide
order) comes from the fold's seed, inside ``torch.random.fork_rng``: the caller's random state is
left as it was, and the same seed gives the same model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sslkit.config import MilConfig

FeatureSource = Callable[[int], np.ndarray]  # slide index -> (N, D) float32 features


class GatedAttentionMIL(nn.Module):
    """ABMIL with gated attention (see the module notes); ``forward(x)`` -> (logits (K,), attention (N,))."""

    def __init__(self, in_dim: int, num_classes: int, *, hidden: int = 128, attention_dim: int = 128,
                 dropout: float = 0.25) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, attention_dim)
        self.attention_u = nn.Linear(hidden, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden, num_classes)

    def set_standardization(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Features enter as (x - mean) / std; a dimension with std 0 is only centred."""
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.scale.copy_(torch.as_tensor(np.where(std > 0, 1.0 / np.maximum(std, 1e-12), 1.0), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed((x - self.mean) * self.scale)  # (N, hidden)
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        attention = torch.softmax(self.attention_w(gate).squeeze(-1), dim=0)  # (N,)
        return self.classifier(attention @ h), attention


@dataclass
class FoldTraining:
    """How one fold trained: the epochs run, the epoch whose weights were kept and its validation loss,
    and per epoch the mean training loss and the validation loss (None without validation slides)."""

    epochs_run: int = 0
    best_epoch: int = 0
    best_val_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def feature_stats(features: FeatureSource, slides: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per dimension over every tile of ``slides`` (float64 sums)."""
    total, sq, n = 0.0, 0.0, 0
    for i in slides:
        x = features(int(i)).astype(np.float64)
        total, sq, n = total + x.sum(0), sq + (x * x).sum(0), n + len(x)
    mean = total / n
    return mean, np.sqrt(np.maximum(sq / n - mean * mean, 0.0))


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """n / (K n_c) for each class c with n_c > 0 training slides (1 for a class with none)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 1.0)


def _bag(features: FeatureSource, i: int, device: str) -> torch.Tensor:
    return torch.from_numpy(features(int(i))).to(device=device, dtype=torch.float32)


def _val_loss(model: GatedAttentionMIL, features: FeatureSource, slides: np.ndarray, labels: np.ndarray,
              weights: torch.Tensor, device: str) -> float:
    """Class-weighted mean cross-entropy on ``slides``, in eval mode (as ``F.cross_entropy`` averages a batch)."""
    model.eval()
    total, norm = 0.0, 0.0
    with torch.no_grad():
        for i in slides:
            logits, _ = model(_bag(features, i, device))
            w = float(weights[labels[i]])
            total += w * float(F.cross_entropy(logits[None], torch.tensor([int(labels[i])], device=device)))
            norm += w
    return total / norm


def train_fold(features: FeatureSource, fit: np.ndarray, val: np.ndarray, labels: np.ndarray, *, dim: int,
               num_classes: int, mil: MilConfig, seed: int, device: str, desc: str = "fold"
               ) -> tuple[GatedAttentionMIL, FoldTraining]:
    """Train ABMIL on the slides ``fit`` (indices into ``labels``), early-stopped on ``val``; see the module notes."""
    devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = GatedAttentionMIL(dim, num_classes, hidden=mil.hidden, attention_dim=mil.attention_dim,
                                  dropout=mil.dropout)
        model.set_standardization(*feature_stats(features, fit))
        model.to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=mil.lr, weight_decay=mil.weight_decay)
        weights = torch.as_tensor(class_weights(labels[fit], num_classes) if mil.class_weights
                                  else np.ones(num_classes), dtype=torch.float32, device=device)
        order, info = np.random.default_rng(seed), FoldTraining()
        best_state, best = copy.deepcopy(model.state_dict()), math.inf
        bar = tqdm(range(1, mil.epochs + 1), desc=desc, unit="epoch", leave=False)
        for epoch in bar:
            train_loss = _epoch(model, optimizer, features, order.permutation(fit), labels, weights, device)
            val_loss = _val_loss(model, features, val, labels, weights, device) if len(val) else None
            info.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
            info.epochs_run = epoch
            if val_loss is None or val_loss < best:
                best, info.best_epoch = (val_loss if val_loss is not None else math.inf), epoch
                best_state = copy.deepcopy(model.state_dict())
            bar.set_postfix(train=f"{train_loss:.3f}", val="-" if val_loss is None else f"{val_loss:.3f}")
            if val_loss is not None and epoch - info.best_epoch >= mil.patience:
                break
        bar.close()
    info.best_val_loss = None if best == math.inf else best
    model.load_state_dict(best_state)
    return model.eval(), info


def _epoch(model: GatedAttentionMIL, optimizer: torch.optim.Optimizer, features: FeatureSource, order: np.ndarray,
           labels: np.ndarray, weights: torch.Tensor, device: str) -> float:
    """One pass over the training slides in ``order``, one slide per step (its loss times its class weight, the
    weights averaging 1 over the training slides); returns the mean unweighted loss."""
    model.train()
    losses = []
    for i in order:
        logits, _ = model(_bag(features, i, device))
        target = torch.tensor([int(labels[i])], device=device)
        # one slide: F.cross_entropy(weight=...) would divide the weight out again; the weight scales the step
        loss = weights[target[0]] * F.cross_entropy(logits[None], target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(F.cross_entropy(logits.detach()[None], target)))
    return float(np.mean(losses))


def predict(model: GatedAttentionMIL, features: FeatureSource, slides: np.ndarray, device: str
            ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities (len(slides), K) and each slide's attention (N,) (sums to 1), in eval mode."""
    model.eval()
    probs, attention = [], []
    with torch.no_grad():
        for i in slides:
            logits, a = model(_bag(features, i, device))
            probs.append(torch.softmax(logits.double(), dim=0).cpu().numpy())
            attention.append(a.double().cpu().numpy())
    return np.stack(probs), attention


__all__ = ["FoldTraining", "GatedAttentionMIL", "class_weights", "feature_stats", "predict", "train_fold"]
