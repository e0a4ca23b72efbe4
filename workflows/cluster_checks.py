"""Checks a job's driver makes against the Ray cluster before any work is scheduled: that its
request can ever be placed (:func:`check_resources`) and that every path it writes or reads is
one all nodes see (:func:`check_shared_storage`). Both take plain node lists
(:func:`cluster_nodes` reads them from Ray), so they are tested with made-up clusters.

Why: Ray Train and Ray Tune wait, without an end, for resources that no node has (a worker
asking for more CPUs or GPUs than any node, more workers than fit, or workers that leave no CPU
for the Ray Data read tasks they wait on); and a local path on a multi-node cluster is a
different folder (or none) on every node, so a checkpoint written on one node is not found on
another after a restart."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pose2seg.config import Config

# Ray's own bookkeeping resources: not what a user asks for, left out of messages.
_HIDDEN_PREFIXES = ("node:", "accelerator_type:")
_HIDDEN = ("memory", "object_store_memory")
_EPS = 1e-9


class UnsatisfiableRequestError(ValueError):
    """The cluster can never hold what the run asks for (exit code 2, one line)."""


class LocalStorageError(ValueError):
    """A path the run stores to or reads from is local to one node of a multi-node cluster."""


@dataclass
class NodeInfo:
    """One alive Ray node: its id, whether it is the head, and its total resources."""

    node_id: str
    resources: dict[str, float] = field(default_factory=dict)
    is_head: bool = False

    def label(self) -> str:
        return f"{self.node_id[:8]}{' (head)' if self.is_head else ''}"


def cluster_nodes() -> list[NodeInfo]:
    """The alive nodes of the connected Ray cluster."""
    import ray

    return [
        NodeInfo(
            node_id=str(n["NodeID"]),
            resources={k: float(v) for k, v in (n.get("Resources") or {}).items()},
            is_head="node:__internal_head__" in (n.get("Resources") or {}),
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]


def describe(resources: dict[str, float]) -> str:
    """``CPU 2, GPU 1, worker1 1`` (Ray's bookkeeping resources left out)."""
    shown = {
        k: v
        for k, v in resources.items()
        if k not in _HIDDEN and not k.startswith(_HIDDEN_PREFIXES) and v > 0
    }
    order = sorted(shown, key=lambda k: (k not in ("CPU", "GPU"), k))
    return ", ".join(f"{k} {shown[k]:g}" for k in order) or "nothing"


def describe_cluster(nodes: list[NodeInfo]) -> str:
    return "; ".join(f"node {n.label()}: {describe(n.resources)}" for n in nodes) or "no nodes"


def worker_resources(config: Config) -> dict[str, float]:
    """What one Ray Train worker asks for (``resources_per_worker``)."""
    resources = {"CPU": float(config.train.cpus_per_worker)}
    if config.train.use_gpu:
        resources["GPU"] = 1.0
    resources.update({k: float(v) for k, v in config.train.worker_resources.items()})
    return resources


def _fits(free: dict[str, float], want: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + _EPS >= v for k, v in want.items())


def _take(free: dict[str, float], want: dict[str, float]) -> None:
    for k, v in want.items():
        free[k] = free.get(k, 0.0) - v


def check_resources(
    config: Config,
    nodes: list[NodeInfo],
    *,
    driver_cpus: float = 0.0,
    driver_resources: dict[str, float] | None = None,
    data_cpus: float | None = None,
    what: str = "train",
) -> None:
    """Raise :class:`UnsatisfiableRequestError` (one line: what was asked, what each node has)
    unless the cluster can place, at once, a driver of ``driver_cpus`` CPUs and
    ``driver_resources`` (a Tune trial's: ``tune.cpus_per_trial_driver``,
    ``tune.driver_resources``), at
    least ``train.num_workers`` (the range's minimum) workers of :func:`worker_resources` under
    ``train.placement_strategy``, and still one Parquet read task (``data_cpus``; default
    ``preprocessing.pipeline.READ_CPUS`` with ``train.input_reader=ray_data``, else none)
    beside them. Judged on the nodes' total resources:
    what other jobs hold now is not a reason to refuse (it is freed later)."""
    if data_cpus is None:
        from preprocessing.pipeline import READ_CPUS

        # Only the ray_data reader runs Ray Data tasks while the workers hold their CPUs; the
        # thread reader reads inside the workers, and the val split is materialised before the
        # workers start (measured: 2 workers x 1 CPU on a 2-CPU instance finish).
        data_cpus = READ_CPUS if config.train.input_reader == "ray_data" else 0.0
    want = worker_resources(config)
    driver = {"CPU": float(driver_cpus), **(driver_resources or {})}
    workers = config.train.min_workers
    strategy = config.train.placement_strategy
    asked = (
        f"{what} asks for {workers} worker{'s' if workers != 1 else ''} x ({describe(want)})"
        f"{' (the minimum of train.num_workers)' if config.train.elastic else ''}"
        f"{f' + a {driver_cpus:g}-CPU trial driver' if driver_cpus > 0 else ''}"
        f"{f' ({describe(driver_resources)})' if driver_cpus > 0 and driver_resources else ''}"
        f", placement {strategy}"
        f"{f', + {data_cpus:g} CPU for the Ray Data reads' if data_cpus > 0 else ''}"
    )
    has = (
        f"the cluster has {describe_cluster(nodes)} (an autoscaling cluster whose nodes join "
        "later: train.check_resources=false)"
    )
    if not any(_fits(n.resources, want) for n in nodes):
        raise UnsatisfiableRequestError(
            f"{asked}: no node can hold one worker (train.cpus_per_worker / train.use_gpu / "
            f"train.worker_resources); {has}"
        )
    # Largest nodes first, filled one after the other (Ray's PACK also leaves whole nodes
    # free for the read tasks); STRICT_SPREAD takes one worker per node.
    free = [dict(n.resources) for n in sorted(nodes, key=lambda n: -n.resources.get("CPU", 0))]
    if driver_cpus > 0:
        spot = next((f for f in free if _fits(f, driver)), None)
        if spot is None:
            raise UnsatisfiableRequestError(
                f"{asked}: no node can hold the trial driver (tune.cpus_per_trial_driver / "
                f"tune.driver_resources); {has}"
            )
        _take(spot, driver)
    placed = 0
    for f in free:
        while placed < workers and _fits(f, want):
            _take(f, want)
            placed += 1
            if strategy == "STRICT_SPREAD":
                break
    if placed < workers:
        raise UnsatisfiableRequestError(
            f"{asked}: only {placed} such worker{'s' if placed != 1 else ''} fit"
            f"{' (one per node)' if strategy == 'STRICT_SPREAD' else ''} (train.num_workers); {has}"
        )
    if data_cpus > 0 and not any(f.get("CPU", 0.0) + _EPS >= data_cpus for f in free):
        raise UnsatisfiableRequestError(
            f"{asked}: the workers leave no node with {data_cpus:g} CPU for the Ray Data reads "
            "(train.input_reader=ray_data), so the run would wait for its data forever (lower "
            f"train.cpus_per_worker or train.num_workers, or use train.input_reader=thread); {has}"
        )


def local_paths(config: Config) -> dict[str, str]:
    """The config's storage keys whose value is a path on the local file system: every node of a
    cluster has its own (``s3://`` and other URIs, and MLflow servers, are shared)."""
    from workflows.mlflow_tracking import resolve_tracking_uri

    out: dict[str, str] = {}
    for key, value in (
        ("data.root", config.data.root if config.data.source == "synthetic" else ""),
        ("data.processed", config.data.processed),
        ("train.storage_path", config.train.storage_path),
    ):
        if value and "://" not in value:
            out[key] = value
    if config.data.source == "coco":
        for key in ("data.root", "data.train_images", "data.val_images"):
            value = getattr(config.data, key.split(".", 1)[1])
            if value and "://" not in value and (key == "data.root" or value.startswith("/")):
                out[key] = value
    uri = resolve_tracking_uri(config)
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        out["registry.tracking_uri"] = uri
    return out


def check_shared_storage(config: Config, nodes: list[NodeInfo], *, what: str = "train") -> None:
    """Raise :class:`LocalStorageError` (one line naming the keys and why) when the cluster has
    more than one node and the run stores to a local path, unless
    ``train.shared_filesystem`` says that path is a file system every node mounts."""
    if len(nodes) <= 1 or config.train.shared_filesystem:
        return
    paths = local_paths(config)
    if not paths:
        return
    named = ", ".join(f"{k}={v}" for k, v in paths.items())
    raise LocalStorageError(
        f"{what} on a {len(nodes)}-node cluster needs storage every node sees, but {named} "
        f"{'is a local path' if len(paths) == 1 else 'are local paths'}: a checkpoint, Parquet "
        "file or MLflow record written on one node is missing on the others (after a lost node, "
        "the run would restart from nothing). Use s3:// (and an MLflow server: "
        "registry.tracking_uri=http://...), or set train.shared_filesystem=true if the path is "
        "a file system every node mounts"
    )


def check_cluster(
    config: Config,
    *,
    driver_cpus: float = 0.0,
    driver_resources: dict[str, float] | None = None,
    what: str = "train",
    nodes: Any = None,
) -> list[NodeInfo]:
    """Both checks against the connected cluster (``train.check_resources``); returns its nodes."""
    nodes = cluster_nodes() if nodes is None else nodes
    if config.train.check_resources:
        check_shared_storage(config, nodes, what=what)
        check_resources(
            config, nodes, driver_cpus=driver_cpus, driver_resources=driver_resources, what=what
        )
    return nodes


def state_api_reachable(timeout_s: float = 5.0) -> bool:
    """Whether the connected cluster's dashboard, which serves Ray's state API, answers. Ray
    Train's placement-group cleaner watches the controllers through that API: without it, the
    workers' resources of a Ray Train run whose controller died (a Tune trial stopped by ASHA,
    a driver lost with its node) stay held until the job ends."""
    import urllib.request

    import ray

    try:
        url = ray._private.worker.get_dashboard_url()  # empty when the head runs none
    except Exception:
        return False
    if not url:
        return False
    try:
        with urllib.request.urlopen(f"http://{url}/api/gcs_healthz", timeout=timeout_s) as resp:
            return resp.status == 200
    except OSError:
        return False
