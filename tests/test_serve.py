"""Ray Serve on loopback: success, streaming, bad input, batching, hot swap, auth, S3."""

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from charrnn import checkpoint
from charrnn.typed import load_yaml
from tests.conftest import ROOT, run_job
from tests.services import free_port, moto_server, ray_listeners_off_loopback, s3_client, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def serve_base():
    """Ray + Serve in this process, HTTP on 127.0.0.1 (token auth on for the cluster)."""
    import ray
    from ray import serve
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def deploy(base, name="charrnn", **args):
    from ray import serve

    from charrnn.serve import build_app
    serve.run(build_app(args), name=name, route_prefix="/", blocking=False)
    wait_for(lambda: _ok(base + "/healthz"), 120, "the Serve app")
    return base


def _ok(url):
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory):
    """A copy of the tiny run, so hot-swap tests can move its winner."""
    storage, name, _ = tiny_run
    dst = tmp_path_factory.mktemp("serve") / name
    shutil.copytree(storage / name, dst)
    return dst


@pytest.fixture(scope="module")
def app(serve_base, run_dir):
    return deploy(serve_base, checkpoint=str(run_dir / "winner.json"), watch_interval_s=0.5,
                  max_chars_limit=500, max_prompts=8, max_body_bytes=4096)


def post(app, path="/generate", **body):
    return requests.post(app + path, json=body, timeout=60)


def test_generate_and_model_info(app, run_dir):
    r = post(app, prompt="Alice was", max_chars=40, temperature=0.8, seed=1)
    assert r.status_code == 200, r.text
    data = r.json()
    assert len(data["completions"]) == 1 and len(data["completions"][0]) == 40
    winner = json.loads((run_dir / "winner.json").read_text())
    assert data["model"]["step"] == winner["step"] and data["model"]["run"] == "tiny"
    assert data["model"]["checkpoint"].endswith(winner["checkpoint"])
    m = requests.get(app + "/model").json()
    assert m["val_loss"] == pytest.approx(winner["val_loss"])
    assert requests.get(app + "/docs").status_code == 200
    assert "/generate" in requests.get(app + "/openapi.json").json()["paths"]


def test_everything_listens_on_loopback(app):
    """The proxy, the replicas (their inter-deployment gRPC server included: binding.py) and
    Ray itself listen on 127.0.0.1 only."""
    assert post(app, prompt="alice", max_chars=5).status_code == 200
    assert not ray_listeners_off_loopback()


def test_same_seed_same_text_offline_and_online(app, run_dir):
    prompts = ["the queen", "alice", "she said"]
    r = post(app, prompts=prompts, max_chars=60, temperature=0.9, top_k=10, seed=5).json()
    offline = run_job("generate.py", "--checkpoint", str(run_dir), "--prompt", prompts[0],
                      "--prompt", prompts[1], "--prompt", prompts[2], "--max-chars", "60",
                      "--temperature", "0.9", "--top-k", "10", "--seed", "5", "--format", "jsonl")
    assert [json.loads(x)["completion"] for x in offline.stdout.splitlines()] == r["completions"]
    # Sent alone, prompt 1 with seed 6 gives the same text as inside the batch.
    alone = post(app, prompt="alice", max_chars=60, temperature=0.9, top_k=10, seed=6).json()
    assert alone["completions"][0] == r["completions"][1]


def test_streaming(app):
    with requests.post(app + "/generate/stream", json={"prompt": "the", "max_chars": 50,
                                                       "seed": 3}, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        chunks = [c for c in r.iter_content(chunk_size=None, decode_unicode=True)]
    text = "".join(chunks)
    assert len(text) == 50
    assert text == post(app, prompt="the", max_chars=50, seed=3).json()["completions"][0]


@pytest.mark.parametrize("body,status,match", [
    (b"{not json", 400, "JSON"),
    (b"[1, 2]", 422, ""),
    (b"{}", 422, "exactly one of"),
    (b'{"prompt": ""}', 422, "non-empty"),
    (b'{"prompts": []}', 422, "non-empty"),
    (b'{"prompt": "a\\u00e9\\u00f8"}', 422, "'é', 'ø' (to accept them, set oov to 'drop' or"),
    (b'{"prompt": "a", "max_chars": 501}', 422, "above the limit 500"),
    (b'{"prompt": "a", "temperature": 0}', 422, "must be a finite number > 0 (or use greedy: true)"),
    (b'{"prompt": "a", "temperature": -1}', 422, "temperature"),
    (b'{"prompt": "a", "top_p": 0}', 422, "top_p"),
    (b'{"prompt": "a", "top_p": 1.5}', 422, "top_p"),
    (b'{"prompt": "a", "top_k": 0}', 422, "top_k"),
    (b'{"prompt": "a", "max_chars": "many"}', 422, "max_chars"),
    # strict (tests/test_api.py has the rest): a typo was a 200 with the default 200 characters
    (b'{"prompt": "a", "max_char": 20}', 422, "max_char: Extra inputs are not permitted"),
    (b'{"prompt": "a", "seed": -1}', 422, "seed"),
    (b'{"prompt": "a", "temperature": NaN}', 422, "temperature must be a finite number"),
    (b'{"prompt": "a", "temperature": Infinity}', 422, "temperature must be a finite number"),
    (json.dumps({"prompts": ["a"] * 9}).encode(), 422, "at most 8"),
    (json.dumps({"prompt": "a" * 5000}).encode(), 413, "larger than 4096"),
    # chunked, without Content-Length: read no further than the limit (api.read_body)
    (iter([b'{"prompt": "', b"a" * 3000, b"a" * 3000, b'"}']), 413, "larger than 4096"),
])
def test_bad_input_is_4xx_with_a_message(app, body, status, match):
    r = requests.post(app + "/generate", data=body, timeout=30,
                      headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert match in r.json()["error"]
    assert post(app, prompt="a", max_chars=5).status_code == 200  # the replica stays healthy


def test_unknown_paths_and_methods_answer_with_an_error_field(app):
    assert requests.get(app + "/nope", timeout=30).json() == {"error": "Not Found"}
    r = requests.get(app + "/generate", timeout=30)
    assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"}


def test_greedy_needs_no_temperature_and_oov_policies(app):
    assert post(app, prompt="a", max_chars=5, greedy=True, temperature=0).status_code == 200
    r = post(app, prompt="aé", max_chars=5, oov="drop", seed=1)
    assert r.status_code == 200
    # Extremes JSON allows: a top_k beyond int64 was a 500; a top_p of 1e-320 decoded "zzzz".
    greedy = post(app, prompt="a", max_chars=8, greedy=True).json()["completions"]
    assert post(app, prompt="a", max_chars=8, top_p=1e-320, seed=1).json()["completions"] == greedy
    assert post(app, prompt="a", max_chars=8, top_k=10**23, seed=10**30).status_code == 200


def test_concurrent_requests_form_real_batches(app):
    before = requests.get(app + "/stats").json()["batch_sizes"]

    def one(i):
        return post(app, prompt="the " + "abcdefghij"[i % 10], max_chars=100 + i, seed=i)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(r.status_code == 200 for r in results)
    assert [len(r.json()["completions"][0]) for r in results] == [100 + i for i in range(32)]
    after = requests.get(app + "/stats").json()["batch_sizes"]
    new = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    assert max(new) > 1, new  # concurrent requests shared generation batches


def test_hot_swap_when_winner_changes(app, run_dir):
    old = requests.get(app + "/model").json()
    other = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.name not in old["checkpoint"])
    assert other, "the tiny run keeps more than one checkpoint"
    manifest = json.loads((run_dir / "winner.json").read_text())
    # A long request in flight while the winner moves finishes on the model it started with.
    with ThreadPoolExecutor(1) as pool:
        inflight = pool.submit(post, app, prompt="a", max_chars=500, seed=1)
        time.sleep(0.2)
        new_manifest = {**manifest, "checkpoint": other[0],
                        "step": int(other[0].split("_")[1])}
        (run_dir / "winner.json").write_text(json.dumps(new_manifest))
        r = inflight.result()
    assert r.status_code == 200 and r.json()["model"]["checkpoint"] == old["checkpoint"]
    wait_for(lambda: requests.get(app + "/model").json()["checkpoint"] != old["checkpoint"],
             30, "the hot swap")
    assert post(app, prompt="a", max_chars=5).json()["model"]["step"] == new_manifest["step"]
    (run_dir / "winner.json").write_text(json.dumps(manifest))  # restore
    wait_for(lambda: requests.get(app + "/model").json()["checkpoint"] == old["checkpoint"],
             30, "the swap back")
    # A damaged winner.json keeps the model serving, and the reason is logged once, not at every
    # watch interval (0.5 s here), and named once in GET /model ("X: X: not a valid ...").
    log = _replica_log("charrnn")
    before = log.read_text().count("keeping")
    try:
        tmp = run_dir / "winner.json.tmp"  # replaced whole: the watcher never reads it half-written
        tmp.write_text('{"checkpoint": ')
        tmp.replace(run_dir / "winner.json")
        wait_for(lambda: requests.get(app + "/model").json()["source_error"], 30, "the error")
        time.sleep(2)
        m = requests.get(app + "/model").json()
        assert m["checkpoint"] == old["checkpoint"]
        assert m["source_error"].count(str(run_dir / "winner.json")) == 1, m["source_error"]
        assert "not a valid winner manifest" in m["source_error"]
        assert log.read_text().count("keeping") - before == 1
    finally:
        (run_dir / "winner.json").write_text(json.dumps(manifest))
    wait_for(lambda: requests.get(app + "/model").json()["source_error"] is None, 30, "recovery")


def _replica_log(app_name: str) -> Path:
    """The log file of the one replica of Serve app `app_name`, in this cluster's session."""
    import ray
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    (path,) = logs.glob(f"replica_{app_name}_*.log")
    return path


def test_swap_through_user_config(serve_base, run_dir):
    from ray import serve

    from charrnn.serve import CharRNNServer
    ckpts = sorted(run_dir.glob("checkpoint_*"))
    args = {"checkpoint": str(run_dir), "watch_interval_s": 0}
    app = CharRNNServer.options(user_config={"checkpoint": str(ckpts[0])}).bind(args)
    serve.run(app, name="uc", route_prefix="/uc", blocking=False)
    wait_for(lambda: _ok(serve_base + "/uc/healthz"), 120, "the uc app")
    assert requests.get(serve_base + "/uc/model").json()["checkpoint"] == str(ckpts[0])
    app = CharRNNServer.options(user_config={"checkpoint": str(ckpts[-1])}).bind(args)
    serve.run(app, name="uc", route_prefix="/uc", blocking=False)
    wait_for(lambda: requests.get(serve_base + "/uc/model").json()["checkpoint"] == str(ckpts[-1]),
             60, "the user_config swap")
    # A checkpoint that cannot be loaded (a typo, an upload not done yet) does not take the
    # application down: the replica keeps serving and says why.
    missing = str(run_dir / "checkpoint_99999999")
    serve.run(CharRNNServer.options(user_config={"checkpoint": missing}).bind(args), name="uc",
              route_prefix="/uc", blocking=False)
    wait_for(lambda: requests.get(serve_base + "/uc/model").json()["source"] == missing, 60,
             "the bad user_config")
    m = requests.get(serve_base + "/uc/model").json()
    assert m["checkpoint"] == str(ckpts[-1]) and "does not exist" in m["source_error"]
    assert m["source_error"].count(missing) == 1, m["source_error"]  # was "X: no checkpoint at X"
    r = requests.post(serve_base + "/uc/generate", json={"prompt": "a", "max_chars": 5})
    assert r.status_code == 200 and r.json()["model"]["checkpoint"] == str(ckpts[-1])
    from ray.serve.schema import ApplicationStatus
    assert serve.status().applications["uc"].status == ApplicationStatus.RUNNING
    # A misspelled key changed nothing, silently; now GET /model names it. Without a
    # `checkpoint` key the replica follows the builder's checkpoint again (the run's winner).
    serve.run(CharRNNServer.options(user_config={"checkpiont": str(ckpts[0])}).bind(args),
              name="uc", route_prefix="/uc", blocking=False)
    wait_for(lambda: "checkpiont" in (requests.get(serve_base + "/uc/model").json()["source_error"]
                                      or ""), 60, "the misspelled user_config")
    m = requests.get(serve_base + "/uc/model").json()
    assert m["source_error"] == ("user_config: unknown key 'checkpiont' ignored (its one key is "
                                 "'checkpoint')")
    assert m["source"] == str(run_dir) and m["checkpoint"] == checkpoint.resolve(str(run_dir))
    # Fixed: the note goes.
    serve.run(CharRNNServer.options(user_config={"checkpoint": str(ckpts[0])}).bind(args),
              name="uc", route_prefix="/uc", blocking=False)
    wait_for(lambda: requests.get(serve_base + "/uc/model").json()["checkpoint"] == str(ckpts[0]),
             60, "the fixed user_config")
    assert requests.get(serve_base + "/uc/model").json()["source_error"] is None
    assert serve.status().applications["uc"].status == ApplicationStatus.RUNNING
    serve.delete("uc")


def test_a_client_that_goes_away_stops_its_rows(serve_base, run_dir):
    """Serve cancels the request of a client that disconnects; its rows leave the engine at
    once instead of generating to `max_chars` (a started @serve.batch runs to its end)."""
    from ray import serve

    from charrnn.serve import CharRNNServer
    app = CharRNNServer.options(ray_actor_options={"num_cpus": 0.5}).bind(
        {"checkpoint": str(run_dir), "watch_interval_s": 0, "max_chars_limit": 1_000_000})
    serve.run(app, name="gone", route_prefix="/gone", blocking=False)
    base = serve_base + "/gone"
    wait_for(lambda: _ok(base + "/healthz"), 120, "the gone app")

    def active():
        return requests.get(base + "/stats", timeout=10).json()["active_rows"]

    long_ = {"max_chars": 1_000_000, "seed": 1}  # a minute or more of stepping
    with pytest.raises(requests.ReadTimeout):  # a whole-text client that gives up
        requests.post(base + "/generate", json={"prompts": ["a", "b"], **long_}, timeout=1.5)
    wait_for(lambda: active() == 0, 10, "the abandoned rows to stop")
    with requests.post(base + "/generate/stream", json={"prompt": "a", **long_}, stream=True,
                       timeout=30) as r:  # a streaming client that reads a little, then leaves
        chunks = r.iter_content(chunk_size=None)  # (kept: closing it closes the connection)
        assert next(chunks)
        assert active() == 1
    wait_for(lambda: active() == 0, 10, "the abandoned stream to stop")
    assert post(base, prompt="a", max_chars=20, seed=2).status_code == 200  # still serving
    serve.delete("gone")


def test_an_int8_replica_serves_the_offline_int8_texts(serve_base, run_dir):
    """`precision: int8` (a C kernel built at load, `charrnn/native.py`): a batch of prompts
    gives the texts the offline path gives with the same seeds. The replica steps on two
    threads (with AMX, its 42 rows are two blocks of 32, shared out), the offline path on one."""
    from ray import serve

    from charrnn import native
    from charrnn.generate import Generator
    from charrnn.sampling import SampleParams
    from charrnn.serve import CharRNNServer
    if native.compiler() is None:
        pytest.skip("no C compiler to build the int8 kernel")
    app = CharRNNServer.options(ray_actor_options={"num_cpus": 0.5}).bind(
        {"checkpoint": str(run_dir), "watch_interval_s": 0, "precision": "int8", "threads": 2})
    serve.run(app, name="int8", route_prefix="/int8", blocking=False)
    base = serve_base + "/int8"
    wait_for(lambda: _ok(base + "/healthz"), 120, "the int8 app")
    prompts = ["the queen", "alice", "she said"] * 14
    r = post(base, prompts=prompts, max_chars=60, temperature=0.9, seed=5)
    assert r.status_code == 200, r.text
    offline = Generator(checkpoint.load(str(run_dir)), "cpu", "int8", threads=1)
    texts = list(offline.complete(prompts, SampleParams(60, temperature=0.9, seed=5)))
    assert r.json()["completions"] == texts
    serve.delete("int8")


def test_a_full_queue_is_shed_with_503_and_retry_after(serve_base, run_dir):
    """Past `max_ongoing_requests` per replica and `max_queued_requests` waiting, Serve answers
    503 with Retry-After at once (the shipped app: 256 and 512) instead of queueing without end;
    here 1 and 1, so a third request is one too many."""
    from ray import serve

    from charrnn.serve import CharRNNServer
    app = CharRNNServer.options(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=1,
                                max_queued_requests=1).bind(
        {"checkpoint": str(run_dir), "watch_interval_s": 0, "max_chars_limit": 1_000_000})
    serve.run(app, name="full", route_prefix="/full", blocking=False)
    base = serve_base + "/full"
    wait_for(lambda: _ok(base + "/healthz"), 120, "the full app")
    pool = ThreadPoolExecutor(1)
    with requests.post(base + "/generate/stream", json={"prompt": "a", "max_chars": 1_000_000},
                       stream=True, timeout=30) as r:
        chunks = r.iter_content(chunk_size=None)
        assert next(chunks)  # the replica's one slot is taken
        queued = pool.submit(post, base, prompt="b", max_chars=5, seed=1)
        time.sleep(1)  # b reaches the queue first
        shed = []

        def refused():
            try:
                shed.append(requests.post(base + "/generate", json={"prompt": "c"}, timeout=10))
            except requests.ReadTimeout:  # queued after all (b was not there yet): try again
                return False
            return shed[-1].status_code == 503
        wait_for(refused, 20, "a request past the queue to be refused")
        assert shed[-1].headers["retry-after"] == "1"
        assert not queued.done()
    assert queued.result().status_code == 200  # it ran once the stream let go of the slot
    pool.shutdown()
    serve.delete("full")


def test_bearer_token(serve_base, run_dir, monkeypatch):
    from ray import serve
    monkeypatch.setenv("CHARRNN_TEST_TOKEN", "s3cret-token")
    from charrnn.serve import CharRNNServer
    app = CharRNNServer.options(ray_actor_options={
        "num_cpus": 0.5, "runtime_env": {"env_vars": {"CHARRNN_TEST_TOKEN": "s3cret-token"}}}
    ).bind({"checkpoint": str(run_dir), "api_token_env": "CHARRNN_TEST_TOKEN"})
    serve.run(app, name="auth", route_prefix="/auth", blocking=False)
    wait_for(lambda: _ok(serve_base + "/auth/healthz"), 120, "the auth app")
    url = serve_base + "/auth/generate"
    assert requests.post(url, json={"prompt": "a"}).status_code == 401
    for bad in ("Bearer nope", "Bearer é", "Bearer s3cret-tokén"):  # non-ASCII was a 500
        r = requests.post(url, json={"prompt": "a"}, headers={"Authorization": bad})
        assert (r.status_code, r.json()) == (401, {"error": "missing or wrong bearer token"})
    good = {"Authorization": "Bearer s3cret-token"}
    assert requests.post(url, json={"prompt": "a", "max_chars": 3}, headers=good).status_code == 200
    assert requests.get(serve_base + "/auth/healthz").status_code == 200  # health stays open
    serve.delete("auth")


def test_batch_client_job_matches_offline(app, run_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the queen\nalice was\nthe cat\n")
    common = ["--prompts-file", str(prompts), "--format", "jsonl", "--max-chars", "40",
              "--seed", "9", "--temperature", "0.7", "--prompt", "alice {ω}", "--oov", "drop"]
    online = run_job("generate.py", "--serve-url", app, *common)
    offline = run_job("generate.py", "--checkpoint", str(run_dir), *common)
    assert online.returncode == 0, online.stderr
    rows = [json.loads(x) for x in online.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["alice {ω}", "the queen", "alice was", "the cat"]
    assert [r["completion"] for r in rows] == [json.loads(x)["completion"]
                                              for x in offline.stdout.splitlines()]


def test_serving_from_s3(serve_base, run_dir):
    with moto_server() as env:
        c = s3_client(env)
        c.create_bucket(Bucket="models")
        for f in run_dir.rglob("*"):
            if f.is_file():
                c.upload_file(str(f), "models", f"runs/tiny/{f.relative_to(run_dir)}")
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            from ray import serve

            from charrnn.serve import CharRNNServer, build_app
            build_app({"checkpoint": "s3://models/runs/tiny/winner.json"})  # resolves via S3
            app = CharRNNServer.options(ray_actor_options={"num_cpus": 0.5,
                                                           "runtime_env": {"env_vars": env}}).bind(
                {"checkpoint": "s3://models/runs/tiny/winner.json", "watch_interval_s": 0})
            serve.run(app, name="s3", route_prefix="/s3", blocking=False)
            wait_for(lambda: _ok(serve_base + "/s3/healthz"), 120, "the S3 app")
            r = requests.post(serve_base + "/s3/generate", json={"prompt": "a", "max_chars": 10})
            assert r.status_code == 200 and r.json()["model"]["checkpoint"].startswith("s3://")
            serve.delete("s3")
        finally:
            for k, v in old.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_shipped_serve_config_is_valid():
    cfg = load_yaml((ROOT / "serve_config.yaml").read_text())
    from ray.serve.schema import ServeDeploySchema
    ServeDeploySchema.model_validate(cfg)
    app = cfg["applications"][0]
    assert app["import_path"] == "charrnn.serve:build_app"
    from charrnn.config import serve_config_from_args
    serve_config_from_args(app["args"])


def test_a_relative_checkpoint_path_reaches_replicas_absolute(tiny_run, monkeypatch):
    """`serve run charrnn.serve:build_app checkpoint=runs/alice/winner.json`: replicas (and the
    watcher re-reading winner.json) may run in another directory than the builder."""
    from charrnn.serve import build_app
    storage, name, _ = tiny_run
    monkeypatch.chdir(storage)
    app = build_app({"checkpoint": f"{name}/winner.json"})
    args = app._bound_deployment.init_args[0]
    assert args["checkpoint"] == str(storage / name / "winner.json")


def _deploy_shipped_config(env: dict, dashboard: str, tmp_path: Path, port: int, **args) -> None:
    """`serve deploy` of the shipped `serve_config.yaml` to a `ray_head` cluster, with its HTTP
    port and some builder args replaced."""
    cfg = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    cfg["http_options"]["port"] = port
    cfg["applications"][0]["args"].update(args)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    serve = str(Path(sys.executable).parent / "serve")
    for _ in range(30):  # the head's agents register a few seconds after `ray start`
        p = subprocess.run([serve, "deploy", str(path), "-a", dashboard], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        if p.returncode == 0 or "agent" not in (p.stdout + p.stderr).lower():
            break
        time.sleep(2)
    assert p.returncode == 0, p.stderr


def test_serve_cli_run_and_deploy(tiny_run, tmp_path):
    """`serve deploy serve_config.yaml` and `serve run charrnn.serve:build_app checkpoint=URI`
    against a `ray start --head` cluster with token auth."""
    from tests.services import ray_head
    storage, name, _ = tiny_run
    winner = str(storage / name / "winner.json")
    serve = str(Path(sys.executable).parent / "serve")
    with ray_head(num_cpus=2) as (env, dashboard, gcs):
        env = {**env, "PYTHONPATH": str(ROOT)}
        port = free_port()
        _deploy_shipped_config(env, dashboard, tmp_path, port, checkpoint=winner)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ok(url + "/healthz"), 180, "serve deploy")
        assert requests.get(url + "/model").json()["checkpoint"].endswith("checkpoint_00000254")
        subprocess.run([serve, "shutdown", "-y", "-a", dashboard], env=env, timeout=120,
                       capture_output=True)
        wait_for(lambda: not _ok(url + "/healthz"), 60, "serve shutdown")
        run = subprocess.Popen(
            [serve, "run", "--address", gcs, "charrnn.serve:build_app", f"checkpoint={winner}",
             "max_batch_size=16"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: _ok("http://127.0.0.1:8000/healthz"), 180, "serve run")
            r = requests.post("http://127.0.0.1:8000/generate",
                              json={"prompt": "alice", "max_chars": 10, "seed": 1})
            assert r.status_code == 200 and len(r.json()["completions"][0]) == 10
        finally:
            run.send_signal(2)
            run.wait(60)


@pytest.mark.parametrize("switch", ["RAY_SERVE_ENABLE_DIRECT_INGRESS",
                                    "RAY_SERVE_THROUGHPUT_OPTIMIZED"])
def test_direct_ingress_serves_the_same_api_on_each_replicas_own_port(switch, tiny_run,
                                                                      tmp_path):
    """Serve's direct ingress (README, "Direct ingress"): with RAY_SERVE_ENABLE_DIRECT_INGRESS,
    or Ray's RAY_SERVE_THROUGHPUT_OPTIMIZED (direct ingress, gRPC between deployments, buffered
    request logs, user code on the replica's main loop), set where the cluster starts, the
    shipped `serve_config.yaml` also answers on the replica's own HTTP port, taken from the
    configured range, without the proxy hop. Same API there: the
    texts the proxy gives, streaming, a bad input's 422, the bearer token, /docs, the hot swap;
    and that server listens on `http_options.host` (loopback), like every other."""
    from tests.services import ray_head
    storage, name, _ = tiny_run
    run = tmp_path / name  # a copy: its winner moves below
    shutil.copytree(storage / name, run)
    direct = free_port()
    extra = {switch: "1", "CHARRNN_API_TOKEN": "s3cret",
             "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(direct),
             "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(direct + 1)}  # one replica: one port
    with ray_head(extra_env=extra, num_cpus=2) as (env, dashboard, _):
        port = free_port()
        _deploy_shipped_config({**env, "PYTHONPATH": str(ROOT)}, dashboard, tmp_path, port,
                               checkpoint=str(run / "winner.json"), watch_interval_s=0.5)
        proxy, replica = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{direct}"
        wait_for(lambda: _ok(replica + "/healthz"), 180, "the replica's own port")
        auth = {"Authorization": "Bearer s3cret"}
        body = {"prompts": ["alice", "the queen"], "max_chars": 40, "temperature": 0.8, "seed": 3}
        assert requests.post(replica + "/generate", json=body, timeout=60).status_code == 401
        got = requests.post(replica + "/generate", json=body, headers=auth, timeout=60)
        assert got.status_code == 200, got.text
        via_proxy = requests.post(proxy + "/generate", json=body, headers=auth, timeout=60)
        assert got.json() == via_proxy.json()
        one = {"prompt": "alice", "max_chars": 40, "temperature": 0.8, "seed": 3}
        with requests.post(replica + "/generate/stream", json=one, headers=auth, stream=True,
                           timeout=60) as r:
            streamed = "".join(r.iter_content(chunk_size=None, decode_unicode=True))
        assert streamed == got.json()["completions"][0]
        bad = requests.post(replica + "/generate", json={"prompt": "a", "temperature": 0},
                            headers=auth, timeout=60)
        assert bad.status_code == 422 and "temperature" in bad.json()["error"]
        assert requests.get(replica + "/docs", timeout=10).status_code == 200
        model = requests.get(replica + "/model", timeout=10).json()
        assert model["checkpoint"].endswith("checkpoint_00000254")
        other = sorted(c.name for c in run.glob("checkpoint_*") if c.name not in model["checkpoint"])
        manifest = json.loads((run / "winner.json").read_text())
        (run / "winner.json").write_text(json.dumps({**manifest, "checkpoint": other[0]}))
        wait_for(lambda: requests.get(replica + "/model", timeout=10).json()["checkpoint"].endswith(
            other[0]), 60, "the hot swap")
        assert not ray_listeners_off_loopback()
