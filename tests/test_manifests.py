"""Every shipped manifest is loaded and validated offline: KubeRay objects against the v1.7.0
CRD schemas in ../shared/schemas/kuberay, core objects with kubernetes-validate, embedded Serve
configs and job entry points with the project's own parsers."""

import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT

SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
        "RayService": "ray.io_rayservices.yaml"}
MANIFESTS = [ROOT / "ray-cluster.yaml", *sorted((ROOT / "k8s").glob("*.yaml"))]


def _docs():
    for path in MANIFESTS:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                yield pytest.param(doc, id=f"{path.name}[{i}]:{doc['kind']}")


def _crd_schema(kind):
    if not SCHEMAS.is_dir():
        pytest.skip(f"KubeRay schemas not found at {SCHEMAS}")
    crd = yaml.safe_load((SCHEMAS / CRDS[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("doc", list(_docs()))
def test_manifest_is_valid(doc):
    if doc["kind"] in CRDS:
        assert doc["apiVersion"] == "ray.io/v1"
        jsonschema.validate(doc, _crd_schema(doc["kind"]))
    else:
        import kubernetes_validate
        kubernetes_validate.validate(doc, "1.30", strict=True)


def _cluster_specs():
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] in CRDS:
                spec = doc["spec"]
                yield doc["kind"], spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def test_clusters_use_token_auth_and_our_ray_version():
    for kind, spec in _cluster_specs():
        assert spec["authOptions"]["mode"] == "token", kind
        assert spec["rayVersion"] == "2.60.0", kind


def test_rayjob_entrypoint_parses():
    import jobs.train as train
    doc = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"]
    args = train.parse_args(argv[2:])
    assert args.workers == 2 and args.storage.startswith("s3://")
    assert (ROOT / args.config).is_file()
    # Each training worker takes all but one CPU of a worker pod: Ray gives it floor(CPUs) torch
    # threads, and the CPU left over runs Ray Data (a worker holding every CPU starves it).
    from charrnn.config import load_config
    cpus = load_config(str(ROOT / args.config), args.overrides).scaling.cpus_per_worker
    group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    pod_cpus = float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert cpus == pod_cpus - 1 and group["replicas"] >= args.workers


def test_rayservice_serve_config_is_valid():
    from ray.serve.schema import ServeDeploySchema

    from charrnn.config import serve_config_from_args
    doc = yaml.safe_load((ROOT / "k8s" / "rayservice.yaml").read_text())
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    for app in serve_cfg["applications"]:
        assert app["import_path"] == "charrnn.serve:build_app"
        serve_config_from_args(app["args"])


def test_dockerfile_installs_the_pinned_ray_and_torch():
    text = (ROOT / "Dockerfile").read_text()
    assert "rayproject/ray:2.60.0" in text and "TORCH_VERSION=2.13.0" in text
    assert Path(ROOT / ".dockerignore").read_text().count(".venv")
