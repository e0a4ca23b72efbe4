"""A measured multi-node run with a lost node: a 3-node Ray cluster on this machine (head + 2
worker nodes, ``workflows.local_cluster``), Parquet and checkpoints on an S3 server on loopback
(``moto_server``), MLflow behind ``mlflow server`` (SQLite store, S3 artifacts). It trains with
an elastic ``train.num_workers=[1, 2]`` (one worker per worker node), kills worker node 2 (its
raylet and workers, by PID) in the middle of epoch ``--kill-in-epoch``, lets the run go on with
one worker, adds a replacement node after the next checkpoint, and prints:

- the nodes, what was killed (node id, PIDs) and when (seconds after the start, the epoch);
- what recovered: the epochs and world sizes in the run's history (MLflow), where every rank
  ran (``pose2seg.worker_nodes``), the one MLflow run and the registered model version;
- the time lost: the interval between the last checkpoint before the kill and the first one
  after it, minus the median interval between checkpoints before the kill (the epoch redone
  and the restart, against a normal epoch).

    .venv/bin/python benchmarks/multinode_demo.py                     # defaults: 12 epochs, ~3.5 min
    .venv/bin/python benchmarks/multinode_demo.py --epochs 6 --kill-in-epoch 3 --set data.synthetic_num_train=64

Everything it starts (cluster, S3, MLflow) lives in private temp dirs on free loopback ports
and is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from workflows.local_cluster import (  # noqa: E402
    LocalCluster,
    committed_checkpoints,
    final_history,
    free_port,
    mlflow_server_argv,
)

TINY = {
    "data.input_size": 96,
    "data.images_per_shard": 4,
    "data.synthetic_num_train": 32,
    "data.synthetic_num_val": 8,
    "data.synthetic_image_size": 96,
    "data.synthetic_max_people": 3,
    "model.fpn_channels": 16,
    "model.roi_size": 16,
    "model.num_residual_units": 1,
    "model.seg_channels": 8,
    "model.num_templates": 2,
    "train.batch_size": 4,
    "train.warmup_steps": 2,
    "train.cpus_per_worker": 0.5,
    "train.torch_threads": 1,
    "train.worker_resources": {"trainer": 1},
    "train.placement_strategy": "SPREAD",
    "train.elastic_resize_interval_s": 5,
    "train.max_failures": 4,
    "train.progress_every_seconds": 0,
    "eval.batch_size": 4,
    "registry.model_name": "pose2seg-multinode-demo",
}


def _wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return  # the server answers
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    raise RuntimeError(f"{what} did not come up at {url}")


def start_s3(tmp: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_http(url, proc, "moto_server")
    return proc, url


def start_mlflow(tmp: str, bucket: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        mlflow_server_argv(f"sqlite:///{tmp}/mlflow.db", f"s3://{bucket}/mlflow", port),
        env=env,
        stdout=open(os.path.join(tmp, "mlflow.log"), "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_http(f"{url}/health", proc, "mlflow server")
    return proc, url


def checkpoint_times(bucket: str, prefix: str, seen: dict[int, float]) -> None:
    """Record the first time each epoch's checkpoint is seen committed under s3://bucket/prefix
    (registered by Ray Train's controller: a checkpoint only uploaded is redone if the node goes
    before its registration, as it then never happened)."""
    for results in committed_checkpoints(bucket, prefix).values():
        for metrics in results:
            seen.setdefault(int(metrics["epoch"]), time.time())


def train_worker_nodes(cluster: LocalCluster) -> dict:
    nodes = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    title = fh.read().split(b"\0")[0]
            except OSError:
                continue
            if title.startswith(b"ray::RayTrainWorker"):
                node = cluster.node_of_pid(int(entry))
                if node is not None:
                    nodes[node.node_id] = node
    return nodes


def run(args: argparse.Namespace) -> dict:
    import boto3

    tmp = tempfile.mkdtemp(prefix="pose2seg-mn-demo-")
    s3, endpoint = start_s3(tmp)
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
        }
    )
    bucket = f"demo-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    mlflow_proc, tracking = start_mlflow(tmp, bucket)
    cluster = LocalCluster()
    out: dict = {"events": []}
    t0 = time.time()

    def event(text: str) -> None:
        out["events"].append({"t_s": round(time.time() - t0, 1), "event": text})
        print(f"[{time.time() - t0:7.1f} s] {text}", flush=True)

    try:
        cluster.start_head(num_cpus=1)
        cluster.add_node("worker1", num_cpus=1, resources={"trainer": 1})
        cluster.add_node("worker2", num_cpus=1, resources={"trainer": 1})
        cluster.wait_for_nodes()
        for n in cluster.nodes:
            event(f"node {n.name} {n.node_id[:12]} up (raylet pid {n.raylet_pid()})")
        run_name = f"demo-{uuid.uuid4().hex[:6]}"
        sets = {
            **TINY,
            "data.root": f"s3://{bucket}/raw",
            "data.processed": f"s3://{bucket}/processed",
            "train.storage_path": f"s3://{bucket}/runs",
            "registry.tracking_uri": tracking,
            "train.run_name": run_name,
            "train.epochs": args.epochs,
            "train.num_workers": [1, 2],
        }
        argv = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
        argv += [a for o in args.overrides for a in ("--set", o)]
        env = {**cluster.client_env(), "PYTHONPATH": common.REPO_ROOT}
        event("preprocess on the cluster")
        subprocess.run(
            [sys.executable, "workflows/preprocess.py", *argv],
            cwd=common.REPO_ROOT,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        event("train: python workflows/train.py (RAY_ADDRESS = the cluster)")
        log = open(os.path.join(tmp, "train.log"), "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "workflows/train.py", *argv],
            cwd=common.REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        ckpts: dict[int, float] = {}
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                checkpoint_times(bucket, f"runs/{run_name}/", ckpts)
                time.sleep(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        # An elastic group may start with one worker and grow: wait until both workers run,
        # then for a fresh checkpoint (at least of epoch kill_in_epoch - 1), and kill a fraction
        # of an epoch after it: mid-epoch.
        while proc.poll() is None and len(train_worker_nodes(cluster)) < 2:
            time.sleep(0.5)
        target = max(max(ckpts, default=0) + 1, args.kill_in_epoch - 1)
        while proc.poll() is None and max(ckpts, default=0) < target:
            time.sleep(0.2)
        target = max(ckpts)
        interval = ckpts[target] - ckpts.get(target - 1, ckpts[target] - 10.0)
        time.sleep(max(0.0, args.kill_fraction * interval - (time.time() - ckpts[target])))
        on = train_worker_nodes(cluster)
        victim = next((n for n in on.values() if n.name == "worker2"), None) or next(
            n for n in on.values() if not n.head
        )
        last_before = max(ckpts, default=0)
        kill_t = time.time()
        pids = cluster.kill_node(victim)
        event(
            f"killed node {victim.name} {victim.node_id[:12]} (raylet + {len(pids) - 1} "
            f"processes, PIDs {pids}) during epoch {last_before + 1}"
        )
        out["killed"] = {
            "node": victim.name,
            "node_id": victim.node_id,
            "pids": pids,
            "t_s": round(kill_t - t0, 1),
            "epoch_in_progress": last_before + 1,
        }
        while max(ckpts, default=0) <= last_before and proc.poll() is None:
            time.sleep(0.5)
        first_after = min((e for e in ckpts if e > last_before), default=None)
        event(f"checkpoint of epoch {first_after} stored after the loss (1 worker)")
        replacement = cluster.add_node("worker3", num_cpus=1, resources={"trainer": 1})
        cluster.wait_for_nodes()
        event(f"replacement node worker3 {replacement.node_id[:12]} joined")
        join_t = time.time()
        rc = proc.wait(timeout=args.timeout)
        done.set()
        log.close()
        event(f"train.py exited {rc}")
        if rc != 0:
            raise RuntimeError(open(os.path.join(tmp, "train.log")).read()[-4000:])
        out.update(_mlflow_figures(tracking, run_name, sets["registry.model_name"]))
        # What each epoch of the finished run was trained on: the final checkpoint's history.
        history = final_history(bucket, f"runs/{run_name}/")
        out["world_size_by_epoch"] = {int(h["epoch"]): int(h["world_size"]) for h in history}
        out["epoch_seconds"] = {int(h["epoch"]): round(h["epoch_seconds"], 1) for h in history}
        # The regrowth: the first epoch after the join trained by 2 workers, committed when.
        regrown = [e for e, w in out["world_size_by_epoch"].items() if w == 2 and e > first_after]
        out["joined_t_s"] = round(join_t - t0, 1)
        out["first_epoch_on_2_workers_after_join"] = min(regrown) if regrown else None
        out["its_commit_after_join_s"] = (
            round(ckpts[min(regrown)] - join_t, 1) if regrown and min(regrown) in ckpts else None
        )
        before = [ckpts[e] - ckpts[e - 1] for e in range(2, last_before + 1) if e - 1 in ckpts]
        last_t = ckpts.get(last_before, t0)
        gap = ckpts[first_after] - last_t
        redo = kill_t - last_t  # the part of the epoch done since the last checkpoint, lost
        after_epoch = out["epoch_seconds"].get(first_after, float("nan"))
        restart = gap - redo - after_epoch  # noticing the loss, new workers, restore, input
        out["checkpoint_interval_before_s"] = (
            round(statistics.median(before), 1) if before else None
        )
        out["interval_across_loss_s"] = round(gap, 1)
        out["work_lost_s"] = round(redo, 1)
        out["epoch_after_loss_s"] = round(after_epoch, 1)
        out["restart_s"] = round(restart, 1)
        out["time_lost_s"] = round(redo + restart, 1)
        # Valid only when the kill came mid-epoch: the next checkpoint then needs a whole
        # (re-run) epoch after the kill, not just the end of the interrupted one.
        out["killed_mid_epoch"] = bool(ckpts[first_after] - kill_t > 0.5 * after_epoch)
        out["wall_s"] = round(time.time() - t0, 1)
        out["nodes"] = {n.name: n.node_id for n in cluster.nodes} | {victim.name: victim.node_id}
        return out
    finally:
        cluster.stop()
        for p in (mlflow_proc, s3):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass


def _mlflow_figures(tracking: str, run_name: str, model: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name("pose2seg").experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`pose2seg.run_name` = '{run_name}'")
    run = runs[0]
    version = client.get_model_version_by_alias(model, "champion")
    return {
        "mlflow_runs": len(runs),
        "epochs_logged": sorted(
            m.step for m in client.get_metric_history(run.info.run_id, "epoch")
        ),
        "worker_nodes": json.loads(run.data.tags.get("pose2seg.worker_nodes", "[]")),
        "registered_version_from_this_run": version.run_id == run.info.run_id,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--kill-in-epoch", type=int, default=3)
    parser.add_argument(
        "--kill-fraction",
        type=float,
        default=0.4,
        help="kill this fraction of an epoch (the last checkpoint interval) into the epoch",
    )
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=common.default_out_path("multinode_demo"))
    args = parser.parse_args(argv)
    common.limit_threads_env()
    machine = common.machine_info()
    common.print_header("multi-node run with a lost node", machine)
    result = run(args)
    result["load_average_1_5_15min_at_end"] = common.load_average()
    print(json.dumps({k: v for k, v in result.items() if k != "events"}, indent=2))
    print(
        f"time lost to the node loss: {result['time_lost_s']} s = work since the last checkpoint "
        f"{result['work_lost_s']} s + restart {result['restart_s']} s (the next epoch, on one "
        f"worker, took {result['epoch_after_loss_s']} s; a checkpoint interval before the loss "
        f"{result['checkpoint_interval_before_s']} s; killed mid-epoch: "
        f"{result['killed_mid_epoch']})"
    )
    if result.get("first_epoch_on_2_workers_after_join"):
        print(
            f"grew back to 2 workers: epoch {result['first_epoch_on_2_workers_after_join']}, "
            f"committed {result['its_commit_after_join_s']} s after the replacement joined"
        )
    else:
        print("no epoch on 2 workers after the replacement joined (the run ended first)")
    common.write_json(args.out, result, machine=machine)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
