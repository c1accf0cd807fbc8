import json
import os
import pickle
import re

import pytest
import torch

from charrnn import checkpoint, s3, storage
from charrnn.config import Config, DataConfig
from charrnn.corpus import load_text
from charrnn.errors import CheckpointError, CorpusError, StorageError
from charrnn.model import CharRNN, ModelConfig
from charrnn.vocab import Vocab


@pytest.fixture
def saved(tmp_path):
    vocab = Vocab.from_text("abc \n")
    cfg = Config(model=ModelConfig(vocab_size=len(vocab), hidden_size=8, embedding_dim=4,
                                   num_layers=1))
    model = CharRNN(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 3, dtype=torch.long))[0].sum().backward()
    opt.step()
    d = checkpoint.save(tmp_path / "ckpt", model, cfg, vocab,
                        {"step": 5, "history": []}, opt)
    return d, model, cfg, vocab


def test_round_trip_from_its_path_alone(saved):
    d, model, cfg, vocab = saved
    loaded = checkpoint.load(str(d))
    assert loaded.config == cfg and loaded.vocab == vocab and loaded.meta["step"] == 5
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    state = checkpoint.load_train_state(loaded)
    assert state["optimizer"]["state"]  # the AdamW moments travel too
    assert next(loaded.model.parameters()).device.type == "cpu"


def test_a_planted_pickle_is_refused_not_executed(saved, tmp_path):
    d = saved[0]
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (d / "model.pt").write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(CheckpointError, match="refusing to load model.pt"):
        checkpoint.load(str(d))
    assert not marker.exists()
    torch.save({"x": Evil()}, d / "model.pt")  # the same inside torch's zip format
    with pytest.raises(CheckpointError, match="refusing"):
        checkpoint.load(str(d))
    assert not marker.exists()


def test_incomplete_or_missing_checkpoints(saved, tmp_path):
    d = saved[0]
    (d / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint, missing vocab.json"):
        checkpoint.load(str(d))
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        checkpoint.load(str(tmp_path / "empty"))


def test_winner_manifest_resolves_and_refuses_partial_checkpoints(saved, tmp_path):
    d, model, cfg, _ = saved
    run = d.parent
    m = checkpoint.winner_manifest(str(run), "ckpt", {"val_loss": 1.5, "epoch": 1, "step": 5},
                                   "r", model.summary())
    uri = checkpoint.write_winner(str(run), m)
    assert checkpoint.resolve(uri) == checkpoint.resolve(str(run)) == str(run / "ckpt")
    assert json.loads((run / "winner.json").read_text())["val_loss"] == 1.5
    gone = run / "gone"
    d.rename(gone)  # the checkpoint a manifest names was deleted (or not copied with it)
    for given in (uri, str(run)):
        said = re.escape(f"{given} names checkpoint {d}, which does not exist")
        with pytest.raises(CheckpointError, match=said):
            checkpoint.load(given)
    gone.rename(d)
    (d / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="not publishing"):
        checkpoint.write_winner(str(run), m)
    for bad in ("5", "[1]", '{"checkpoint": 7}', "{nope"):  # each was a TypeError or worse
        (tmp_path / "w.json").write_text(bad)
        with pytest.raises(CheckpointError, match="not a (valid )?winner manifest"):
            checkpoint.resolve(str(tmp_path / "w.json"))


def test_a_failed_local_upload_leaves_nothing_behind(saved, tmp_path, monkeypatch):
    """A full disk (or Ctrl-C) mid-copy: no half-written directory beside the run's
    checkpoints, and an existing checkpoint of that name is untouched."""
    import shutil

    from charrnn import storage
    from charrnn.errors import StorageError
    src = saved[0]
    dst = tmp_path / "run" / "checkpoint_00000001"
    storage.upload_dir(src, str(dst))
    before = (dst / "model.pt").read_bytes()
    real = shutil.copytree

    def full_disk(src, d, *a, **k):
        real(src, d, *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copytree", full_disk)
    with pytest.raises(StorageError, match="No space left on device"):
        storage.upload_dir(src, str(dst))
    assert sorted(p.name for p in dst.parent.iterdir()) == ["checkpoint_00000001"]
    assert (dst / "model.pt").read_bytes() == before


def test_storage_uris_other_than_local_or_s3_are_refused(saved, tmp_path, monkeypatch):
    d, _, cfg, _ = saved
    assert checkpoint.load(f"file://{d}").config == cfg  # file:// is a local path
    monkeypatch.chdir(tmp_path)
    for uri in ("gs://bucket/runs", "http://host/ckpt", "s3a://bucket/x"):
        with pytest.raises(StorageError, match="unsupported storage scheme .*s3://bucket/prefix"):
            storage.check_storage(uri)
        with pytest.raises(StorageError, match="unsupported storage scheme"):
            checkpoint.load(uri)
    assert not list(tmp_path.glob("*:"))  # no directory named `gs:` was made


def test_storage_inside_a_submitted_jobs_working_dir_is_refused(tmp_path, monkeypatch):
    """`ray job submit --working-dir . -- python jobs/train.py --storage ./runs` would write the
    run into Ray's unpacked copy of the job's files, deleted later and not shared by the next
    submission (resuming would silently start over)."""
    job_dir = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    from charrnn.trainer import check_storage
    with pytest.raises(StorageError, match="inside the working directory that `ray job submit`"):
        check_storage("./runs")
    assert not (job_dir / "runs").exists()
    check_storage(str(tmp_path / "runs"))  # anywhere else is fine


def test_s3_uris_without_a_bucket_are_one_line():
    assert s3.split("s3://bucket/runs/alice/") == ("bucket", "runs/alice")
    assert s3.split("s3://bucket") == ("bucket", "")
    for uri in ("s3://", "s3:///runs", "s3://my bucket/runs"):
        with pytest.raises(StorageError, match="an S3 URI needs a bucket name"):
            storage.check_storage(uri)  # was botocore's ParamValidationError, a traceback
        with pytest.raises(StorageError, match="an S3 URI needs a bucket name"):
            checkpoint.load(uri)
    with pytest.raises(CorpusError, match="names a bucket; give the text's object"):
        load_text(DataConfig(corpus="s3://bucket/"))


def test_a_training_setting_refused_by_a_later_rule_does_not_lock_the_weights(saved, capsys):
    """This session refused run names '.' and '..'; a checkpoint saved under such a name (or any
    training setting a later check refuses) still serves and generates."""
    d, model, cfg, _ = saved
    c = json.loads((d / "config.json").read_text())
    c["run"]["name"], c["train"]["lr"] = "..", -1.0
    (d / "config.json").write_text(json.dumps(c))
    loaded = checkpoint.load(str(d))
    assert loaded.config.model == cfg.model and loaded.config.data == cfg.data
    assert "warning: a saved training setting is no longer accepted (train.lr must" in capsys.readouterr().out


def test_upper_case_drop_chars_saved_before_they_were_refused_still_load(saved, capsys):
    """Under data.lowercase they dropped nothing, which is why a config now refuses them; a
    checkpoint saved with them loads, with all its settings and without them."""
    d, model, cfg, _ = saved
    c = json.loads((d / "config.json").read_text())
    c["data"]["drop_chars"], c["train"]["lr"] = "A!É", 0.0042
    (d / "config.json").write_text(json.dumps(c))
    loaded = checkpoint.load(str(d))
    assert loaded.config.data.drop_chars == "!" and loaded.config.train.lr == 0.0042
    assert "warning" not in capsys.readouterr().out
    c["model"]["hidden_size"] = -1  # the model's own settings stay strict
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="corrupt checkpoint metadata in config.json"):
        checkpoint.load(str(d))


def _tamper(d, name, edit):
    if name.endswith(".json"):
        (d / name).write_text(json.dumps(edit(json.loads((d / name).read_text()))))
    else:
        edit(d / name)


@pytest.mark.parametrize("name,edit,match", [
    ("vocab.json", lambda v: {"chars": "ab"}, "vocab.json has 2 characters but config.json"),
    ("vocab.json", lambda v: {"chars": 5}, "corrupt checkpoint metadata in vocab.json"),
    ("meta.json", lambda m: [1, 2], "meta.json .*expected a JSON object, got list"),
    ("config.json", lambda c: {**c, "model": {**c["model"], "hidden_size": 16}},
     "model.pt does not match config.json's model .*size mismatch"),
    ("config.json", lambda c: {**c, "model": {**c["model"], "bogus": 1}},
     "config.json .*unknown config key model.bogus"),
    ("model.pt", lambda p: torch.save([1, 2], p), "model.pt does not match .*dict-like"),
    ("model.pt", lambda p: torch.save({k: v.fill_(float("nan")) if k == "head.bias" else v
                                       for k, v in torch.load(p).items()}, p),
     "model.pt holds NaN or infinite weights"),
    ("model.pt", lambda p: p.write_bytes(p.read_bytes()[:50]),
     r"model.pt: not a readable checkpoint file \(PytorchStreamReader failed[^.]*\)$"),
])
def test_damaged_checkpoint_files_get_one_line_errors(saved, tmp_path, name, edit, match):
    d, *_ = saved
    _tamper(d, name, edit)
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(str(d))


def test_storage_or_run_path_that_is_a_file_is_one_line(tmp_path):
    from charrnn import runlock
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is a file, not a directory"):
        storage.check_storage(str(tmp_path / "file"))  # was "cannot create ...: File exists"
    with pytest.raises(StorageError, match="Not a directory"):
        storage.check_storage(str(tmp_path / "file" / "runs"))
    with pytest.raises(StorageError, match="'file': .* is a file, not a run directory"):
        with runlock.run_lock(str(tmp_path / "file"), "file"):  # was a FileExistsError traceback
            pass
    assert (tmp_path / "file").read_text() == "x"


def test_a_full_disk_is_one_line_and_leaves_no_partial_files(tmp_path, monkeypatch):
    import errno
    import shutil
    from pathlib import Path
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.pt").write_bytes(b"x")
    run = tmp_path / "run"
    run.mkdir()
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def copy_fails(a, b, **kw):  # shutil.copytree's one error for every file it could not copy
        Path(b).mkdir()
        (Path(b) / "model.pt").write_bytes(b"half")
        raise shutil.Error([(f"{a}/model.pt", f"{b}/model.pt", f"[Errno 28] {full.strerror}: "
                             f"'{a}/model.pt' -> '{b}/model.pt'")])
    monkeypatch.setattr(shutil, "copytree", copy_fails)
    with pytest.raises(StorageError, match=r"^cannot write .*/run/ckpt: No space left on device$"):
        storage.upload_dir(src, str(run / "ckpt"))  # was the shutil.Error list of temp paths

    def write_fails(self, data):
        open(self, "wb").write(data[:1])
        raise full
    monkeypatch.setattr(Path, "write_bytes", write_fails)
    with pytest.raises(StorageError, match=r"^cannot write .*/run/winner.json: No space left"):
        storage.write_text(str(run / "winner.json"), "{}")
    assert list(run.iterdir()) == []  # no half copy, no .tmp file beside the run


def test_a_full_staging_disk_is_one_line(saved, tmp_path, monkeypatch):
    """torch.save on a full disk raises RuntimeError ('unexpected pos 20416 vs 20368'), json
    writes OSError; both were tracebacks out of a training run."""
    _, model, cfg, vocab = saved

    def full(*a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 20416 vs 20368")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"cannot write a checkpoint into .*/again: "
                                              r"\[enforce fail.* \(is its disk full\?\) .*TMPDIR"):
        checkpoint.save(tmp_path / "again", model, cfg, vocab, {"step": 1})


def test_the_storage_directory_names_its_runs(saved, tmp_path):
    """`--checkpoint runs` (the storage) for `runs/alice` (a run) said only "neither a checkpoint
    directory ... nor a winner manifest"."""
    d, model, cfg, vocab = saved
    runs = tmp_path / "runs"
    for name in ("bob", "alice"):
        (runs / name).mkdir(parents=True)
        (runs / name / "winner.json").write_text("{}")
    (runs / "not-a-run").mkdir()
    with pytest.raises(CheckpointError, match=r"runs holds runs, not a checkpoint: give one of "
                                              r"them, e.g. .*runs/alice \(runs: alice, bob\)$"):
        checkpoint.load(str(runs))
    # A run without winner.json (before its first one, or deleted) names its latest checkpoint.
    run = tmp_path / "early"
    for step in (120, 7, 64):
        (run / checkpoint.dir_name(step)).mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"run .*early has no winner.json yet: give one of its "
                                              r"checkpoints, e.g. .*early/checkpoint_00000120 \(the "
                                              r"latest; 3 checkpoint\(s\)\)$"):
        checkpoint.load(str(run))
