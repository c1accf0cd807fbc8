import numpy as np
import pytest
import torch

from charrnn.generate import generate, sample_ids
from charrnn.model import CharRNN, ModelConfig
from charrnn.sampling import SampleParamError, SampleParams
from charrnn.vocab import Vocab

VOCAB = Vocab.from_text("abcdefghijklmnopqrstuvwxyz .,\n")


@pytest.fixture(params=["lstm", "gru"])
def model(request):
    torch.manual_seed(0)
    m = CharRNN(ModelConfig(cell=request.param, vocab_size=len(VOCAB), embedding_dim=8,
                            hidden_size=16, num_layers=2, dropout=0.1))
    return m.eval()


def test_forward_shapes(model):
    logits, state = model(torch.zeros(3, 7, dtype=torch.long))
    assert logits.shape == (3, 7, len(VOCAB))
    h = state[0] if isinstance(state, tuple) else state
    assert h.shape == (2, 3, 16)


def test_stateful_steps_equal_rerunning_the_prefix(model):
    x = torch.randint(0, len(VOCAB), (2, 12))
    full, _ = model(x)
    _, state = model(x[:, :5])
    for t in range(5, 12):  # one character at a time, state carried
        step, state = model(x[:, t:t + 1], state)
        torch.testing.assert_close(torch.softmax(step[:, 0], -1), torch.softmax(full[:, t], -1),
                                   atol=1e-5, rtol=1e-4)


def test_packed_prompts_of_different_lengths(model):
    a, b = "hello world", "hi"
    single = [generate(model, VOCAB, [p], SampleParams(20, seed=3)) for p in (a, b)]
    batch = generate(model, VOCAB, [a, b], [SampleParams(20, seed=3), SampleParams(20, seed=3)])
    assert batch == [s[0] for s in single]


def test_same_seed_same_text_and_batch_independence(model):
    p = SampleParams(50, temperature=1.2, seed=42)
    one = generate(model, VOCAB, ["the "], p)
    assert one == generate(model, VOCAB, ["the "], p)
    mixed = generate(model, VOCAB, ["x", "the ", "abc"],
                     [SampleParams(5, seed=1), p, SampleParams(80, greedy=True)])
    assert mixed[1] == one[0]
    assert [len(t) for t in mixed] == [5, 50, 80]  # each row stops at its own length
    assert generate(model, VOCAB, ["the "], SampleParams(50, temperature=1.2, seed=43)) != one


def test_long_generations_are_packed_in_chunks_with_the_same_text(model, monkeypatch):
    """Ids are packed every CHUNK_STEPS steps (a list of one tensor per step took ~800 bytes a
    character); chunk edges, a short last chunk and rows of other lengths change no text."""
    import charrnn.generate as gen
    params = [SampleParams(23, seed=5), SampleParams(9, seed=6), SampleParams(16, greedy=True)]
    whole = generate(model, VOCAB, ["the ", "a", ""], params)
    monkeypatch.setattr(gen, "CHUNK_STEPS", 4)
    calls = []
    assert generate(model, VOCAB, ["the ", "a", ""], params,
                    progress=lambda steps, total: calls.append((steps, total))) == whole
    assert [len(t) for t in whole] == [23, 9, 16]
    assert calls == [(4, 23), (8, 23), (12, 23), (16, 23), (20, 23)]  # per packed chunk


def test_long_prompts_are_prefilled_in_passes_with_the_same_result(model, monkeypatch):
    """A prompt longer than PREFILL_CHUNK goes through in passes (one pass held (B, T, 4H) gates:
    about 8 GB for a 1 MB prompt at H=256); rows that end in an earlier pass keep their state."""
    import charrnn.generate as gen
    prompts = ["a", "the quick", "hello world. " * 4, "", "abcdefghijklmnopq"]  # 1, 9, 52, 0, 17
    with torch.inference_mode():
        whole_last, whole_state = gen.prefill(model, VOCAB, prompts, "cpu")
        monkeypatch.setattr(gen, "PREFILL_CHUNK", 8)  # 7 passes; rows drop out at 1, 2 and 3
        last, state = gen.prefill(model, VOCAB, prompts, "cpu")
        # ... and each pass in groups of rows (16 positions: 2 rows of 8, then 1 or 2 at a time)
        monkeypatch.setattr(gen, "PREFILL_POSITIONS", 16)
        grouped_last, grouped_state = gen.prefill(model, VOCAB, prompts, "cpu")
        # The logits after a prompt's last character are the head over its final output.
        logits, _ = model(torch.tensor([VOCAB.encode(prompts[2]).tolist()]))
    torch.testing.assert_close(whole_last[2], logits[0, -1], atol=1e-5, rtol=1e-4)
    for got_last, got_state in ((last, state), (grouped_last, grouped_state)):
        torch.testing.assert_close(got_last, whole_last, atol=1e-5, rtol=1e-4)
        for s, w in zip(*(x if isinstance(x, tuple) else (x,) for x in (got_state, whole_state))):
            torch.testing.assert_close(s, w, atol=1e-5, rtol=1e-4)
    params = [SampleParams(30, seed=i, temperature=0.5) for i in range(len(prompts))]
    assert generate(model, VOCAB, prompts, params) == [
        generate(model, VOCAB, [p], [q])[0] for p, q in zip(prompts, params)]


def test_prefill_calls_make_one_model_call_per_next(model, monkeypatch):
    """Serve's engine steps its running rows between two calls; the call that ends a prefill
    returns its result at once, so a short prompt joins in the pass that read it."""
    import charrnn.generate as gen
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: (calls.append(1), forward(*a, **k))[1])
    with torch.inference_mode():
        it = gen.prefill_calls(model, VOCAB, ["the "], "cpu")
        with pytest.raises(StopIteration) as done:
            next(it)
        assert len(calls) == 1 and done.value.value[0].shape == (1, len(VOCAB))
        monkeypatch.setattr(gen, "PREFILL_CHUNK", 2)  # 6 characters: 3 calls
        it = gen.prefill_calls(model, VOCAB, ["hello ", "a"], "cpu")
        next(it), next(it)
        with pytest.raises(StopIteration) as done:
            next(it)
    assert len(calls) == 4
    whole = gen.prefill(model, VOCAB, ["hello ", "a"], "cpu")
    torch.testing.assert_close(done.value.value[0], whole[0])


def test_temperatures_near_zero_decode_greedily(model):
    """logits / 1e-45 overflowed float32 to inf, the softmax to NaN, and the row printed the
    vocabulary's last character forever; below 1e-5 a row now takes the argmax, the T -> 0
    limit, also beside sampled rows."""
    greedy = generate(model, VOCAB, ["the "], SampleParams(30, greedy=True))[0]
    for t in (1e-6, 1e-30, 1e-45, 1e-300):
        assert generate(model, VOCAB, ["the "], SampleParams(30, temperature=t, seed=1)) == [greedy]
    mixed = generate(model, VOCAB, ["the ", "the "],
                     [SampleParams(30, temperature=1e-300, seed=1), SampleParams(30, seed=2)])
    assert mixed[0] == greedy


def test_a_row_does_not_depend_on_the_filters_of_other_rows(model):
    p = SampleParams(40, temperature=0.9, seed=11)
    alone = generate(model, VOCAB, ["the "], p)[0]
    for other in (SampleParams(10, top_k=3, seed=1), SampleParams(10, top_p=0.5, seed=2)):
        assert generate(model, VOCAB, ["the ", "abc"], [p, other])[0] == alone


def test_fp32_rows_do_not_depend_on_the_batch_at_full_size():
    """Alice-sized (2 x 256): a row alone, in a batch of 8 and in a batch of 3 gives one text.
    (A lone row's matmuls take a matrix-vector kernel, and the prefill packs prompts of different
    lengths together, so a row's last bits can change with its batch; in fp32 that is too small
    to move a sample, bf16 rounding can magnify it, hence fp32 by default: BENCHMARKS.md.)"""
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=len(VOCAB), hidden_size=256, num_layers=2)).eval()
    prompts = ["the cat", "a", "hello there", "xyz", "q", "the end.", "ab", "no"]
    params = [SampleParams(120, temperature=1.3, seed=i) for i in range(8)]
    batch = generate(model, VOCAB, prompts, params)
    assert generate(model, VOCAB, prompts[2:5], params[2:5]) == batch[2:5]
    assert [generate(model, VOCAB, [p], [q])[0] for p, q in zip(prompts, params)] == batch


def test_fused_step_matches_the_module(model):
    from charrnn.stepper import Stepper
    step = Stepper(model)
    ids = torch.randint(0, len(VOCAB), (3, 6))
    _, state = model(ids[:, :5])
    ref, _ = model(ids[:, 5:6], state)
    out, _ = step(ids[:, 5], step.state_in(state))
    torch.testing.assert_close(out, ref[:, 0], atol=1e-5, rtol=1e-4)


def test_greedy_and_degenerate_filters_agree(model):
    g = generate(model, VOCAB, ["abc"], SampleParams(30, greedy=True))
    assert generate(model, VOCAB, ["abc"], SampleParams(30, top_k=1, seed=5)) == g
    assert generate(model, VOCAB, ["abc"], SampleParams(30, top_p=1e-6, seed=5)) == g
    # A top_p below float32's range is 0 in the filter: it dropped every character (NaN, "zzz").
    assert generate(model, VOCAB, ["abc"], SampleParams(30, top_p=1e-320, seed=5)) == g
    # Any top_k >= V keeps all; one beyond int64 (a JSON body may hold it) was a ValueError.
    plain = generate(model, VOCAB, ["abc"], SampleParams(30, seed=5))
    assert generate(model, VOCAB, ["abc"], SampleParams(30, top_k=10**23, seed=5)) == plain
    logits, _ = model(torch.from_numpy(VOCAB.encode("abc").astype(np.int64))[None])
    assert g[0][0] == VOCAB.chars[int(logits[0, -1].argmax())]


def test_top_k_restricts_the_support(model):
    steps = [[VOCAB.chars[i] for i in ids.tolist()] for ids in sample_ids(
        model, VOCAB, ["a"] * 64, [SampleParams(1, top_k=3, seed=i) for i in range(64)])]
    logits, _ = model(torch.from_numpy(VOCAB.encode("a").astype(np.int64))[None])
    top3 = {VOCAB.chars[i] for i in logits[0, -1].topk(3).indices.tolist()}
    assert set(steps[0]) <= top3


@pytest.mark.parametrize("kw,match", [
    ({"temperature": 0}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"max_new_chars": -1}, "max_new_chars"),
    ({"seed": -1}, "seed must be >= 0")])
def test_bad_sample_params(kw, match):
    with pytest.raises(ValueError, match=match):
        SampleParams(**kw)
    SampleParams(temperature=0, greedy=True)  # greedy needs no temperature


def test_sample_param_errors_speak_the_callers_names():
    with pytest.raises(SampleParamError) as e:
        SampleParams(temperature=float("inf"))
    assert str(e.value) == "temperature must be a finite number > 0 (or use greedy)"
    assert e.value.message({"temperature": "--temperature", "greedy": "--greedy"}) == \
        "--temperature must be a finite number > 0 (or use --greedy)"
    with pytest.raises(SampleParamError) as e:
        SampleParams(max_new_chars=-1)
    assert e.value.field == "max_new_chars"
    assert e.value.message({"max_new_chars": "max_chars"}) == "max_chars must be >= 0"


def test_pick_device():
    from charrnn.generate import pick_device
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu", "cuda:x", ""):
        with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
            pick_device(bad)
    with pytest.raises(ValueError, match="cuda:99"):
        pick_device("cuda:99")  # no GPU here, or fewer than 100


def test_empty_prompt_starts_from_a_character_the_vocabulary_has():
    """An empty prompt started from "\\n" and failed with "characters not in the model's
    vocabulary: '\\n'" (which the user never typed) when `data.drop_chars` had dropped newlines;
    it now starts from a newline, else a space, else the first character."""
    assert VOCAB.start == "\n"
    assert Vocab(" abc").start == " " and Vocab("xyz").start == "x"
    for vocab in (Vocab(" abc"), Vocab("xyz")):
        torch.manual_seed(0)
        m = CharRNN(ModelConfig(vocab_size=len(vocab), embedding_dim=4, hidden_size=8)).eval()
        out = generate(m, vocab, ["", "a" if "a" in vocab.index else "x"], SampleParams(10, seed=1))
        assert len(out[0]) == 10 and not vocab.unknown(out[0])


def test_row_streams_depend_on_their_seed_alone():
    """A row's uniforms come from its seed alone (counter-based, SplitMix64): not from its
    length, its neighbours or the batch; seeds past 64 bits stay distinct; None draws anew."""
    from charrnn.sampling import RowControls, uniforms
    u = uniforms([7, 8, None, 2**64 + 7, 10**30], 300)
    assert u.dtype == np.float32 and u.shape == (5, 300) and (u >= 0).all() and (u < 1).all()
    assert np.array_equal(uniforms([7], 100)[0], u[0, :100])
    assert np.array_equal(uniforms([8, 7], 300)[1], u[0])
    assert len({row.tobytes() for row in u}) == 5
    assert not np.array_equal(uniforms([None], 50), uniforms([None], 50))
    many = uniforms(list(range(200)), 500)
    assert abs(many.mean() - 0.5) < 0.01 and abs(many.var() - 1 / 12) < 0.005
    rc = RowControls([SampleParams(5, seed=3), SampleParams(0, seed=4), SampleParams(9, seed=7)], "cpu")
    want = np.zeros((3, 9), np.float32)
    want[0, :5], want[2] = uniforms([3], 5)[0], uniforms([7], 9)[0]
    assert np.array_equal(rc.uniforms.numpy(), want)  # zero past each row's length
