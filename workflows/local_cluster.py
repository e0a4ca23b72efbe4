"""A real multi-node Ray cluster on one machine, started as users start one: ``ray start --head``
and ``ray start --address=...`` per node, each node its own raylet with its own ``--num-cpus``
and custom resources (:class:`LocalCluster`); a node is lost by killing its raylet and the
processes it started, by PID (:meth:`LocalCluster.kill_node`), and a replacement joins with
:meth:`LocalCluster.add_node`. Used by the multi-node tests and ``benchmarks/multinode_demo.py``.

Isolation from other Ray instances on the machine: every process of the cluster gets a private
``RAY_TMPDIR`` / ``--temp-dir`` (Ray's ``ray_current_cluster`` discovery file lives there, so a
bare ``ray.init()`` elsewhere never finds it) and free loopback ports; it is reached only by its
explicit address and stopped by its own PIDs (never ``ray stop``, which stops every instance).

python -m workflows.local_cluster up --workers 2 --cpus 1   # prints RAY_ADDRESS and the PIDs
python -m workflows.local_cluster down --temp-dir /tmp/raymn-XXXX
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_exe() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "ray")
    return exe if os.path.exists(exe) else (shutil.which("ray") or "ray")


def mlflow_server_argv(backend_store_uri: str, artifacts_destination: str, port: int) -> list[str]:
    """The command of a real ``mlflow server`` on loopback (one worker, artifacts proxied): what
    the multi-node, S3 and reliability tests and the multi-node demo start."""
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    return [
        exe if os.path.exists(exe) else (shutil.which("mlflow") or "mlflow"),
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        artifacts_destination,
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _environ(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return fh.read().split(b"\0")
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc's parent links)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class NodeProcess:
    """One node of the cluster: its name, raylet port, Ray node id and resources."""

    name: str
    node_manager_port: int
    resources: dict[str, float]
    num_cpus: float
    node_id: str = ""
    head: bool = False

    def raylet_pid(self) -> int | None:
        needle = f"--node_manager_port={self.node_manager_port}".encode()
        for entry in os.listdir("/proc"):
            if entry.isdigit() and b"raylet" in _cmdline(int(entry)).split(b"\0")[0]:
                if needle in _cmdline(int(entry)):
                    return int(entry)
        return None

    def pids(self) -> list[int]:
        """The raylet and every process it started (workers, agents) of this node."""
        raylet = self.raylet_pid()
        return [] if raylet is None else [raylet, *_children(raylet)]


@dataclass
class LocalCluster:
    """A head and worker nodes on this machine; see the module docstring."""

    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="raymn-", dir="/tmp"))
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    nodes: list[NodeProcess] = field(default_factory=list)
    dashboard_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def node_env(self) -> dict[str, str]:
        """The environment every node and every command run against the cluster gets."""
        env = dict(os.environ)
        env.update(self.env)
        env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}"
        env["RAY_AUTH_MODE"] = "disabled"
        env["RAY_TMPDIR"] = self.temp_dir
        # A lost node is declared dead after about 3 s instead of Ray's default 15+ s.
        env.setdefault("RAY_health_check_period_ms", "1000")
        env.setdefault("RAY_health_check_failure_threshold", "3")
        # The head's dashboard starts 9 module processes: on a loaded 2-core machine that took
        # longer than Ray's 60 s and `ray start --head` failed.
        env.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "240")
        env.pop("RAY_ADDRESS", None)
        return env

    def client_env(self) -> dict[str, str]:
        """The environment of a command run against the cluster (``RAY_ADDRESS`` set)."""
        return {**self.node_env(), "RAY_ADDRESS": self.address}

    def _start(self, node: NodeProcess, extra: list[str]) -> None:
        cmd = [
            _ray_exe(),
            "start",
            *extra,
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={node.num_cpus:g}",
            f"--resources={json.dumps(node.resources)}",
            "--disable-usage-stats",
            f"--node-manager-port={node.node_manager_port}",
            f"--object-manager-port={free_port()}",
            # Other Ray instances on the machine hold the default ports.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]
        done = subprocess.run(cmd, env=self.node_env(), capture_output=True, text=True, timeout=420)
        if done.returncode != 0:
            raise RuntimeError(f"ray start failed for {node.name}: {done.stdout}{done.stderr}")
        self.nodes.append(node)

    def wait_for_nodes(self, timeout_s: float = 120) -> list[NodeProcess]:
        """Wait until every started node is alive in the cluster; sets their node ids."""
        deadline = time.time() + timeout_s
        while True:
            by_port = {n["NodeManagerPort"]: n["NodeID"] for n in self.alive_nodes()}
            for node in self.nodes:
                node.node_id = by_port.get(node.node_manager_port, "")
            missing = [n.name for n in self.nodes if not n.node_id]
            if not missing:
                return self.nodes
            if time.time() > deadline:
                raise RuntimeError(f"nodes {missing} did not join the cluster in {timeout_s} s")
            time.sleep(1)

    def wait_for_node_count(self, count: int, timeout_s: float = 120) -> None:
        """Wait until the cluster has ``count`` alive nodes (a killed node has been noticed)."""
        deadline = time.time() + timeout_s
        while len(self.alive_nodes()) != count:
            if time.time() > deadline:
                raise RuntimeError(
                    f"the cluster did not reach {count} alive nodes in {timeout_s} s"
                )
            time.sleep(1)

    def start_head(
        self,
        *,
        num_cpus: float = 1,
        resources: dict[str, float] | None = None,
        dashboard: bool = True,
    ):
        """The head node. With its dashboard (as ``ray start --head`` starts one by default), on a
        free loopback port: Ray's state API is served by it, and Ray Train's placement-group
        cleaner needs that API to free the workers of a run whose controller died (a Tune trial
        stopped by ASHA or lost with its node); without it they stay held until the job ends."""
        head = NodeProcess("head", free_port(), dict(resources or {}), num_cpus, head=True)
        self.dashboard_port = free_port() if dashboard else None
        if dashboard:
            # The cleaner runs on the head and finds the API by auto-detection, which fails
            # while other Ray instances run on the machine ("Found multiple active Ray
            # instances"): every process of the cluster is told where it is.
            self.env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{self.dashboard_port}"
        self._start(
            head,
            [
                "--head",
                f"--port={self.port}",
                f"--temp-dir={self.temp_dir}",
                *(
                    [
                        "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={self.dashboard_port}",
                    ]
                    if dashboard
                    else ["--include-dashboard=false"]
                ),
                f"--ray-client-server-port={free_port()}",
            ],
        )
        return head

    def add_node(
        self, name: str, *, num_cpus: float = 1, resources: dict[str, float] | None = None
    ) -> NodeProcess:
        node = NodeProcess(name, free_port(), dict(resources or {}), num_cpus)
        self._start(node, [f"--address={self.address}"])
        return node  # its node_id is set by wait_for_nodes()

    def _query(self, expression: str, what: str):
        """The JSON value of a Python ``expression`` over ``ray``, evaluated by a short child
        process connected to the cluster (the caller may hold another Ray instance)."""
        code = (
            "import json, ray; ray.init(address='auto', logging_level='ERROR', "
            f"log_to_driver=False); print(json.dumps({expression}))"
        )
        env = {**self.node_env(), "RAY_ADDRESS": self.address}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"cannot read {what}: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def alive_nodes(self) -> list[dict]:
        """``ray.nodes()`` of the cluster's alive nodes."""
        return self._query(
            "[{k: n[k] for k in ('NodeID', 'NodeManagerPort', 'Alive', 'Resources')} "
            "for n in ray.nodes() if n['Alive']]",
            "the cluster's nodes",
        )

    def available_resources(self) -> dict[str, float]:
        """``ray.available_resources()`` of the cluster: what no task, actor or placement group
        holds now."""
        return self._query("ray.available_resources()", "the cluster's free resources")

    def node_of_pid(self, pid: int) -> NodeProcess | None:
        """The node whose raylet started process ``pid`` (a Train worker, a Tune trial)."""
        for node in self.nodes:
            if pid in node.pids():
                return node
        return None

    def kill_node(self, node: NodeProcess) -> list[int]:
        """Lose ``node`` as a crash or a spot preemption does: SIGKILL its raylet and every
        process it started, by PID. Returns the PIDs killed."""
        pids = node.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes.remove(node)
        return pids

    def own_pids(self) -> set[int]:
        """Every process of the cluster: its processes name the private temp dir on their
        command line or inherit ``RAY_TMPDIR=<temp_dir>``."""
        cmd_needle = self.temp_dir.encode()
        env_needle = f"RAY_TMPDIR={self.temp_dir}".encode()
        out = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                pid = int(entry)
                if cmd_needle in _cmdline(pid) or env_needle in _environ(pid):
                    out.add(pid)
        for node in self.nodes:
            out.update(node.pids())
        return out

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every process of the cluster, SIGKILL what is left after ``grace_s``."""
        stop_temp_dir(self.temp_dir, grace_s=grace_s, extra=self.own_pids())
        self.nodes.clear()


def _s3_json(bucket: str, prefix: str, suffix: str):
    """(key, parsed JSON) of every object under s3://bucket/prefix whose key ends with ``suffix``."""
    from preprocessing.storage import s3_client

    client = s3_client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(suffix):
                yield (
                    obj["Key"],
                    json.loads(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()),
                )


def committed_checkpoints(bucket: str, prefix: str) -> dict[str, list[dict]]:
    """The metrics of every checkpoint the Train runs under s3://bucket/prefix committed, by run
    folder: the ones their controller registered (``checkpoint_manager_snapshot.json``, what a
    run restarted under the same name continues from). A checkpoint folder on S3 is not enough:
    a node lost between its upload and the controller's registration is an epoch redone."""
    snapshot = "/checkpoint_manager_snapshot.json"
    return {
        key[: -len(snapshot)]: [r["metrics"] for r in body.get("checkpoint_results", [])]
        for key, body in _s3_json(bucket, prefix, snapshot)
    }


def final_history(bucket: str, prefix: str) -> list[dict]:
    """The per-epoch metrics (``history``) of the newest checkpoint stored under
    s3://bucket/prefix: what every epoch of the finished run was trained on, redone ones as
    redone (MLflow keeps the first attempt's values of an epoch redone after a node was lost
    between its checkpoint's upload and Ray Train's registration of it)."""
    states = [s for key, s in _s3_json(bucket, prefix, "/state.json") if "/checkpoint_" in key]
    if not states:
        raise FileNotFoundError(f"no checkpoint under s3://{bucket}/{prefix}")
    return list(max(states, key=lambda s: int(s["epoch"])).get("history", []))


def stop_temp_dir(temp_dir: str, *, grace_s: float = 5.0, extra: set[int] | None = None) -> None:
    """Stop the processes of the cluster whose private temp dir is ``temp_dir``; remove it."""
    probe = LocalCluster(temp_dir=temp_dir, port=0)
    pids = probe.own_pids() | set(extra or ())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline:
            pids = {p for p in pids if os.path.exists(f"/proc/{p}")} | probe.own_pids()
            if not pids:
                break
            time.sleep(0.3)
        if not pids:
            break
    shutil.rmtree(temp_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a head and --workers worker nodes")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--cpus", type=float, default=1.0, help="logical CPUs of every node")
    up.add_argument("--head-cpus", type=float, default=1.0)
    down = sub.add_parser("down", help="stop the cluster of this temp dir")
    down.add_argument("--temp-dir", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "down":
        stop_temp_dir(args.temp_dir)
        return 0
    cluster = LocalCluster()
    cluster.start_head(num_cpus=args.head_cpus)
    for i in range(args.workers):
        cluster.add_node(f"worker{i + 1}", num_cpus=args.cpus, resources={"trainer": 1})
    cluster.wait_for_nodes()
    for node in cluster.nodes:
        print(f"{node.name:8s} node {node.node_id[:8]} raylet pid {node.raylet_pid()}")
    print(f"export RAY_ADDRESS={cluster.address} RAY_TMPDIR={cluster.temp_dir}")
    print(f"stop it with: python -m workflows.local_cluster down --temp-dir {cluster.temp_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
