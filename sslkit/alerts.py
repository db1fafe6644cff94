"""Alerts: rules on the logged signals that say, while a run trains, that it is failing.

The engine judges them on the main process at every logged step (``train.log_every``), from
the row it logs (``metrics.jsonl`` keys) and the count of skipped steps:

- ``collapse``: ``health/std_ratio`` below ``train.alert.collapse_below`` (0.05) for
  ``train.alert.patience`` (5) logged steps in a row: the embeddings have gathered at one point.
- ``rank``: ``health/rankme_ratio`` below ``train.alert.rank_below`` (0.05) for ``patience``
  logged steps: the embeddings spread along a few directions only (dimensional collapse).
- ``chance``: from step ``train.alert.chance_after`` (100) on, ``loss`` above
  (1 - ``train.alert.chance_margin``) x ``loss_chance`` (within 3 % of it, or above it) for
  ``patience`` logged steps in a row. ``loss_chance`` is the method's loss when every embedding
  is the same (``Method.chance_loss``): an encoder that carries no information scores it, and
  every run starts near it. Methods without one (SCL, the autoencoder) are not judged.
- ``uniform``: from step ``chance_after`` on, ``teacher_entropy`` (DINO: the entropy of the teacher's
  distribution over its prototypes, divided by its largest value log K) above
  ``train.alert.uniform_above`` (0.97) for ``patience`` logged steps: the teacher gives every image
  the same flat target (DINO's uniform collapse; the loss then sits at log K). Methods that do not
  log it are not judged.
- ``nonfinite``: a step skipped for a non-finite loss or gradient norm since the previous
  logged step (``train.alert.nonfinite``). It fires at once: the engine itself stops after
  ``train.max_bad_steps`` such steps in a row, and this says so at the first.

Each rule fires once per episode: an episode opens when its condition has held for the rule's
patience and closes at the first logged step where it does not hold, which re-arms the rule. A
step where the signal is not logged (no ``health/`` signals, a non-finite value, the chance
rule's warm-up) neither extends nor closes an episode. The counts start afresh when a run resumes.
An :class:`Alert` carries one sentence naming the signal, its value, the threshold, the likely
cause and the fix; the engine writes it to the log, ``alerts.jsonl`` and the tracker, and with
``train.alert.action=stop`` ends the run with it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from sslkit.config import AlertConfig


@dataclass(frozen=True)
class Alert:
    rule: str  # collapse | rank | chance | uniform | nonfinite
    signal: str  # the metrics.jsonl key judged
    value: float  # its value at ``step``
    threshold: float
    step: int  # the logged step at which the alert fired
    since: int  # the first logged step of the episode
    message: str  # one sentence: signal, value, threshold, likely cause and fix

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Episode:
    count: int = 0  # logged steps in a row where the condition held
    since: int = 0


# What each rule means and what to try, the second half of its sentence.
CAUSES = {
    "collapse": "the embeddings have collapsed towards one point; likely causes: a learning rate too high "
                "(optim.lr), weight decay too large (optim.weight_decay), or views too weak or identical "
                "(data.views): lower the first two or strengthen the views, and restart or resume from a "
                "checkpoint before the episode",
    "rank": "the embeddings vary along a few directions only (dimensional collapse); likely causes: no "
            "BatchNorm in the projector (model.head_norm), views that teach too little (data.views) or a learning "
            "rate too high (optim.lr): change one and restart",
    "chance": "the loss is where an encoder that carries no information puts it, so the run is not learning; "
              "likely causes: weight decay too large (optim.weight_decay), a learning rate too high or too low "
              "(optim.lr), collapsed embeddings (see health/std_ratio) or a momentum too high for the key "
              "encoder to follow (method.momentum): change one and restart",
    "uniform": "the teacher gives every image about the same flat distribution (DINO's uniform collapse), so the "
               "student has nothing to learn; likely causes: centring stronger than sharpening, a teacher temperature "
               "too high (method.teacher_temp) or a head whose outputs barely differ between images "
               "(method.head_batch_norm=true helps convolutional backbones): lower the first or change the second, "
               "and restart",
    "nonfinite": "the run is diverging; likely causes: a learning rate too high (optim.lr), no gradient clipping "
                 "(optim.grad_clip) or bf16/fp16 overflow (train.precision=no rules it out): lower the first, "
                 "set the second, and resume from the last checkpoint",
}


class Alerts:
    """The rules of ``train.alert`` and their episodes; :meth:`update` is called once per logged step."""

    def __init__(self, cfg: AlertConfig, *, step: int = 0, skipped: int = 0) -> None:
        """``step`` and ``skipped``: the run's step and skipped-step count when it starts (or resumes)."""
        self.cfg = cfg
        self.episodes = {name: _Episode() for name in CAUSES}
        self.step, self.skipped = step, skipped  # at the previous logged step

    def update(self, step: int, logs: dict[str, Any], *, skipped: int) -> list[Alert]:
        """The alerts that fire at logged ``step``, whose row is ``logs``; ``skipped``: steps skipped so far."""
        if self.cfg.action == "off":
            return []
        window, new = step - self.step, skipped - self.skipped
        self.step, self.skipped = step, skipped
        fired = [self._below("collapse", "health/std_ratio", self.cfg.collapse_below, step, logs),
                 self._below("rank", "health/rankme_ratio", self.cfg.rank_below, step, logs),
                 self._chance(step, logs), self._uniform(step, logs), self._nonfinite(step, new, window)]
        return [alert for alert in fired if alert is not None]

    def _advance(self, rule: str, step: int, held: Optional[bool], patience: int) -> Optional[_Episode]:
        """Count ``held`` into the rule's episode; the episode when it has just reached ``patience``."""
        episode = self.episodes[rule]
        if held is None:  # not judged at this step
            return None
        if not held:
            episode.count = 0
            return None
        if episode.count == 0:
            episode.since = step
        episode.count += 1
        return episode if episode.count == patience else None

    def _below(self, rule: str, signal: str, threshold: Optional[float], step: int, logs: dict[str, Any]
               ) -> Optional[Alert]:
        """A health signal under its threshold (collapse, rank)."""
        value = _finite(logs.get(signal))
        held = None if threshold is None or value is None else value < threshold
        episode = self._advance(rule, step, held, self.cfg.patience)
        if episode is None:
            return None
        text = (f"{rule}: {signal} {value:.3g} < {threshold:g} for {self.cfg.patience} logged steps "
                f"(since step {episode.since})")
        return Alert(rule, signal, value, threshold, step, episode.since, f"{text}: {CAUSES[rule]}.")

    def _chance(self, step: int, logs: dict[str, Any]) -> Optional[Alert]:
        margin, loss, chance = self.cfg.chance_margin, _finite(logs.get("loss")), _finite(logs.get("loss_chance"))
        judged = margin is not None and loss is not None and chance is not None and step >= self.cfg.chance_after
        threshold = (1 - margin) * chance if judged else math.nan
        episode = self._advance("chance", step, loss >= threshold if judged else None, self.cfg.patience)
        if episode is None:
            return None
        text = (f"chance: loss {loss:.4g} >= {threshold:.4g} ({1 - margin:g} x loss_chance {chance:.4g}) for "
                f"{self.cfg.patience} logged steps (since step {episode.since})")
        return Alert("chance", "loss", loss, threshold, step, episode.since, f"{text}: {CAUSES['chance']}.")

    def _uniform(self, step: int, logs: dict[str, Any]) -> Optional[Alert]:
        threshold, value = self.cfg.uniform_above, _finite(logs.get("teacher_entropy"))
        judged = threshold is not None and value is not None and step >= self.cfg.chance_after
        episode = self._advance("uniform", step, value > threshold if judged else None, self.cfg.patience)
        if episode is None:
            return None
        text = (f"uniform: teacher_entropy {value:.4g} > {threshold:g} for {self.cfg.patience} logged steps "
                f"(since step {episode.since})")
        return Alert("uniform", "teacher_entropy", value, threshold, step, episode.since,
                     f"{text}: {CAUSES['uniform']}.")

    def _nonfinite(self, step: int, new: int, window: int) -> Optional[Alert]:
        episode = self._advance("nonfinite", step, new > 0 if self.cfg.nonfinite else None, 1)
        if episode is None:
            return None
        text = (f"nonfinite: skipped_steps rose by {new} > 0 in the {window} steps up to step {step} (steps with a "
                f"non-finite loss or gradient norm, {self.skipped} in all)")
        return Alert("nonfinite", "skipped_steps", float(new), 0.0, step, episode.since,
                     f"{text}: {CAUSES['nonfinite']}.")


def _finite(value: Any) -> Optional[float]:
    """``value`` as a float, or None when it is missing or not finite (not judged)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


__all__ = ["Alert", "Alerts", "CAUSES"]
