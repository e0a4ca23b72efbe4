"""A run whose Train workers cannot be placed fails after ``train.placement_timeout_s`` with one
line (issue 25): Ray Train alone retries the placement for ever, which is how a Tune trial
waited without an end for a node that another, dead, trial's workers still held."""

from __future__ import annotations

import time

import pytest

from tests.helpers import tiny_config

pytestmark = pytest.mark.integration


def test_workers_that_cannot_be_placed_fail_after_the_placement_timeout(
    ray_session, tmp_path, monkeypatch
):
    import os

    import ray
    from mlflow import MlflowClient
    from ray.util.placement_group import placement_group, remove_placement_group

    from preprocessing.pipeline import preprocess_dataset
    from workflows.train_driver import run_training
    from workflows.train_failures import START_TIMEOUT_ENV, WorkersNotPlacedError

    # Ray Train's placement attempt: 2 s, not 60, through the key (which reaches the run's
    # controller only if Ray Train hands it over from the driver: else the run takes > 60 s).
    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    config = tiny_config(
        tmp_path,
        **{
            "train.num_workers": 1,
            "train.cpus_per_worker": 1.0,
            "train.epochs": 1,
            "train.placement_timeout_s": 4,
            "train.placement_attempt_s": 2,
            "train.run_name": "not-placed",
            "registry.register": False,
        },
    )
    preprocess_dataset(config)
    # Another job holds 1.5 of the 2 CPUs: the run's checks pass (the cluster can hold the
    # worker), its val split still reads (0.25 CPU), its 1-CPU worker cannot be placed now.
    hold = placement_group([{"CPU": 1.5}])
    ray.get(hold.ready(), timeout=60)
    try:
        t0 = time.time()
        with pytest.raises(WorkersNotPlacedError) as err:
            run_training(config)
        elapsed = time.time() - t0
    finally:
        remove_placement_group(hold)
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("not-placed: its 1 Train worker x (CPU 1) could not be placed in 4 s")
    # Free: what the held group left (other tests' groups in the shared session may hold more),
    # never a placement group's own resources.
    assert "2 attempts of 2 s" in line and "free now: CPU 0." in line, line
    assert "_group_" not in line, line
    assert elapsed < 60, elapsed
    assert START_TIMEOUT_ENV not in os.environ  # the driver's environment as it was
    client = MlflowClient(tracking_uri=config.registry.tracking_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("pose2seg").experiment_id],
        filter_string="tags.`pose2seg.run_name` = 'not-placed'",
    )
    assert run.info.status == "FAILED"
