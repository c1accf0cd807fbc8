"""The int8 generation step (`charrnn/quantized.py`) and its C kernel (`charrnn/native.py`)."""

import threading

import numpy as np
import pytest
import torch

from charrnn import native
from charrnn.engine import DONE, Engine
from charrnn.errors import CharrnnError
from charrnn.generate import Generator, generate, prefill
from charrnn.model import CharRNN, ModelConfig
from charrnn.quantized import Int8Stepper, amx_available, pack_amx, quantize_columns, quantize_h
from charrnn.sampling import RowControls, SampleParams, sample_next
from charrnn.stepper import Stepper, make_stepper
from charrnn.vocab import Vocab

from .conftest import call_job

VOCAB = Vocab.from_text("abcdefghijklmnopqrstuvwxyz .,\n")
needs_cc = pytest.mark.skipif(native.compiler() is None, reason="no C compiler to build the int8 kernel")


needs_amx = pytest.mark.skipif(not amx_available(), reason="no AMX here (or no C compiler)")


def lstm(hidden=256, layers=2, cell="lstm", seed=0):
    torch.manual_seed(seed)
    return CharRNN(ModelConfig(cell=cell, vocab_size=len(VOCAB), embedding_dim=16,
                               hidden_size=hidden, num_layers=layers)).eval()


@pytest.fixture
def fresh_kernel(monkeypatch):
    """Build the kernel again in this test (the process keeps the first one it built)."""
    monkeypatch.setattr(native, "_lib", None)


def test_quantizers_round_trip():
    w = torch.randn(64, 40)
    q, s = quantize_columns(w)
    assert q.dtype == torch.int8 and s.shape == (40,)
    x = torch.rand(5, 64) * 2 - 1
    approx = torch._int_mm(quantize_h(x), q).float() * s  # what the kernel computes
    torch.testing.assert_close(approx, x @ w, atol=0.3, rtol=0)  # x @ w: std about 4.6
    assert quantize_h(torch.tensor([[-1.5, 1.0, 0.0]])).tolist() == [[-127, 127, 0]]


@needs_cc
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_int8_step_tracks_the_fp32_step(layers):
    model = lstm(layers=layers)
    fp, q = Stepper(model), Int8Stepper(model)
    ids = torch.randint(0, len(VOCAB), (16, 30))
    _, state = model(ids[:, :10])
    sf, sq = fp.state_in(state), q.state_in(state)
    for t in range(10, 30):  # the state carried for 20 steps
        lf, sf = fp(ids[:, t], sf)
        lq, sq = q(ids[:, t], sq)
        torch.testing.assert_close(torch.softmax(lq, -1), torch.softmax(lf, -1), atol=0.02, rtol=0)
    for hf, hq in zip(sf[0], sq[0]):
        assert hq.dtype == torch.int8
        torch.testing.assert_close(hq.float() / 127, hf, atol=0.03, rtol=0)


@needs_cc
def test_int8_rows_do_not_depend_on_the_batch():
    """Integer GEMMs are exact: a row's text is the same alone, in a subset, or in any batch."""
    model = lstm()
    prompts = ["the cat", "a", "hello there", "xyz", "q", "the end.", "ab", "no"]
    params = [SampleParams(120, temperature=1.3, seed=i) for i in range(8)]
    batch = generate(model, VOCAB, prompts, params, dtype=torch.int8)
    assert generate(model, VOCAB, prompts[2:5], params[2:5], dtype=torch.int8) == batch[2:5]
    assert [generate(model, VOCAB, [p], [s], dtype=torch.int8)[0]
            for p, s in zip(prompts, params)] == batch
    greedy = generate(model, VOCAB, ["the cat"], SampleParams(40, greedy=True), dtype=torch.int8)
    assert len(greedy[0]) == 40


@needs_cc
def test_int8_held_out_loss_matches_fp32(tiny_run):
    """The trained tiny model, teacher forced through each step over held-out text."""
    from charrnn import checkpoint
    from charrnn.corpus import load_text
    storage, name, _ = tiny_run
    loaded = checkpoint.load(str(storage / name))
    ids = torch.from_numpy(loaded.vocab.encode(load_text(loaded.config.data)).astype(np.int64))
    streams = ids[int(len(ids) * 0.9):][: 8 * 400].view(8, 400)  # (8, 400)
    losses = {}
    for name, step in (("fp32", Stepper(loaded.model)), ("int8", Int8Stepper(loaded.model))):
        H, L = loaded.config.model.hidden_size, loaded.config.model.num_layers
        state = step.state_in((torch.zeros(L, 8, H), torch.zeros(L, 8, H)))
        total = 0.0
        for t in range(399):
            logits, state = step(streams[:, t], state)
            total += torch.nn.functional.cross_entropy(logits, streams[:, t + 1], reduction="sum").item()
        losses[name] = total / (8 * 399)
    assert abs(losses["int8"] - losses["fp32"]) < 0.01, losses


@needs_cc
def test_engine_steps_int8_rows_like_offline_generation():
    model = lstm(hidden=32)
    engine = Engine(model, VOCAB, dtype=torch.int8)
    prompts, params = ["the ", "hello world"], [SampleParams(50, seed=1), SampleParams(30, seed=2)]
    out, done = [None] * 2, threading.Event()

    def emit(item):
        if item is DONE or isinstance(item, BaseException):
            done.set()
        else:
            out[:] = item

    engine.submit(prompts, params, emit)
    assert done.wait(60)
    assert out == generate(model, VOCAB, prompts, params, dtype=torch.int8)


def _steps(step, ids, start):
    """Logits of every step of ids (B, T) from `start`, and the last state."""
    out, state = [], start
    for t in range(ids.shape[1]):
        logits, state = step(ids[:, t], state)
        out.append(logits)
    return torch.stack(out), state


@needs_amx
@pytest.mark.parametrize("M, K, N", [(32, 64, 32), (64, 512, 1024), (96, 192, 96)])
def test_the_amx_gemm_is_exactly_int_mm(M, K, N):
    torch.manual_seed(M + K + N)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    b = torch.randint(-128, 128, (K, N), dtype=torch.int8)
    out, packed = torch.empty(M, N, dtype=torch.int32), pack_amx(b)  # (held: the kernel reads it)
    native.kernel().amx_gemm(M, N, K, a.data_ptr(), packed.data_ptr(), out.data_ptr())
    assert torch.equal(out, torch._int_mm(a, b))


@needs_amx
@pytest.mark.parametrize("hidden, layers, rows", [(256, 2, 64), (32, 1, 5), (100, 3, 33)])
def test_the_amx_step_is_exactly_the_int_mm_step(hidden, layers, rows):
    """One native call on AMX, or per layer torch._int_mm and the gate pass: the same numbers
    (integer sums are exact), for widths and batch sizes that need padding."""
    model = lstm(hidden=hidden, layers=layers)
    amx, plain = Int8Stepper(model), Int8Stepper(model)
    plain.amx = False
    ids = torch.randint(0, len(VOCAB), (rows, 12))
    start = amx.state_in((torch.rand(layers, rows, hidden) * 2 - 1, torch.randn(layers, rows, hidden)))
    (la, sa), (lp, sp) = _steps(amx, ids, start), _steps(plain, ids, start)
    assert torch.equal(la, lp)
    for x, y in zip(sa[0] + sa[1], sp[0] + sp[1]):
        assert torch.equal(x, y)


@needs_amx
@pytest.mark.parametrize("rows", [33, 64, 100, 129])
def test_the_amx_step_gives_the_same_numbers_on_any_number_of_threads(rows):
    """Above 32 rows the blocks of 32 are shared out between the caller and the kernel's
    helper threads: every row's numbers are those of one thread stepping them all."""
    model = lstm(hidden=64, layers=2)
    ids = torch.randint(0, len(VOCAB), (rows, 6))
    alone = Int8Stepper(model, threads=1)
    start = alone.state_in((torch.rand(2, rows, 64) * 2 - 1, torch.randn(2, rows, 64)))
    want, (wh, wc) = _steps(alone, ids, start)
    for threads in (2, 3, 5):
        got, (h, c) = _steps(Int8Stepper(model, threads=threads), ids, start)
        assert torch.equal(got, want)
        assert all(torch.equal(x, y) for x, y in zip(h + c, wh + wc))


@needs_amx
def test_steps_from_several_threads_share_the_helpers_safely():
    """Two engines stepping at once (a hot swap) and the helpers serve one step at a time: the
    other runs alone. Every result is exact, over many steps in both threads."""
    model = lstm(hidden=64, layers=2)
    ids = torch.randint(0, len(VOCAB), (96, 40))
    start = Int8Stepper(model, threads=1).state_in((torch.zeros(2, 96, 64), torch.zeros(2, 96, 64)))
    want, _ = _steps(Int8Stepper(model, threads=1), ids, start)
    results, errors = [], []

    def run():
        try:
            for _ in range(5):
                results.append(_steps(Int8Stepper(model, threads=2), ids, start)[0])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 15
    assert all(torch.equal(r, want) for r in results)


@needs_amx
def test_a_forked_child_starts_helpers_of_its_own():
    """A forked child has none of its parent's helper threads: it starts its own (one more
    thread in the child after its first shared step) and steps exactly as the parent."""
    import multiprocessing as mp
    import os
    model = lstm(hidden=64, layers=1)
    step = Int8Stepper(model, threads=2)
    ids = torch.randint(0, len(VOCAB), (64, 4))
    start = step.state_in((torch.zeros(1, 64, 64), torch.zeros(1, 64, 64)))
    want, _ = _steps(step, ids, start)  # the parent's helper runs now

    def child():
        before = len(os.listdir("/proc/self/task"))
        out = _steps(step, ids, start)[0].numpy()
        q.put((out, len(os.listdir("/proc/self/task")) - before))

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child)
    p.start()
    got, new_threads = q.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0 and np.array_equal(got, want.numpy()) and new_threads >= 1


def test_the_kernel_sources_ship_with_the_package():
    """Every file of csrc/ (the kernel and the header it includes) is package data, so an
    installed charrnn (the Dockerfile's `pip install .`) builds the kernel too."""
    import fnmatch
    from pathlib import Path

    import tomllib
    csrc = Path(native.SOURCE).parent
    pyproject = tomllib.loads((csrc.parent.parent / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["charrnn"]
    for f in csrc.iterdir():
        assert any(fnmatch.fnmatch(f"csrc/{f.name}", g) for g in globs), f.name


def test_thread_counts_for_generation():
    """int8 with AMX: the kernel gets the threads and torch keeps one for its bookkeeping (its
    idle workers would spin on the helpers' cores); otherwise torch gets them."""
    from charrnn.stepper import cpu_threads
    before = torch.get_num_threads()
    try:
        assert cpu_threads("int8", 3) == 3 and torch.get_num_threads() == (1 if amx_available() else 3)
        assert cpu_threads("fp32", 2) == 2 and torch.get_num_threads() == 2
        assert cpu_threads("bf16") == 2 and torch.get_num_threads() == 2  # 0: torch's count now
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        Int8Stepper(lstm(hidden=32), threads=0)


@needs_cc
def test_prompts_through_the_int8_step_match_feeding_each_alone():
    """The int8 prefill runs its rows longest first through views; each row's logits and state
    are those of feeding its prompt alone, one character at a time."""
    model = lstm(hidden=64)
    step = Int8Stepper(model)
    prompts = ["the cat sat", "a", "hello there, you", "xyz", "", "q."]
    last, state = prefill(model, VOCAB, prompts, "cpu", step)
    h, c = step.state_in(state)
    for b, p in enumerate(prompts):
        s = step.state_in((torch.zeros(2, 1, 64), torch.zeros(2, 1, 64)))
        for i in VOCAB.encode(p or VOCAB.start):
            logits, s = step(torch.tensor([int(i)]), s)
        assert torch.equal(last[b:b + 1], logits)
        assert all(torch.equal(x[b:b + 1], y) for x, y in zip(h + c, s[0] + s[1]))


@needs_cc
def test_the_native_draw_follows_sample_next():
    """Greedy rows exactly; sampled rows agree but for a draw landing within float rounding of
    a boundary between two characters."""
    q = Int8Stepper(lstm(hidden=32))
    torch.manual_seed(3)
    params = [SampleParams(50, greedy=i % 4 == 0, temperature=0.5 + i / 64, seed=i) for i in range(64)]
    rc = RowControls(params, "cpu")
    same = 0
    for t in range(50):
        logits = torch.randn(64, len(VOCAB)) * 3
        steps = torch.full((64,), t)
        a, b = q.draw(logits, rc, steps), sample_next(logits, rc, steps)
        assert torch.equal(a[rc.greedy], b[rc.greedy])
        same += int((a == b).sum())
    assert same >= 64 * 50 - 3
    filtered = RowControls([SampleParams(5, top_k=3, seed=1)] * 4, "cpu")  # sample_next's own path
    logits = torch.randn(4, len(VOCAB))
    zero = torch.zeros(4, dtype=torch.long)
    assert torch.equal(q.draw(logits, filtered, zero), sample_next(logits, filtered, zero))


@needs_cc
def test_out_of_vocabulary_ids_are_refused_not_read():
    q = Int8Stepper(lstm(hidden=32))
    state = q.state_in((torch.zeros(2, 3, 32), torch.zeros(2, 3, 32)))
    with pytest.raises(IndexError, match=r"1 of 3 ids are outside the vocabulary \(0\.\.29\)"):
        q(torch.tensor([0, len(VOCAB), 1]), state)


@needs_cc
def test_int8_is_refused_for_grus_and_off_cpu():
    with pytest.raises(CharrnnError, match="LSTM models only; this checkpoint is a GRU"):
        make_stepper(lstm(hidden=32, cell="gru"), torch.int8)
    with pytest.raises(CharrnnError, match="runs on CPU only"):
        Int8Stepper(lstm(hidden=32).to("meta"))


@needs_cc
def test_loading_the_kernel_keeps_denormals(fresh_kernel):
    """Built with -ffast-math, the library switched the process to flush-to-zero when loaded."""
    native.kernel()
    assert 5e-324 * float("1.0") > 0 and torch.tensor([1e-40]).mul(1.0).item() > 0


def test_no_compiler_is_one_clear_error(monkeypatch, fresh_kernel):
    monkeypatch.setattr(native, "compiler", lambda: None)
    with pytest.raises(native.NativeBuildError, match="needs a C compiler .* use precision fp32 or bf16"):
        native.kernel()


@needs_cc
def test_a_refused_flag_set_falls_back_to_the_next(monkeypatch, fresh_kernel):
    good = native.flag_sets()[-1]
    monkeypatch.setattr(native, "flag_sets", lambda: [good[:-1] + ["-fno-such-flag-charrnn"], good])
    assert native.kernel().lstm_layer_int8 is not None


@needs_cc
def test_every_flag_set_refused_names_the_compilers_complaint(monkeypatch, fresh_kernel):
    monkeypatch.setattr(native, "flag_sets", lambda: [["-fno-such-flag-charrnn"]])
    with pytest.raises(native.NativeBuildError, match="could not build lstm_int8.c .*no-such-flag"):
        native.kernel()


@needs_cc
def test_generate_cli_with_int8(capfd, tiny_run):
    storage, name, _ = tiny_run
    args = ["--checkpoint", str(storage / name), "--prompt", "alice", "--max-chars", "40", "--seed", "1"]
    p = call_job(capfd, "generate.py", *args, "--precision", "int8")
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.strip()) >= 40
    assert call_job(capfd, "generate.py", *args, "--precision", "int8").stdout == p.stdout


def test_generator_checks_int8_before_any_work(monkeypatch, fresh_kernel, tiny_run):
    from charrnn import checkpoint
    storage, name, _ = tiny_run
    monkeypatch.setattr(native, "compiler", lambda: None)
    with pytest.raises(native.NativeBuildError):
        Generator(checkpoint.load(str(storage / name)), "cpu", "int8")
