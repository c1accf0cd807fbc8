"""The per-worker training function: the same code in local mode and on every Ray Train worker.

`train_loop_per_worker(loop_config)` receives plain data (config dict, vocabulary, corpus ids or
a Ray object reference to them) and a mode; everything distributed goes through `dist.Backend`.
Each evaluation (end of epoch, every `run.checkpoint_every_steps`, time limit, Ctrl-C) measures
validation loss on all ranks, all-reduces it, saves a checkpoint (rank 0) and reports.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from charrnn import checkpoint, optim, resume, runlock, runlog, s3, scratch, storage
from charrnn.budget import TimeBudget
from charrnn.config import Config
from charrnn.data import EpochPlan, split_corpus, val_chunks, val_signature
from charrnn.dist import Backend, LocalBackend, RayBackend, unwrap
from charrnn.errors import CheckpointError, Interrupted, RunLockLost, StorageError, TrainingDiverged
from charrnn.generate import generate
from charrnn.model import CharRNN
from charrnn.sampling import SampleParams
from charrnn.vocab import Vocab


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = Config.from_dict(loop_config["config"])
    s3.configure(cfg.run.s3_endpoint_url, cfg.run.s3_region)
    vocab = Vocab(loop_config["vocab"])
    ids = loop_config["ids"]
    if loop_config["mode"] == "ray":
        import ray
        if isinstance(ids, ray.ObjectRef):
            ids = ray.get(ids)  # zero-copy view of the node's shared-memory copy
        backend: Backend = RayBackend(loop_config["run_uri"], loop_config.get("start_from"),
                                      lease=loop_config.get("lease"), report_lines=cfg.run.ray_report_lines)
    else:
        backend = LocalBackend(loop_config["run_uri"], cfg.run.keep_checkpoints,
                               lease=loop_config.get("lease"))
    try:
        trainer = Trainer(cfg, vocab, ids, backend, loop_config.get("invocation"))
    except CheckpointError as e:
        # The checkpoint to resume from is damaged or of another model, vocabulary or held-out
        # text: every rank reads the same one, so Ray Train's restarts would only fail again.
        backend.stop(e)  # local mode: raises; Ray: the driver raises it, without retries
        return
    trainer.fit()


class Trainer:
    def __init__(self, cfg: Config, vocab: Vocab, ids: np.ndarray, backend: Backend,
                 invocation: str | None = None):
        self.cfg, self.vocab, self.b = cfg, vocab, backend
        t = cfg.train
        # `invocation`: the `jobs/train.py` run this attempt belongs to (Ray Train restarts after
        # a failure are more attempts of one), whose `train.max_minutes` it shares.
        self.invocation, self.budget = invocation, TimeBudget(t.max_minutes)
        torch.manual_seed(t.seed + backend.rank)  # dropout streams differ per rank
        if t.threads:
            torch.set_num_threads(t.threads)
        self.train, self.val = split_corpus(ids, cfg.data)
        self.val_signature = val_signature(self.val, t.eval_max_chars)
        self.K = self.train.num_windows
        # A rank's share: ceil(K / world) windows (`trainer.window_index_array` pads the index
        # list so the shares cover every window), at least one even when K < world.
        self.share = -(-self.K // backend.world)
        self.steps_per_epoch = math.ceil(self.share / t.batch_size)
        self.total_steps = t.epochs * self.steps_per_epoch
        model = CharRNN(cfg.model)
        self.opt, self.sched = optim.build(model, t, self.total_steps, self.budget.progress)
        self.epoch = self.epoch_step = self.step = 0
        self.history: list[dict] = []
        self.best = float("inf")
        self.elapsed_before = 0.0  # training time of earlier attempts of this run
        with backend.resume_checkpoint() as directory:
            if directory is not None:
                self._restore(model, directory)
        self.model = backend.wrap(model)
        if self.history and backend.is_writer:
            line = resume.repoint_winner(backend.run_uri, self.history, cfg.run.name,
                                         unwrap(self.model).summary())
            if line:
                runlog.say(line)
        self.autocast = optim.autocast(backend.device, t.precision)
        self._reset_meter()

    # ----- state ------------------------------------------------------------------------
    def _restore(self, model: CharRNN, directory: Path) -> None:
        loaded = resume.restore(directory, model, self.opt, self.sched, self.cfg, self.vocab,
                                self.val_signature, local=isinstance(self.b, LocalBackend),
                                rank=self.b.rank, device=self.b.device)
        m = loaded.meta
        if self.invocation and m.get("invocation") == self.invocation:  # a restart
            self.budget.restore(m.get("invocation_elapsed_s", 0.0))
        self.epoch, self.step = m["next_epoch"], m["step"]
        self.epoch_step = resume.epoch_step(m, self.cfg.train.batch_size, self.b.world,
                                            self.steps_per_epoch)
        self.history, self.best, self.elapsed_before = m["history"], m["best_val_loss"], m["elapsed_s"]
        if self.b.is_writer:
            b = self.budget
            used = (f"; {b.before_s:.0f} s of this job's {self.cfg.train.max_minutes:g} "
                    "train.max_minutes used" if b.before_s and b.limit_s else "")
            runlog.say(f"resuming run {self.cfg.run.name!r} from its checkpoint at step {self.step} "
                       f"(epoch {self.epoch + 1}, best val {self.best:.4f}{used})")
            changed = resume.changed_settings(loaded.config, self.cfg)
            if changed:
                runlog.say("  changed since that checkpoint: " + ", ".join(changed))

    def _eta(self) -> float:
        """Seconds left: by the pace of this attempt, capped by `train.max_minutes`."""
        pace = self.budget.attempt_s() / max(self.step - self.start_step, 1)
        eta, left = (self.total_steps - self.step) * pace, self.budget.left_s()
        return eta if left is None else min(eta, left)

    def _reset_meter(self) -> None:
        self.loss_sum = self.loss_count = 0.0
        self.meter_t0, self.meter_chars = time.monotonic(), 0

    # ----- loop -------------------------------------------------------------------------
    def fit(self) -> None:
        t = self.cfg.train
        self.start_step = self.step
        self.budget.start()
        if self.b.is_writer:
            m = unwrap(self.model)
            runlog.say(f"training {m.num_params():,} parameters on {self.b.world} worker(s), "
                       f"{self.K:,} windows/epoch, {self.steps_per_epoch} steps/epoch, "
                       f"{t.epochs} epochs, device {self.b.device}")
            if t.batch_size > self.share:  # the batch (and the step count) is not what was asked
                runlog.say(f"note: train.batch_size {t.batch_size:,} is more than the {self.share:,} "
                           "windows a worker has per epoch: each epoch is one step of them all")
            if t.warmup_steps >= self.total_steps:  # the schedule never leaves its warm-up
                runlog.say(f"note: train.warmup_steps {t.warmup_steps:,} is not below the run's "
                           f"{self.total_steps:,} steps: the learning rate never reaches train.lr")
            if self.epoch >= t.epochs:
                runlog.say(f"run {self.cfg.run.name!r} has already trained its {t.epochs} epochs; "
                           "--epochs N (N > that) trains it further")
        try:
            while self.epoch < t.epochs:
                out_of_time = self._run_epoch()
                if self.epoch_step >= self.steps_per_epoch:
                    self.epoch, self.epoch_step = self.epoch + 1, 0
                self._evaluate("time limit" if out_of_time else "epoch")
                if out_of_time:
                    if self.b.is_writer:
                        runlog.say("stopping: train.max_minutes reached")
                    break
        except (TrainingDiverged, RunLockLost) as e:
            self.b.stop(e)  # raises in local mode; ends the Ray run with the error reported
            return
        except KeyboardInterrupt:
            if isinstance(self.b, LocalBackend):
                try:
                    self._evaluate("interrupted")
                    if self.history:  # the interrupt may have come between a save and its manifest
                        self._publish_winner()
                except KeyboardInterrupt:  # a second Ctrl-C: a save it cut left nothing half-written
                    # The keeper's index, not the history: the cut may fall between the two.
                    entries = self.b.entries
                    kept, again = resume.kept(entries[-1]["step"] if entries else None)
                    raise Interrupted(f"a second Ctrl-C ended the shutdown early. {kept}; "
                                      f"{again}") from None
                raise Interrupted() from None
            raise
        if self.b.is_writer and self.history:
            self._publish_winner(final=True)

    def _run_epoch(self) -> bool:
        """One epoch (or what remains of it after a resume). True when the time limit hit."""
        t = self.cfg.train
        plan = EpochPlan(self.train, t.seed, self.epoch)
        skip, stop = self.epoch_step, False
        for i, idx in enumerate(self.b.index_batches(self.K, t.batch_size)):
            if i < skip or i >= self.steps_per_epoch or stop:
                continue  # drain the shard so every worker ends the epoch together
            x, y = (torch.from_numpy(a).to(self.b.device, non_blocking=True) for a in plan.batch(idx))
            self._train_step(x, y)
            self.epoch_step = i + 1
            every = self.cfg.run.checkpoint_every_steps
            if every and self.step % every == 0 and self.epoch_step < self.steps_per_epoch:
                self._evaluate("interval")
            if t.log_every_steps and self.step % t.log_every_steps == 0 and self.b.is_writer:
                self._progress()
            if t.max_minutes:  # ranks agree on the time, so on the LR and on when to stop
                stop = self.budget.sync(self.b.all_reduce_sum, self.b.world)
        return stop

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model.train()
        with self.autocast:
            logits, _ = self.model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        value = loss.item()  # the step's one host sync, after the optimizer step is queued
        if self.b.world == 1 and not math.isfinite(value):
            # One worker stops at once (its weights are never saved now). Several find out
            # together at the next evaluation (a NaN reaches every rank through the all-reduce).
            raise resume.diverged("training", value, self.step, self.history, self.cfg.train)
        self.loss_sum += value * y.numel()
        self.loss_count += y.numel()
        self.meter_chars += y.numel()

    def _progress(self) -> None:
        dt = time.monotonic() - self.meter_t0
        cps = self.meter_chars * self.b.world / max(dt, 1e-9)
        runlog.say(runlog.progress_line(self.epoch, self.cfg.train.epochs, self.epoch_step,
                                        self.steps_per_epoch,
                                        self.loss_sum / max(self.loss_count, 1), cps, self._eta()))

    @torch.no_grad()
    def _val_sums(self) -> tuple[float, float]:
        self.model.eval()
        total = count = 0.0
        state = None  # carried across chunks: each stream is read as one long sequence
        for x, y in val_chunks(self.val, self.b.rank, self.b.world,
                               max_chars=self.cfg.train.eval_max_chars):
            x, y = torch.from_numpy(x).to(self.b.device), torch.from_numpy(y).to(self.b.device)
            with self.autocast:
                logits, state = unwrap(self.model)(x, state)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
        return total, count

    def _evaluate(self, reason: str) -> None:
        """All ranks: validate, all-reduce, checkpoint (rank 0), report. Resets the meter."""
        if self.history and self.history[-1]["step"] == self.step:
            return  # nothing trained since the last checkpoint (e.g. Ctrl-C right after one)
        dt = time.monotonic() - self.meter_t0
        vs, vc = self._val_sums()
        lost = runlock.lease_lost(self.b.run_uri, self.b.lease) if self.b.is_writer else None
        vs, vc, ts, tc, chars, lost_on = self.b.all_reduce_sum(
            [vs, vc, self.loss_sum, self.loss_count, float(self.meter_chars), float(bool(lost))])
        if lost_on:  # every rank stops here; nothing of this evaluation is saved
            raise runlock.lost(self.cfg.run.name, lost or "seen by rank 0",
                               f", so it stopped at step {self.step}")
        elapsed = self.elapsed_before + self.budget.attempt_s()
        val_loss = vs / vc
        train_loss = ts / tc if tc else float("nan")
        train_bad = tc and not math.isfinite(train_loss)
        if train_bad or not math.isfinite(val_loss):
            # Every rank sees the same sums: all stop here, and no checkpoint of it is saved.
            which, value = ("training", train_loss) if train_bad else ("validation", val_loss)
            raise resume.diverged(which, value, self.step, self.history, self.cfg.train)
        metrics = {
            "epoch": self.epoch + self.epoch_step / self.steps_per_epoch,
            "step": self.step, "train_loss": train_loss, "val_loss": val_loss,
            "train_bpc": runlog.bpc(train_loss), "val_bpc": runlog.bpc(val_loss),
            "lr": self.sched.get_last_lr()[0], "chars_per_s": chars / max(dt, 1e-9),
            "elapsed_s": elapsed, "reason": reason,
        }
        # Committed to self only once the checkpoint is stored: a Ctrl-C during validation or
        # the upload leaves this evaluation undone, and the interrupt handler runs it again.
        history, best = [*self.history, metrics], min(self.best, val_loss)
        improved = val_loss < self.best
        name = checkpoint.dir_name(self.step)
        # Rank 0 stages the checkpoint in a scratch directory, which `report` stores.
        with scratch.directory("save") if self.b.is_writer else contextlib.nullcontext() as d:
            tmp = None if d is None else d / name
            if tmp is not None:
                meta = {"run": self.cfg.run.name, "next_epoch": self.epoch,
                        "epoch_step": self.epoch_step, "step": self.step, "metrics": metrics,
                        "epoch_windows": self.epoch_step * self.cfg.train.batch_size * self.b.world,
                        "best_val_loss": best, "elapsed_s": elapsed, "history": history,
                        "val_signature": self.val_signature, "invocation": self.invocation,
                        "invocation_elapsed_s": self.budget.used_s()}
                checkpoint.save(tmp, unwrap(self.model), self.cfg, self.vocab, meta, self.opt,
                                self.sched)
            try:
                self.b.report(metrics, tmp, name)  # returns once rank 0's upload is complete
            except StorageError as e:  # the store went away, a full disk: say what is kept
                kept = f"step {self.history[-1]['step']:,}" if self.history else "the start"
                raise StorageError(f"could not store {name} (step {self.step:,}), so the run "
                                   f"stopped: {e}; once that is fixed, the same command resumes "
                                   f"from {kept}") from None
        self.history, self.best = history, best
        if self.b.is_writer:
            if improved:
                self._publish_winner()
            # The plot costs ~0.3 s: drawn at the end of a run (and when it stops early).
            runlog.write_record(self.b.run_uri, self.history, self.cfg.run.name,
                                plot=reason != "epoch" or self.epoch >= self.cfg.train.epochs)
            eta = self._eta()
            runlog.say(runlog.epoch_line(metrics, self.cfg.train.epochs, eta, self._sample()))
        self._reset_meter()

    def _publish_winner(self, final: bool = False) -> None:
        manifest = checkpoint.publish_winner(self.b.run_uri, self.history, self.cfg.run.name,
                                             unwrap(self.model).summary())
        if final:
            runlog.say(f"best val {manifest['val_loss']:.4f} nats/char ({manifest['val_bpc']:.3f} "
                       f"bpc) at step {manifest['step']}; winner manifest "
                       f"{storage.join(self.b.run_uri, checkpoint.WINNER)}")

    def _sample(self) -> str:
        n = self.cfg.train.sample_chars
        if not n:
            return ""
        prompt = self.vocab.decode(self.val.ids[:24])
        text = generate(unwrap(self.model), self.vocab, [prompt],
                        SampleParams(max_new_chars=n, temperature=0.8, seed=0), self.b.device)[0]
        return prompt + text
