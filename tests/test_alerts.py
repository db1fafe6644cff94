"""The train.alert rules on hand-made sequences of logged rows: each fires after exactly its patience,
once per episode, re-arms after a recovery, ignores steps that do not judge it, and names its signal."""

from __future__ import annotations

import math

import pytest

from sslkit.alerts import Alerts
from sslkit.config import AlertConfig


def _feed(alerts: Alerts, rows: list[dict], *, every: int = 10, skipped: list[int] | None = None) -> dict[int, list]:
    """Logged rows at steps every, 2 every, ...: {step: [rules that fired]} for the steps where any did."""
    fired = {}
    for i, row in enumerate(rows):
        step = (i + 1) * every
        out = alerts.update(step, row, skipped=skipped[i] if skipped else 0)
        if out:
            fired[step] = out
    return fired


def test_collapse_fires_after_exactly_patience_once_per_episode_and_rearms():
    alerts = Alerts(AlertConfig(patience=3, collapse_below=0.05))
    ratios = [0.5, 0.04, 0.03, 0.02, 0.01, 0.01, 0.3, 0.04, 0.04, 0.04]
    fired = _feed(alerts, [{"health/std_ratio": r} for r in ratios])
    assert list(fired) == [40, 100]  # the third low row of each episode; the recovery at 70 re-armed it
    first = fired[40][0]
    assert (first.rule, first.signal, first.since, first.step) == ("collapse", "health/std_ratio", 20, 40)
    assert first.value == pytest.approx(0.02) and first.threshold == 0.05
    assert first.message.startswith("collapse: health/std_ratio 0.02 < 0.05 for 3 logged steps (since step 20): "
                                    "the embeddings have collapsed")
    assert "optim.lr" in first.message and "optim.weight_decay" in first.message and first.message.endswith(".")
    assert fired[100][0].since == 80


def test_rank_fires_on_a_few_directions_only():
    # The demo with the paper's views and no BatchNorm in the projector, on one machine: effective rank about 2.4
    # of min(B, D) = 64 from step 30 on, while a healthy demo stayed above 12 (health/rankme_ratio 0.19).
    alerts = Alerts(AlertConfig())  # defaults: rank_below 0.05, patience 5
    rows = [{"health/rankme_ratio": r, "health/std_ratio": 0.3} for r in [0.7, 0.07, 0.036] + [0.038] * 5]
    fired = _feed(alerts, rows)
    assert list(fired) == [70]
    (alert,) = fired[70]
    assert (alert.rule, alert.signal, alert.since) == ("rank", "health/rankme_ratio", 30)
    assert alert.message.startswith("rank: health/rankme_ratio 0.038 < 0.05 for 5 logged steps (since step 30): ")
    assert "model.head_norm" in alert.message


def test_a_step_without_the_signal_neither_extends_nor_ends_an_episode():
    alerts = Alerts(AlertConfig(patience=3))
    rows = [{"health/std_ratio": 0.01}, {}, {"health/std_ratio": math.nan}, {"health/std_ratio": 0.01},
            {"health/std_ratio": 0.01}]
    assert [(s, a[0].since) for s, a in _feed(alerts, rows).items()] == [(50, 10)]


def test_chance_waits_for_the_warm_up_and_uses_the_margin():
    cfg = AlertConfig(patience=2, chance_margin=0.02, chance_after=30, collapse_below=None)
    chance = math.log(1280)  # the demo's: 256 in-batch keys and a full queue of 1,024
    losses = [chance, chance, chance * 0.985, chance * 1.01, chance * 0.97, chance * 0.99, chance * 0.99]
    fired = _feed(Alerts(cfg), [{"loss": x, "loss_chance": chance} for x in losses])
    # Steps 10 and 20 are the warm-up; 30 and 40 are within 2 % (or above): fires at 40; 50 is 3 % below
    # chance (recovered); 60 and 70 fire again.
    assert list(fired) == [40, 70]
    alert = fired[40][0]
    assert (alert.rule, alert.signal, alert.since) == ("chance", "loss", 30)
    assert alert.threshold == pytest.approx(0.98 * chance)
    assert alert.message.startswith(f"chance: loss {chance * 1.01:.4g} >= {0.98 * chance:.4g} (0.98 x loss_chance "
                                    f"{chance:.4g}) for 2 logged steps (since step 30): the loss is where")
    assert "optim.weight_decay" in alert.message


def test_the_defaults_catch_the_demo_that_went_back_to_chance():
    """docs/results.md: the demo (log_every 10) once collapsed with its loss back at chance from step 20 on.
    The healthy sequence is a measured demo (loss / loss_chance at steps 10 to 160, docs/training.md)."""
    chance = math.log(256 + 1024)
    healthy = [0.996, 0.966, 0.971, 0.977, 0.970, 0.973, 0.962, 0.943, 0.937, 0.916, 0.897, 0.881, 0.860, 0.861,
               0.850, 0.857]
    rows = [{"loss": r * chance, "loss_chance": chance} for r in healthy]
    assert _feed(Alerts(AlertConfig()), rows) == {}
    collapsed = [0.99, *[0.998] * 20]
    fired = _feed(Alerts(AlertConfig()), [{"loss": r * chance, "loss_chance": chance} for r in collapsed])
    assert [(step, a.rule, a.since) for step, alerts in fired.items() for a in alerts] == [(140, "chance", 100)]


def test_chance_is_not_judged_without_a_chance_value():
    cfg = AlertConfig(patience=1, chance_after=0)
    assert _feed(Alerts(cfg), [{"loss": 7.0}] * 3) == {}  # a method without Method.chance_loss


def test_nonfinite_fires_on_the_first_window_with_a_skipped_step_and_rearms():
    alerts = Alerts(AlertConfig(), step=0, skipped=2)  # resumed with 2 skipped steps already counted
    fired = _feed(alerts, [{}] * 6, skipped=[2, 3, 5, 5, 6, 6])
    assert list(fired) == [20, 50]
    first = fired[20][0]
    assert (first.rule, first.signal, first.value, first.since) == ("nonfinite", "skipped_steps", 1.0, 20)
    assert first.message.startswith("nonfinite: skipped_steps rose by 1 > 0 in the 10 steps up to step 20")
    assert "optim.grad_clip" in first.message


def test_rules_are_independent_and_off_switches_work():
    rows = [{"health/std_ratio": 0.0, "health/rankme_ratio": 0.01, "loss": 1.0, "loss_chance": 1.0}] * 2
    fired = _feed(Alerts(AlertConfig(patience=2, chance_after=0)), rows, skipped=[1, 1])
    assert [a.rule for a in fired[10]] == ["nonfinite"]
    assert [a.rule for a in fired[20]] == ["collapse", "rank", "chance"]
    quiet = AlertConfig(patience=2, chance_after=0, collapse_below=None, rank_below=None, chance_margin=None,
                        nonfinite=False)
    assert _feed(Alerts(quiet), rows, skipped=[1, 1]) == {}
    assert _feed(Alerts(AlertConfig(patience=2, chance_after=0, action="off")), rows, skipped=[1, 1]) == {}


def test_uniform_fires_on_a_dino_teacher_gone_flat_and_judges_nothing_else():
    # dino-cpu's first recipe on CoNSeP: teacher_entropy 0.94 at step 10, 0.999 from step 40, 1.0 at the end,
    # the loss at log K; the recipe kept (BatchNorm in the head, teacher temperature 0.04) stayed at 0.94-0.95
    alerts = Alerts(AlertConfig(patience=3, chance_after=30))
    entropy = [0.94, 0.97, 0.985, 0.999, 0.9995, 1.0, 1.0, 0.95, 0.99, 0.99, 0.99]
    fired = _feed(alerts, [{"teacher_entropy": e, "loss": 8.3} for e in entropy])
    assert list(fired) == [50, 110]  # judged from step 30; the dip to 0.95 at 80 ended the first episode
    (alert,) = fired[50]
    assert (alert.rule, alert.signal, alert.since, alert.threshold) == ("uniform", "teacher_entropy", 30, 0.97)
    assert alert.message.startswith("uniform: teacher_entropy 0.9995 > 0.97 for 3 logged steps (since step 30): ")
    assert "method.teacher_temp" in alert.message
    healthy = _feed(Alerts(AlertConfig(patience=3, chance_after=0)), [{"teacher_entropy": 0.95}] * 6)
    assert healthy == {}
    off = _feed(Alerts(AlertConfig(patience=1, chance_after=0, uniform_above=None)), [{"teacher_entropy": 1.0}] * 3)
    assert off == {}
    assert _feed(Alerts(AlertConfig(patience=1, chance_after=0)), [{"loss": 8.3}] * 3) == {}  # other methods
