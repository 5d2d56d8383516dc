"""The shipped deployment files stay consistent with the code that runs them.

deploy/k8s/raycluster.yaml (KubeRay), deploy/Dockerfile, deploy/ray-cluster.yaml (Ray's
cluster launcher), deploy/cluster-example.yaml (the ClusterSpec all three start) and
the command blocks of docs/operations.md:

* every YAML parses; the cluster-launcher file passes Ray's own config validation;
* the KubeRay manifest has the objects and fields the deployment relies on;
* the Dockerfile's instructions parse, torch==2.13.0 is installed before the project,
  every package of pyproject.toml is copied in, and it runs as a non-root user;
* every ``pdserve ...`` command line in those files parses with the real CLI parser
  (``pdserve.deploy.cli.build_parser()``), so they name only flags the CLI accepts;
* the spec parses as a ClusterSpec whose pools fit the nodes the manifests describe.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from pdserve.deploy.cluster import ClusterSpec

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "k8s" / "raycluster.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
LAUNCHER = DEPLOY / "ray-cluster.yaml"
SPEC = DEPLOY / "cluster-example.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
SPEC_IN_IMAGE = "/opt/pdserve/deploy/cluster-example.yaml"

SUBCOMMANDS = ("up", "scale", "plan", "loadtest", "generate", "make-tiny-model")
_PDSERVE_RE = re.compile(rf"\bpdserve\s+({'|'.join(SUBCOMMANDS)})\b")
_PROGRAMS = ("ray", "kubectl", "docker", "export", "redis-server", "curl")


# ---------------------------------------------------------------------------- helpers

def pdserve_commands(text: str) -> list[list[str]]:
    """Every ``pdserve <subcommand> ...`` in a shell text, as argv after ``pdserve``.

    The text is split like a shell would (quotes, ``;``/``&&``/``|`` end a command); a
    quoted word that itself holds a pdserve command (``ray exec ... 'pdserve up ...'``)
    is split again.
    """
    if not _PDSERVE_RE.search(text):
        return []
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    found = []
    for i, tok in enumerate(tokens):
        if tok == "pdserve" and i + 1 < len(tokens) and tokens[i + 1] in SUBCOMMANDS:
            argv = []
            for t in tokens[i + 1:]:
                if t and set(t) <= set("();<>|&"):
                    break
                argv.append(t)
            found.append(argv)
        elif " " in tok and _PDSERVE_RE.search(tok):
            found += pdserve_commands(tok)
    return found


def shell_lines(text: str) -> list[str]:
    """Lines of shell, with backslash continuations joined."""
    return text.replace("\\\n", " ").splitlines()


def comment_commands(path: Path) -> list[str]:
    """Example commands written in a file's ``#`` comments (lines starting with a program)."""
    lines = [ln.strip()[1:].strip() for ln in path.read_text().splitlines() if ln.strip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [ln for ln in joined.splitlines() if ln.split(" ", 1)[0] in _PROGRAMS or _PDSERVE_RE.match(ln)]


def yaml_strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in yaml_strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in yaml_strings(v)]
    return []


def markdown_code(path: Path) -> list[str]:
    """The contents of the fenced code blocks of a Markdown file."""
    return re.findall(r"^```[^\n]*\n(.*?)^```", path.read_text(), flags=re.M | re.S)


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction; comments dropped, continuations joined."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    return out


def cli_parse(argv: list[str]):
    pytest.importorskip("pdserve.loadtest.cli", reason="pdserve's CLI is not complete yet")
    from pdserve.deploy.cli import build_parser

    parser = build_parser()

    def fail(message):
        raise AssertionError(f"`pdserve {shlex.join(argv)}` is rejected by the CLI: {message}")

    for action in parser._subparsers._group_actions:  # the subcommands' parsers exit too
        for sub in action.choices.values():
            sub.error = fail
    parser.error = fail
    return parser.parse_args(argv)


def kuberay_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(KUBERAY.read_text()) if d is not None]


def raycluster() -> dict:
    (rc,) = [d for d in kuberay_docs() if d["kind"] == "RayCluster"]
    return rc


# ---------------------------------------------------------------------------- YAML

@pytest.mark.parametrize("path", [KUBERAY, LAUNCHER, SPEC], ids=lambda p: p.name)
def test_every_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_spec_is_a_cluster_spec_with_prefill_and_decode():
    spec = ClusterSpec.from_yaml(SPEC)
    assert {p.role for p in spec.pools} == {"prefill", "decode"}
    assert spec.model == "/models/llama-3.1-8b-instruct"  # absolute: the same on every node
    assert spec.store is None  # each deployment passes --redis-url
    for pool in spec.pools:
        assert pool.resources.get("GPU", 0) > 0


def test_kuberay_objects_and_fields():
    docs = kuberay_docs()
    kinds = sorted((d["apiVersion"], d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [("apps/v1", "Deployment", "pdserve-kvpool"), ("apps/v1", "Deployment", "pdserve-redis"),
                     ("ray.io/v1", "RayCluster", "pdserve"), ("v1", "Service", "pdserve-gateway"),
                     ("v1", "Service", "pdserve-kvpool"), ("v1", "Service", "pdserve-redis")]
    rc = raycluster()
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    assert rc["spec"]["rayVersion"] == _pinned("ray")
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no worker is placed on the head
    (head_c,) = head["template"]["spec"]["containers"]
    script = head_c["args"][0]
    # KubeRay's generated `ray start` without --block, so pdserve up runs after it.
    assert "${KUBERAY_GEN_RAY_START_CMD/--block/} &&" in script
    (up,) = pdserve_commands(script)
    # The key reaches `pdserve up` as $PDSERVE_API_KEY (below), never on its command line.
    assert up[:1] == ["up"] and "--ray-address" in up and "--redis-url" in up and "--api-key" not in up
    env = {e["name"]: e for e in head_c["env"]}
    assert env["PDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "pdserve-secrets", "key": "api-key"}
    assert env["REDIS_URL"]["value"].startswith("redis://pdserve-redis:6379")
    assert 8000 in [p["containerPort"] for p in head_c["ports"]]
    (group,) = rc["spec"]["workerGroupSpecs"]
    (worker_c,) = group["template"]["spec"]["containers"]
    assert int(worker_c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert worker_c["args"] == ["ulimit -n 65536; $KUBERAY_GEN_RAY_START_CMD"]
    for c in (head_c, worker_c):
        assert c["image"] == head_c["image"]
        assert {"/models", "/dev/shm"} <= {m["mountPath"] for m in c["volumeMounts"]}
    (svc,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "pdserve-gateway"]
    assert svc["spec"]["selector"] == {"ray.io/cluster": "pdserve", "ray.io/node-type": "head"}
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(8000, 8000)]


def test_kuberay_worker_pods_hold_the_spec():
    """Every worker (a TP group, on one pod) fits one worker pod; the pods hold them all."""
    spec = ClusterSpec.from_yaml(SPEC)
    (group,) = raycluster()["spec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    pod = {"GPU": int(limits["nvidia.com/gpu"]), "CPU": int(limits["cpu"])}
    for pool in spec.pools:
        for k, v in pool.resources.items():
            assert v * pool.tp_size <= pod[k], (pool.name, k)
    for k, v in spec.total_resources().items():
        assert v <= pod[k] * group["replicas"], k


def test_cluster_launcher_config_passes_rays_validation():
    pytest.importorskip("ray", reason="the `ray` extra is not installed")
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["head_node_type"] in config["available_node_types"]
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    head_start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==2.13.0" in c)
    project_at = next(i for i, c in enumerate(setup) if "pdserve[ray,nixl,kvpool]" in c)
    assert torch_at < project_at


# ---------------------------------------------------------------------------- Dockerfile

def _pinned(name: str) -> str:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (req,) = [r for reqs in extras.values() for r in reqs if re.match(rf"{name}==", r)]
    return req.split("==", 1)[1]


def test_dockerfile_instructions_parse():
    known = {"FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "EXPOSE", "HEALTHCHECK", "CMD", "ARG", "LABEL"}
    instructions = parse_dockerfile(DOCKERFILE)
    assert {k for k, _ in instructions} <= known, instructions
    assert instructions[0] == ("FROM", "python:3.11-slim")


def test_dockerfile_installs_torch_before_the_project():
    runs = [args for k, args in parse_dockerfile(DOCKERFILE) if k == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if re.search(r"pip install torch==2\.13\.0\b", r))
    project_at = next(i for i, r in enumerate(runs) if '".[ray,nixl,kvpool]"' in r)
    assert torch_at < project_at
    assert f"ray[default]=={_pinned('ray')}" in runs[project_at]  # same Ray as the extra pins


def test_dockerfile_copies_every_package_and_runs_unprivileged():
    instructions = parse_dockerfile(DOCKERFILE)
    copied = {args.split()[0] for k, args in instructions if k == "COPY"}
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(package_dirs.values()) <= copied
    for src in copied:
        assert (ROOT / src).exists(), src
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert not copied & ignored
    keys = [k for k, _ in instructions]
    user_at = keys.index("USER")
    assert dict(instructions)["USER"] not in ("root", "0") and user_at < keys.index("CMD")
    assert ("EXPOSE", "8000") in instructions
    (cmd,) = [args for k, args in instructions if k == "CMD"]
    (up,) = pdserve_commands(cmd)
    # The key comes from $PDSERVE_API_KEY, which the command requires before starting.
    assert up[:3] == ["up", "--spec", SPEC_IN_IMAGE] and "--api-key" not in up
    assert '"${PDSERVE_API_KEY:?' in cmd


# ---------------------------------------------------------------------------- commands

def _all_commands() -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    for path in (KUBERAY, LAUNCHER, SPEC):
        texts = comment_commands(path)
        for doc in yaml.safe_load_all(path.read_text()):
            texts += yaml_strings(doc)
        found += [(path.name, argv) for t in texts for argv in pdserve_commands(t)]
    texts = comment_commands(DOCKERFILE) + [a for k, a in parse_dockerfile(DOCKERFILE) if k in ("RUN", "CMD")]
    found += [(DOCKERFILE.name, argv) for t in texts for argv in pdserve_commands(t)]
    if OPERATIONS.exists():
        found += [(OPERATIONS.name, argv) for block in markdown_code(OPERATIONS)
                  for line in shell_lines(block) for argv in pdserve_commands(line)]
    return found


def test_command_extraction_sees_quotes_and_separators():
    text = """ray exec c.yaml 'export K=1; pdserve up --port 8000 --api-key "$K"' && pdserve scale --decode 2 | tee x"""
    assert pdserve_commands(text) == [["up", "--port", "8000", "--api-key", "$K"], ["scale", "--decode", "2"]]


def test_the_manifests_name_pdserve_commands():
    files = {name for name, _ in _all_commands()}
    assert {KUBERAY.name, LAUNCHER.name, DOCKERFILE.name} <= files


def test_every_pdserve_command_parses_with_the_cli():
    commands = _all_commands()
    for name, argv in commands:
        args = cli_parse(argv)
        assert args.command == argv[0], (name, argv)
        if argv[0] == "up" and args.spec:
            assert args.spec.endswith("deploy/cluster-example.yaml"), (name, argv)


# ---------------------------------------------------------------------------- metrics

def _exported_metric_names() -> set[str]:
    """Every series the gateway and a (both-role) worker export, as Prometheus names them."""
    import dataclasses

    from prometheus_client import CollectorRegistry

    from pdserve.deploy.worker_metrics import WorkerCollector
    from pdserve.engine.engine import EngineStats
    from pdserve.proto import pdserve_pb2 as pb
    from pdserve.router.metrics import GatewayMetrics

    class Service:  # what the collector reads from a Prefill/Decode service
        transfers = pb.StatsResponse()

    worker = WorkerCollector("decode-0", "both", {"prefill": Service(), "decode": Service()})
    worker.update(EngineStats(**{f.name: 0 for f in dataclasses.fields(EngineStats)}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(worker)
    families = list(GatewayMetrics().registry.collect()) + list(registry.collect())
    return {f"{f.name}_total" if f.type == "counter" else f.name for f in families}


def test_operations_doc_lists_every_metric_exactly():
    documented = set(re.findall(r"^\| `(pdserve_[a-z0-9_]+)`", OPERATIONS.read_text(), flags=re.M))
    exported = _exported_metric_names()
    assert documented == exported, {"undocumented": exported - documented, "not exported": documented - exported}
