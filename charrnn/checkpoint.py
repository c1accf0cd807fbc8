"""Self-describing checkpoints and the winner manifest.

A checkpoint is a directory:
    model.pt        weights (a state_dict of tensors only)
    config.json     the full Config (model.vocab_size filled in) that rebuilds the model
    vocab.json      the characters, in id order
    train_state.pt  optimizer, LR schedule and RNG state (tensors and plain numbers only)
    meta.json       epoch, step, metrics, history, run name, a digest of the held-out text;
                    written last
It loads from its URI alone (a directory, a `winner.json`, or a run directory; local or S3), on
the CPU even when trained on a GPU. `.pt` files load with `weights_only=True`, so a planted
pickle that would run code is refused, never executed.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from charrnn import storage
from charrnn.config import Config
from charrnn.errors import CharrnnError, CheckpointError, ConfigError
from charrnn.model import CharRNN
from charrnn.vocab import Vocab

FORMAT_VERSION = 1
FILES = ("model.pt", "config.json", "vocab.json", "train_state.pt", "meta.json")
MODEL_FILES = tuple(f for f in FILES if f != "train_state.pt")  # what inference reads
WINNER = "winner.json"


def dir_name(step: int) -> str:
    """A run's checkpoint directory for optimizer step `step` (what winner.json names)."""
    return f"checkpoint_{step:08d}"


CHECKPOINT_NAME = re.compile(r"checkpoint_\d{8,}")  # what `dir_name` gives


@dataclass
class Loaded:
    model: CharRNN
    config: Config
    vocab: Vocab
    meta: dict
    uri: str  # where it was loaded from (the checkpoint directory)
    path: Path | None  # the local directory holding its files (None: a removed download)


def save(directory: str | Path, model: CharRNN, config: Config, vocab: Vocab, meta: dict,
         optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> Path:
    """Write a checkpoint into a local directory (Ray Train or the local keeper uploads it).

    `model` must be the bare module (unwrap DDP first: see `dist.unwrap`).
    """
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, d / "model.pt")
        (d / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        (d / "vocab.json").write_text(json.dumps(vocab.to_dict()))
        torch.save({
            "optimizer": optimizer.state_dict() if optimizer else None,
            "scheduler": scheduler.state_dict() if scheduler else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        }, d / "train_state.pt")
        (d / "meta.json").write_text(json.dumps({"format": FORMAT_VERSION, **meta}, indent=2))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        reason = (e.strerror if isinstance(e, OSError) and e.strerror else
                  f"{str(e).splitlines()[0]} (is its disk full?)")
        raise CheckpointError(f"cannot write a checkpoint into {d}: {reason} (training stages "
                              "each checkpoint in the temporary directory, TMPDIR, before it "
                              "is stored)") from None
    return d


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path.name}: it holds pickled objects other than tensors and "
            f"plain data, which could run code ({str(e).splitlines()[0][:160]})") from None
    except (RuntimeError, EOFError) as e:
        detail = str(e).split(". ")[0]  # torch appends a paragraph of advice
        raise CheckpointError(f"{path}: not a readable checkpoint file ({detail})") from None


def load_dir(path: str | Path, uri: str | None = None, device: str = "cpu",
             files: tuple[str, ...] = FILES) -> Loaded:
    """Load a checkpoint from a local directory holding (at least) `files`."""
    d = Path(path)
    missing = [f for f in files if not (d / f).is_file()]
    if missing:
        raise CheckpointError(f"{uri or d}: incomplete checkpoint, missing {', '.join(missing)}")
    where = uri or str(d)
    config = _read_json(d, "config.json", where, _saved_config)
    vocab = _read_json(d, "vocab.json", where, Vocab.from_dict)
    meta = _read_json(d, "meta.json", where, _mapping)
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: checkpoint format {meta.get('format')} is not "
                              f"supported (expected {FORMAT_VERSION})")
    if len(vocab) != config.model.vocab_size:
        raise CheckpointError(f"{where}: vocab.json has {len(vocab)} characters but config.json's "
                              f"model.vocab_size is {config.model.vocab_size}; the files are from "
                              "different checkpoints")
    model = CharRNN(config.model)
    weights = _torch_load(d / "model.pt")
    if isinstance(weights, dict) and not all(
            torch.isfinite(t).all() for t in weights.values() if isinstance(t, torch.Tensor)):
        raise CheckpointError(f"{where}: model.pt holds NaN or infinite weights (its run had "
                              "diverged); use an earlier checkpoint")
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError) as e:  # not a state dict, or shapes and names config.json lacks
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:2] or [str(e)[:200]]
        raise CheckpointError(f"{where}: model.pt does not match config.json's model "
                              f"({first[0]})") from None
    return Loaded(model.to(device).eval(), config, vocab, meta, where, d)


def _saved_config(d: Any) -> Config:
    """A checkpoint's config. A check added after it was saved may refuse one of its training
    settings (run, train, scaling); that must not make the weights unusable: the model and data
    sections (all that inference and the same-run check read) are then kept, the rest default."""
    d = _without_inert_settings(d)
    try:
        return Config.from_dict(d)
    except ConfigError as e:
        if not isinstance(d, dict):
            raise
        config = Config.from_dict({k: d[k] for k in ("model", "data") if k in d})  # strict
        from charrnn import runlog
        runlog.say(f"warning: a saved training setting is no longer accepted ({e}); "
                   "the checkpoint's model and data settings are used as they are")
        return config


def saved_config(ckpt_uri: str) -> Config:
    """The typed config of a checkpoint in storage (local or S3), without its weights."""
    raw = storage.read_bytes(storage.join(ckpt_uri, "config.json"))
    return _parse_json(raw, "config.json", ckpt_uri, _saved_config)


def _without_inert_settings(d: Any) -> Any:
    """A saved config made to pass checks added since, where what it did stays the same: upper-case
    `data.drop_chars` under `data.lowercase` (accepted before) never dropped anything."""
    data = d.get("data") if isinstance(d, dict) else None
    if not (isinstance(data, dict) and data.get("lowercase", True) is True
            and isinstance(data.get("drop_chars"), str)):
        return d
    kept = "".join(c for c in data["drop_chars"] if c.lower() == c)
    return d if kept == data["drop_chars"] else {**d, "data": {**data, "drop_chars": kept}}


def _mapping(value: Any) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _read_json(d: Path, name: str, where: str, build: Any) -> Any:
    return _parse_json((d / name).read_bytes(), name, where, build)


def _parse_json(raw: bytes, name: str, where: str, build: Any) -> Any:
    """Parse one metadata file of a checkpoint; anything unreadable names the file."""
    try:
        return build(json.loads(raw.decode("utf-8")))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, CharrnnError) as e:
        raise CheckpointError(f"{where}: corrupt checkpoint metadata in {name} "
                              f"({str(e) or type(e).__name__})") from None


def missing_files(ckpt_uri: str) -> list[str]:
    """The checkpoint files not (yet) in storage at `ckpt_uri`; empty when it is complete."""
    return [f for f in FILES if not storage.exists(storage.join(ckpt_uri, f))]


def load_train_state(loaded: Loaded) -> dict:
    if loaded.path is None:
        raise CheckpointError(f"{loaded.uri}: its training state was not kept (a downloaded copy); "
                              "load it with `load_dir` on a local directory")
    return _torch_load(loaded.path / "train_state.pt")


def resolve(uri: str) -> str:
    """A winner manifest, run directory or checkpoint directory URI -> checkpoint directory URI."""
    if not uri.strip():  # "" was read as the current directory, and named as " is neither..."
        raise CheckpointError("no checkpoint given: the URI is empty")
    if uri.endswith(".json"):
        return _named_checkpoint(uri, uri)
    if storage.exists(storage.join(uri, "model.pt")):
        return uri
    if storage.exists(storage.join(uri, WINNER)):
        return _named_checkpoint(uri, storage.join(uri, WINNER))
    if not storage.exists(uri):
        raise CheckpointError(f"no checkpoint at {uri}: the path does not exist")
    runs = [r for r in storage.subdirs(uri) if storage.exists(storage.join(uri, r, WINNER))]
    if runs:  # `--checkpoint runs`, the storage, for `runs/alice`, one of its runs
        raise CheckpointError(f"{uri} holds runs, not a checkpoint: give one of them, e.g. "
                              f"{storage.join(uri, runs[0])} (runs: {', '.join(runs[:10])})")
    ckpts = [d for d in storage.subdirs(uri, limit=100_000) if d.startswith("checkpoint_")]
    if ckpts:  # a run whose first winner is not written yet, or whose winner.json was deleted
        raise CheckpointError(f"run {uri} has no {WINNER} yet: give one of its checkpoints, e.g. "
                              f"{storage.join(uri, ckpts[-1])} (the latest; "
                              f"{len(ckpts)} checkpoint(s))")
    raise CheckpointError(f"{uri} is neither a checkpoint directory (model.pt), a run directory "
                          f"({WINNER}) nor a winner manifest")


def _named_checkpoint(given: str, manifest_uri: str) -> str:
    """The checkpoint a winner manifest names, which must exist: loading it, a Serve replica's
    hot swap and `build_app` all say which manifest names what is gone."""
    ckpt = read_winner(manifest_uri)["checkpoint_uri"]
    if not storage.exists(ckpt):
        raise CheckpointError(f"{given} names checkpoint {ckpt}, which does not exist (deleted, or "
                              "not copied with its manifest)")
    return ckpt


def load(uri: str, device: str = "cpu") -> Loaded:
    """Load a checkpoint from any URI `resolve` accepts. From S3, what inference reads (not the
    optimizer state) is downloaded into a temporary directory, removed once loaded (`path` is
    then None)."""
    ckpt = resolve(uri)
    local = storage.local_path(ckpt)
    if local is not None:
        return load_dir(local, ckpt, device)
    missing = missing_files(ckpt)
    if missing:  # as strict as a local checkpoint, without downloading the optimizer state
        raise CheckpointError(f"{ckpt}: incomplete checkpoint, missing {', '.join(missing)}")
    with storage.local_copy(ckpt, kind="load", files=MODEL_FILES) as d:
        return dataclasses.replace(load_dir(d, ckpt, device, files=MODEL_FILES), path=None)


# ----- winner manifest -----------------------------------------------------------------------

def winner_manifest(run_uri: str, checkpoint_name: str, metrics: dict, run_name: str,
                    model_summary: dict) -> dict:
    return {
        "checkpoint": checkpoint_name,  # relative to the manifest: survives copying the run
        "checkpoint_uri": storage.join(run_uri, checkpoint_name),
        "val_loss": metrics["val_loss"],
        "val_bpc": metrics.get("val_bpc"),
        "epoch": metrics["epoch"],
        "step": metrics["step"],
        "run": run_name,
        "model": model_summary,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def best_entry(history: list[dict]) -> dict:
    """The entry of a run's history with the lowest validation loss: what `winner.json` names."""
    return min(history, key=lambda m: m["val_loss"])


def publish_winner(run_uri: str, history: list[dict], run_name: str, model_summary: dict) -> dict:
    """Point `winner.json` at the best checkpoint of `history`; returns the manifest written."""
    best = best_entry(history)
    manifest = winner_manifest(run_uri, dir_name(best["step"]), best, run_name, model_summary)
    write_winner(run_uri, manifest)
    return manifest


def write_winner(run_uri: str, manifest: dict) -> str:
    """Point `winner.json` at a checkpoint, but only one that is complete in storage.

    Call it after the checkpoint's upload returned; the check here guards the invariant that a
    manifest never names a partial or missing checkpoint. The write itself is atomic.
    """
    ckpt = storage.join(run_uri, manifest["checkpoint"])
    missing = missing_files(ckpt)
    if missing:
        raise CheckpointError(f"not publishing {ckpt} as the winner: missing {', '.join(missing)}")
    uri = storage.join(run_uri, WINNER)
    storage.write_text(uri, json.dumps(manifest, indent=2))
    return uri


def read_winner(uri: str) -> dict:
    try:
        manifest = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{uri}: not a valid winner manifest ({e})") from None
    except CharrnnError as e:
        raise CheckpointError(f"cannot read winner manifest: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("checkpoint"), str):
        raise CheckpointError(f"{uri}: not a winner manifest (no 'checkpoint' field)")
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    manifest["checkpoint_uri"] = storage.join(base, manifest["checkpoint"])
    return manifest
