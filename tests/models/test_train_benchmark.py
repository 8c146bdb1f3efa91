"""models.benchmark: the per-stage rates its data-parallel table reports."""

import math

from models.benchmark import _stage_rate


def test_stage_rate_reads_the_first_epoch_of_each_stage() -> None:
    metrics = {
        "epochs": [
            {"stage": "linear", "epoch": 0, "train_samples_per_s": 300_000.0},
            {"stage": "linear", "epoch": 1, "train_samples_per_s": 310_000.0},
            {"stage": "all", "epoch": 0, "train_samples_per_s": 40_000.0},
        ]
    }
    assert _stage_rate(metrics, "linear") == 300_000.0
    assert _stage_rate(metrics, "all") == 40_000.0  # the DLRM's own stage, not the linear part's first epoch


def test_stage_rate_without_a_linear_stage() -> None:
    metrics = {"epochs": [{"epoch": 0, "train_samples_per_s": 45_000.0}]}  # records of before stages, or LR runs
    assert _stage_rate(metrics, "all") == 45_000.0
    assert math.isnan(_stage_rate(metrics, "linear"))
