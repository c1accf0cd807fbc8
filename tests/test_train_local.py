"""End to end in local mode: train `tiny` on the tutorial's corpus, resume, interrupt, generate."""

import dataclasses
import json
import os
import re
import shutil
import sys

import pytest
import torch

from charrnn import checkpoint
from charrnn.config import load_config
from charrnn.dist import LocalBackend
from charrnn.errors import CheckpointError, Interrupted
from charrnn.train_loop import Trainer
from charrnn.trainer import fit, prepare
from tests.conftest import ROOT, call_job, run_job


def test_train_then_generate_from_the_winner(tiny_run, tmp_path):
    storage, name, out = tiny_run
    run = storage / name
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 2
    for ln in lines:
        assert "nats/char" in ln and "bpc" in ln and "chars/s" in ln and "sample:" in ln
    assert out.strip().splitlines()[-1] == f"winner: {run / 'winner.json'}"
    winner = json.loads((run / "winner.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert winner["val_loss"] == min(m["val_loss"] for m in metrics)
    assert metrics[-1]["val_loss"] < 2.6  # it learned something in a few seconds
    assert (run / "metrics.csv").read_text().startswith("epoch,step,train_loss,val_loss")
    assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(run.glob("checkpoint_*"))) <= 2 + 1  # best K (+ the latest)

    p = run_job("generate.py", "--checkpoint", str(run / "winner.json"), "--prompt", "Alice was",
                "--max-chars", "120", "--temperature", "0.8", "--seed", "1")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("Alice was") and len(p.stdout.strip()) >= 120
    again = run_job("generate.py", "--checkpoint", str(run), "--prompt", "Alice was",
                    "--max-chars", "120", "--temperature", "0.8", "--seed", "1")
    assert again.stdout == p.stdout  # same seed, same text; a run dir works as the URI

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xef\xbb\xbfthe queen\r\nthe cat\r\nshe said\r\n")  # Notepad: BOM, CRLF
    p = run_job("generate.py", "--checkpoint", winner["checkpoint_uri"], "--prompts-file",
                str(prompts), "--format", "jsonl", "--max-chars", "30", "--top-k", "5",
                "--top-p", "0.9", "--seed", "3")
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["the queen", "the cat", "she said"]
    assert [r["seed"] for r in rows] == [3, 4, 5] and all(len(r["completion"]) == 30 for r in rows)
    p = run_job("generate.py", "--checkpoint", str(run), "--random-prompt", "--greedy",
                "--max-chars", "20")
    assert p.returncode == 0 and len(p.stdout) > 20


def _cfg(corpus, storage, name, *extra):
    return load_config(str(ROOT / "configs" / "tiny.yaml"),
                       [f"data.corpus={corpus}", f"run.storage={storage}", f"run.name={name}",
                        "train.sample_chars=0", *extra])


def _weights(storage, name):
    return checkpoint.load(str(storage / name)).model.state_dict()


def test_resume_continues_steps_and_optimizer_state(corpus_path, tmp_path):
    fit(_cfg(corpus_path, tmp_path, "r", "train.epochs=1"))
    first = checkpoint.load(str(tmp_path / "r" / "checkpoint_00000127"))
    saved_opt = checkpoint.load_train_state(first)["optimizer"]
    # A new trainer on the same run picks up where it stopped.
    cfg, vocab, ids = prepare(_cfg(corpus_path, tmp_path, "r", "train.epochs=2"))
    t = Trainer(cfg, vocab, ids, LocalBackend(str(tmp_path / "r"), 2))
    assert (t.step, t.epoch, t.epoch_step) == (127, 1, 0)
    restored = t.opt.state_dict()
    assert restored["state"][0]["step"] == saved_opt["state"][0]["step"] == 127
    assert torch.equal(restored["state"][0]["exp_avg"], saved_opt["state"][0]["exp_avg"])
    t.fit()
    history = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert [m["step"] for m in history] == [127, 254]
    assert history[1]["val_loss"] < history[0]["val_loss"]


def test_what_a_killed_save_left_is_tidied_before_the_run_resumes(corpus_path, tmp_path, capsys):
    """SIGKILL (the OOM killer) mid-copy left `checkpoint_X.tmp-<hex>` in the run for good; between
    the two renames that replace a checkpoint, it left the only complete copy as `X.old-<hex>`,
    so resuming skipped it and retrained its steps."""
    fit(_cfg(corpus_path, tmp_path, "k", "train.epochs=1"))
    run = tmp_path / "k"
    (run / "checkpoint_00000127").rename(run / "checkpoint_00000127.old-0123abcd")
    shutil.copytree(run / "checkpoint_00000127.old-0123abcd", run / "checkpoint_00000254.tmp-89abcdef")
    (run / "checkpoint_00000254.tmp-89abcdef" / "model.pt").write_bytes(b"half")
    (run / "winner.json.tmp-deadbeef").write_text("{")
    (run / "notes.tmp-1").write_text("a user's file: not ours")
    capsys.readouterr()
    fit(_cfg(corpus_path, tmp_path, "k", "train.epochs=2"))
    out = capsys.readouterr().out
    assert ("restored checkpoint_00000127 from checkpoint_00000127.old-0123abcd, left by a process "
            "killed while replacing it") in out
    assert "removed checkpoint_00000254.tmp-89abcdef, left half-written by a process that was killed" in out
    assert "removed winner.json.tmp-deadbeef" in out
    assert "resuming run 'k' from its checkpoint at step 127" in out
    assert sorted(p.name for p in run.iterdir() if "." in p.name and not p.name.endswith(
        (".json", ".csv", ".png"))) == [".lock", "notes.tmp-1"]
    assert json.loads((run / "metrics.json").read_text())[-1]["step"] == 254


def test_resume_points_the_winner_at_the_best_checkpoint_it_resumed_with(corpus_path, tmp_path,
                                                                         capsys, monkeypatch):
    """A Ray run stopped within ~2 s of a report resumes from the checkpoint before it (Ray Train
    had not recorded the last), while `winner.json` may name the last: retrained and overwritten
    by this attempt, or pruned by Ray's keeper. Resuming repoints the winner at the best of the
    restored history; the same code runs in both modes, shown here in local mode."""
    fit(_cfg(corpus_path, tmp_path, "w", "train.epochs=1", "run.checkpoint_every_steps=50"))
    run = tmp_path / "w"
    manifest = json.loads((run / "winner.json").read_text())
    assert manifest["checkpoint"] == "checkpoint_00000127"
    shutil.copytree(run / "checkpoint_00000127", run / "checkpoint_00000150")  # not in the index
    (run / "winner.json").write_text(json.dumps({**manifest, "checkpoint": "checkpoint_00000150"}))
    cfg, vocab, ids = prepare(_cfg(corpus_path, tmp_path, "w", "train.epochs=2"))
    capsys.readouterr()
    Trainer(cfg, vocab, ids, LocalBackend(str(run), 2))
    assert "winner.json named checkpoint_00000150, which this attempt did not resume with (the " \
           "run stopped before it was recorded); it now names checkpoint_00000127" in capsys.readouterr().out
    assert json.loads((run / "winner.json").read_text())["checkpoint"] == "checkpoint_00000127"
    Trainer(cfg, vocab, ids, LocalBackend(str(run), 2))  # consistent now: nothing to say
    assert "winner.json named" not in capsys.readouterr().out
    (run / "winner.json").write_text("{")  # damaged (or removed): published again
    Trainer(cfg, vocab, ids, LocalBackend(str(run), 2))
    assert "winner.json was missing or unreadable; it now names checkpoint_00000127" in \
        capsys.readouterr().out
    assert json.loads((run / "winner.json").read_text())["checkpoint"] == "checkpoint_00000127"
    # A best checkpoint that cannot be published either: the resume goes on, with a warning.
    (run / "winner.json").write_text(json.dumps({**manifest, "checkpoint": "checkpoint_00000150"}))

    def refuse(*_):
        raise CheckpointError("not publishing it as the winner: missing model.pt")
    monkeypatch.setattr(checkpoint, "write_winner", refuse)
    assert Trainer(cfg, vocab, ids, LocalBackend(str(run), 2)).step == 127
    assert "warning: winner.json not updated: not publishing it" in capsys.readouterr().out


def test_resume_takes_the_configs_lr_and_weight_decay(corpus_path, tmp_path, capsys):
    """Lowering train.lr is how a user continues a run that diverged: the optimizer state that
    is restored (moments, step) must not bring the old LR or weight decay back with it."""
    from charrnn.optim import lr_factor
    fit(_cfg(corpus_path, tmp_path, "h", "train.epochs=1"))
    cfg, vocab, ids = prepare(_cfg(corpus_path, tmp_path, "h", "train.epochs=2", "train.lr=0.001",
                                   "train.weight_decay=0.05"))
    t = Trainer(cfg, vocab, ids, LocalBackend(str(tmp_path / "h"), 2))
    assert "changed since that checkpoint: train.epochs 1 -> 2, train.lr 0.01 -> 0.001, " \
           "train.weight_decay 0.01 -> 0.05" in capsys.readouterr().out
    g = t.opt.param_groups[0]
    assert (g["initial_lr"], g["weight_decay"]) == (0.001, 0.05)
    assert g["lr"] == pytest.approx(0.001 * lr_factor(127, t.total_steps, cfg.train))
    assert t.opt.state_dict()["state"][0]["step"] == 127  # the moments came back
    t.fit()
    lrs = [m["lr"] for m in json.loads((tmp_path / "h" / "metrics.json").read_text())]
    assert lrs == pytest.approx([0.01 * 0.1, 0.001 * 0.1])  # each run ends annealed to 10%


def test_a_finished_run_says_so_and_a_copied_run_resumes_without_noise(corpus_path, tmp_path,
                                                                        capsys):
    fit(_cfg(corpus_path, tmp_path / "a", "done", "train.epochs=1"))
    shutil.copytree(tmp_path / "a" / "done", tmp_path / "b" / "done")  # a run moved elsewhere
    capsys.readouterr()
    fit(_cfg(corpus_path, tmp_path / "b", "done", "train.epochs=1"))
    out = capsys.readouterr().out
    assert "run 'done' has already trained its 1 epochs; --epochs N" in out
    assert "changed since" not in out  # where a run lives is not a changed setting


def test_a_diverged_loss_stops_the_run_and_saves_nothing_of_it(corpus_path, tmp_path):
    """A NaN loss used to train on to the end, save NaN checkpoints and publish a winner.json
    with `"val_loss": NaN` (not JSON). Now the run stops at the first non-finite step with one
    line, and what was saved before stays as it was."""
    from charrnn.errors import TrainingDiverged
    fit(_cfg(corpus_path, tmp_path, "n", "train.epochs=1"))
    run = tmp_path / "n"
    before = {p.name: p.read_bytes() for p in (run / "winner.json", run / "checkpoints.json")}
    with pytest.raises(TrainingDiverged, match=r"the training loss is (nan|inf) at step 1[23]\d\. "
                                               r"The run keeps what it saved up to step 127: "
                                               r"lower train.lr \(now 1e\+06\)"):
        fit(_cfg(corpus_path, tmp_path, "n", "train.epochs=2", "train.lr=1e6", "train.grad_clip=0"))
    assert {p.name: p.read_bytes() for p in (run / "winner.json", run / "checkpoints.json")} == before
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_00000127"]
    fit(_cfg(corpus_path, tmp_path, "n", "train.epochs=2"))  # a sane LR resumes from step 127
    assert [m["step"] for m in json.loads((run / "metrics.json").read_text())] == [127, 254]


def test_resuming_on_other_held_out_text_is_refused(corpus_path, tmp_path):
    """The best validation loss so far was measured on the run's held-out text: resumed on
    other text, the winner would compare unlike numbers. Same text, other settings: fine."""
    from charrnn.errors import CharrnnError
    fit(_cfg(corpus_path, tmp_path, "v", "train.epochs=1"))
    for change, why in (("data.val_fraction=0.2", "data.val_fraction 0.1 -> 0.2"),
                        ("train.eval_max_chars=5000", "train.eval_max_chars 2000000 -> 5000")):
        with pytest.raises(CharrnnError, match=re.escape(
                f"run 'v' was validated on other held-out text ({why}); use another --name")):
            fit(_cfg(corpus_path, tmp_path, "v", "train.epochs=2", change))
    # Another model or vocabulary: the message names what differs.
    for changes, why in (
            (["model.hidden_size=48"], "(model.hidden_size 32 -> 48)"),
            (["data.drop_chars=xyz", "model.num_layers=2"], "(model.num_layers 1 -> 2; vocabulary "
             "45 -> 42 characters, gone 'x', 'y', 'z'; data.drop_chars '' -> 'xyz')")):
        with pytest.raises(CharrnnError, match=re.escape(
                f"run 'v' already holds a checkpoint of a different model or vocabulary {why}; ")):
            fit(_cfg(corpus_path, tmp_path, "v", "train.epochs=2", *changes))
    fit(_cfg(corpus_path, tmp_path, "v", "train.epochs=2", "train.lr=0.005"))
    assert [m["step"] for m in json.loads((tmp_path / "v" / "metrics.json").read_text())] == [127, 254]


def test_a_damaged_latest_checkpoint_is_named_and_can_be_moved_aside(corpus_path, tmp_path):
    """A damaged file in the latest checkpoint stops the resume with one line that says what to
    do; once that checkpoint is moved out, the run resumes from the one before it."""
    from charrnn.errors import CharrnnError
    fit(_cfg(corpus_path, tmp_path, "d", "train.epochs=2", "run.keep_checkpoints=2"))
    run = tmp_path / "d"
    state = run / "checkpoint_00000254" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CharrnnError, match=r"cannot resume run 'd': .*train_state.pt: not a "
                                           r"readable checkpoint file .*move this one out"):
        fit(_cfg(corpus_path, tmp_path, "d", "train.epochs=3"))
    (run / "checkpoint_00000254").rename(tmp_path / "aside")
    fit(_cfg(corpus_path, tmp_path, "d", "train.epochs=3"))
    history = json.loads((run / "metrics.json").read_text())
    assert [m["step"] for m in history] == [127, 254, 381]  # 254 trained again from 127
    assert [e["name"] for e in json.loads((run / "checkpoints.json").read_text())] == [
        "checkpoint_00000254", "checkpoint_00000381"]


def test_ctrl_c_saves_and_the_rerun_resumes_mid_epoch(corpus_path, tmp_path, monkeypatch):
    cfg = _cfg(corpus_path, tmp_path, "c", "train.epochs=1")
    real_step = Trainer._train_step

    def interrupt_at_40(self, x, y):
        if self.step == 40:
            raise KeyboardInterrupt
        real_step(self, x, y)

    monkeypatch.setattr(Trainer, "_train_step", interrupt_at_40)
    with pytest.raises(Interrupted):
        fit(cfg)
    meta = json.loads((tmp_path / "c" / "checkpoint_00000040" / "meta.json").read_text())
    assert (meta["step"], meta["epoch_step"], meta["next_epoch"]) == (40, 40, 0)
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    fit(cfg)
    history = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert [m["step"] for m in history] == [40, 127]
    fit(_cfg(corpus_path, tmp_path, "c2", "train.epochs=1"))
    a, b = _weights(tmp_path, "c"), _weights(tmp_path, "c2")
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    # Resumed with another batch size (or, on Ray, another number of workers), the epoch goes
    # on from the windows it has trained: 40 steps x 32 windows = 20 steps of 64.
    monkeypatch.setattr(Trainer, "_train_step", interrupt_at_40)
    with pytest.raises(Interrupted):
        fit(_cfg(corpus_path, tmp_path, "c3", "train.epochs=1"))
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    cfg, vocab, ids = prepare(_cfg(corpus_path, tmp_path, "c3", "train.epochs=1",
                                   "train.batch_size=64"))
    t = Trainer(cfg, vocab, ids, LocalBackend(str(tmp_path / "c3"), 2))
    assert (t.step, t.epoch, t.epoch_step, t.steps_per_epoch) == (40, 0, 20, 64)


@pytest.mark.parametrize("where", ["save", "index", "after"])
def test_a_second_ctrl_c_during_the_last_save_says_what_was_kept(corpus_path, tmp_path,
                                                                   monkeypatch, where):
    """A second Ctrl-C while the first one's checkpoint was being saved (or its log line and plot
    made) printed a bare `interrupted`; it now says which step the run resumes from, and that
    step is what the rerun resumes from."""
    from charrnn import runlog
    real_step, real_save, real_record = Trainer._train_step, checkpoint.save, runlog.write_record

    first = []

    def interrupt_at_140(self, x, y):
        if self.step == 140:
            first.append(1)
            raise KeyboardInterrupt
        real_step(self, x, y)

    def second(real):  # the second Ctrl-C: in the first one's save, or right after it
        def fn(*args, **kwargs):
            if first and where == "save":
                raise KeyboardInterrupt
            real(*args, **kwargs)
            if first:
                raise KeyboardInterrupt
        return fn

    real_report = LocalBackend.report
    monkeypatch.setattr(Trainer, "_train_step", interrupt_at_140)
    monkeypatch.setattr(checkpoint, "save", second(real_save) if where == "save" else real_save)
    # "index": right after the keeper indexed the checkpoint, before the history records it
    monkeypatch.setattr(LocalBackend, "report", second(real_report) if where == "index" else real_report)
    monkeypatch.setattr(runlog, "write_record", second(real_record) if where == "after" else real_record)
    cfg = _cfg(corpus_path, tmp_path, "k", "train.epochs=2")
    with pytest.raises(Interrupted) as e:
        fit(cfg)
    step = 127 if where == "save" else 140
    assert str(e.value) == (f"a second Ctrl-C ended the shutdown early. The run keeps what it "
                            f"saved up to step {step}; run again to resume from step {step}")
    assert json.loads((tmp_path / "k" / "checkpoints.json").read_text())[-1]["step"] == step
    # "index": the cut came before the winner moved; the rerun moves it (`resume.repoint_winner`)
    winner = 127 if where in ("save", "index") else 140
    assert json.loads((tmp_path / "k" / "winner.json").read_text())["step"] == winner
    assert not [p.name for p in (tmp_path / "k").iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    monkeypatch.setattr(checkpoint, "save", real_save)
    monkeypatch.setattr(runlog, "write_record", real_record)
    monkeypatch.setattr(LocalBackend, "report", real_report)
    cfg, vocab, ids = prepare(cfg)
    assert Trainer(cfg, vocab, ids, LocalBackend(str(tmp_path / "k"), 2)).step == step
    assert json.loads((tmp_path / "k" / "winner.json").read_text())["step"] == step


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_save_like_ctrl_c_and_the_rerun_resumes(corpus_path, tmp_path, sig):
    """`kill`, `docker stop`, a Kubernetes pod stopping (SIGTERM), or the terminal or SSH session
    closing (SIGHUP): each killed the process where it stood, losing what it had trained since
    its last checkpoint (up to an epoch)."""
    import signal
    import subprocess
    import sys
    sig = getattr(signal, sig)
    args = ["--config", "configs/tiny.yaml", "--corpus", str(corpus_path), "--storage",
            str(tmp_path), "--name", "term", "--set", "train.sample_chars=0"]
    p = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train.py"), *args, "--epochs", "500",
                          "--set", "train.log_every_steps=10"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith("corpus ")
        # Its first checkpoint is saved, and it is a few steps into the second epoch: a progress
        # line says so (a fixed sleep raced a whole 0.3 s epoch of `tiny`, and sometimes lost).
        while not p.stdout.readline().startswith("  epoch 2/"):
            pass
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 128 + sig, err
    assert err.strip().splitlines() == ["interrupted: checkpoint saved; run the same command "
                                        "again to resume"]
    saved = json.loads((tmp_path / "term" / "checkpoints.json").read_text())[-1]
    meta = json.loads((tmp_path / "term" / saved["name"] / "meta.json").read_text())
    assert meta["history"][-1]["reason"] == "interrupted" and meta["step"] > 127  # mid-epoch
    again = run_job("train.py", *args, "--epochs", "1")
    assert again.returncode == 0, again.stderr
    assert f"resuming run 'term' from its checkpoint at step {meta['step']} " in again.stdout


def test_a_run_under_nohup_outlives_sighup(corpus_path, tmp_path):
    """`nohup` starts a process with SIGHUP ignored; the SIGHUP handler must not undo that."""
    import signal
    import subprocess
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", "configs/tiny.yaml",
         "--corpus", str(corpus_path), "--storage", str(tmp_path), "--name", "nohup"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        while not p.stdout.readline().startswith("epoch "):
            pass
        p.send_signal(signal.SIGHUP)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0 and "winner: " in out, err
    assert json.loads((tmp_path / "nohup" / "winner.json").read_text())["step"] == 254


def test_ctrl_c_during_a_save_still_saves(corpus_path, tmp_path, monkeypatch):
    """Ctrl-C while the end-of-epoch checkpoint is being stored: the evaluation is redone, so
    the run really has the checkpoint its exit message promises, and the winner names it."""
    real_report = LocalBackend.report
    calls = []

    def interrupted_upload(self, metrics, checkpoint_dir, name):
        calls.append(name)
        if len(calls) == 1:
            raise KeyboardInterrupt  # before anything reached the run directory
        real_report(self, metrics, checkpoint_dir, name)

    monkeypatch.setattr(LocalBackend, "report", interrupted_upload)
    with pytest.raises(Interrupted):
        fit(_cfg(corpus_path, tmp_path, "i", "train.epochs=1"))
    assert calls == ["checkpoint_00000127", "checkpoint_00000127"]
    run = tmp_path / "i"
    assert [e["step"] for e in json.loads((run / "checkpoints.json").read_text())] == [127]
    assert [m["step"] for m in json.loads((run / "metrics.json").read_text())] == [127]
    assert checkpoint.read_winner(str(run / "winner.json"))["step"] == 127
    assert checkpoint.load(str(run)).meta["history"][-1]["reason"] == "interrupted"


def test_a_checkpoint_saved_twice_under_one_name_has_one_index_entry(tmp_path):
    backend = LocalBackend(str(tmp_path / "run"), keep=1)
    for loss in (2.0, 1.5, 1.9):  # the last two: one step, saved twice
        d = tmp_path / f"save{loss}"
        d.mkdir()
        (d / "model.pt").write_text(str(loss))
        backend.report({"val_loss": loss, "step": 10 if loss < 2 else 5}, d,
                       "checkpoint_00000010" if loss < 2 else "checkpoint_00000005")
    index = json.loads((tmp_path / "run" / "checkpoints.json").read_text())
    assert index == [{"name": "checkpoint_00000010", "val_loss": 1.9, "step": 10}]
    assert (tmp_path / "run" / "checkpoint_00000010" / "model.pt").read_text() == "1.9"


def test_time_limit_and_step_interval_checkpoints(corpus_path, tmp_path):
    fit(_cfg(corpus_path, tmp_path, "s", "run.checkpoint_every_steps=50", "run.keep_checkpoints=1"))
    history = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert [m["step"] for m in history] == [50, 100, 127, 150, 200, 250, 254]
    kept = json.loads((tmp_path / "s" / "checkpoints.json").read_text())
    assert len(kept) <= 2 and kept[-1]["step"] == 254
    fit(_cfg(corpus_path, tmp_path, "m", "train.max_minutes=0.0001", "train.epochs=50"))
    history = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert len(history) == 1 and history[0]["reason"] == "time limit"


def _error_line(p):
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


@pytest.mark.parametrize("setup,args,match", [
    (None, ["--corpus", "{tmp}/missing.txt"], "corpus file not found"),
    ("short", ["--corpus", "{tmp}/short.txt"], "too short"),
    ("binary", ["--corpus", "{tmp}/binary.txt"], "offset 2"),
    ("drop", ["--corpus", "{tmp}/drop.txt", "--set", "data.drop_chars=ab\n"], "empty after"),
    (None, ["--corpus", "http://127.0.0.1:9/x.txt"], "--corpus PATH"),
    (None, ["--set", "model.hidden=3"], "unknown config key"),
    (None, ["--set", "train.epochs=many"], "expected int"),
    ("process", ["--config", "{tmp}/none.yaml"], "config file not found"),  # as a user runs it
])
def test_cli_errors_are_one_line(tmp_path, setup, args, match, capfd):
    (tmp_path / "short.txt").write_text("abc " * 20)
    (tmp_path / "binary.txt").write_bytes(b"ab\xfe\xffcd" * 100)
    (tmp_path / "drop.txt").write_text("abab\nab\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    common = ("train.py", "--config", "configs/tiny.yaml", "--storage", str(tmp_path / "runs"))
    p = run_job(*common, *args) if setup == "process" else call_job(capfd, *common, *args)
    assert match in _error_line(p)


def test_a_long_generation_reports_progress_on_stderr(tiny_run, capfd, monkeypatch):
    """Offline generation was silent however long it ran (64 prompts x 30,000 characters of the
    alice model: 46 s); it now writes a line to stderr every 10 s, stdout keeping the texts."""
    from charrnn import runlog
    monkeypatch.setattr(runlog.Every, "due", lambda self: True)  # every chance, not every 10 s
    storage, name, _ = tiny_run
    p = call_job(capfd, "generate.py", "--checkpoint", str(storage / name), "--prompt", "a",
                 "--max-chars", "2048", "--seed", "1")
    assert p.returncode == 0 and len(p.stdout) == 1 + 2048 + 1
    assert p.stderr.startswith("  1,024 of 2,048 characters per prompt, 1 prompt(s) ("), p.stderr


def test_many_prompts_are_generated_and_written_batch_by_batch(tiny_run, tmp_path, capfd,
                                                               monkeypatch):
    """200,000 prompts were one batch: 5 GB held, slower per character than batches of 2,048,
    and nothing written nor reported for 8 minutes, so Ctrl-C kept nothing."""
    from charrnn import generate, runlog
    storage, name, _ = tiny_run
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"alice {c}\n" for c in "abcdefghij"))
    args = ("generate.py", "--checkpoint", str(storage / name), "--prompts-file", str(prompts),
            "--max-chars", "30", "--seed", "3", "--format", "jsonl")
    whole = call_job(capfd, *args)
    assert whole.returncode == 0 and not whole.stderr
    monkeypatch.setattr(generate, "ROWS_PER_BATCH", 4)  # batches of 3, 4 and 3 rows
    monkeypatch.setattr(runlog.Every, "due", lambda self: True)
    calls, real = [], generate.generate
    monkeypatch.setattr(generate, "generate",
                        lambda m, v, p, *a, **k: calls.append(len(p)) or real(m, v, p, *a, **k))
    batched = call_job(capfd, *args)
    assert calls == [3, 4, 3] and batched.stdout == whole.stdout  # same seeds, same texts
    assert [line.split(" (")[0] for line in batched.stderr.splitlines()] == [
        "  3 of 10 prompts done", "  7 of 10 prompts done", "  10 of 10 prompts done"]
    # Texts are written as their batch ends: a failure in the second batch keeps the first.
    def fail_second(m, v, p, *a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(p))
        return real(m, v, p, *a, **k)
    calls.clear()
    monkeypatch.setattr(generate, "generate", fail_second)
    stopped = call_job(capfd, *args)
    assert stopped.returncode == 130 and stopped.stdout == "".join(whole.stdout.splitlines(True)[:3])


def test_prompts_come_from_stdin_with_a_dash(tiny_run):
    """`--prompts-file -` was "No such file or directory: -"."""
    import subprocess
    storage, name, _ = tiny_run
    args = [sys.executable, str(ROOT / "jobs" / "generate.py"), "--checkpoint", str(storage / name),
            "--prompts-file", "-", "--format", "jsonl", "--max-chars", "5", "--seed", "1"]
    p = subprocess.run(args, input=b"\xef\xbb\xbfthe queen\r\n\r\nthe cat\rshe said",
                       capture_output=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert [json.loads(line)["prompt"] for line in p.stdout.splitlines()] == [
        "the queen", "the cat", "she said"]
    p = subprocess.run(args, input=b"", capture_output=True, cwd=ROOT, timeout=120)
    assert (p.returncode, p.stderr.decode()) == (
        2, "error: --prompts-file stdin has no prompts (one per line; blank lines are skipped)\n")


def test_generate_cli_errors(tiny_run, tmp_path, capfd):
    storage, name, _ = tiny_run
    run = str(storage / name)
    # one case as a user runs it (a new process); the rest call main() in this process
    line = _error_line(run_job("generate.py", "--checkpoint", run, "--prompt", "Ωa"))
    assert "'ω'" in line and "--oov drop" in line  # the flag, not a policy to look up
    ok = call_job(capfd, "generate.py", "--checkpoint", run, "--prompt", "Ωa", "--oov", "drop",
                  "--max-chars", "5")
    assert ok.returncode == 0 and ok.stdout.startswith("Ωa")
    assert "--temperature must be a finite number > 0" in _error_line(call_job(
        capfd, "generate.py", "--checkpoint", run, "--prompt", "a", "--temperature", "0"))
    assert "--max-chars must be >= 0" in _error_line(call_job(
        capfd, "generate.py", "--checkpoint", run, "--prompt", "a", "--max-chars", "-1"))
    # More than any address space holds: one line and status 1, not numpy's traceback.
    p = run_job("generate.py", "--checkpoint", run, "--prompt", "a", "--max-chars", str(10**14))
    assert p.returncode == 1 and p.stderr == (
        "error: out of memory: could not allocate 364 TiB; ask for less (fewer prompts or a "
        "smaller --max-chars)\n")
    moved = tmp_path / "moved"  # a checkpoint whose training corpus is not on this machine
    best = json.loads((storage / name / "winner.json").read_text())["checkpoint"]
    shutil.copytree(storage / name / best, moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["data"]["corpus"] = str(tmp_path / "elsewhere.txt")
    (moved / "config.json").write_text(json.dumps(cfg))
    assert "--random-prompt: corpus file not found: " in _error_line(call_job(
        capfd, "generate.py", "--checkpoint", str(moved), "--random-prompt"))
    assert "--corpus: data.corpus must be set" in _error_line(call_job(
        capfd, "generate.py", "--checkpoint", str(moved), "--random-prompt", "--corpus", ""))
    assert "--device: device must be auto, cpu, cuda or cuda:N, got 'tpu'" in _error_line(call_job(
        capfd, "generate.py", "--checkpoint", run, "--prompt", "a", "--device", "tpu"))
    assert "--seed must be >= 0" in _error_line(call_job(
        capfd, "generate.py", "--checkpoint", run, "--prompt", "a", "--seed", "-1"))
    assert "(or use --greedy)" in _error_line(call_job(
        capfd, "generate.py", "--checkpoint", run, "--prompt", "a", "--temperature", "nan"))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    assert "has no prompts" in _error_line(call_job(
        capfd, "generate.py", "--checkpoint", run, "--prompts-file", str(blank)))
    blank.write_bytes(b"ab\xff\n")
    assert "not UTF-8 text (byte offset 2, line 1)" in _error_line(call_job(
        capfd, "generate.py", "--checkpoint", run, "--prompts-file", str(blank)))
    # Past the first 8 KiB: a text-mode read named the offset within its chunk (5,426 here).
    blank.write_bytes(b"\xef\xbb\xbf" + b"alice\n" * 5000 + b"ab\xff\n")
    assert "not UTF-8 text (byte offset 30,005, line 5,001)" in _error_line(call_job(
        capfd, "generate.py", "--checkpoint", run, "--prompts-file", str(blank)))
    assert "does not exist" in _error_line(call_job(
        capfd, "generate.py", "--checkpoint", str(tmp_path / "nope"), "--prompt", "a"))
    # was " is neither a checkpoint directory ...", the current directory searched for one
    assert _error_line(call_job(capfd, "generate.py", "--checkpoint", "", "--prompt", "a")) == (
        "error: no checkpoint given: the URI is empty")
    assert "prompts-file" in _error_line(call_job(
        capfd, "generate.py", "--checkpoint", run, "--prompts-file", str(tmp_path / "nope.txt")))
    # Empty values were read as not given: "give --prompt, --prompts-file or --random-prompt",
    # and `--serve-url ""` went on to load checkpoint None (AttributeError traceback).
    assert _error_line(call_job(capfd, "generate.py", "--checkpoint", run, "--prompts-file", "")) == (
        "error: --prompts-file is empty: give a file, or - to read stdin")
    assert _error_line(call_job(capfd, "generate.py", "--serve-url", "", "--prompt", "a")) == (
        "error: --serve-url '' is not a valid URL; expected http(s)://HOST[:PORT]/PATH")


def test_a_ray_address_with_no_cluster_is_one_line(monkeypatch):
    """Ray itself retries such an address for minutes, printing only its own warnings."""
    from charrnn.errors import CharrnnError
    from charrnn.trainer import connect_ray
    from tests.services import free_port
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    with pytest.raises(CharrnnError, match=r"^no Ray cluster answers at RAY_ADDRESS=127.0.0.1:\d+ "
                                           r"\(Connection refused\): start one \(`ray start --head`\)"):
        connect_ray()


def test_a_dead_cluster_left_on_record_by_ray_start_is_one_line(capfd, corpus_path, tmp_path,
                                                               monkeypatch):
    """A head that died without `ray stop` leaves its address in Ray's ray_current_cluster file,
    which a plain `ray.init()` joins: `jobs/train.py --workers 1` then retried it for minutes
    (over 5 measured), printing only Ray's GCS warnings."""
    from tests.services import free_port
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    record = tmp_path / "ray" / "ray_current_cluster"
    record.parent.mkdir()
    record.write_text(f"127.0.0.1:{free_port()}")
    line = _error_line(call_job(capfd, "train.py", "--config", "configs/tiny.yaml", "--workers",
                                "1", "--corpus", str(corpus_path), "--storage",
                                str(tmp_path / "runs")))
    assert re.fullmatch(
        r"error: no Ray cluster answers at 127\.0\.0\.1:\d+, which the last `ray start` on this "
        rf"machine recorded in {re.escape(str(record))} \(Connection refused\): start that "
        r"cluster again, or run `ray stop` \(it clears the record\) or set RAY_ADDRESS=local to "
        r"train on this machine alone", line), line


def test_ray_address_local_is_a_new_cluster_whatever_is_on_record(tmp_path, monkeypatch):
    """RAY_ADDRESS=local (Ray's word) is the way past a dead record without `ray stop`: no
    probe of the recorded address, and the new cluster counts as this machine alone (too many
    workers is an error, not a wait)."""
    import ray

    from charrnn.trainer import connect_ray
    from tests.services import free_port
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    record = tmp_path / "ray" / "ray_current_cluster"
    record.parent.mkdir()
    record.write_text(f"127.0.0.1:{free_port()}")
    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(os.environ.get("RAY_ADDRESS")))
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert connect_ray() is True and calls == ["local"]
    monkeypatch.delenv("RAY_ADDRESS")
    record.unlink()
    assert connect_ray() is True  # nothing on record: a new cluster too
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert connect_ray() is False  # `ray start`'s cluster, which may grow


def test_resources_a_cluster_cannot_supply():
    from charrnn.errors import CharrnnError
    from charrnn.trainer import check_resources
    have = {"CPU": 2.0}
    check_resources(2, 0.8, 0.0, have, fixed=True)  # fits: nothing said
    with pytest.raises(CharrnnError, match=r"4 workers x 0.8 CPU need 3.2 CPU; the Ray cluster "
                                           r"has 2 CPU: lower --workers"):
        check_resources(4, 0.8, 0.0, have, fixed=True)
    with pytest.raises(CharrnnError, match=r"need 2 GPU; the Ray cluster has 0 GPU"):
        check_resources(2, 0.5, 1.0, have, fixed=True)
    with pytest.raises(CharrnnError, match=r"^1 worker x 0.8 CPU \+ 1 GPU needs 1 GPU; the Ray "):
        check_resources(1, 0.8, 1.0, have, fixed=True)
    check_resources(4, 0.8, 0.0, have, fixed=False)  # a cluster that may grow: Ray Train waits


def test_a_run_moves_from_local_mode_to_ray_train_never_back(tmp_path):
    """Each mode keeps its own record of a run's checkpoints (the local keeper's index, Ray
    Train's snapshot). Local -> Ray hands over the local run's latest checkpoint; Ray -> local is
    refused, since the keeper would retrain over the Ray run's checkpoints and prune them."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    from charrnn.dist import KEEPER_INDEX, RAY_SNAPSHOT, resume_point
    from charrnn.errors import CharrnnError
    assert RAY_SNAPSHOT == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    run = tmp_path / "r"
    assert resume_point(str(run), "r", ray_mode=True) is None  # a new run
    assert resume_point(str(run), "r", ray_mode=False) is None
    run.mkdir()
    (run / KEEPER_INDEX).write_text(json.dumps([{"name": "checkpoint_00000010", "val_loss": 2.0,
                                                 "step": 10},
                                                {"name": "checkpoint_00000020", "val_loss": 2.1,
                                                 "step": 20}]))
    assert resume_point(str(run), "r", ray_mode=True) is None  # listed, but nothing stored
    from charrnn.checkpoint import FILES
    for name in ("checkpoint_00000010", "checkpoint_00000020"):
        (run / name).mkdir()
        for f in FILES:
            (run / name / f).write_text("")
    assert resume_point(str(run), "r", ray_mode=True) == f"{run}/checkpoint_00000020"
    assert resume_point(str(run), "r", ray_mode=False) is None  # the keeper resumes itself
    # A Ray run stopped before Ray Train wrote its snapshot: its winner is handed over.
    ray_run = tmp_path / "early"
    ray_run.mkdir()
    shutil.copytree(run / "checkpoint_00000010", ray_run / "checkpoint_00000010")
    (ray_run / "winner.json").write_text(json.dumps({"checkpoint": "checkpoint_00000010"}))
    assert resume_point(str(ray_run), "early", ray_mode=True) == f"{ray_run}/checkpoint_00000010"
    with pytest.raises(CharrnnError, match="run 'early' was trained by Ray Train workers"):
        resume_point(str(ray_run), "early", ray_mode=False)
    # The same files from a local run (its saved config says 0 workers) whose index was removed:
    # not a Ray run (as it was told), and not to be retrained over either.
    (ray_run / "checkpoint_00000010" / "config.json").write_text(json.dumps({"scaling": {"workers": 0}}))
    with pytest.raises(CharrnnError, match=r"run 'early' has a winner.json but no checkpoints.json "
                                           r"\(local mode's index of its checkpoints\): restore"):
        resume_point(str(ray_run), "early", ray_mode=False)
    (ray_run / "checkpoint_00000010" / "config.json").write_text(json.dumps({"scaling": {"workers": 2}}))
    with pytest.raises(CharrnnError, match="run 'early' was trained by Ray Train workers"):
        resume_point(str(ray_run), "early", ray_mode=False)
    (ray_run / RAY_SNAPSHOT).write_text("{}")  # from then on Ray Train resumes it itself
    assert resume_point(str(ray_run), "early", ray_mode=True) is None
    (run / RAY_SNAPSHOT).write_text("{}")
    with pytest.raises(CharrnnError, match="run 'r' was trained by Ray Train workers: continue "
                                           r"it with --workers N \(N >= 1\)"):
        resume_point(str(run), "r", ray_mode=False)


def test_one_run_is_trained_by_one_process_at_a_time(corpus_path, tmp_path):
    """A second process training the same run would interleave checkpoints with the first and
    prune them; it gets one line instead. The lock goes with the first process."""
    import fcntl

    from charrnn.errors import CharrnnError
    (tmp_path / "busy").mkdir()
    with open(tmp_path / "busy" / ".lock", "a") as held:  # as another process would hold it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CharrnnError, match="run 'busy' is being trained by another process"):
            fit(_cfg(corpus_path, tmp_path, "busy", "train.epochs=1"))
        assert not list((tmp_path / "busy").glob("checkpoint_*"))
    fit(_cfg(corpus_path, tmp_path, "busy", "train.epochs=1"))  # released: it trains
    assert (tmp_path / "busy" / "winner.json").is_file()


def test_a_batch_larger_than_an_epoch_is_noted(corpus_path, tmp_path, capsys):
    """`train.batch_size=100000` on a 4,061-window corpus trained one step per epoch, said only
    as "1 steps/epoch"."""
    fit(_cfg(corpus_path, tmp_path, "big", "train.epochs=1", "train.batch_size=100000"))
    assert ("note: train.batch_size 100,000 is more than the 4,061 windows a worker has per epoch: "
            "each epoch is one step of them all") in capsys.readouterr().out


def test_a_warmup_longer_than_the_run_is_noted(corpus_path, tmp_path, capsys):
    """`train.warmup_steps=100000` trained 254 steps at a learning rate that never left warm-up
    (loss 3.83 against 2.09), without a word."""
    fit(_cfg(corpus_path, tmp_path, "warm", "train.epochs=1", "train.warmup_steps=300"))
    assert ("note: train.warmup_steps 300 is not below the run's 127 steps: the learning rate "
            "never reaches train.lr") in capsys.readouterr().out
    fit(_cfg(corpus_path, tmp_path, "short", "train.epochs=1", "train.warmup_steps=5"))
    assert "train.warmup_steps" not in capsys.readouterr().out


def test_a_checkpoint_the_store_refuses_stops_the_run_naming_what_is_kept(corpus_path, tmp_path,
                                                                        monkeypatch):
    """The store went away mid-run (or its disk filled): the error was the store's own message
    ("s3://b/runs/x/checkpoint_00002286: When getting information for key ... curlCode: 7"),
    which said neither that the run had stopped nor where it would resume."""
    from charrnn import dist
    from charrnn.errors import StorageError
    real, calls = dist.storage.upload_dir, []

    def upload_dir(local, uri):
        calls.append(uri)
        if len(calls) == 2:
            raise StorageError(f"{uri}: Could not connect to server")
        real(local, uri)
    monkeypatch.setattr(dist.storage, "upload_dir", upload_dir)
    with pytest.raises(StorageError) as e:
        fit(_cfg(corpus_path, tmp_path, "gone", "train.epochs=3"))
    assert str(e.value) == (
        f"could not store checkpoint_00000254 (step 254), so the run stopped: {tmp_path}/gone/"
        "checkpoint_00000254: Could not connect to server; once that is fixed, the same command "
        "resumes from step 127")
    monkeypatch.setattr(dist.storage, "upload_dir", real)
    fit(_cfg(corpus_path, tmp_path, "gone", "train.epochs=3"))  # and it does
    assert json.loads((tmp_path / "gone" / "winner.json").read_text())["step"] == 381


@pytest.mark.parametrize("index", [
    "garbage", "5", "{}", '[{"name": 5, "val_loss": 1}]', '[{"name": "checkpoint_00000018"}]',
    # the keeper prunes entries it no longer keeps: a name outside the run would be deleted
    '[{"name": "../other/checkpoint_00000018", "val_loss": 1.0}]',
])
def test_a_damaged_checkpoint_index_is_refused(tmp_path, index):
    """Was an AttributeError or KeyError traceback for entries that are not the keeper's."""
    from charrnn.dist import KEEPER_INDEX, keeper_entries
    from charrnn.errors import CharrnnError
    (tmp_path / KEEPER_INDEX).write_text(index)
    with pytest.raises(CharrnnError, match="not a checkpoint index; it is written by charrnn"):
        keeper_entries(str(tmp_path))
    (tmp_path / KEEPER_INDEX).write_text("[]")
    assert keeper_entries(str(tmp_path)) == []


def test_entry_points_import_torch_inside_main():
    """A Ctrl-C while torch loads (the first 2 s) was a KeyboardInterrupt traceback from an
    import; inside main() it is run_cli's clean `interrupted` (status 130)."""
    import subprocess
    import sys
    code = ("import sys; import jobs.train, jobs.generate; "
            "sys.exit('torch imported at module level' if 'torch' in sys.modules else 0)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_a_worker_failure_that_is_a_charrnn_error_is_one_line():
    """What fit() makes of Ray Train's WorkerGroupError after its restarts: the first rank whose
    error is a CharrnnError (unwrapped from Ray's UserExceptionWithTraceback), or None (a bug,
    whose traceback stays)."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from charrnn.errors import StorageError
    from charrnn.trainer import _charrnn_failure
    wrapped = {1: UserExceptionWithTraceback(StorageError("s3://b/r: no such bucket"), "Traceback...")}
    assert _charrnn_failure(WorkerGroupError("x", wrapped)) == "rank 1: s3://b/r: no such bucket"
    bug = {0: UserExceptionWithTraceback(ZeroDivisionError("division by zero"), "Traceback...")}
    assert _charrnn_failure(WorkerGroupError("x", bug)) is None


def test_running_out_of_memory_is_one_line(capsys):
    """numpy's MemoryError, torch's CPU allocator failure (a RuntimeError) and CUDA's
    OutOfMemoryError end as one line and status 1, locally and from a Ray Train worker; any other
    RuntimeError keeps its traceback."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from charrnn.cli import run_cli
    from charrnn.errors import out_of_memory
    from charrnn.trainer import _oom_failure
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                       "allocate memory: you tried to allocate 640000000000 bytes. Error code 12")
    cuda = type("OutOfMemoryError", (RuntimeError,), {})(
        "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.15 GiB total capacity)")
    assert out_of_memory(cpu) == "596.0 GiB" and out_of_memory(cuda) == "20 GiB"
    assert out_of_memory(MemoryError("Unable to allocate 37.3 GiB for an array")) == "37.3 GiB"
    assert out_of_memory(MemoryError()) == "memory" and out_of_memory(RuntimeError("x")) is None

    def fail(e):
        def main():
            raise e
        return main
    assert run_cli(fail(cpu), oom_hint="a smaller model") == 1
    assert capsys.readouterr().err == ("error: out of memory: could not allocate 596.0 GiB; ask "
                                       "for less (a smaller model)\n")
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(fail(RuntimeError("a bug")))
    failures = {0: UserExceptionWithTraceback(ZeroDivisionError("x"), "Traceback..."),
                1: UserExceptionWithTraceback(cpu, "Traceback...")}
    assert _oom_failure(WorkerGroupError("x", failures)) is cpu
    assert _oom_failure(WorkerGroupError("x", {0: failures[0]})) is None


def test_a_ranks_steps_cover_its_share_even_with_fewer_windows_than_workers(tmp_path):
    """A rank's share is ceil(K / world) windows (the index list is padded to equal shares).
    Counted as K // world, 1 window and 2 workers made 0 steps an epoch and a ZeroDivisionError
    at the first evaluation, on every Ray Train restart."""
    from charrnn.vocab import Vocab
    text = "alice was beginning to get very tired of sitting by her sister on the bank\n"
    vocab = Vocab.from_text(text)
    cfg = _cfg("unused", tmp_path, "k", "data.val_fraction=0.49")
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=len(vocab)))
    for world, windows, steps in ((1, 1, 1), (2, 1, 1), (4, 1, 1)):
        backend = LocalBackend(str(tmp_path / "k"), 2)
        backend.world = world
        t = Trainer(cfg, vocab, vocab.encode(text), backend)
        assert (t.K, t.steps_per_epoch) == (windows, steps)
    cfg = _cfg("unused", tmp_path, "k", "train.batch_size=64")
    big = vocab.encode(text * 62)  # 129 windows: shares of 65 at 2 workers, 2 steps of 64
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=len(vocab)))
    backend = LocalBackend(str(tmp_path / "k"), 2)
    backend.world = 2
    t = Trainer(cfg, vocab, big, backend)
    assert t.K == 129 and t.steps_per_epoch == 2  # K // world counted 1: a window left out


def test_a_relative_corpus_path_is_saved_absolute(corpus_path, tmp_path, monkeypatch, capsys):
    """A checkpoint keeps its corpus for `generate.py --random-prompt`: saved as given
    (`../shared/...`), it was looked up in whatever directory generation ran from. A checkpoint of
    an older version, which kept it relative, resumes without a 'changed' line for it."""
    import os

    from charrnn.corpus import load_text
    monkeypatch.chdir(corpus_path.parent)
    fit(_cfg(corpus_path.name, tmp_path, "rel", "train.epochs=1"))
    loaded = checkpoint.load(str(tmp_path / "rel"))
    assert loaded.config.data.corpus == str(corpus_path.resolve())
    monkeypatch.chdir(tmp_path)
    assert len(load_text(loaded.config.data)) > 100_000  # what --random-prompt reads
    # as an older version saved it: relative to the directory training ran in
    cfg_file = tmp_path / "rel" / "checkpoint_00000127" / "config.json"
    saved = json.loads(cfg_file.read_text())
    saved["data"]["corpus"] = os.path.relpath(corpus_path, corpus_path.parent.parent)
    cfg_file.write_text(json.dumps(saved))
    monkeypatch.chdir(corpus_path.parent.parent)
    capsys.readouterr()
    fit(_cfg(saved["data"]["corpus"], tmp_path, "rel", "train.epochs=2"))
    out = capsys.readouterr().out
    assert "changed since that checkpoint: train.epochs 1 -> 2\n" in out  # not data.corpus


def test_a_closed_or_full_stdout_ends_generation_in_one_line_and_training_goes_on(
        tiny_run, corpus_path, tmp_path):
    """`generate.py ... | head` ended in a BrokenPipeError traceback, and `train.py ... | head`
    (or a `tee` that died, or a full disk under `> train.log`) killed the run at its next log
    line, losing what it had trained."""
    import subprocess
    storage, name, _ = tiny_run

    def closed_after_one_line(script, *args):
        p = subprocess.Popen([sys.executable, str(ROOT / "jobs" / script), *args], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            p.stdout.readline()
            p.stdout.close()
            err = p.stderr.read().decode()
            return p.wait(timeout=120), err
        finally:
            p.kill()

    # 200,000 characters in one write: more than a pipe holds, so the write meets the closed end.
    rc, err = closed_after_one_line("generate.py", "--checkpoint", str(storage / name),
                                    "--prompt", "alice", "--max-chars", "200000", "--seed", "1")
    # Generating them takes about 10 s here, when generate.py's progress lines (every 10 s) may
    # come: they are all stderr may hold (CI met "  1 of 1 prompts done (19,976 chars/s)").
    progress = re.compile(r"  (1 of 1 prompts done|[\d,]+ of 200,000 characters per prompt, "
                          r"1 prompt\(s\)) \([\d,]+ chars/s\)\n")
    assert (rc, progress.sub("", err)) == (141, ""), err
    rc, err = closed_after_one_line("train.py", "--config", "configs/tiny.yaml", "--corpus",
                                    str(corpus_path), "--storage", str(tmp_path), "--name", "cut")
    assert rc == 0 and "Traceback" not in err, err
    assert "stdout was closed by its reader; the run goes on" in err
    assert json.loads((tmp_path / "cut" / "winner.json").read_text())["step"] == 254  # 2 epochs

    # `> out.txt` on a full disk (/dev/full): an OSError traceback from both before
    def to_a_full_disk(script, *args):
        with open("/dev/full", "w") as full:
            p = subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], cwd=ROOT,
                               stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
        return p.returncode, p.stderr

    assert to_a_full_disk("generate.py", "--checkpoint", str(storage / name), "--prompt",
                          "alice") == (2, "error: cannot write to stdout: No space left on device\n")
    rc, err = to_a_full_disk("train.py", "--config", "configs/tiny.yaml", "--corpus",
                             str(corpus_path), "--storage", str(tmp_path), "--name", "full")
    assert rc == 0 and err.startswith("cannot write to stdout (No space left on device); the run "
                                      "goes on without printing"), err
    assert json.loads((tmp_path / "full" / "winner.json").read_text())["step"] == 254
