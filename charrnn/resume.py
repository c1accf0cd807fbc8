"""Resuming a run: what its latest checkpoint gives back, and what the new config overrides.

`restore` applies these, in this order: open the checkpoint, check it belongs to this run,
restore weights, optimizer and RNG, then let the config's LR and weight decay win; the trainer
maps the epoch position to the current batch size and number of workers (`epoch_step`). `kept`
and `diverged` say, when a run stops early, which step it will resume from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from charrnn import checkpoint, corpus, storage
from charrnn.config import Config, TrainConfig
from charrnn.errors import CheckpointError, TrainingDiverged
from charrnn.vocab import Vocab


def open_checkpoint(directory: Path, run_name: str, local: bool) -> tuple[checkpoint.Loaded, dict]:
    """The checkpoint and its training state. In local mode a damaged file gets a way out: the
    keeper resumes from the checkpoint before it once this one is moved aside."""
    try:
        loaded = checkpoint.load_dir(directory)
        return loaded, checkpoint.load_train_state(loaded)
    except CheckpointError as e:
        if not local:
            raise
        raise CheckpointError(f"cannot resume run {run_name!r}: {e}; to resume from the checkpoint "
                              "before it, move this one out of the run directory") from None


def restore(directory: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, sched, cfg: Config,
            vocab: Vocab, val_signature: str, local: bool, rank: int,
            device: torch.device) -> checkpoint.Loaded:
    """Load the checkpoint in `directory` into `model` (the bare module), the optimizer, the LR
    schedule and the RNG, once it is shown to be of this run. Its `meta` says where the run was."""
    loaded, state = open_checkpoint(directory, cfg.run.name, local)
    check_same_run(loaded, cfg, vocab, val_signature)
    model.load_state_dict(loaded.model.state_dict())
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    apply_optimizer_settings(opt, sched, cfg.train)
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    if rank:  # the saved state is rank 0's: other ranks keep distinct dropout masks
        torch.manual_seed(cfg.train.seed + 7919 * rank + loaded.meta["step"])
    return loaded


def check_same_run(loaded: checkpoint.Loaded, cfg: Config, vocab: Vocab, val_signature: str) -> None:
    """Refuse to resume from a checkpoint of another model, vocabulary or held-out text, naming
    what differs."""
    diff = [f"model.{k} {v!r} -> {getattr(cfg.model, k)!r}"
            for k, v in dataclasses.asdict(loaded.config.model).items()
            if k != "vocab_size" and getattr(cfg.model, k) != v]
    if loaded.vocab != vocab:  # the corpus or its cleaning changed: say which settings did
        diff += [_vocab_change(loaded.vocab, vocab)] + [
            c for c in changed_settings(loaded.config, cfg) if c.startswith("data.")]
    if diff:
        raise CheckpointError(
            f"run {cfg.run.name!r} already holds a checkpoint of a different model or "
            f"vocabulary ({'; '.join(diff)}); use another --name to start a new run")
    if loaded.meta.get("val_signature", val_signature) != val_signature:
        # Its best validation loss was measured on other text: the winner would be wrong.
        changed = [c for c in changed_settings(loaded.config, cfg)
                   if c.startswith(("data.", "train.eval_max_chars "))]
        raise CheckpointError(
            f"run {cfg.run.name!r} was validated on other held-out text "
            f"({'; '.join(changed) or 'the corpus text changed'}); use another --name to start a "
            "new run")


def _vocab_change(old: Vocab, new: Vocab) -> str:
    """`vocabulary 45 -> 71 characters, new 'A', 'B', ... and 18 more, gone ...`."""
    def some(chars: set[str]) -> str:
        shown = sorted(chars)
        return ", ".join(map(repr, shown[:8])) + (f" and {len(shown) - 8} more" if len(shown) > 8 else "")
    added, gone = set(new.chars) - set(old.chars), set(old.chars) - set(new.chars)
    what = [f"new {some(added)}"] * bool(added) + [f"gone {some(gone)}"] * bool(gone)
    return f"vocabulary {len(old)} -> {len(new)} characters, " + (", ".join(what) or "reordered")


def apply_optimizer_settings(opt: torch.optim.Optimizer, sched, t: TrainConfig) -> None:
    """The config's `train.lr` and `train.weight_decay` win over those stored in the restored
    optimizer and scheduler: changing them is how a user continues a run that diverged or
    stalled. The LR schedule's position (its step) is kept."""
    for g in opt.param_groups:
        g["initial_lr"], g["weight_decay"] = t.lr, t.weight_decay
    sched.base_lrs = [t.lr] * len(opt.param_groups)
    factor = sched.lr_lambdas[0](sched.last_epoch)
    for g in opt.param_groups:
        g["lr"] = t.lr * factor


def epoch_step(meta: dict, batch_size: int, world: int, steps_per_epoch: int) -> int:
    """Steps of the current epoch already done, in this attempt's steps. Counted through the
    epoch's trained windows: with another batch size or number of workers (local mode -> Ray
    after a Ctrl-C) a step covers another number of windows."""
    per_step = batch_size * world
    done = meta.get("epoch_windows", meta["epoch_step"] * per_step)  # older checkpoints: steps
    return min(done // per_step, steps_per_epoch)


def changed_settings(old: Config, new: Config) -> list[str]:
    """`section.key old -> new` for each data/train/run/scaling setting that differs (but
    `run.storage`)."""
    a, b = old.to_dict(), new.to_dict()
    # Where the run lives is where its checkpoint was just found: a relative `./runs` saved by an
    # older version, or a copied run, is the same run, not a changed setting.
    a["run"].pop("storage"), b["run"].pop("storage")
    for d in (a, b):  # older versions saved a relative path; symlinks resolve to one place
        d["data"]["corpus"] = corpus.absolute(d["data"]["corpus"])
    return [f"{sec}.{k} {a[sec].get(k)!r} -> {v!r}" for sec in ("data", "train", "run", "scaling")
            for k, v in b[sec].items() if a[sec].get(k) != v]


def repoint_winner(run_uri: str, history: list[dict], run_name: str, model_summary: dict) -> str | None:
    """On resume: make `winner.json` name the best checkpoint of the restored `history`.
    Returns a line saying what changed, or None when it already did.

    Ray Train records a report up to ~2 s after it returns (its controller polls the workers),
    so a run stopped in that window resumes from the checkpoint before the last one, while the
    winner may already name the last. The new attempt retrains that step and overwrites its
    directory, and Ray Train's keeper, which never saw its loss, may prune it: the winner must
    move back to what this attempt knows. (Local mode: a crash between the index and the winner.)
    """
    uri = storage.join(run_uri, checkpoint.WINNER)
    best = checkpoint.dir_name(checkpoint.best_entry(history)["step"])
    try:
        named = checkpoint.read_winner(uri)["checkpoint"] if storage.exists(uri) else None
    except CheckpointError:
        named = None
    if named == best:
        return None
    try:
        checkpoint.publish_winner(run_uri, history, run_name, model_summary)
    except CheckpointError as e:  # that one is gone too: the next improvement publishes
        return f"warning: {checkpoint.WINNER} not updated: {e}"
    was = ("was missing or unreadable" if named is None else f"named {named}, which this "
           "attempt did not resume with (the run stopped before it was recorded)")
    return f"{checkpoint.WINNER} {was}; it now names {best}"


def kept(last: int | None) -> tuple[str, str]:
    """What a run that stops now keeps, given the step of its latest checkpoint (None: none), and
    how it goes on: for the messages that end a run."""
    if last is None:
        return "Nothing was saved", "run again"
    return f"The run keeps what it saved up to step {last}", f"run again to resume from step {last}"


def diverged(which: str, value: float, step: int, history: list[dict],
             t: TrainConfig) -> TrainingDiverged:
    """The error that ends a run whose `which` ("training" or "validation") loss is not finite."""
    saved, again = kept(history[-1]["step"] if history else None)
    return TrainingDiverged(
        f"training diverged: the {which} loss is {value} at step {step}. {saved}: lower "
        f"train.lr (now {t.lr:g}), keep train.grad_clip > 0 (now {t.grad_clip:g}) or use "
        f"train.precision=fp32, and {again}")
