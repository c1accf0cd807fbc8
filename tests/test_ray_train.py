"""Ray Train integration: sharding, DDP on CPU, S3 checkpoints, fault tolerance, job submission."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from charrnn import checkpoint, storage
from charrnn import s3 as s3_access  # `s3` is the moto_server fixture here
from charrnn.config import load_config
from charrnn.errors import CharrnnError, CheckpointError, StorageError
from charrnn.trainer import fit, window_index_array
from tests.conftest import ROOT, run_job
from tests.services import (
    bucket_keys,
    bucket_objects,
    moto_server,
    ray_head,
    s3_client,
    wait_for,
    watch_listeners,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def ray_local(s3):
    """An in-process Ray cluster (token auth is on by default for ray.init in 2.60). It starts
    after the S3 variables are set: like cluster nodes, its workers read credentials from their
    own environment."""
    import ray
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def s3():
    with moto_server() as env:
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        s3_access.configure()
        s3_client(env).create_bucket(Bucket="charrnn")
        yield env
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cfg(corpus, storage_uri, name, *extra):
    return load_config(str(ROOT / "configs" / "tiny.yaml"),
                       [f"data.corpus={corpus}", f"run.storage={storage_uri}", f"run.name={name}",
                        *extra])


def test_window_index_padding_covers_every_window():
    for k, w in [(10, 3), (9, 3), (1, 2), (4061, 2)]:
        arr = window_index_array(k, w)
        assert len(arr) % w == 0 and set(arr) == set(range(k)) and len(arr) - k < w


def _shard_probe(config):
    """A train function recording which window indices each rank sees per epoch."""
    import ray.train

    from charrnn.dist import RayBackend
    b = RayBackend("")
    for epoch in range(2):
        seen = np.concatenate(list(b.index_batches(0, 7)))
        np.save(Path(config["out"]) / f"rank{b.rank}_epoch{epoch}.npy", seen)
        ray.train.report({"epoch": epoch})


def test_shards_are_disjoint_and_cover_the_epoch(ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from charrnn.binding import NodeBoundTorchConfig
    from charrnn.trainer import window_dataset
    K = 101
    TorchTrainer(_shard_probe, train_loop_config={"out": str(tmp_path)},
                 torch_config=NodeBoundTorchConfig(),
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(name="shards", storage_path=str(tmp_path / "store")),
                 datasets={"train": window_dataset(K, 2)}).fit()
    padded = window_index_array(K, 2)
    for epoch in range(2):
        a = np.load(tmp_path / f"rank0_epoch{epoch}.npy")
        b = np.load(tmp_path / f"rank1_epoch{epoch}.npy")
        assert len(a) == len(b) == len(padded) // 2  # equal shares: equal DDP steps
        assert sorted(np.concatenate([a, b])) == sorted(padded)  # disjoint, whole epoch
        assert set(a) | set(b) == set(range(K))


def test_two_workers_to_s3_then_generate(ray_local, s3, corpus_path, tmp_path, capfd):
    with watch_listeners() as off_loopback:
        winner = fit(_cfg(corpus_path, "s3://charrnn/runs", "ddp", "scaling.workers=2",
                          "run.checkpoint_every_steps=40"))
    # Everything listened on loopback, rank 0's rendezvous store included (binding.py).
    assert not off_loopback, off_loopback
    assert winner == "s3://charrnn/runs/ddp/winner.json"
    objects = bucket_objects(s3, "charrnn")
    manifest = json.loads(objects["runs/ddp/winner.json"])
    metrics = json.loads(objects["runs/ddp/metrics.json"])
    assert manifest["val_loss"] == min(m["val_loss"] for m in metrics)
    assert "runs/ddp/loss_curve.png" in objects and "runs/ddp/metrics.csv" in objects
    assert [m["step"] for m in metrics] == [40, 64, 80, 120, 128]  # 2 workers: half the steps
    loaded = checkpoint.load(winner)
    assert loaded.meta["step"] == manifest["step"] and loaded.config.scaling.workers == 2
    # Credentials never reach storage, the config shipped to workers, or the logs.
    out, err = capfd.readouterr()
    # A worker's log line reaches the driver once (runlog.say, not print: see there).
    assert (out + err).count("parameters on 2 worker(s)") == 1, out + err
    # Each epoch's line is not buried: Ray Train's report lines (`run.ray_report_lines`) and
    # Ray Data's two lines a pass are off.
    assert "| val " in out + err and "Starting execution of Dataset" not in out + err, out + err
    for line in ("Reporting training result", "Checkpoint successfully created"):
        assert line not in out + err, out + err
    for blob in [*objects.values(), out.encode(), err.encode(),
                 json.dumps(loaded.config.to_dict()).encode()]:
        assert s3["AWS_ACCESS_KEY_ID"].encode() not in blob
        assert s3["AWS_SECRET_ACCESS_KEY"].encode() not in blob
    p = run_job("generate.py", "--checkpoint", winner, "--prompt", "alice", "--max-chars", "40",
                "--seed", "1", env=s3)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("alice") and len(p.stdout) > 40
    with pytest.raises(CheckpointError, match=r"^s3://charrnn/runs holds runs, not a checkpoint: "
                                              r"give one of them, e.g. s3://charrnn/runs/ddp "):
        checkpoint.load("s3://charrnn/runs")  # the storage, not the run
    # Same number of samples on one worker in local mode: the same loss, within noise.
    local = fit(_cfg(corpus_path, str(tmp_path), "one", "train.batch_size=64"))
    one = json.loads(Path(local).read_text())["val_loss"]
    assert abs(one - manifest["val_loss"]) < 0.1, (one, manifest["val_loss"])


def test_storage_errors_come_before_training(s3, tmp_path):
    with pytest.raises(StorageError, match="bucket 'missing' does not exist"):
        storage.check_storage("s3://missing/runs")
    os.environ["AWS_SECRET_ACCESS_KEY"] = "wrong"
    try:
        with pytest.raises(StorageError, match="denied"):
            storage.check_storage("s3://charrnn/runs")
    finally:
        os.environ["AWS_SECRET_ACCESS_KEY"] = s3["AWS_SECRET_ACCESS_KEY"]
    t0 = time.monotonic()
    s3_access.configure(endpoint_url="http://127.0.0.1:9")
    try:
        with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
            storage.check_storage("s3://charrnn/runs")
    finally:
        s3_access.configure()
    assert time.monotonic() - t0 < 60


def test_corpus_from_s3(s3, corpus_path, tmp_path):
    s3_client(s3).upload_file(str(corpus_path), "charrnn", "data/wonderland.txt")
    from charrnn.config import DataConfig
    from charrnn.corpus import load_text
    assert load_text(DataConfig(corpus="s3://charrnn/data/wonderland.txt")).startswith("alice")


def test_a_manifest_naming_a_checkpoint_that_is_gone_says_so(s3):
    s3_client(s3).put_object(Bucket="charrnn", Key="runs/gone/winner.json",
                             Body=b'{"checkpoint": "checkpoint_00000127"}')
    for uri in ("s3://charrnn/runs/gone/winner.json", "s3://charrnn/runs/gone"):
        with pytest.raises(CheckpointError, match=f"^{uri} names checkpoint "
                           "s3://charrnn/runs/gone/checkpoint_00000127, which does not exist"):
            checkpoint.load(uri)


def test_interrupted_upload_never_moves_the_winner(s3, corpus_path, monkeypatch):
    cfg = _cfg(corpus_path, "s3://charrnn/runs", "cut", "train.epochs=2")
    real = storage.upload_dir
    calls = []

    def upload_then_die(local_dir, uri):
        calls.append(uri)
        if len(calls) == 2:  # the second checkpoint: copy one file, then "crash"
            fs, path = storage.resolve(uri)
            with fs.open_output_stream(f"{path}/model.pt") as f:
                f.write((Path(local_dir) / "model.pt").read_bytes())
            raise OSError("connection reset during upload")
        real(local_dir, uri)

    monkeypatch.setattr(storage, "upload_dir", upload_then_die)
    with pytest.raises(Exception, match="connection reset"):
        fit(cfg)
    manifest = checkpoint.read_winner("s3://charrnn/runs/cut/winner.json")
    assert manifest["step"] == 127  # still the first, complete checkpoint
    assert checkpoint.load("s3://charrnn/runs/cut/winner.json").meta["step"] == 127
    monkeypatch.setattr(storage, "upload_dir", real)
    fit(cfg)  # re-running the same name resumes and finishes
    assert checkpoint.read_winner("s3://charrnn/runs/cut/winner.json")["step"] == 254


def test_an_s3_upload_cut_short_leaves_no_partial_checkpoint(s3, tmp_path, monkeypatch):
    """Ctrl-C or a lost connection mid-upload left the files sent so far under the new
    checkpoint's name, outside the run's index, where nothing would ever prune them."""
    import pyarrow.fs as pafs
    real, saved_dir = pafs.copy_files, tmp_path
    for name in ("model.pt", "meta.json"):
        (saved_dir / name).write_text(name)

    def objects():
        return [k for k in bucket_keys(s3, "charrnn")  # files; not pyarrow's folder markers
                if k.startswith("cutshort/") and not k.endswith("/")]

    def cut(src, dst, destination_filesystem):
        destination_filesystem.create_dir(dst)
        with destination_filesystem.open_output_stream(f"{dst}/model.pt") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pafs, "copy_files", cut)
    with pytest.raises(KeyboardInterrupt):
        storage.upload_dir(saved_dir, "s3://charrnn/cutshort/checkpoint_00000001")
    assert objects() == []
    monkeypatch.setattr(pafs, "copy_files", real)
    storage.upload_dir(saved_dir, "s3://charrnn/cutshort/checkpoint_00000001")
    monkeypatch.setattr(pafs, "copy_files", cut)
    with pytest.raises(KeyboardInterrupt):  # replacing one: what was there is not deleted
        storage.upload_dir(saved_dir, "s3://charrnn/cutshort/checkpoint_00000001")
    assert objects() == ["cutshort/checkpoint_00000001/meta.json", "cutshort/checkpoint_00000001/model.pt"]


def test_loading_from_s3_leaves_no_download_behind(s3, corpus_path, tmp_path, monkeypatch):
    """A Serve replica hot-swapping from S3, or a generate job, loads by URI again and again;
    each download used to stay in /tmp, the optimizer state (twice the model) included."""
    import tempfile
    cfg = _cfg(corpus_path, "s3://charrnn/runs", "tmpfree", "train.epochs=1")
    fit(cfg)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fetched, real = [], storage.download_dir
    monkeypatch.setattr(storage, "download_dir",
                        lambda uri, d, files=None: fetched.append(files) or real(uri, d, files))
    loaded = checkpoint.load("s3://charrnn/runs/tmpfree/winner.json")
    assert loaded.meta["step"] == 127 and loaded.path is None
    assert fetched == [checkpoint.MODEL_FILES]  # not the optimizer state
    with pytest.raises(CharrnnError, match="training state was not kept"):
        checkpoint.load_train_state(loaded)
    fit(_cfg(corpus_path, "s3://charrnn/runs", "tmpfree", "train.epochs=2"))  # resumes from S3
    assert list(tmp_path.iterdir()) == []


def test_an_s3_run_is_trained_by_one_process_at_a_time(s3, corpus_path, monkeypatch, capsys):
    """S3 has no flock: the run lock is a lease object written with a conditional PUT, renewed in
    the background, and taken over (If-Match) once it has not been renewed for STALE_S."""
    from charrnn import runlock
    monkeypatch.setattr(runlock, "RENEW_S", 0.2)
    uri = "s3://charrnn/runs/held"
    with runlock.run_lock(uri, "held"):
        with pytest.raises(CharrnnError, match=r"run 'held' is being trained by another process "
                                               r"now \(.* pid \d+ .*; its lease s3://charrnn/runs/"
                                               r"held/.lock was renewed \d+ s ago\)"):
            fit(_cfg(corpus_path, "s3://charrnn/runs", "held"))
        time.sleep(0.5)  # renewals keep it fresh
        with pytest.raises(CharrnnError, match="being trained by another process"):
            with runlock.run_lock(uri, "held"):
                pass
        monkeypatch.setattr(runlock, "STALE_S", -1.0)  # as if the holder had died long ago
        said = []
        monkeypatch.setattr(runlock.runlog, "say", said.append)
        with runlock.run_lock(uri, "held") as second:
            assert any(line.startswith("taking over the lease of ") for line in said)
            wait_for(lambda: "warning: another process took over the lease s3://charrnn/runs/"
                             "held/.lock; this run stops at its next checkpoint without saving "
                             "it" in said, 30, "the first holder to notice")
            assert runlock.lease_lost(uri, second) is None
            assert re.fullmatch(r".* pid \d+ \(\w+\) took over its lease s3://charrnn/runs/"
                                r"held/.lock", runlock.lease_lost(uri, "the first holder"))
        monkeypatch.undo()  # runlog.say, RENEW_S and STALE_S as they were
        monkeypatch.setattr(runlock, "RENEW_S", 0.2)
    assert not [k for k in bucket_keys(s3, "charrnn") if k.startswith("runs/held/")]  # released
    with runlock.run_lock(uri, "held") as owner:
        s3_client(s3).delete_object(Bucket="charrnn", Key="runs/held/.lock")
        assert runlock.lease_lost(uri, owner) == f"its lease {uri}/.lock was removed"
    import botocore.exceptions  # a store without conditional PUTs: trained, with a warning
    real = s3_access.client

    def unconditional():
        c = real()
        plain = c.put_object

        def put_object(**kw):
            if "IfNoneMatch" in kw or "IfMatch" in kw:
                raise botocore.exceptions.ClientError(
                    {"Error": {"Code": "NotImplemented", "Message": "no"}}, "PutObject")
            return plain(**kw)
        c.put_object = put_object
        return c
    monkeypatch.setattr(s3_access, "client", unconditional)
    capsys.readouterr()
    with runlock.run_lock(uri, "held") as owner:
        assert owner is None and runlock.lease_lost(uri, owner) is None
    assert "does not support conditional writes (NotImplemented): no run lock" in capsys.readouterr().out


def test_a_checkpoint_upload_to_s3_is_tried_again_before_the_run_stops(s3, corpus_path,
                                                                       monkeypatch, capsys):
    """An object store that restarts (a MinIO pod rescheduled) or a network blip ended a local
    run at its next checkpoint; the upload is now tried again after each of the waits."""
    from charrnn import dist
    real, failures = dist.storage.upload_dir, {"left": 2}

    def flaky(local, uri):
        if uri.endswith("checkpoint_00000254") and failures["left"]:
            failures["left"] -= 1
            raise StorageError(f"{uri}: Could not connect to server")
        real(local, uri)
    monkeypatch.setattr(dist.storage, "upload_dir", flaky)
    monkeypatch.setattr(dist, "UPLOAD_RETRY_WAITS_S", (0.1, 0.2))
    fit(_cfg(corpus_path, "s3://charrnn/runs", "blip", "train.epochs=3"))
    out = capsys.readouterr().out
    assert ("warning: cannot store checkpoint_00000254 (s3://charrnn/runs/blip/checkpoint_00000254"
            ": Could not connect to server); trying again in 0 s (attempt 2 of 3)") in out
    assert "(attempt 3 of 3)" in out
    assert checkpoint.read_winner("s3://charrnn/runs/blip/winner.json")["step"] == 381
    failures["left"] = 3  # down for longer than the waits: the run stops, naming what is kept
    with pytest.raises(StorageError, match=r"^could not store checkpoint_00000254 \(step 254\), "
                                           r"so the run stopped: .*; once that is fixed, the same "
                                           r"command resumes from step 127$"):
        fit(_cfg(corpus_path, "s3://charrnn/runs", "down", "train.epochs=3"))


def test_a_lease_whose_renewals_stopped_is_waited_for_then_taken_over(s3, monkeypatch):
    """A trainer killed outright (OOM, a lost node or pod) leaves its lease behind, and the retry
    that follows (a RayJob's backoffLimit, a resubmission) failed with "being trained by another
    process" until STALE_S had passed. It now waits for the lease to go stale and takes it over,
    unless the holder renews it meanwhile: then it is alive, and refused as before."""
    import threading

    from charrnn import runlock
    monkeypatch.setattr(runlock, "RENEW_S", 1.0)
    monkeypatch.setattr(runlock, "GRACE_S", 0.0)
    monkeypatch.setattr(runlock, "STALE_S", 4.0)
    client, key, uri = s3_client(s3), "runs/dead/.lock", "s3://charrnn/runs/dead"
    client.put_object(Bucket="charrnn", Key=key, Body=b'{"owner": "killed"}')
    time.sleep(2.2)  # two renewals missed (the store's clock counts whole seconds)
    said = []
    monkeypatch.setattr(runlock.runlog, "say", said.append)
    start = time.monotonic()
    with runlock.run_lock(uri, "dead") as owner:
        assert owner != "killed" and time.monotonic() - start >= 1.0
        assert runlock.lease_lost(uri, owner) is None
    assert re.fullmatch(r"the lease of killed on s3://charrnn/runs/dead/.lock was last renewed "
                        r"[23] s ago \(every 1 s while it trains\): waiting [12] s to take it over",
                        said[0]), said
    assert said[1].startswith("taking over the lease of killed on s3://charrnn/runs/dead/.lock")
    client.put_object(Bucket="charrnn", Key=key, Body=b'{"owner": "slow"}')
    time.sleep(2.2)
    renewal = threading.Timer(0.5, lambda: client.put_object(Bucket="charrnn", Key=key,
                                                             Body=b'{"owner": "slow"}'))
    renewal.start()
    with pytest.raises(CharrnnError, match=r"^run 'dead' is being trained by another process now "
                                           r"\(slow; its lease s3://charrnn/runs/dead/.lock was "
                                           r"renewed \d s ago\)"):
        with runlock.run_lock(uri, "dead"):
            pass
    renewal.join()
    client.delete_object(Bucket="charrnn", Key=key)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_trainer_that_lost_its_s3_lease_stops_without_saving(s3, corpus_path, workers, request):
    """A trainer cut off from the store (or paused) for STALE_S loses its lease to the next
    trainer of the run. It must not then write checkpoints, winner or index beside the new one:
    it checks the lease before each save and stops, in local mode and on Ray Train workers."""
    import threading

    from charrnn.errors import RunLockLost
    if workers:
        request.getfixturevalue("ray_local")
    name, client = f"taken{workers}", s3_client(s3)
    prefix = f"runs/{name}/"
    seen: dict[str, set] = {}

    def keys():
        return {k for k in bucket_keys(s3, "charrnn") if k.startswith(prefix)}  # run still writing

    def take_over():  # as `runlock._acquire` does, once the first checkpoint is in the bucket
        wait_for(lambda: any("/checkpoint_" in k for k in keys()), 120, "a first checkpoint")
        client.put_object(Bucket="charrnn", Key=prefix + ".lock", Body=b'{"owner": "intruder"}')
        seen["at"] = keys()

    thread = threading.Thread(target=take_over, daemon=True)
    thread.start()
    with pytest.raises(RunLockLost, match=rf"^run '{name}': this trainer no longer holds the run "
                                          rf"lock \(intruder took over its lease s3://charrnn/"
                                          rf"{prefix}.lock\)"):
        fit(_cfg(corpus_path, "s3://charrnn/runs", name, "train.epochs=50",
                 "run.checkpoint_every_steps=10", f"scaling.workers={workers}"))
    thread.join(5)
    after = keys()
    # A save already past its check when the lease changed hands may land; nothing after it.
    # (Ray Train's checkpoint_manager_snapshot.json, which records such a save, is no checkpoint.)
    new_dirs = {k.split("/")[2] for k in after - seen["at"]
                if re.fullmatch(r"checkpoint_\d+", k.split("/")[2])}
    assert len(new_dirs) <= 1, new_dirs
    assert not [k for k in after if k.endswith("stopped.json")]  # no note in another's run
    lease = client.get_object(Bucket="charrnn", Key=prefix + ".lock")["Body"].read()
    assert lease == b'{"owner": "intruder"}'  # the new holder's lease is left alone


def _ray_workers():
    import psutil
    return [p for p in psutil.process_iter(["cmdline"])
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def test_a_local_run_continues_on_ray_train(ray_local, corpus_path, tmp_path, monkeypatch):
    """The first Ray attempt of a run trained in local mode starts from its latest checkpoint:
    nothing the local run saved is retrained, overwritten or pruned. Back to local mode is
    refused with one line (the unit test of `dist.resume_point` covers the rules).

    The storage is a relative path, as in `--storage ./runs`: Ray Train workers do not run in
    the driver's directory. Ray stored the checkpoints under its absolute `storage_path`, while
    rank 0 looked for them under the relative path from its own directory to publish
    `winner.json`, failed, and every attempt ended there."""
    monkeypatch.chdir(tmp_path)
    fit(_cfg(corpus_path, "runs", "moved"))  # local mode: 2 epochs of 127 steps
    run = tmp_path / "runs" / "moved"
    local_history = json.loads((run / "metrics.json").read_text())
    saved = {p.name: (p / "model.pt").read_bytes() for p in run.glob("checkpoint_*")}
    assert sorted(saved) == ["checkpoint_00000127", "checkpoint_00000254"]
    winner = fit(_cfg(corpus_path, "./runs", "moved", "scaling.workers=1", "train.epochs=3"))
    assert winner == str(run / "winner.json")
    for name, weights in saved.items():
        assert (run / name / "model.pt").read_bytes() == weights
    ray_ckpt = checkpoint.load(str(run / "checkpoint_00000381"))
    assert ray_ckpt.meta["history"][:2] == local_history  # continued, not started over
    assert [m["step"] for m in json.loads((run / "metrics.json").read_text())] == [127, 254, 381]
    with pytest.raises(CharrnnError, match="trained by Ray Train workers"):
        fit(_cfg(corpus_path, "runs", "moved", "train.epochs=4"))
    # Resumed with another model: every worker finds it in the checkpoint and stops, at once.
    # Raised, it was a worker failure: Ray Train restarted the group `run.max_failures` times,
    # then fit() raised a WorkerGroupError traceback (a plain CharrnnError here, not this type).
    with pytest.raises(CheckpointError, match="^run 'moved' already holds a checkpoint of a "
                                              "different model"):
        fit(_cfg(corpus_path, "runs", "moved", "scaling.workers=1", "train.epochs=4",
                 "model.hidden_size=48"))
    assert not (run / "stopped.json").exists()  # the note is read once


def test_a_diverged_loss_ends_a_ray_run_without_retries(ray_local, corpus_path, tmp_path, capfd):
    """All workers see the NaN in the all-reduced evaluation and stop together. Raised in a
    worker it would be a failure that Ray Train retries (`run.max_failures`) from the last
    checkpoint; reported, the run ends at once and the driver raises it."""
    from charrnn.errors import TrainingDiverged
    with pytest.raises(TrainingDiverged, match=r"the training loss is (nan|inf) at step 64\. "
                                               "Nothing was saved"):
        fit(_cfg(corpus_path, str(tmp_path), "nan", "scaling.workers=2", "train.lr=1e6",
                 "train.grad_clip=0"))
    out = capfd.readouterr().out
    assert out.count("training 8,605 parameters on 2 worker(s)") == 1, out  # one attempt
    assert not list((tmp_path / "nan").glob("checkpoint_0*"))
    assert not (tmp_path / "nan" / "winner.json").exists()


def test_a_killed_worker_restarts_the_group_and_resumes(corpus_path, tmp_path):
    """Ray Train restarts the worker group from the latest checkpoint and the run finishes. The
    restart belongs to the same job: it gets what is left of `train.max_minutes`, and the LR goes
    on annealing (each restart got the whole limit again, and its LR went back up)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "log.txt", "w")
    limit_s = 30
    proc = subprocess.Popen(
        [sys.executable, "jobs/train.py", "--config", "configs/tiny.yaml", "--corpus",
         str(corpus_path), "--storage", str(tmp_path), "--name", "ft", "--workers", "2",
         "--epochs", "500", "--max-minutes", str(limit_s / 60), "--set",
         "run.checkpoint_every_steps=20"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    run = tmp_path / "ft"

    def trained_s() -> float:
        try:
            return json.loads((run / "metrics.json").read_text())[-1]["elapsed_s"]
        except (OSError, ValueError, IndexError):
            return 0.0
    try:
        snapshot = run / "checkpoint_manager_snapshot.json"
        # Kill only once Ray Train has registered a checkpoint (its snapshot names one), a
        # third of the way into the time limit.
        wait_for(lambda: trained_s() > limit_s / 3 and snapshot.is_file()
                 and "checkpoint_000" in snapshot.read_text(), 240, "a registered checkpoint")
        victim = wait_for(_ray_workers, 30, "a Ray Train worker")[-1]
        victim.send_signal(signal.SIGKILL)
        assert proc.wait(360) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    finally:
        proc.kill()
    out = (tmp_path / "log.txt").read_text()
    assert "resuming run 'ft'" in out and "of this job's 0.5 train.max_minutes used)" in out
    assert "stopping: train.max_minutes reached" in out and "winner: " in out
    # Why the group restarted stays on the console (Ray Train's INFO line; `quiet_report_lines`
    # quiets only the lines of each report), and no report line came back with the new group.
    assert "[FailurePolicy] RETRY" in out and "Reporting training result" not in out, out[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    steps = [m["step"] for m in metrics]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # the step count continued
    assert metrics[-1]["elapsed_s"] < limit_s + 6, metrics[-1]  # not the limit again
    lrs = [m["lr"] for m in metrics]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(lrs, lrs[1:])), lrs  # annealing, never up


def test_more_workers_than_this_machine_is_one_error_line(corpus_path, tmp_path):
    """Ray Train would retry its worker group start every minute, forever."""
    t = time.monotonic()
    p = run_job("train.py", "--config", "configs/tiny.yaml", "--corpus", str(corpus_path),
                "--storage", str(tmp_path), "--workers", "2", "--set",
                "scaling.cpus_per_worker=1000", timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "error: 2 workers x 1000 CPU need 2000 CPU; the Ray cluster has" in p.stderr
    assert time.monotonic() - t < 100


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                        (signal.SIGHUP, 129)])
def test_ctrl_c_ends_a_ray_run_in_one_line_and_it_resumes(corpus_path, tmp_path, sig, status):
    """Ray Train's SIGINT handler aborts the run, after which its `ray.get` raised SystemExit(1):
    the job ended with status 1 and not a word. Now: one line, status 130, and the rerun resumes.
    SIGTERM (`ray job stop`, a pod stopping) made `ray.init`'s handler exit mid-run, and the
    process then aborted (status 134); it now aborts the run as Ctrl-C does (status 143), as does
    SIGHUP (a closed terminal or SSH session; status 129), which ended the driver where it stood."""
    args = ["--config", "configs/tiny.yaml", "--corpus", str(corpus_path), "--storage",
            str(tmp_path), "--name", "int", "--workers", "1"]
    p = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train.py"), *args, "--epochs", "200"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (tmp_path / "int" / "winner.json").exists(), 240, "a first checkpoint")
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == status, err[-2000:]
    assert "interrupted: Ray Train stopped the run; its reported checkpoints are kept" in err
    again = run_job("train.py", *args, "--max-minutes", "0.05")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming run 'int' from its checkpoint at step" in again.stdout + again.stderr


def test_ray_job_submit_end_to_end(ray_local, corpus_path):
    import ray as ray_api
    with moto_server() as s3env:
        s3_client(s3env).create_bucket(Bucket="jobs")
        with ray_head(extra_env=s3env) as (env, dashboard, address):
            ray = str(Path(sys.executable).parent / "ray")
            s3_client(s3env).upload_file(str(corpus_path), "jobs", "corpus/wonderland.txt")
            argv = [ray, "job", "submit", "--address", dashboard, "--working-dir", ".", "--",
                    "python", "jobs/train.py", "--config", "configs/tiny.yaml", "--workers", "2",
                    "--corpus", "s3://jobs/corpus/wonderland.txt", "--storage", "s3://jobs/runs",
                    "--name", "submitted"]
            for _ in range(30):  # the head's job agent registers a few seconds after start
                p = subprocess.run(argv, cwd=ROOT, env={**env, **s3env}, capture_output=True,
                                   text=True, timeout=400)
                if "No available agent" not in p.stdout + p.stderr:
                    break
                time.sleep(2)
            assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
            assert "winner: s3://jobs/runs/submitted/winner.json" in p.stdout
            # The same cluster without its token: one line naming the way out (Ray alone
            # retries, then raises a traceback that does not mention the token).
            bad = {**env, **s3env, "RAY_ADDRESS": address, "RAY_AUTH_TOKEN": "0" * 32}
            p = run_job("train.py", "--config", "configs/tiny.yaml", "--workers", "1",
                        "--corpus", str(corpus_path), "--storage", "s3://jobs/runs", "--name", "t",
                        env=bad, timeout=200)
            assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
            assert p.stderr.strip().splitlines()[-1].startswith(
                f"error: cannot connect to a Ray cluster (RAY_ADDRESS={address}): ")
            assert "needs RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN" in p.stderr
        # The head stopped alone: `ray stop` in its teardown also killed this module's
        # in-process cluster, and a minute later its driver, pytest, exited with status 1.
        assert ray_api.get(ray_api.remote(lambda: 7).remote(), timeout=60) == 7
        objects = bucket_objects(s3env, "jobs")
        assert "runs/submitted/winner.json" in objects
        g = run_job("generate.py", "--checkpoint", "s3://jobs/runs/submitted/winner.json",
                    "--prompt", "the queen", "--max-chars", "50", "--seed", "2", env=s3env)
        assert g.returncode == 0 and g.stdout.startswith("the queen"), g.stderr
