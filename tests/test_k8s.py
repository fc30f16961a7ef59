"""KubeRay manifests (k8s/), the Dockerfile and the RayService's serve config: fast, no cluster, no Docker."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from k8s import render

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
CRDS = ROOT.parent / "shared" / "kuberay-crds"
MANIFESTS = {
    "raycluster.yaml": "RayCluster",
    "rayjob-caption.yaml": "RayJob",
    "rayjob-distill.yaml": "RayJob",
    "rayservice.yaml": "RayService",
}
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
WORKDIR = "/home/ray/specvlm"  # the Dockerfile's WORKDIR: the repo root inside the image


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def closed(schema):
    """``schema`` with ``additionalProperties: false`` on every object schema that lists ``properties`` and neither
    preserves unknown fields nor says what extra properties may be: an unknown (e.g. misspelt) field is an error,
    as the API server's structural-schema pruning would silently drop it."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: closed(v) if k in ("items", "additionalProperties", "not") or k.endswith("Of") else v
        for k, v in schema.items()
    }
    if "properties" in schema:
        out["properties"] = {k: closed(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            out["additionalProperties"] = False
    return out


def crd_schema(kind: str) -> dict:
    path = CRDS / CRD_FILES[kind]
    if not path.exists():
        pytest.skip(f"{path} not found (the KubeRay v1.7.0 CRDs live in shared/kuberay-crds/)")
    crd = yaml.safe_load(path.read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return closed(version["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_validates_against_crd(name):
    doc = load(name)
    kind = MANIFESTS[name]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    schema = crd_schema(kind)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_closed_schema_rejects_unknown_fields():
    schema = crd_schema("RayJob")
    doc = load("rayjob-caption.yaml")
    bad = copy.deepcopy(doc)
    bad["spec"]["shutdownAfterJobFinish"] = True  # misspelt
    assert not jsonschema.Draft7Validator(schema).is_valid(bad)
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert not jsonschema.Draft7Validator(schema).is_valid(bad)


def cluster_specs() -> dict[str, dict]:
    return {
        "raycluster.yaml": load("raycluster.yaml")["spec"],
        "rayjob-caption.yaml": load("rayjob-caption.yaml")["spec"]["rayClusterSpec"],
        "rayjob-distill.yaml": load("rayjob-distill.yaml")["spec"]["rayClusterSpec"],
        "rayservice.yaml": load("rayservice.yaml")["spec"]["rayClusterConfig"],
    }


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_cluster_spec(name):
    spec = cluster_specs()[name]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    gpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert len(gpu) == 1
    (gpu,) = gpu
    assert 0 <= gpu["minReplicas"] <= gpu["maxReplicas"]
    for c in gpu["template"]["spec"]["containers"]:
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
    for c in containers(spec):
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_USAGE_STATS_ENABLED"]["value"] == "0"
        assert env["SPECVLM_HOME"]["value"] in {m["mountPath"] for m in c["volumeMounts"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            ref = env[key]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "specvlm-s3" and ref["key"] == key
        assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_jobs_embed_the_raycluster_spec():
    specs = cluster_specs()
    assert specs["rayjob-caption.yaml"] == specs["raycluster.yaml"]
    base = specs["raycluster.yaml"]
    for name in ("rayjob-distill.yaml", "rayservice.yaml"):
        assert specs[name]["headGroupSpec"]["rayStartParams"] == base["headGroupSpec"]["rayStartParams"]
        assert specs[name]["rayVersion"] == base["rayVersion"]


def test_one_image_everywhere():
    images = {c["image"] for spec in cluster_specs().values() for c in containers(spec)}
    assert len(images) == 1, images


def entrypoint(name: str) -> list[str]:
    """The ``python -m ...`` command of a RayJob entrypoint (after an optional ``cd WORKDIR &&``)."""
    text = load(name)["spec"]["entrypoint"]
    parts = [shlex.split(p) for p in text.split("&&")]
    for part in parts[:-1]:
        assert part == ["cd", WORKDIR], f"{name}: unexpected entrypoint prefix {part}"
    return parts[-1]


@pytest.mark.parametrize(
    "name,module", [("rayjob-caption.yaml", "pipelines.caption"), ("rayjob-distill.yaml", "pipelines.distill")]
)
def test_rayjob_entrypoint(name, module):
    argv = entrypoint(name)
    assert argv[:3] == ["python", "-m", module]
    assert importlib.util.find_spec(argv[2]) is not None
    config = argv[argv.index("--config") + 1]
    assert not Path(config).is_absolute() and (ROOT / config).is_file(), config
    spec = load(name)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["backoffLimit"] >= 1
    # the module imports (find_spec alone would accept a broken one)
    importlib.import_module(module)
    if module == "pipelines.caption":
        assert all(a.startswith("s3://") for a in (argv[argv.index("--input") + 1], argv[argv.index("--output") + 1]))


def test_distill_output_is_on_a_shared_volume():
    argv = entrypoint("rayjob-distill.yaml")
    output = argv[argv.index("--output") + 1]
    spec = cluster_specs()["rayjob-distill.yaml"]
    for c in containers(spec):
        assert any(output.startswith(m["mountPath"] + "/") for m in c["volumeMounts"]), c["name"]


def service_config() -> dict:
    return yaml.safe_load(load("rayservice.yaml")["spec"]["serveConfigV2"])


def test_rayservice_is_rendered_from_configs_serve_yaml():
    text = (K8S / "rayservice.yaml").read_text()
    assert render.rewrite(text, render.serve_config()) == text, "k8s/rayservice.yaml is stale: python -m k8s.render"
    assert service_config() == render.serve_config()


def test_rayservice_differs_from_configs_serve_yaml_only_by_the_overlay():
    base = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    svc = service_config()
    assert [a["name"] for a in svc["applications"]] == [a["name"] for a in base["applications"]]
    overlay = yaml.safe_load((K8S / "serve-gpu.yaml").read_text())
    for mine, theirs in zip(svc["applications"], base["applications"]):
        assert {k: v for k, v in mine.items() if k != "args"} == {k: v for k, v in theirs.items() if k != "args"}
        assert set(mine["args"]) == set(theirs["args"]) | set(overlay["applications"][theirs["name"]]["args"])
    assert set(overlay) <= {"http_options", "applications", "proxy_location"}
    assert svc["applications"][0]["args"]["deployment"]["ray_actor_options"]["num_gpus"] == 1


def test_serve_config_v2_is_a_serve_deploy_schema_and_imports():
    from ray.serve.schema import ServeDeploySchema

    from actors.serve_config import ServeAppConfig

    raw = service_config()
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "0.0.0.0"
    for app in schema.applications:
        module, _, attr = app.import_path.partition(":") if ":" in app.import_path else app.import_path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr))
        ServeAppConfig.model_validate(app.args)


def test_merge():
    assert render.merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": None, "e": 4}, "d": [1]}) == {
        "a": {"c": 2, "e": 4},
        "d": [1],
    }
    assert render.merge({}, {"a": {"b": None, "c": 1}}) == {"a": {"c": 1}}  # a null under a new key deletes nothing


def test_dockerfile_base_image_matches_ray_requirement():
    pyproject = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"ray\[[^\]]*\]\s*(?:>=|==|~=)\s*([0-9][0-9.]*)', pyproject)
    assert m, "no ray requirement in pyproject.toml"
    version = m.group(1)
    froms = re.findall(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), flags=re.M)
    assert len(froms) == 1
    image, _, tag = froms[0].partition(":")
    assert image == "rayproject/ray" and tag.endswith("-gpu"), froms[0]
    tag_version = tag.split("-")[0]
    assert tag_version == version or tag_version.startswith(version + "."), (tag, version)
    for name in MANIFESTS:
        spec = cluster_specs()[name]
        assert spec["rayVersion"] == tag_version
