"""Continuous batching: groups that join a running batch get the texts they would get alone."""

import threading
import time

import pytest
import torch

from charrnn.engine import DONE, Engine, _Group
from charrnn.generate import generate
from charrnn.model import CharRNN, ModelConfig
from charrnn.sampling import SampleParams
from charrnn.vocab import Vocab

VOCAB = Vocab.from_text("abcdefghijklmnopqrstuvwxyz .,\n")


@pytest.fixture(params=["lstm", "gru"])
def model(request):
    torch.manual_seed(1)
    return CharRNN(ModelConfig(cell=request.param, vocab_size=len(VOCAB), embedding_dim=8,
                               hidden_size=16, num_layers=2)).eval()


def collect(engine, prompts, params, cancelled=None):
    out, done = [[] for _ in prompts], threading.Event()
    errors = []

    def emit(item):
        if item is DONE:
            done.set()
        elif isinstance(item, BaseException):
            errors.append(item)
            done.set()
        else:
            for b, c in enumerate(item):
                if c is not None:
                    out[b].append(c)

    engine.submit(prompts, params, emit, chunk_steps=3, cancelled=cancelled)
    return out, done, errors


def before_forward(monkeypatch, model, hook):
    """`hook(kwargs)` runs before each model call (prefill calls pass `lengths`; GRU steps go
    through the module too, without): to slow the calls down, count them or make them fail."""
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: (hook(k), forward(*a, **k))[1])


def test_groups_joining_mid_run_match_offline_generation(model):
    engine = Engine(model, VOCAB)
    groups = [(["the ", "a"], [SampleParams(60, seed=1), SampleParams(5, greedy=True)]),
              (["hello world"], [SampleParams(40, temperature=0.7, top_k=4, seed=9)]),
              (["x", "yy", "zzz"], [SampleParams(0), SampleParams(30, top_p=0.8, seed=3),
                                    SampleParams(80, seed=4)])]
    results = []
    for prompts, params in groups:  # submitted while earlier groups are still stepping
        results.append(collect(engine, prompts, params))
    for (prompts, params), (out, done, errors) in zip(groups, results):
        assert done.wait(30) and not errors
        assert ["".join(o) for o in out] == generate(model, VOCAB, prompts, params)
    assert engine.max_rows >= 2


def test_whole_text_groups_get_one_emit_and_match_streaming(model):
    """Without chunk_steps a group is woken once, with whole texts; several groups queued
    together are prefilled in one batch; rows end at their own lengths."""
    engine = Engine(model, VOCAB)
    groups = [(["the ", "a", ""], [SampleParams(25, seed=1), SampleParams(0), SampleParams(7, seed=2)]),
              (["hello"], [SampleParams(40, temperature=0.6, top_p=0.9, seed=5)]),
              (["zz", "q"], [SampleParams(12, greedy=True), SampleParams(33, top_k=2, seed=8)])]
    events = [[] for _ in groups]
    done = [threading.Event() for _ in groups]
    with engine._lock:  # queue all three before the engine thread looks: one join
        for k, (prompts, params) in enumerate(groups):
            def emit(x, k=k):
                events[k].append(x)
                if x is DONE:
                    done[k].set()
            engine._pending.append((prompts, params, _Group(emit, None, len(prompts))))
        engine._thread = threading.Thread(target=engine._run, daemon=True)
        engine._thread.start()
    for k, (prompts, params) in enumerate(groups):
        assert done[k].wait(30)
        texts, end = events[k]
        assert end is DONE and texts == generate(model, VOCAB, prompts, params)
        assert [len(t) for t in texts] == [p.max_new_chars for p in params]
    assert engine.max_rows == 6


def test_an_error_reaches_every_waiting_group(model):
    engine = Engine(model, VOCAB)
    bad = SampleParams(5, seed=1)
    out, done, errors = collect(engine, ["\x00not in vocab"], [bad])
    assert done.wait(30) and errors
    time.sleep(0.2)
    # Alone on an idle engine it got its error once; the loop then stepped an empty batch and
    # sent it an AttributeError as well.
    assert [type(e).__name__ for e in errors] == ["VocabError"]


def test_a_group_that_cannot_join_fails_alone(model):
    """A prompt its model cannot encode fails its own group, not the rows already stepping nor
    a group that joins at the same step (prefilled together with it)."""
    engine = Engine(model, VOCAB)
    paused, gate, first = threading.Event(), threading.Event(), []

    def emit(item):  # holds the engine thread until both groups below are queued
        paused.set()
        assert gate.wait(30)
        first.append(item)

    engine.submit(["the "], [SampleParams(40, seed=1)], emit, chunk_steps=3)
    assert paused.wait(30)
    bad = collect(engine, ["\x00not in vocab"], [SampleParams(5, seed=1)])
    good = collect(engine, ["hello", "a"], [SampleParams(30, seed=9), SampleParams(12, seed=2)])
    gate.set()
    assert bad[1].wait(30) and bad[2] and not any(bad[0])
    out, done, errors = good
    assert done.wait(30) and not errors
    assert ["".join(o) for o in out] == generate(
        model, VOCAB, ["hello", "a"], [SampleParams(30, seed=9), SampleParams(12, seed=2)])
    deadline = time.monotonic() + 30
    while (not first or first[-1] is not DONE) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first[-1] is DONE
    assert "".join(c[0] for c in first[:-1] if c[0]) == generate(
        model, VOCAB, ["the "], [SampleParams(40, seed=1)])[0]


def test_a_cancelled_row_stops_and_leaves_the_others_alone(model):
    """A row whose caller went away leaves the batch within a few steps; the rows beside it
    (same group or another) still get their whole texts, the same as offline."""
    engine = Engine(model, VOCAB)
    gone = [threading.Event(), threading.Event()]
    long_ = SampleParams(1_000_000, seed=1)  # minutes of stepping if it ran to its end
    short = SampleParams(300, seed=2)
    out, done, errors = collect(engine, ["the ", "a"], [long_, short], cancelled=gone)
    other = collect(engine, ["hello"], [SampleParams(200, seed=3)])
    wait_for = time.monotonic() + 30
    while not out[0] and time.monotonic() < wait_for:
        time.sleep(0.01)
    gone[0].set()
    assert done.wait(30) and not errors
    assert len("".join(out[0])) < 10_000  # stopped early
    assert ["".join(out[1])] == generate(model, VOCAB, ["a"], [short])
    assert other[1].wait(30) and ["".join(other[0][0])] == generate(
        model, VOCAB, ["hello"], [SampleParams(200, seed=3)])
    deadline = time.monotonic() + 10
    while engine.active_rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.active_rows == 0


def test_whole_text_group_with_every_row_cancelled_still_completes(model):
    engine = Engine(model, VOCAB)
    gone = [threading.Event()]
    got, done = [], threading.Event()
    engine.submit(["the "], [SampleParams(1_000_000, seed=1)],
                  lambda x: (got.append(x), done.set() if x is DONE else None), cancelled=gone)
    time.sleep(0.05)
    gone[0].set()
    assert done.wait(30)
    texts, end = got
    assert end is DONE and 0 < len(texts[0]) < 1_000_000
    with pytest.raises(ValueError, match="one cancelled event per prompt"):
        engine.submit(["a", "b"], [SampleParams(1)] * 2, lambda x: None, cancelled=gone)


def test_a_hot_swap_while_a_group_gathers_splits_it_by_model():
    """A request is prepared for the model serving when it arrives and runs on that model. A
    group gathered across a hot swap holds rows of two models (other vocabularies, even): each
    part joins its own model's engine, and every row gets the text its model gives it alone."""
    import asyncio
    import types
    from collections import Counter

    from charrnn.serve import CharRNNServer, Row
    cls = CharRNNServer.func_or_class  # the replica's class; Serve's own wrappers are not needed

    def served(chars, seed):
        torch.manual_seed(seed)
        vocab = Vocab.from_text(chars)
        m = CharRNN(ModelConfig(vocab_size=len(vocab), embedding_dim=8, hidden_size=16,
                                num_layers=1)).eval()
        return types.SimpleNamespace(engine=Engine(m, vocab), info={"checkpoint": chars},
                                     model=m, vocab=vocab)

    old, new = served("abc ", 1), served("xyz ", 2)
    rows = [Row("ab", SampleParams(20, seed=1), old), Row("xy", SampleParams(20, seed=2), new),
            Row("c", SampleParams(5, seed=3), old)]
    want = [generate(r.gen.model, r.gen.vocab, [r.prompt], [r.params])[0] for r in rows]
    srv = types.SimpleNamespace(batch_sizes=Counter())
    srv._submit = lambda rows, chunk_steps: cls._submit(srv, rows, chunk_steps)

    async def both():
        whole = await cls._batch.__wrapped__(srv, rows)  # what @serve.batch calls with a group
        streams: list[list] = [[] for _ in rows]
        async for chunk in cls._batch_stream.__wrapped__(srv, rows):
            for s, c in zip(streams, chunk):
                s.append(c)
        return whole, streams

    whole, streams = asyncio.run(both())
    assert whole == [(w, r.gen.info) for w, r in zip(want, rows)]
    for s, w in zip(streams, want):  # a stream ends with StopIteration, or when the group ends
        end = s.index(StopIteration) if StopIteration in s else len(s)
        assert "".join(s[:end]) == w and set(s[end + 1:]) <= {"", StopIteration}


def test_serves_warning_that_groups_do_not_fill_is_dropped_and_others_are_kept(monkeypatch):
    """Serve checks `max_batch_size` x `max_concurrent_batches` against `max_ongoing_requests`
    when a replica creates a gatherer's queue. Run here with the deployment's own settings
    (64 x 64 > 256): Serve still warns, and `serve._GroupsNeedNotFill` keeps that warning, whose
    advice would lift the bound on a replica's rows, out of the log; other warnings pass."""
    import asyncio
    import logging
    import types

    from ray.serve import batching

    from charrnn import serve
    replica = types.SimpleNamespace(_deployment_config=serve.CharRNNServer._deployment_config)
    monkeypatch.setattr(batching.serve, "get_replica_context", lambda: replica)
    lazy = serve.CharRNNServer.func_or_class._batch._is_batching_task_alive.__self__
    assert lazy.max_batch_size * lazy.max_concurrent_batches > replica._deployment_config.max_ongoing_requests

    logger, seen = logging.getLogger("ray.serve"), []
    catch = logging.Handler(logging.WARNING)
    catch.emit = seen.append

    async def first_request():  # what creates the queue in a replica (in its event loop)
        monkeypatch.setattr(lazy, "_queue", None)
        lazy.queue  # noqa: B018
        logger.warning("another warning")

    logger.addHandler(catch)
    try:
        asyncio.run(first_request())
        assert [r.getMessage() for r in seen] == ["another warning"]
        with monkeypatch.context() as m:  # without the filter, Serve's warning is there
            m.setattr(logger, "filters", [])
            asyncio.run(first_request())
    finally:
        logger.removeHandler(catch)
    assert "`max_concurrent_batches` (64)" in seen[1].getMessage()


def test_a_loop_stuck_in_a_step_shows_in_stalled_s_and_fails_the_health_check(model):
    """A failed step fails its groups; a step that never returns (a hung device) would leave
    them waiting forever, and only the replica's health check can end that."""
    import types

    from charrnn import serve
    engine = Engine(model, VOCAB)
    assert engine.stalled_s() == 0.0  # idle
    release, stepper = threading.Event(), engine.stepper

    class Stuck:
        fused, state_in = stepper.fused, stepper.state_in
        draw, steps_prompts = staticmethod(stepper.draw), stepper.steps_prompts

        def __call__(self, ids, state):
            release.wait(30)
            return stepper(ids, state)

    engine.stepper = Stuck()
    out, done, errors = collect(engine, ["the "], [SampleParams(5, seed=1)])
    time.sleep(0.3)
    assert engine.stalled_s() >= 0.25
    replica = types.SimpleNamespace(current=types.SimpleNamespace(engine=engine))
    check = serve.CharRNNServer.func_or_class.check_health
    check(replica)  # not yet past the limit
    engine.stall_limit_s = 0.2
    with pytest.raises(RuntimeError, match=r"no progress for 0 s \(more than 0.2 s\) with requests"):
        check(replica)
    release.set()
    assert done.wait(30) and not errors and len("".join(out[0])) == 5
    deadline = time.monotonic() + 10
    while engine.stalled_s() and time.monotonic() < deadline:  # the thread ends when idle
        time.sleep(0.01)
    assert engine.stalled_s() == 0.0


def test_a_long_prefill_shows_progress_at_every_model_call(model, monkeypatch):
    """Serve's largest legal join (256 requests of 64 prompts x 4,000 characters) prefills for
    minutes here; it is progress, not a stuck loop, as long as its model calls return."""
    import charrnn.generate as gen
    monkeypatch.setattr(gen, "PREFILL_CHUNK", 2)  # 40 characters: 20 model calls
    before_forward(monkeypatch, model, lambda _: time.sleep(0.05))
    engine = Engine(model, VOCAB)
    t = time.monotonic()
    out, done, errors = collect(engine, ["alice was beginning to get very tired of"],
                                [SampleParams(2, seed=1)])
    worst = 0.0
    while not done.wait(0.01):
        worst = max(worst, engine.stalled_s())
    assert not errors and time.monotonic() - t >= 1.0
    assert worst < 0.5, worst  # the whole prefill in one pass: over 1 s


def test_running_streams_go_on_while_a_long_prompt_is_prefilled(model, monkeypatch):
    """The prefill of a joining group runs one model call between two steps of the running
    rows. It used to run whole first: Serve's largest request (64 prompts of 4,000 characters)
    stopped every stream for 4.4 s here, and a flood of them for minutes."""
    import charrnn.generate as gen
    monkeypatch.setattr(gen, "PREFILL_CHUNK", 2)  # the 60-character prompt: 30 model calls
    before_forward(monkeypatch, model, lambda _: time.sleep(0.01))
    engine = Engine(model, VOCAB)
    paused, gate, stream, b_started = threading.Event(), threading.Event(), [], []

    def emit(item):  # holds the engine thread until the long prompt is queued
        paused.set()
        assert gate.wait(30)
        if item is not DONE:
            stream.append(item[0] or "")

    a_params, b_prompt = [SampleParams(200, seed=1)], ["the cat sat on the mat. " * 2 + "hello world."]
    engine.submit(["the "], a_params, emit, chunk_steps=1)
    assert paused.wait(30)

    def b_emit(item):
        if not b_started:
            b_started.append(len("".join(stream)))  # the stream's characters by then
        b_out.append(item)

    b_out = []
    engine.submit(b_prompt, [SampleParams(5, seed=2)], b_emit)
    gate.set()
    deadline = time.monotonic() + 30
    while (not b_out or b_out[-1] is not DONE) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b_out[0] == generate(model, VOCAB, b_prompt, [SampleParams(5, seed=2)])
    assert b_started[0] >= 25, b_started  # whole-prefill-first: 1
    while len("".join(stream)) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "".join(stream) == generate(model, VOCAB, ["the "], a_params)[0]


def test_a_loop_that_dies_mid_prefill_fails_the_joining_groups_too(model, monkeypatch):
    """Exceptions of one group fail that group; anything else ends the loop, and every group it
    holds gets the error (the running rows, the ones being prefilled, the queued)."""
    engine = Engine(model, VOCAB)
    paused, gate = threading.Event(), threading.Event()

    def emit(item):  # holds the engine thread until the prefill below is queued
        paused.set()
        assert gate.wait(30)
        running.append(item)

    running = []
    engine.submit(["the "], [SampleParams(500, seed=1)], emit, chunk_steps=1)
    assert paused.wait(30)

    def dies(_):
        raise KeyboardInterrupt

    before_forward(monkeypatch, model, dies)
    out, done, errors = collect(engine, ["hello"], [SampleParams(5, seed=2)])
    gate.set()
    assert done.wait(30) and [type(e) for e in errors] == [KeyboardInterrupt]
    deadline = time.monotonic() + 30
    while not any(isinstance(x, KeyboardInterrupt) for x in running) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(running[-1], KeyboardInterrupt) and engine.stalled_s() == 0.0


def test_a_prefill_whose_callers_all_went_away_stops(model, monkeypatch):
    """Clients that give up on a long prompt (a timeout under a flood) free the engine at its
    next prefill call, not after the whole prefill and the first steps."""
    import charrnn.generate as gen
    monkeypatch.setattr(gen, "PREFILL_CHUNK", 2)  # 40 characters: 20 model calls
    calls = []  # True per prefill call
    before_forward(monkeypatch, model, lambda k: calls.append("lengths" in k))
    engine = Engine(model, VOCAB)
    gone = [threading.Event(), threading.Event()]
    for e in gone:
        e.set()
    got, done = [], threading.Event()
    engine.submit(["alice was beginning to get very tired of"] * 2, [SampleParams(50, seed=1)] * 2,
                  lambda x: (got.append(x), done.set() if x is DONE else None), cancelled=gone)
    assert done.wait(30) and got == [["", ""], DONE] and sum(calls) == 0
    # One caller of two still there: the prefill goes on, and the other row leaves at once.
    gone[1].clear()
    got.clear(), done.clear()
    engine.submit(["alice was beginning to get very tired of"] * 2, [SampleParams(50, seed=1)] * 2,
                  lambda x: (got.append(x), done.set() if x is DONE else None), cancelled=gone)
    assert done.wait(30) and sum(calls) == 20 and got[-1] is DONE
    texts = got[0]
    assert len(texts[0]) < 50 and len(texts[1]) == 50
