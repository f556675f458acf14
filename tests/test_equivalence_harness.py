"""benchmarks/training_equivalence.py's verdicts: equal records pass, a semantic difference fails.

The harness itself needs scvi-tools in its own venv; its comparison is plain Python on two
records, tested here on hand-made ones.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import training_equivalence as harness  # noqa: E402

N_STEPS = 30  # snapshots after steps 1-10, 20 and 30; steps 1-20 are "early"


def make_record(n_steps: int = N_STEPS) -> dict:
    g = torch.Generator().manual_seed(0)
    names = ["encoder.fc_layers.Layer 0.0.weight", "encoder.fc_layers.Layer 0.0.bias",
             "encoder.fc_layers.Layer 0.1.weight", "px_r"]
    tensor = lambda: torch.randn(4, 3, generator=g)  # noqa: E731
    grads = {n: tensor() for n in names}
    # zero by design
    grads["encoder.fc_layers.Layer 0.0.bias"] = grads["encoder.fc_layers.Layer 0.0.bias"] * 1e-9
    state = {n: tensor() for n in names} | {
        "encoder.fc_layers.Layer 0.1.running_mean": tensor(),
        "encoder.fc_layers.Layer 0.1.num_batches_tracked": torch.tensor(1),
    }
    return {
        "steps": [
            {"cells": [0, 1], "eps": [], "loss": 10.0 + s, "reconstruction": 9.0, "kl_z": 1.0,
             "kl_weight": 0.0, "epoch": 0}
            for s in range(n_steps)
        ],
        "snapshots": {s: {k: v.clone() for k, v in state.items()} for s in harness.snapshot_steps(n_steps)},
        "first_grads": grads,
        "grads_at": {s: grads for s in [0, *harness.snapshot_steps(n_steps)[:-1]]},
        "first_adam": {
            n: {"update": g_ * 1e-3, "exp_avg": g_ * 0.1, "exp_avg_sq": g_ * g_ * 1e-3}
            for n, g_ in grads.items()
        },
        "forced_grads": {s: grads for s in [0, *harness.snapshot_steps(n_steps)[:-1]]},
    }


def verdict(ours: dict, theirs: dict, last_step_noise: float = 0.0) -> harness.Report:
    """The harness's report; ``last_step_noise``: how far scvi-tools parts from itself by the last step."""
    baseline = {s: 0.0 for s in harness.snapshot_steps(N_STEPS)} | {N_STEPS: last_step_noise}
    return harness.compare("test", ours, theirs, N_STEPS, baseline)


def test_identical_records_pass():
    record = make_record()
    assert verdict(copy.deepcopy(record), record).ok


@pytest.mark.parametrize(
    "change", ["gradient", "kl_weight", "loss", "missing_gradient", "later_gradient", "counter"]
)
def test_a_semantic_difference_fails(change):
    theirs = make_record()
    ours = copy.deepcopy(theirs)
    if change == "gradient":  # e.g. a different weight decay or likelihood: 1e-3 relative in one tensor
        ours["first_grads"]["px_r"] = ours["first_grads"]["px_r"] * (1 + 1e-3)
    elif change == "kl_weight":
        ours["steps"][1]["kl_weight"] = 0.0025
    elif change == "loss":
        ours["steps"][0]["loss"] *= 1 + 1e-4
    elif change == "missing_gradient":
        del ours["first_grads"]["px_r"]
    elif change == "later_gradient":  # the step from the reference's weights after 5 steps differs
        ours["forced_grads"][5] = dict(
            ours["forced_grads"][5], px_r=ours["forced_grads"][5]["px_r"] * (1 + 1e-3)
        )
    elif change == "counter":
        ours["snapshots"][1]["encoder.fc_layers.Layer 0.1.num_batches_tracked"] = torch.tensor(2)
    assert not verdict(ours, theirs).ok


def test_round_off_in_a_zero_gradient_passes_but_a_real_one_does_not():
    theirs = make_record()
    ours = copy.deepcopy(theirs)
    bias = "encoder.fc_layers.Layer 0.0.bias"  # followed by BatchNorm: exact gradient 0
    ours["first_grads"][bias] = -ours["first_grads"][bias]  # round-off of opposite sign: 200% "relative"
    assert verdict(ours, theirs).ok
    ours["first_grads"][bias] = torch.ones(4, 3)  # a gradient that BatchNorm should have removed
    assert not verdict(ours, theirs).ok


def test_late_drift_passes_only_when_every_step_agrees_from_the_same_state():
    theirs = make_record()
    ours = copy.deepcopy(theirs)
    # 5 % apart after the last step
    ours["snapshots"][N_STEPS]["px_r"] = ours["snapshots"][N_STEPS]["px_r"] * 1.05
    # every step from the reference's weights gives the same gradient: chaos
    report = verdict(ours, theirs, 1e-4)
    assert report.ok and any("round-off amplified" in row[4] for row in report.rows)
    # one step differs: semantics
    ours["forced_grads"][20] = {k: v * 1.01 for k, v in ours["forced_grads"][20].items()}
    assert not verdict(ours, theirs, 0.03).ok
    ours = copy.deepcopy(theirs)
    ours["snapshots"][10]["px_r"] = ours["snapshots"][10]["px_r"] * 1.001  # apart within the first 20 steps
    assert not verdict(ours, theirs, 0.03).ok
