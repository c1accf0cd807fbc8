"""Every shipped manifest is loaded and validated offline: KubeRay objects against the v1.7.0
CRD schemas in ../shared/schemas/kuberay, core objects with kubernetes-validate, embedded Serve
configs and job entry points with the project's own parsers."""

import functools
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from charrnn.typed import StrictLoader, load_yaml
from tests.conftest import ROOT

SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
        "RayService": "ray.io_rayservices.yaml"}
MANIFESTS = [ROOT / "ray-cluster.yaml", *sorted((ROOT / "k8s").glob("*.yaml"))]


def _docs():
    for path in MANIFESTS:
        # strict: a key given twice is an error (kubectl refuses it; PyYAML would keep the last)
        for i, doc in enumerate(yaml.load_all(path.read_text(), Loader=StrictLoader)):
            if doc:
                yield pytest.param(doc, id=f"{path.name}[{i}]:{doc['kind']}")


@functools.cache
def _crd_validator(kind):
    """The v1 schema of a KubeRay CRD (1 MB of YAML: read with libyaml when PyYAML has it)."""
    if not SCHEMAS.is_dir():
        pytest.skip(f"KubeRay schemas not found at {SCHEMAS}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((SCHEMAS / CRDS[kind]).read_text(), Loader=loader)  # noqa: S506
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    # The CRD's own schema is KubeRay's, not checked here (jsonschema.validate would spend 2 s
    # checking it against the metaschema on every call).
    return jsonschema.validators.validator_for(schema)(schema)


def _unknown_fields(doc, schema, path="$"):
    """Fields the schema does not name, which kubectl's strict field validation refuses (a CRD's
    schema leaves out `additionalProperties: false`, so jsonschema alone lets a typo through)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(doc, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for k, v in doc.items():
            if props is not None and k in props:
                yield from _unknown_fields(v, props[k], f"{path}.{k}")
            elif isinstance(extra, dict):  # a map: every value has the same schema
                yield from _unknown_fields(v, extra, f"{path}.{k}")
            elif props is not None:
                yield f"{path}.{k}"
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(doc):
            yield from _unknown_fields(v, schema["items"], f"{path}[{i}]")


@pytest.mark.parametrize("doc", list(_docs()))
def test_manifest_is_valid(doc):
    if doc["kind"] in CRDS:
        assert doc["apiVersion"] == "ray.io/v1"
        validator = _crd_validator(doc["kind"])
        validator.validate(doc)
        assert list(_unknown_fields(doc, validator.schema)) == []
    else:
        import kubernetes_validate
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_a_misspelled_field_or_a_repeated_key_is_caught():
    doc = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    doc["spec"]["rayClusterSpec"]["headGroupSpecs"] = doc["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert list(_unknown_fields(doc, _crd_validator("RayJob").schema)) == [
        "$.spec.rayClusterSpec.headGroupSpecs"]
    with pytest.raises(yaml.YAMLError, match="duplicate key 'spec'"):
        yaml.load("kind: RayJob\nspec: {}\nspec: {}\n", Loader=StrictLoader)  # noqa: S506


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
    serve_cfg = load_yaml(doc["spec"]["serveConfigV2"])  # strict: no repeated keys
    ServeDeploySchema.model_validate(serve_cfg)
    for app in serve_cfg["applications"]:
        assert app["import_path"] == "charrnn.serve:build_app"
        serve_config_from_args(app["args"])


def test_dockerfile_installs_the_pinned_ray_and_torch():
    text = (ROOT / "Dockerfile").read_text()
    assert "rayproject/ray:2.60.0" in text and "TORCH_VERSION=2.13.0" in text
    assert Path(ROOT / ".dockerignore").read_text().count(".venv")


def test_constraints_pin_every_dependency_within_its_range():
    """`make install` (and so CI) installs with constraints.txt: each dependency pyproject.toml
    names, dev extras included, must be pinned there to a version its range allows, so a range
    widened or a package added without `make lock` is caught here rather than resolved afresh.
    torch stays unpinned: the Makefile's TORCH chooses its build."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"constraints.txt: {line!r} is not name==version"
            pins[canonicalize_name(name)] = version.strip()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in pins
            continue
        assert name in pins, f"{req.name} is not pinned in constraints.txt (run make lock)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}")


def test_the_image_holds_what_its_jobs_and_manifests_need(tmp_path, corpus_path):
    """No Docker daemon here to build the image: this lays out its working directory from the
    Dockerfile's own COPY lines and runs the jobs there, so a job that needs a file the image
    lacks (a module outside `charrnn/`, a config) fails here. `jobs/*.py` put their parent
    directory first on sys.path, so `charrnn` is imported from the copy, as in the image."""
    import os
    import shutil
    import subprocess
    import sys

    lines = [shlex.split(line) for line in (ROOT / "Dockerfile").read_text().splitlines()]
    workdir = next(words[1] for words in lines if words[:1] == ["WORKDIR"])
    image = tmp_path / "image"
    for words in lines:
        if words[:1] == ["COPY"]:
            *sources, dest = words[1:]
            target = image / dest
            for src in sources:
                to = target / src if dest.endswith("/") else target
                to.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if (ROOT / src).is_dir() else shutil.copy)(ROOT / src, to)
    # Every container of the manifests runs in the image's working directory (its WORKDIR
    # unless the manifest names it), where the RayJob's entrypoint finds its script and config.
    def containers(node):
        if isinstance(node, dict):
            yield from node.get("containers", [])
            node = list(node.values())
        for v in node if isinstance(node, list) else []:
            yield from containers(v)

    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            for c in containers(doc):
                assert c.get("workingDir", workdir) == workdir, f"{path.name}: {c['name']}"
    argv = shlex.split(yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())["spec"]["entrypoint"])
    for arg in argv[1:]:
        if arg.endswith((".py", ".yaml")):
            assert (image / arg).is_file(), f"{arg} (the RayJob's entrypoint) is not in the image"

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Without the editable install's finder (`make install`), which would find a module the
    # copy lacks in this checkout.
    alone = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in str(f)]; "

    def run(code, *args):
        p = subprocess.run([sys.executable, "-c", alone + code, *args], cwd=image, text=True,
                           capture_output=True, timeout=240, env=env)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    job = "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    run(job, "jobs/train.py", "--config", "configs/tiny.yaml", "--corpus", str(corpus_path),
        "--storage", str(tmp_path / "runs"), "--name", "img", "--epochs", "1")
    text = run(job, "jobs/generate.py", "--checkpoint", str(tmp_path / "runs" / "img"),
               "--prompt", "alice", "--max-chars", "20", "--seed", "1")
    assert text.startswith("alice") and len(text.rstrip("\n")) == 25
    out = run("import charrnn.serve as s, yaml; print(s.__file__); s.build_app({'checkpoint': "
              f"{str(tmp_path / 'runs' / 'img')!r}}}); yaml.safe_load(open('serve_config.yaml'))")
    assert out.startswith(str(image / "charrnn"))
