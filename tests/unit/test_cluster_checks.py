"""The checks a job makes against the cluster before fitting, on made-up node lists (no Ray):
requests no node can hold fail at once with one line naming what was asked and what each node
has; local storage on a multi-node cluster is refused naming the key."""

from __future__ import annotations

import pytest

from pose2seg.config import Config
from workflows.cluster_checks import (
    LocalStorageError,
    NodeInfo,
    UnsatisfiableRequestError,
    check_cluster,
    check_resources,
    check_shared_storage,
)

S3 = {
    "data.root": "s3://b/raw",
    "data.processed": "s3://b/processed",
    "train.storage_path": "s3://b/runs",
    "registry.tracking_uri": "http://127.0.0.1:5000",
}


def _node(i: int, cpus: float, gpus: float = 0.0, **custom: float) -> NodeInfo:
    resources = {"CPU": cpus, "memory": 1e9, f"node:10.0.0.{i}": 1.0, **custom}
    if gpus:
        resources["GPU"] = gpus
    return NodeInfo(node_id=f"{i:02d}" + "ab" * 27, resources=resources, is_head=i == 0)


THREE = [_node(0, 1), _node(1, 1, trainer=1), _node(2, 1, trainer=1)]


def _config(**overrides) -> Config:
    return Config().with_overrides({**S3, **overrides})


def test_a_request_the_cluster_holds_passes():
    check_resources(_config(), THREE)
    check_resources(_config(**{"train.placement_strategy": "STRICT_SPREAD"}), THREE)
    check_resources(_config(**{"train.num_workers": [2, 6]}), THREE)  # the minimum fits
    check_resources(_config(), [_node(0, 2)])  # the defaults on a 2-core machine
    check_resources(_config(), THREE, driver_cpus=0.5)


def test_a_worker_bigger_than_every_node_names_the_request_and_the_nodes():
    with pytest.raises(UnsatisfiableRequestError) as err:
        check_resources(_config(**{"train.cpus_per_worker": 4}), THREE)
    line = str(err.value)
    assert "\n" not in line
    assert "2 workers x (CPU 4), placement PACK:" in line and "no node can hold one worker" in line
    assert "node 00ababab (head): CPU 1" in line and "node 01ababab: CPU 1, trainer 1" in line
    assert "memory" not in line and "node:10" not in line


def test_a_gpu_worker_on_a_cpu_cluster_fails():
    with pytest.raises(UnsatisfiableRequestError, match=r"CPU 0.5, GPU 1.*no node"):
        check_resources(_config(**{"train.use_gpu": True}), THREE)
    check_resources(_config(**{"train.use_gpu": True}), [_node(0, 8, gpus=2)])


def test_more_workers_than_fit_fails_and_counts_what_fits():
    with pytest.raises(UnsatisfiableRequestError, match="only 6 such workers fit"):
        check_resources(_config(**{"train.num_workers": 7}), THREE)
    check_resources(_config(**{"train.num_workers": 6}), THREE)  # every CPU taken: fine
    with pytest.raises(
        UnsatisfiableRequestError, match=r"only 3 such workers fit \(one per node\)"
    ):
        check_resources(
            _config(
                **{"train.num_workers": 4, "train.placement_strategy": "STRICT_SPREAD"},
            ),
            THREE,
        )
    # An elastic range is judged by its minimum.
    with pytest.raises(UnsatisfiableRequestError, match="the minimum of train.num_workers"):
        check_resources(_config(**{"train.num_workers": [7, 8]}), THREE)


def test_workers_that_leave_no_cpu_for_ray_data_reads_fail_single_node_too():
    # The ray_data reader runs read tasks while the workers train: 2 workers x 1 CPU on a
    # 2-CPU machine would wait for their data forever.
    reads = {"train.input_reader": "ray_data"}
    with pytest.raises(UnsatisfiableRequestError, match="no node with 0.25 CPU for the Ray Data"):
        check_resources(_config(**reads, **{"train.cpus_per_worker": 1.0}), [_node(0, 2)])
    # A Tune trial driver counts too.
    with pytest.raises(UnsatisfiableRequestError, match="0.5-CPU trial driver"):
        check_resources(
            _config(**reads, **{"train.cpus_per_worker": 0.75}), [_node(0, 2)], driver_cpus=0.5
        )
    # The thread reader (the default) reads inside the workers: measured to finish.
    check_resources(_config(**{"train.cpus_per_worker": 1.0}), [_node(0, 2)])


def test_local_storage_on_a_multi_node_cluster_is_refused_naming_the_keys():
    config = _config(**{"train.storage_path": "/tmp/runs", "data.processed": "data/processed"})
    with pytest.raises(LocalStorageError) as err:
        check_shared_storage(config, THREE)
    line = str(err.value)
    assert "\n" not in line and "3-node cluster" in line
    assert "train.storage_path=/tmp/runs" in line and "data.processed=data/processed" in line
    assert "data.root=" not in line and "registry.tracking_uri=sqlite" not in line


def test_a_sqlite_mlflow_store_is_local_too():
    config = _config(**{"registry.tracking_uri": "sqlite:///mlflow.db"})
    with pytest.raises(LocalStorageError, match="registry.tracking_uri=sqlite:///mlflow.db"):
        check_shared_storage(config, THREE)


def test_local_storage_is_fine_on_one_node_or_a_shared_file_system():
    local = Config()  # every default is a local path
    check_shared_storage(local, [_node(0, 2)])
    check_shared_storage(local.with_overrides({"train.shared_filesystem": True}), THREE)
    check_shared_storage(_config(), THREE)


def test_check_cluster_honours_check_resources():
    off = Config().with_overrides({"train.check_resources": False, "train.num_workers": 99})
    assert check_cluster(off, nodes=THREE) == THREE
    with pytest.raises(LocalStorageError):
        check_cluster(Config(), nodes=THREE)


def test_custom_worker_resources_pin_the_workers_to_their_nodes():
    config = _config(**{"train.worker_resources": {"trainer": 1}})
    with pytest.raises(UnsatisfiableRequestError, match=r"\(CPU 0.5, trainer 1\)"):
        check_resources(config.with_overrides({"train.num_workers": 3}), THREE)
    check_resources(config, THREE)  # one worker on each of the two trainer nodes
    with pytest.raises(UnsatisfiableRequestError, match="no node can hold one worker"):
        check_resources(config, [_node(0, 8)])


def test_a_trial_driver_asking_for_a_resource_no_node_has_is_refused():
    head = [_node(0, 1, driver=4), _node(1, 1, trainer=1)]
    ok = _config(**{"train.worker_resources": {"trainer": 1}, "train.num_workers": 1})
    check_resources(ok, head, driver_cpus=0.25, driver_resources={"driver": 1})
    with pytest.raises(UnsatisfiableRequestError) as err:
        check_resources(ok, THREE, driver_cpus=0.25, driver_resources={"driver": 1})
    line = str(err.value)
    assert "a 0.25-CPU trial driver (driver 1)" in line
    assert "no node can hold the trial driver (tune.cpus_per_trial_driver / " in line
