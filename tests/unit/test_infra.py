"""Offline validation of infra/: the container image, KubeRay manifests, the AWS cluster-launcher
config and the MLflow server deployment.

Nothing here needs Docker, Kubernetes or a cloud: the files are parsed and checked against the
code (installed Ray/MLflow versions, pyproject, constraints.txt, workflows/, configs/) and
against each other (images, service names, ports, secrets, tracking URIs).
"""

from __future__ import annotations

import copy
import re
import shlex
import sys
import tomllib
import types
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from tests.helpers import check_script_command

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
SERVICE_ACCOUNT = INFRA / "kuberay" / "serviceaccount.yaml"
RAYJOBS = {
    "train": INFRA / "kuberay" / "rayjob-train.yaml",
    "tune": INFRA / "kuberay" / "rayjob-tune.yaml",
}
RAYSERVICE = INFRA / "kuberay" / "rayservice.yaml"
AWS_CLUSTER = INFRA / "aws" / "cluster.yaml"
MLFLOW_SERVER = INFRA / "mlflow" / "mlflow-server.yaml"
POSTGRES = INFRA / "mlflow" / "postgres.yaml"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
KUBE_FILES = [RAYCLUSTER, *RAYJOBS.values(), MLFLOW_SERVER, POSTGRES, SERVICE_ACCOUNT, RAYSERVICE]
EXPECTED_FILES = [
    DOCKERFILE,
    INFRA / "docker" / "README.md",
    RAYCLUSTER,
    SERVICE_ACCOUNT,
    *RAYJOBS.values(),
    RAYSERVICE,
    AWS_CLUSTER,
    MLFLOW_SERVER,
    POSTGRES,
    COMPOSE,
    INFRA / "README.md",
]
# Dockerfile FLAVOR build-arg -> tag suffix of the project image built with it.
FLAVORS = {"cpu": "cpu", "cu128": "gpu"}
# Configs that run on a cluster: data and checkpoints on S3, a tracking server.
CLUSTER_CONFIGS = {"cocopersons.yaml": "train", "ochuman_eval.yaml": "eval"}
GPU_KEY = "nvidia.com/gpu"


# ----------------------------------------------------------------------------- helpers


def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    for d in docs:
        assert isinstance(d, dict), f"{path}: every document must be a mapping, got {type(d)}"
    return docs


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def pyproject_spec(name: str) -> str:
    for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)$", dep)
        if m and m.group(1).lower() == name:
            return m.group(3)
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def walk(obj: Any, path: str = ""):
    """Yield (path, key, value) for every mapping entry, recursively through lists."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield path, k, v
            yield from walk(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from walk(v, f"{path}[{i}]")


def images_in(obj: Any) -> list[str]:
    return [v for _, k, v in walk(obj) if k == "image" and isinstance(v, str)]


def containers_in(obj: Any) -> list[dict]:
    out = []
    for _, k, v in walk(obj):
        if k == "containers" and isinstance(v, list):
            out.extend(v)
    return out


def quantity(value: Any) -> float:
    """Kubernetes CPU quantity ("500m", "7", 4) as a float."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for doc in load_docs(RAYCLUSTER):
        if doc.get("kind") == "RayCluster":
            specs.append((f"{RAYCLUSTER.name}:{doc['metadata']['name']}", doc["spec"]))
    for path in RAYJOBS.values():
        for doc in load_docs(path):
            if doc.get("kind") == "RayJob" and "rayClusterSpec" in doc["spec"]:
                specs.append(
                    (f"{path.name}:{doc['metadata']['name']}", doc["spec"]["rayClusterSpec"])
                )
    for doc in load_docs(RAYSERVICE):
        if doc.get("kind") == "RayService":
            specs.append(
                (f"{RAYSERVICE.name}:{doc['metadata']['name']}", doc["spec"]["rayClusterConfig"])
            )
    return specs


def rayjob(step: str) -> dict:
    jobs = [d for d in load_docs(RAYJOBS[step]) if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, f"{RAYJOBS[step]} must hold exactly one RayJob"
    return jobs[0]


def gpu_groups(spec: dict) -> list[tuple[dict, int]]:
    groups = []
    for group in spec.get("workerGroupSpecs", []):
        gpus = sum(
            int(c.get("resources", {}).get("limits", {}).get(GPU_KEY, 0))
            for c in group["template"]["spec"]["containers"]
        )
        if gpus:
            groups.append((group, gpus))
    return groups


def load_cluster_config(name: str):
    from pose2seg.config import load_config

    path = REPO / "configs" / name
    if not path.is_file():
        pytest.skip(f"configs/{name} is not written yet (the lead owns configs/); nothing to check")
    return load_config(str(path))


# ---- Dockerfile parsing


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        instr, _, args = current.partition(" ")
        out.append((instr.upper(), args.strip()))
        current = ""
    return out


def dockerfile_stages(build_args: dict[str, str] | None = None) -> list[dict]:
    """Stages with their expanded base image, name, ARG defaults, COPY sources, RUNs, USER, WORKDIR."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    global_args: dict[str, str] = {}
    stages: list[dict] = []

    def expand(text: str, env: dict[str, str]) -> str:
        return re.sub(
            r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), m.group(0)), text
        )

    for instr, args in instructions:
        if instr == "ARG" and not stages:
            name, _, default = args.partition("=")
            global_args[name] = (build_args or {}).get(name, default)
        elif instr == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(
                {
                    "base": expand(parts[0], global_args),
                    "raw_base": parts[0],
                    "name": name,
                    "args": dict(global_args),
                    "copies": [],
                    "runs": [],
                    "user": None,
                    "workdir": None,
                    "copy_before_run": [],
                }
            )
        elif not stages:
            continue
        elif instr == "ARG":
            name, _, default = args.partition("=")
            if default:
                stages[-1]["args"][name] = default
        elif instr == "COPY":
            tokens = [t for t in shlex.split(args) if not t.startswith("--")]
            if not any(t.startswith("--from") for t in shlex.split(args)):
                stages[-1]["copies"].extend(tokens[:-1])
        elif instr == "RUN":
            stages[-1]["runs"].append(expand(args, stages[-1]["args"]))
            stages[-1]["copy_before_run"].append(list(stages[-1]["copies"]))
        elif instr == "USER":
            stages[-1]["user"] = args.split(":")[0]
        elif instr == "WORKDIR":
            stages[-1]["workdir"] = args
    stages[-1]["global_args"] = global_args
    return stages


def ray_stage(build_args: dict[str, str] | None = None) -> dict:
    stages = dockerfile_stages(build_args)
    # The default target (the last stage) is the Ray node image.
    stage = stages[-1]
    assert "rayproject/ray" in stage["base"], (
        f"the default target must be the Ray image, got {stage['base']}"
    )
    return stage


# ---- secrets


SENSITIVE_NAME = re.compile(
    r"(PASSWORD|PASSWD|SECRET_ACCESS_KEY|SECRET_KEY|ACCESS_KEY_ID|SESSION_TOKEN|AUTH_TOKEN|API_KEY|PRIVATE_KEY|(^|_)TOKEN$)",
    re.IGNORECASE,
)
REFERENCE = re.compile(
    r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?][^}]*)?\}$|^\$\([A-Za-z_][A-Za-z0-9_]*\)$"
)
AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])")
URI_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@$]+:[^/\s@$]+@", re.IGNORECASE)
AWS_SECRET_LITERAL = re.compile(
    r"aws_secret_access_key\s*[:=]\s*['\"]?(?!\$)[A-Za-z0-9/+=]{8,}", re.IGNORECASE
)
PASSWORD_LITERAL = re.compile(
    r"^\s*-?\s*[\"']?[A-Za-z_]*password[\"']?\s*[:=]\s*(?P<value>\S.*)$",
    re.IGNORECASE | re.MULTILINE,
)


def is_reference(value: Any) -> bool:
    return value is None or (
        isinstance(value, str) and (value == "" or REFERENCE.match(value.strip()) is not None)
    )


def secret_findings_in_text(text: str) -> list[str]:
    findings = []
    if AWS_KEY_ID.search(text):
        findings.append("an AWS access key id (AKIA/ASIA...)")
    if AWS_SECRET_LITERAL.search(text):
        findings.append("a literal aws_secret_access_key")
    for m in URI_WITH_PASSWORD.finditer(text):
        findings.append(f"a URI with an embedded password: {m.group(0)}")
    for m in PASSWORD_LITERAL.finditer(text):
        value = m.group("value").split(" #")[0].strip().strip("'\"")
        if value and not is_reference(value) and not value.startswith(("{", "valueFrom")):
            findings.append(f"a literal password value: {m.group(0).strip()}")
    return findings


def secret_findings_in_yaml(doc: Any) -> list[str]:
    findings = []
    if (
        isinstance(doc, dict)
        and doc.get("kind") == "Secret"
        and (doc.get("data") or doc.get("stringData"))
    ):
        findings.append(
            f"a Kubernetes Secret with inline data: {doc.get('metadata', {}).get('name')}"
        )
    for path, key, value in walk(doc):
        # Kubernetes env entries: {name: X, value: literal}
        if key == "name" and isinstance(value, str) and SENSITIVE_NAME.search(value):
            parent = _lookup(doc, path)
            if isinstance(parent, dict) and "value" in parent and not is_reference(parent["value"]):
                findings.append(f"{path}: env {value} has a literal value")
        # mapping form: POSTGRES_PASSWORD: literal / password: literal
        elif (
            isinstance(key, str)
            and SENSITIVE_NAME.search(key)
            and isinstance(value, str | int | float)
        ):
            if not is_reference(str(value)):
                findings.append(f"{path}.{key} has a literal value")
        # compose list form: - AWS_SECRET_ACCESS_KEY=literal
        if isinstance(value, list):
            for item in value:
                if isinstance(item, str) and "=" in item:
                    name, _, val = item.partition("=")
                    if SENSITIVE_NAME.search(name) and not is_reference(val):
                        findings.append(f"{path}.{key}: {name} has a literal value")
    return findings


def _lookup(doc: Any, path: str) -> Any:
    obj = doc
    for part in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        obj = obj[part[0]] if part[0] else obj[int(part[1])]
    return obj


# ----------------------------------------------------------------------------- files and YAML


def test_expected_infra_files_exist():
    missing = [str(p.relative_to(REPO)) for p in EXPECTED_FILES if not p.is_file()]
    assert not missing, f"missing infra files: {missing}"


@pytest.mark.parametrize(
    "path", sorted(INFRA.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(INFRA))
)
def test_every_yaml_parses(path):
    assert load_docs(path)


def test_infra_readme_names_every_file_and_only_existing_ones():
    readme = (INFRA / "README.md").read_text()
    for path in EXPECTED_FILES:
        rel = str(path.relative_to(INFRA))
        assert rel in readme or f"infra/{rel}" in readme, f"infra/README.md does not mention {rel}"
    for mentioned in set(re.findall(r"infra/[A-Za-z0-9_./-]+\.(?:ya?ml|md|Dockerfile)", readme)):
        assert (REPO / mentioned).is_file(), (
            f"infra/README.md names {mentioned}, which does not exist"
        )
    for command in (
        "ray job submit --address http://",
        "ray up -y infra/aws/cluster.yaml",
        "kubectl apply -f infra/mlflow/mlflow-server.yaml",
        "kubectl -n pose2seg apply -f infra/kuberay/rayjob-train.yaml",
        "python workflows/train.py --config configs/cocopersons.yaml",
    ):
        assert command in readme, f"infra/README.md lacks the command {command!r}"


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads(path):
    from pose2seg.config import load_config

    load_config(str(path))


@pytest.mark.parametrize("name", sorted(CLUSTER_CONFIGS))
def test_cluster_configs_use_s3_and_a_tracking_server(name):
    cfg = load_cluster_config(name)
    assert cfg.data.root.startswith("s3://"), (
        f"{name}: data.root must be s3://, got {cfg.data.root}"
    )
    assert cfg.data.processed.startswith("s3://"), f"{name}: data.processed must be s3://"
    assert urlparse(cfg.registry.tracking_uri).scheme in ("http", "https"), (
        f"{name}: registry.tracking_uri must be a tracking server, got {cfg.registry.tracking_uri!r}"
    )
    if CLUSTER_CONFIGS[name] == "train":
        assert cfg.train.storage_path.startswith("s3://"), (
            f"{name}: train.storage_path must be s3://"
        )
        assert cfg.train.use_gpu, f"{name}: a cluster training config must set train.use_gpu"


# ----------------------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("path", KUBE_FILES, ids=lambda p: p.name)
def test_kubernetes_documents_have_apiversion_kind_and_name(path):
    for doc in load_docs(path):
        assert doc.get("apiVersion") and doc.get("kind"), (
            f"{path.name}: document without apiVersion/kind"
        )
        assert doc.get("metadata", {}).get("name"), (
            f"{path.name}: {doc['kind']} without metadata.name"
        )
        if doc["kind"] in ("RayCluster", "RayJob", "RayService"):
            assert doc["apiVersion"] == "ray.io/v1", f"{path.name}: {doc['kind']} must be ray.io/v1"


def test_raycluster_and_rayjobs_are_present():
    kinds = [d["kind"] for d in load_docs(RAYCLUSTER)]
    assert "RayCluster" in kinds
    for path in RAYJOBS.values():
        job = [d for d in load_docs(path) if d["kind"] == "RayJob"]
        assert len(job) == 1, f"{path.name} must hold one RayJob"
        spec = job[0]["spec"]
        assert "rayClusterSpec" in spec or "clusterSelector" in spec, f"{path.name}: no cluster"
    assert len(ray_cluster_specs()) == 4  # the RayCluster, two RayJobs, the RayService


@pytest.mark.parametrize("name,spec", ray_cluster_specs(), ids=[n for n, _ in ray_cluster_specs()])
def test_ray_cluster_spec(name, spec):
    import ray

    assert "rayVersion" in spec, f"{name}: rayVersion missing"
    assert major_minor(str(spec["rayVersion"])) == major_minor(ray.__version__), (
        f"{name}: rayVersion {spec['rayVersion']} != installed ray {ray.__version__}"
    )
    assert str(spec["rayVersion"]) == ray_stage()["args"]["RAY_VERSION"], (
        f"{name}: rayVersion differs from the Dockerfile's RAY_VERSION"
    )
    assert spec.get("enableInTreeAutoscaling") is True, f"{name}: autoscaling must be enabled"

    head = spec["headGroupSpec"]
    head_containers = head["template"]["spec"]["containers"]
    ports = {p["containerPort"] for c in head_containers for p in c.get("ports", [])}
    assert {6379, 8265} <= ports, (
        f"{name}: the head must expose GCS 6379 and the Jobs/dashboard port 8265"
    )
    for c in head_containers:
        assert GPU_KEY not in c.get("resources", {}).get("limits", {}), (
            f"{name}: the head should be CPU only"
        )

    groups = spec.get("workerGroupSpecs") or []
    assert groups, f"{name}: no worker group"
    for group in groups:
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        assert isinstance(lo, int) and isinstance(hi, int), (
            f"{name}/{group.get('groupName')}: min/maxReplicas"
        )
        assert 0 <= lo <= hi and hi >= 1, (
            f"{name}/{group['groupName']}: need 0 <= min <= max, max >= 1"
        )
        assert lo <= group.get("replicas", lo) <= hi, (
            f"{name}/{group['groupName']}: replicas outside bounds"
        )
        for c in group["template"]["spec"]["containers"]:
            res = c.get("resources", {})
            if GPU_KEY in res.get("requests", {}):
                assert res["requests"][GPU_KEY] == res.get("limits", {}).get(GPU_KEY), (
                    f"{name}: GPU requests must equal limits"
                )
    assert gpu_groups(spec), f"{name}: no worker group with a {GPU_KEY} limit"


@pytest.mark.parametrize("name,spec", ray_cluster_specs(), ids=[n for n, _ in ray_cluster_specs()])
def test_ray_cluster_images_match_the_dockerfile_flavours(name, spec):
    version = project_version()
    for c in spec["headGroupSpec"]["template"]["spec"]["containers"]:
        assert c["image"].endswith(f"/pose2seg-ray:{version}-{FLAVORS['cpu']}"), (
            f"{name}: head image {c['image']}"
        )
    gpu_names = {g["groupName"] for g, _ in gpu_groups(spec)}
    for group in spec["workerGroupSpecs"]:
        flavour = FLAVORS["cu128"] if group["groupName"] in gpu_names else FLAVORS["cpu"]
        for c in group["template"]["spec"]["containers"]:
            assert c["image"].endswith(f"/pose2seg-ray:{version}-{flavour}"), (
                f"{name}/{group['groupName']}: image {c['image']} should be the {flavour} build"
            )


def test_all_project_images_share_one_repository():
    images = []
    for path in [*KUBE_FILES, COMPOSE, AWS_CLUSTER]:
        for doc in load_docs(path):
            images += [i for i in images_in(doc) if "pose2seg-" in i]
    ray_repos = {i.rsplit(":", 1)[0] for i in images if "/pose2seg-ray:" in i}
    assert len(ray_repos) == 1, f"the Ray images name different repositories: {sorted(ray_repos)}"
    registries = {i.rsplit("/", 1)[0] for i in images}
    assert len(registries) == 1, (
        f"project images come from different registries: {sorted(registries)}"
    )


@pytest.mark.parametrize("name,spec", ray_cluster_specs(), ids=[n for n, _ in ray_cluster_specs()])
def test_gpu_group_can_hold_the_cluster_training_run(name, spec):
    cfg = load_cluster_config("cocopersons.yaml")
    capacity = sum(g["maxReplicas"] * gpus for g, gpus in gpu_groups(spec))
    assert capacity >= cfg.train.max_workers, (
        f"{name}: GPU groups scale to {capacity} GPUs, configs/cocopersons.yaml asks for {cfg.train.num_workers}"
    )
    for group, gpus in gpu_groups(spec):
        cpus = sum(
            quantity(c["resources"]["limits"]["cpu"])
            for c in group["template"]["spec"]["containers"]
        )
        assert cpus >= cfg.train.cpus_per_worker * gpus, (
            f"{name}/{group['groupName']}: {cpus} CPUs per pod < train.cpus_per_worker x GPUs"
        )


RAY_FILES = [RAYCLUSTER, *RAYJOBS.values(), RAYSERVICE]


@pytest.mark.parametrize("path", RAY_FILES, ids=lambda p: p.name)
def test_pods_run_as_the_irsa_service_account_defined_once(path):
    # Issue 16 (d): a ServiceAccount defined in each of the three files is deleted from under
    # the other two by `kubectl delete -f` of one of them; it lives in serviceaccount.yaml.
    docs = load_docs(path)
    assert not [d for d in docs if d["kind"] == "ServiceAccount"], (
        f"{path.name} defines a ServiceAccount: define it once, in {SERVICE_ACCOUNT.name}"
    )
    shared = {d["metadata"]["name"]: d for d in load_docs(SERVICE_ACCOUNT)}
    used = {v for _, k, v in walk(docs) if k == "serviceAccountName"}
    assert used, f"{path.name}: pods name no serviceAccountName"
    for sa in used:
        assert sa in shared, f"{path.name}: ServiceAccount {sa} is not in {SERVICE_ACCOUNT.name}"
        annotations = shared[sa]["metadata"].get("annotations", {})
        assert "eks.amazonaws.com/role-arn" in annotations, f"{sa}: no IRSA role annotation"


def test_each_service_account_is_defined_in_exactly_one_file():
    where: dict[str, list[str]] = {}
    for path in sorted(INFRA.rglob("*.yaml")):
        if path.name == "docker-compose.yaml":
            continue
        for doc in load_docs(path):
            if doc.get("kind") == "ServiceAccount":
                where.setdefault(doc["metadata"]["name"], []).append(path.name)
    assert where
    assert all(len(files) == 1 for files in where.values()), where


# KubeRay sets these labels on the pods it creates and selects on them in its own Services.
KUBERAY_OWNED_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/created-by")


def pod_templates(path: Path) -> list[tuple[str, dict]]:
    out = []
    for doc in load_docs(path):
        for where, key, value in walk(doc):
            if key == "template" and isinstance(value, dict) and "spec" in value:
                out.append((f"{path.name}{where}", value))
    return out


@pytest.mark.parametrize("path", RAY_FILES, ids=lambda p: p.name)
def test_ray_pod_templates_leave_kuberays_labels_alone(path):
    # Issue 16 (c): a head pod labelled app.kubernetes.io/name=pose2seg-ray is matched by no
    # head Service KubeRay creates (selector app.kubernetes.io/name: kuberay).
    templates = pod_templates(path)
    assert len(templates) >= 2, f"{path.name}: expected head and worker pod templates"
    for where, template in templates:
        labels = template.get("metadata", {}).get("labels", {})
        overridden = [k for k in labels if k in KUBERAY_OWNED_LABELS or k.startswith("ray.io/")]
        assert not overridden, f"{where}: pod template sets KubeRay's label(s) {overridden}"
        assert labels.get("app.kubernetes.io/part-of") == "pose2seg", where


def test_postgres_statefulset_is_governed_by_a_headless_service():
    # Issue 16 (e): StatefulSet.spec.serviceName must name a headless Service.
    docs = load_docs(POSTGRES)
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    governing = services.get(sts["spec"]["serviceName"])
    assert governing is not None, f"serviceName {sts['spec']['serviceName']} is not defined"
    assert (
        governing["spec"].get("clusterIP") == "None"
        or governing["spec"].get("clusterIP") is None
        and "clusterIP" in governing["spec"]
    ), "the governing Service must be headless"
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert governing["spec"]["selector"].items() <= pod_labels.items()
    # The MLflow server connects through a normal (ClusterIP) Service of the same pods.
    _, container = mlflow_deployment()
    backend = urlparse(option([str(a) for a in container["command"]], "--backend-store-uri"))
    client = services.get(backend.hostname)
    assert client is not None and client["spec"].get("clusterIP") not in ("None",), (
        f"the backend store host {backend.hostname} must be a ClusterIP Service"
    )


PRIVATE_HOSTS = ("10.0.3.7:5000", "172.16.0.9:5000", "172.31.255.1:5000", "192.168.1.20:5000")
PUBLIC_HOSTS = ("attacker.example:5000", "172.32.0.1:5000", "8.8.8.8:5000", "11.0.0.1:5000")


def compose_allowed_hosts() -> list[str]:
    argv = [str(a) for a in compose()["services"]["mlflow"]["command"]]
    value = option(argv, "--allowed-hosts")
    default = re.fullmatch(r"\$\{MLFLOW_ALLOWED_HOSTS:-(.*)\}", value)
    assert default, f"compose --allowed-hosts {value!r} has no default"
    return [h.strip() for h in default.group(1).split(",")]


def test_mlflow_allowed_hosts_keep_the_private_ip_ranges():
    # Issue 16 (b): --allowed-hosts replaces MLflow's defaults, so clients using a private IP
    # (the EC2 path's http://<private-ip>:5000) got "Invalid Host header".
    from mlflow.server.security_utils import is_allowed_host_header

    _, container = mlflow_deployment()
    kube = [
        h.strip()
        for h in option([str(a) for a in container["command"]], "--allowed-hosts").split(",")
    ]
    for name, allowed in (
        ("mlflow-server.yaml", kube),
        ("docker-compose.yaml", compose_allowed_hosts()),
    ):
        for host in PRIVATE_HOSTS + ("localhost:5000", "127.0.0.1:5000"):
            assert is_allowed_host_header(allowed, host), f"{name}: {host} would be rejected"
        for host in PUBLIC_HOSTS:
            assert not is_allowed_host_header(allowed, host), f"{name}: {host} would be answered"
    readme = (INFRA / "README.md").read_text()
    assert "replaces" in readme and "private IP" in readme


def test_tracking_uri_has_one_source_the_config():
    # Issue 16 (f): MLFLOW_TRACKING_URI in the manifests was ignored (registry.tracking_uri wins).
    for path in RAY_FILES:
        text = path.read_text()
        assert "MLFLOW_TRACKING_URI" not in text.split("apiVersion", 1)[1], (
            f"{path.name} sets MLFLOW_TRACKING_URI; the config's registry.tracking_uri is the source"
        )
    for name in CLUSTER_CONFIGS:
        from pose2seg.config import load_config

        assert load_config(str(REPO / "configs" / name)).registry.tracking_uri
    assert "single source" in (INFRA / "README.md").read_text()


def test_config_tracking_uri_wins_and_a_different_env_var_is_reported(monkeypatch, capsys):
    from pose2seg.config import Config
    from workflows.mlflow_tracking import resolve_tracking_uri

    config = Config().with_overrides({"registry.tracking_uri": "http://mlflow:5000"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere-for-this-test:5000")
    assert resolve_tracking_uri(config) == "http://mlflow:5000"
    assert "MLFLOW_TRACKING_URI=http://elsewhere-for-this-test:5000 is ignored" in (
        capsys.readouterr().err
    )
    assert resolve_tracking_uri(Config()) == "http://elsewhere-for-this-test:5000"


def test_gpu_image_torch_matches_its_cuda(monkeypatch):
    # Issue 16 (a): PyPI's torch 2.14.1 is a CUDA 13.0 build (driver >= 580) while the GPU image
    # is CUDA 12.8: the cu128 image installs torch from the matching PyTorch index and checks it.
    for flavour in FLAVORS:
        stage = ray_stage({"FLAVOR": flavour})
        base = stage["base"]
        run = next(r for r in stage["runs"] if "pip install" in r)
        if flavour == "cpu":
            assert base.endswith("-cpu")
            continue
        cuda = f"{flavour[2:-1]}.{flavour[-1]}"
        assert base.endswith(f"-{flavour}"), base
        assert f"https://download.pytorch.org/whl/{flavour}" in run, (
            f"the {flavour} image must install torch from PyTorch's {flavour} index"
        )
        # The torch install comes before the project's, so the project's pin keeps that build.
        assert run.index("download.pytorch.org") < run.index("-c constraints.txt .")
        # Run the build's own check against a torch of each CUDA build.
        check = re.findall(r'python -c "([^"]*torch\.version\.cuda[^"]*)"', run)[-1]
        for built_for, ok in ((cuda, True), ("13.0", False)):
            fake = types.SimpleNamespace(
                __version__="2.14.1", version=types.SimpleNamespace(cuda=built_for)
            )
            monkeypatch.setitem(sys.modules, "torch", fake)
            with pytest.raises(SystemExit) as exit_info:
                exec(check + "\nsys.exit(0)", {})
            code = exit_info.value.code
            assert (code in (0, None)) == ok, (
                f"{flavour} image with torch for CUDA {built_for}: {code}"
            )
            if not ok:
                assert "CUDA 13.0" in str(code) and f"needs CUDA {cuda}" in str(code)
    docs = (INFRA / "docker" / "README.md").read_text()
    assert "driver >= 570" in docs and "driver >= 580" in docs


@pytest.mark.parametrize("step", sorted(RAYJOBS))
def test_rayjob_entrypoint_and_runtime_env(step):
    job = rayjob(step)
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", f"workflows/{step}.py"], f"entrypoint {spec['entrypoint']!r}"
    assert "--config" in argv, "the entrypoint must name a config"
    config = argv[argv.index("--config") + 1]
    assert config == "configs/cocopersons.yaml"
    if (REPO / config).is_file():
        from pose2seg.config import load_config

        load_config(str(REPO / config))

    assert spec.get("shutdownAfterJobFinishes") is True, (
        "the job's cluster must be deleted when it ends"
    )
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    env_vars = runtime_env.get("env_vars")
    assert isinstance(env_vars, dict) and env_vars, "runtimeEnvYAML must set env_vars"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()), (
        "runtime env_vars must be strings (quote numbers)"
    )
    # The job runs from the directory the image holds the code in, with the configs copied there.
    stage = ray_stage()
    assert runtime_env.get("working_dir") == stage["workdir"], (
        "working_dir must be the image's WORKDIR"
    )
    copied = {Path(s).parts[0] for s in stage["copies"]}
    assert {"workflows", "configs"} <= copied, "the image must contain workflows/ and configs/"

    check_workflow_command(argv, f"{RAYJOBS[step].name} entrypoint")


def check_workflow_command(argv: list[str], where: str) -> None:
    """`python workflows/X.py ARGS`: the script exists, its own parser accepts ARGS, and the
    config it names loads (with its --set overrides)."""
    assert argv[0] == "python" and re.fullmatch(r"workflows/\w+\.py", argv[1]), f"{where}: {argv}"
    check_script_command(argv, where)


def readme_workflow_commands() -> list[list[str]]:
    text = (INFRA / "README.md").read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if "python workflows/" in line and "ray job submit" in line:
            commands.append(shlex.split(line[line.index("python workflows/") :]))
    return commands


def test_readme_has_workflow_commands():
    steps = {Path(argv[1]).stem for argv in readme_workflow_commands()}
    assert {"preprocess", "train", "tune", "evaluate"} <= steps, steps


@pytest.mark.parametrize("argv", readme_workflow_commands(), ids=lambda a: " ".join(a[1:3]))
def test_readme_workflow_commands_parse(argv):
    check_workflow_command(argv, "infra/README.md")


def test_rayjob_config_files_exist():
    for step in RAYJOBS:
        argv = shlex.split(rayjob(step)["spec"]["entrypoint"])
        config = argv[argv.index("--config") + 1]
        assert (REPO / config).is_file(), f"{RAYJOBS[step].name}: {config} does not exist"


# ----------------------------------------------------------------------------- RayService


def rayservice() -> dict:
    services = [d for d in load_docs(RAYSERVICE) if d.get("kind") == "RayService"]
    assert len(services) == 1, f"{RAYSERVICE.name} must hold exactly one RayService"
    return services[0]


def serve_applications() -> tuple[dict, list[dict]]:
    serve_config = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    assert isinstance(serve_config, dict), "serveConfigV2 must be a YAML mapping"
    apps = serve_config.get("applications")
    assert isinstance(apps, list) and len(apps) == 1, "serveConfigV2 must define one application"
    return serve_config, apps


def image_path_in_repo(path: str) -> Path:
    """A path inside the image (WORKDIR /home/ray/pose2seg) -> the same file in this checkout."""
    workdir = ray_stage()["workdir"]
    assert path.startswith(workdir + "/"), f"{path} is not under the image's WORKDIR {workdir}"
    return REPO / path[len(workdir) + 1 :]


def test_rayservice_serve_config_passes_serves_schema():
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed")
    from ray.serve.schema import ServeDeploySchema

    serve_config, _ = serve_applications()
    ServeDeploySchema.model_validate(serve_config)


def test_rayservice_application_builds_from_the_shipped_config():
    """The import path resolves, its args load a shipped config, and the app is built offline
    with the deployment options those keys give (GPU replicas, autoscaling)."""
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed")
    import importlib

    from pose2seg.config import load_config
    from workflows.serve_app import deployment_options

    serve_config, (app,) = serve_applications()
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder)
    args = dict(app["args"])
    config_file = image_path_in_repo(args["config"])
    assert config_file.is_file(), f"{args['config']} is not in the image (configs/ is copied)"
    assert {"configs"} <= {Path(s).parts[0] for s in ray_stage()["copies"]}
    config = load_config(str(config_file), args.get("set", []))
    assert args["model"] == f"models:/{config.registry.model_name}@{config.registry.alias}"
    # The proxy the application's keys describe is the one the Serve config starts.
    http = serve_config["http_options"]
    assert (
        (config.serve.host, config.serve.port) == (http["host"], http["port"]) == ("0.0.0.0", 8000)
    )
    assert config.serve.app_name == app["name"] and config.serve.route_prefix == app["route_prefix"]
    options = deployment_options(config)
    assert options["ray_actor_options"]["num_gpus"] == 1
    assert options["autoscaling_config"]["max_replicas"] >= 2

    built = builder({**args, "config": str(config_file)})
    assert type(built).__name__ == "Application"


def test_rayservice_cluster_fits_the_replicas():
    _, (app,) = serve_applications()
    spec = rayservice()["spec"]["rayClusterConfig"]
    from pose2seg.config import load_config

    config = load_config(str(image_path_in_repo(app["args"]["config"])), app["args"]["set"])
    ports = {
        p["containerPort"]
        for c in spec["headGroupSpec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
    }
    assert config.serve.port in ports, "the head must expose the Serve HTTP port"
    groups = gpu_groups(spec)
    gpus = sum(g["maxReplicas"] * n for g, n in groups)
    assert gpus >= config.serve.max_replicas, (
        f"GPU groups reach {gpus} GPUs < serve.max_replicas {config.serve.max_replicas}"
    )
    for group, n in groups:
        cpus = sum(
            quantity(c["resources"]["limits"]["cpu"])
            for c in group["template"]["spec"]["containers"]
        )
        assert cpus >= config.serve.cpus_per_replica * n, f"{group['groupName']}: too few CPUs"
    # The minimum replicas must find GPUs without waiting for the autoscaler.
    floor = sum(g.get("minReplicas", 0) * n for g, n in groups)
    assert floor >= config.serve.num_replicas, (
        f"GPU groups keep {floor} GPUs < serve.num_replicas {config.serve.num_replicas}"
    )


# ----------------------------------------------------------------------------- MLflow server


def mlflow_deployment() -> tuple[dict, dict]:
    docs = load_docs(MLFLOW_SERVER)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return deployment, container


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def test_mlflow_server_command():
    _, container = mlflow_deployment()
    argv = [str(a) for a in container.get("command", []) + container.get("args", [])]
    assert argv[:2] == ["mlflow", "server"]
    backend = urlparse(option(argv, "--backend-store-uri"))
    assert backend.scheme.startswith("postgresql") and backend.password is None, (
        "the backend URI must be postgres and carry no password (PGPASSWORD from a Secret)"
    )
    assert option(argv, "--artifacts-destination").startswith("s3://")
    assert "--serve-artifacts" in argv
    assert option(argv, "--workers") == "1"
    assert option(argv, "--host") == "0.0.0.0"
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    assert "secretKeyRef" in env["PGPASSWORD"]["valueFrom"]

    # The database host and port are the postgres Service's, the password the same Secret key.
    pg_docs = load_docs(POSTGRES)
    pg_service = next(d for d in pg_docs if d["kind"] == "Service")
    assert backend.hostname == pg_service["metadata"]["name"]
    assert (backend.port or 5432) in {p["port"] for p in pg_service["spec"]["ports"]}
    pg_set = next(d for d in pg_docs if d["kind"] == "StatefulSet")
    pg_env = {e["name"]: e for e in pg_set["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (
        pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
        == env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    )
    assert backend.username == pg_env["POSTGRES_USER"]["value"]
    assert backend.path.lstrip("/") == pg_env["POSTGRES_DB"]["value"]
    assert pg_set["spec"].get("volumeClaimTemplates"), "postgres needs a persistent volume"


def test_mlflow_server_probes_and_service():
    deployment, container = mlflow_deployment()
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health"
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert probe["port"] in ports or probe["port"] in ports.values()
    service = next(d for d in load_docs(MLFLOW_SERVER) if d["kind"] == "Service")
    selector = service["spec"]["selector"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items(), "the Service does not select the MLflow pods"
    target = service["spec"]["ports"][0]["targetPort"]
    assert target in ports or target in ports.values()


def tracking_uris() -> dict[str, str]:
    """Every MLflow URI the Ray side uses: cluster configs, pod env, RayJob runtime env."""
    uris = {}
    for name in CLUSTER_CONFIGS:
        path = REPO / "configs" / name
        if path.is_file():
            from pose2seg.config import load_config

            uris[f"configs/{name}"] = load_config(str(path)).registry.tracking_uri
    for path in [RAYCLUSTER, *RAYJOBS.values(), RAYSERVICE]:
        for doc in load_docs(path):
            for where, key, value in walk(doc):
                if key == "env" and isinstance(value, list):
                    for e in value:
                        if e.get("name") == "MLFLOW_TRACKING_URI":
                            uris[f"{path.name}{where}"] = e["value"]
            if doc["kind"] == "RayJob":
                env_vars = yaml.safe_load(doc["spec"]["runtimeEnvYAML"]).get("env_vars", {})
                if "MLFLOW_TRACKING_URI" in env_vars:
                    uris[f"{path.name}:runtimeEnvYAML"] = env_vars["MLFLOW_TRACKING_URI"]
            if doc["kind"] == "RayService":
                for app in yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]:
                    env_vars = app.get("runtime_env", {}).get("env_vars", {})
                    if "MLFLOW_TRACKING_URI" in env_vars:
                        uris[f"{path.name}:{app['name']}"] = env_vars["MLFLOW_TRACKING_URI"]
    return uris


def test_tracking_uris_reach_the_mlflow_service_and_pass_its_host_check():
    from mlflow.server.security_utils import is_allowed_host_header

    uris = tracking_uris()
    assert uris
    service = next(d for d in load_docs(MLFLOW_SERVER) if d["kind"] == "Service")
    svc, ns = service["metadata"]["name"], service["metadata"]["namespace"]
    port = service["spec"]["ports"][0]["port"]
    _, container = mlflow_deployment()
    argv = [str(a) for a in container["command"]]
    allowed = [h.strip() for h in option(argv, "--allowed-hosts").split(",")]
    for where, uri in uris.items():
        parsed = urlparse(uri)
        labels = parsed.hostname.split(".")
        assert labels[0] == svc and (len(labels) == 1 or labels[1] == ns), (
            f"{where}: {uri} does not name the Service {svc} in namespace {ns}"
        )
        assert parsed.port == port, f"{where}: {uri} does not use the Service port {port}"
        # MLflow 3 answers 403 to Host headers outside --allowed-hosts.
        assert is_allowed_host_header(allowed, parsed.netloc), (
            f"{where}: Host {parsed.netloc} would be rejected"
        )
    assert not is_allowed_host_header(allowed, "attacker.example:5000"), (
        "--allowed-hosts must not be a wildcard"
    )


# ----------------------------------------------------------------------------- docker compose


def compose() -> dict:
    return load_docs(COMPOSE)[0]


def compose_env(service: dict) -> dict[str, str | None]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return {
            item.partition("=")[0]: (item.partition("=")[2] if "=" in item else None)
            for item in env
        }
    return dict(env)


def test_compose_services_and_dependencies_are_consistent():
    services = compose()["services"]
    assert {"postgres", "mlflow"} <= services.keys()
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), f"{name}: neither image nor build"
        deps = svc.get("depends_on", {})
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on unknown service {dep}"
            dep_profiles = services[dep].get("profiles")
            if dep_profiles and not set(dep_profiles) <= set(svc.get("profiles", [])):
                assert isinstance(deps, dict) and deps[dep].get("required") is False, (
                    f"{name} needs {dep}, which only runs with profile {dep_profiles}: mark it required: false"
                )
    volumes = set(compose().get("volumes", {}) or {})
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in volumes, f"{name}: named volume {source} is not declared"


def test_compose_mlflow_server_matches_the_kubernetes_one():
    services = compose()["services"]
    mlflow = services["mlflow"]
    argv = [str(a) for a in mlflow["command"]]
    assert argv[:2] == ["mlflow", "server"]
    backend = urlparse(option(argv, "--backend-store-uri"))
    assert backend.hostname in services, f"backend host {backend.hostname} is not a compose service"
    assert backend.password is None
    assert option(argv, "--workers") == "1"
    assert "--serve-artifacts" in argv
    assert REFERENCE.match(option(argv, "--artifacts-destination")), (
        "the artifact bucket must come from ${VAR}"
    )
    env = compose_env(mlflow)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    # The server's PGPASSWORD and postgres' POSTGRES_PASSWORD are the same variable.
    var = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
    pg_env = compose_env(services["postgres"])
    assert var.match(env["PGPASSWORD"]).group(1) == var.match(pg_env["POSTGRES_PASSWORD"]).group(1)
    assert (
        backend.username == pg_env["POSTGRES_USER"]
        and backend.path.lstrip("/") == pg_env["POSTGRES_DB"]
    )

    # Same images as the Kubernetes manifests, built from this repo's Dockerfile target.
    _, k8s_container = mlflow_deployment()
    assert mlflow["image"] == k8s_container["image"]
    pg_k8s = next(d for d in load_docs(POSTGRES) if d["kind"] == "StatefulSet")
    assert (
        services["postgres"]["image"]
        == pg_k8s["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    build = mlflow["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == REPO
    assert (REPO / build["dockerfile"]).resolve() == DOCKERFILE
    assert build["target"] in {s["name"] for s in dockerfile_stages()}
    mlflow_version = next(s for s in dockerfile_stages() if s["name"] == build["target"])["args"][
        "MLFLOW_VERSION"
    ]
    assert mlflow["image"].endswith(f":{mlflow_version}"), (
        "the mlflow image tag must be its MLflow version"
    )


def test_compose_variables_are_documented_in_its_header():
    text = COMPOSE.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    passthrough = {
        name
        for svc in compose()["services"].values()
        for name, value in compose_env(svc).items()
        if value is None
    }
    for name in used | passthrough:
        assert name in header, (
            f"{name} is used by docker-compose.yaml but not documented in its header"
        )


# ----------------------------------------------------------------------------- Dockerfile


def test_dockerfile_base_images_are_pinned():
    for flavour in FLAVORS:
        for stage in dockerfile_stages({"FLAVOR": flavour}):
            base = stage["base"]
            assert "$" not in base, f"unexpanded build arg in FROM {stage['raw_base']}"
            if "@sha256:" in base:
                continue
            name, _, tag = base.rpartition(":")
            assert name and "/" not in tag, f"FROM {base} has no tag"
            assert tag != "latest" and re.search(r"\d+\.\d+", tag), (
                f"FROM {base} is not pinned to a version"
            )


def test_dockerfile_flavours_select_cpu_and_cuda_bases():
    import ray

    cpu = ray_stage({"FLAVOR": "cpu"})["base"]
    gpu = ray_stage({"FLAVOR": "cu128"})["base"]
    assert cpu != gpu
    assert cpu.endswith("-cpu") and re.search(r"-cu\d+$", gpu)
    assert ray_stage()["base"] == cpu, "the default FLAVOR must be the CPU image"
    for base in (cpu, gpu):
        assert f":{ray.__version__}-" in base, (
            f"{base} does not carry the installed Ray {ray.__version__}"
        )
        python_tag = re.search(r"-py(\d)(\d+)-", base)
        assert python_tag, f"{base} names no Python version"
        spec = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
        assert spec == ">=3.11" and (int(python_tag.group(1)), int(python_tag.group(2))) >= (3, 11)


def test_dockerfile_ray_version_satisfies_pyproject():
    from packaging.specifiers import SpecifierSet

    version = ray_stage()["args"]["RAY_VERSION"]
    assert version in SpecifierSet(pyproject_spec("ray")), (
        f"RAY_VERSION {version} vs pyproject {pyproject_spec('ray')}"
    )


def test_dockerfile_installs_the_project_with_the_constraints():
    stage = ray_stage()
    installs = [(i, r) for i, r in enumerate(stage["runs"]) if "pip install" in r]
    assert installs, "the Ray image does not pip install anything"
    index, run = next(
        (i, r)
        for i, r in installs
        if re.search(r"pip install\b.*\s-c\s+constraints\.txt\b.*\s\.(\s|$)", r)
    )
    copied_before = stage["copy_before_run"][index]
    for needed in ("pyproject.toml", "constraints.txt", "pose2seg", "preprocessing", "workflows"):
        assert any(Path(src).parts[0] == needed for src in copied_before), (
            f"{needed} is not copied before {run!r}"
        )
    # What the constraints pin is what the tests run with.
    constraints = (REPO / "constraints.txt").read_text()
    assert re.search(r"^torch==\S+", constraints, re.M) and re.search(
        r"^torchvision==\S+", constraints, re.M
    )


def test_dockerfile_copy_sources_exist():
    for stage in dockerfile_stages():
        for src in stage["copies"]:
            assert (REPO / src).exists(), (
                f"the Dockerfile copies {src}, which is not in the repository"
            )


def test_dockerfile_stages_run_as_non_root():
    for stage in dockerfile_stages():
        assert stage["user"] not in (None, "root", "0"), (
            f"stage {stage['name']} runs as {stage['user']!r}"
        )
    assert ray_stage()["workdir"] == "/home/ray/pose2seg"


def test_dockerfile_mlflow_version_matches_the_tested_one():
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet

    stage = next(s for s in dockerfile_stages() if s["name"] == "mlflow-server")
    pinned = stage["args"]["MLFLOW_VERSION"]
    assert pinned in SpecifierSet(pyproject_spec("mlflow"))
    assert major_minor(pinned) == major_minor(version("mlflow")), (
        "server and client MLflow minor versions differ"
    )
    assert any("psycopg2" in r and "mlflow==" in r for r in stage["runs"]), (
        "the server image needs psycopg2"
    )


def test_docker_readme_builds_every_flavour_with_the_manifest_tags():
    readme = (INFRA / "docker" / "README.md").read_text()
    for flavour, suffix in FLAVORS.items():
        assert re.search(
            rf"--build-arg FLAVOR={flavour}\s+-t \S+/pose2seg-ray:\S+-{suffix}\b", readme
        ), flavour
    assert "--target mlflow-server" in readme


# ----------------------------------------------------------------------------- AWS cluster launcher


def aws_config() -> dict:
    return load_docs(AWS_CLUSTER)[0]


def test_aws_cluster_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(aws_config())))


def test_aws_cluster_head_and_gpu_workers():
    cfg = aws_config()
    assert cfg["provider"]["type"] == "aws" and cfg["provider"].get("region")
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types
    assert types[head].get("resources", {}).get("GPU", 0) == 0, "the head should be a CPU instance"
    assert not re.match(r"^(g|p)\d", types[head]["node_config"]["InstanceType"]), (
        "the head is a GPU instance"
    )
    workers = {name: t for name, t in types.items() if name != head}
    gpu_workers = {
        name: t for name, t in workers.items() if t.get("resources", {}).get("GPU", 0) > 0
    }
    assert gpu_workers, "no GPU worker type"
    for name, t in gpu_workers.items():
        assert re.match(r"^(g|p)\d", t["node_config"]["InstanceType"]), (
            f"{name}: not a GPU instance type"
        )
    for name, t in workers.items():
        lo, hi = t.get("min_workers", 0), t.get("max_workers")
        assert isinstance(hi, int) and 0 <= lo <= hi <= cfg["max_workers"], (
            f"{name}: bad min/max_workers"
        )
    for name, t in types.items():
        assert "IamInstanceProfile" in t["node_config"], (
            f"{name}: S3 access must come from an instance profile"
        )

    train = load_cluster_config("cocopersons.yaml").train
    capacity = max(t["max_workers"] * t["resources"]["GPU"] for t in gpu_workers.values())
    assert capacity >= train.num_workers, f"GPU workers reach {capacity} GPUs < train.num_workers"


def test_aws_cluster_installs_the_project_in_the_dockerfile_bases():
    cfg = aws_config()
    assert any(
        re.search(r"pip install\b.*\s-c\s+constraints\.txt\b.*\s\.(\s|$)", c)
        for c in cfg["setup_commands"]
    )
    mounts = cfg["file_mounts"]
    assert "." in mounts.values(), "the repository must be synced to the nodes"
    remote = next(k for k, v in mounts.items() if v == ".")
    assert any(remote in c for c in cfg["setup_commands"]), (
        "setup_commands do not install the synced repo"
    )
    docker = cfg.get("docker")
    if docker:
        version = project_version()
        allowed_head = {ray_stage({"FLAVOR": "cpu"})["base"]} | {
            i for i in [docker.get("image")] if i
        }
        allowed_worker = {ray_stage({"FLAVOR": "cu128"})["base"]} | {
            i for i in [docker.get("image")] if i
        }
        head = docker.get("head_image", docker.get("image"))
        worker = docker.get("worker_image", docker.get("image"))
        assert head in allowed_head or head.endswith(f"/pose2seg-ray:{version}-cpu"), head
        assert worker in allowed_worker or worker.endswith(f"/pose2seg-ray:{version}-gpu"), worker


# ----------------------------------------------------------------------------- secrets


def infra_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file())


@pytest.mark.parametrize("path", infra_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_no_literal_secrets_under_infra(path):
    text = path.read_text()
    findings = secret_findings_in_text(text)
    if path.suffix in (".yaml", ".yml"):
        for doc in yaml.safe_load_all(text):
            findings += secret_findings_in_yaml(doc)
    assert not findings, f"{path.relative_to(REPO)}: {findings}"


def test_credentials_in_manifests_are_references():
    refs = 0
    for path in KUBE_FILES:
        for doc in load_docs(path):
            for _, key, value in walk(doc):
                if key == "name" and isinstance(value, str) and SENSITIVE_NAME.search(value):
                    refs += 1
                if key == "secretKeyRef":
                    assert set(value) >= {"name", "key"}
                    refs += 1
    assert refs >= 3, "the manifests should take the database password from Secrets"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("env:\n  - name: DB_PASSWORD\n    value: hunter2\n", True),
        ("environment:\n  POSTGRES_PASSWORD: hunter2\n", True),
        ("environment:\n  - AWS_SECRET_ACCESS_KEY=abc123abc123\n", True),
        ("key: AKIAABCDEFGHIJKLMNOP\n", True),
        ("cmd: postgresql://mlflow:hunter2@db:5432/mlflow\n", True),
        (
            "apiVersion: v1\nkind: Secret\nmetadata: {name: x}\nstringData: {auth_token: abc}\n",
            True,
        ),
        ("environment:\n  POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}\n", False),
        ("environment:\n  - AWS_SECRET_ACCESS_KEY\n  - PGPASSWORD=${POSTGRES_PASSWORD}\n", False),
        (
            "env:\n  - name: PGPASSWORD\n    valueFrom: {secretKeyRef: {name: pg, key: password}}\n",
            False,
        ),
        ("cmd: postgresql://mlflow@db:5432/mlflow\nsecretName: pose2seg-ray-token\n", False),
    ],
)
def test_secret_scanner_catches_literals_and_accepts_references(text, expected):
    findings = secret_findings_in_text(text)
    for doc in yaml.safe_load_all(text):
        findings += secret_findings_in_yaml(doc)
    assert bool(findings) is expected, findings


def _entrypoint_config(step: str):
    from pose2seg.config import load_config
    from workflows.train import build_parser

    argv = shlex.split(rayjob(step)["spec"]["entrypoint"])
    args = build_parser().parse_args(argv[2:])
    if not (REPO / args.config).is_file():
        pytest.skip(f"{args.config} is not written yet")
    return load_config(str(REPO / args.config), args.overrides)


def test_train_rayjob_shows_the_elastic_range_in_its_gpu_group():
    """The train job's elastic train.num_workers [min, max] is its GPU group's
    minReplicas..maxReplicas (one worker per GPU), and the start-time resource check is off
    (the autoscaler adds the GPU nodes after the job starts)."""
    cfg = _entrypoint_config("train")
    assert cfg.train.elastic, "the train RayJob must run an elastic range"
    (group, gpus), *_ = gpu_groups(rayjob("train")["spec"]["rayClusterSpec"])
    assert gpus == 1
    assert (group["minReplicas"], group["maxReplicas"]) == (
        cfg.train.min_workers,
        cfg.train.max_workers,
    )
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert cfg.train.check_resources is False
    assert cfg.train.max_failures >= 1, "a lost spot node must be survivable"
    assert cfg.train.storage_path.startswith("s3://"), "checkpoints every node sees"
