import hashlib
import pickle

import numpy as np
import pytest

from charrnn.config import DataConfig
from charrnn.data import EpochPlan, local_index_batches, split_corpus, val_chunks, val_signature
from charrnn.errors import CorpusError, VocabError
from charrnn.vocab import Vocab


def test_vocab_round_trip_and_dtype():
    v = Vocab.from_text("hello world\n")
    assert v.chars == "\n dehlorw"
    ids = v.encode("hello")
    assert ids.dtype == np.uint8 and v.decode(ids) == "hello"
    assert Vocab.from_dict(v.to_dict()) == v
    # encode's tables are built once (a replica encodes every prompt), and still check each text
    tables = v._tables()
    assert v._tables() is tables and v.encode("world").tolist() == [v.index[c] for c in "world"]
    with pytest.raises(VocabError, match="vocabulary: 'x'"):
        v.encode("hex")
    assert pickle.loads(pickle.dumps(v)).encode("hello").tolist() == ids.tolist()


@pytest.mark.parametrize("text, dtype", [
    ("alice \u4e00\u4e01\n", np.uint8),  # CJK: code points past Latin-1, a small vocabulary
    ("".join(map(chr, range(0x4e00, 0x4e00 + 300))), np.uint16),  # more than 256 characters
    ("hi \U0001f600\U0001f431 alice\n", np.uint8),  # emoji: past the BMP (was a Python loop)
])
def test_vocab_encodes_any_unicode_text(text, dtype):
    v = Vocab.from_text(text)
    ids = v.encode(text * 3)
    assert ids.dtype == dtype and ids.tolist() == [v.index[c] for c in text * 3]
    assert v.decode(ids) == text * 3
    with pytest.raises(VocabError, match="vocabulary: '\U0001f98a'"):
        v.encode(text + "\U0001f98a")


def test_oov_policies_list_offending_characters():
    v = Vocab.from_text("abc ")
    with pytest.raises(VocabError, match=r"'x', 'é'"):
        v.clean("abxcé x", "error")
    assert v.clean("abxc", "drop") == "abc"
    assert v.clean("abxc", "replace") == "ab c"
    with pytest.raises(VocabError, match="OOV policy"):
        v.clean("a", "ignore")


def _ids(n=1000):
    return (np.arange(n) % 251).astype(np.uint8)  # id == position mod 251


def test_windows_target_every_position_and_respect_the_split():
    cfg = DataConfig(seq_len=10, stride=10, val_fraction=0.1)
    ids = _ids()
    train, val = split_corpus(ids, cfg)
    assert len(train.ids) == 900 and len(val.ids) == 100
    assert np.shares_memory(train.ids, ids) and np.shares_memory(val.ids, ids)  # no copies
    for epoch in range(5):
        plan = EpochPlan(train, seed=1, epoch=epoch)
        starts = plan.starts(np.arange(train.num_windows))
        assert starts.max() + cfg.seq_len + 1 <= len(train.ids)  # targets stay in train
        x, y = plan.batch(np.arange(4))
        assert x.shape == y.shape == (4, 10)
        assert np.array_equal(y[:, :-1], x[:, 1:])  # y is x shifted by one
    positions = []
    for x, y in val_chunks(val, streams=3):
        assert x.shape == y.shape == (3, 10) and np.array_equal(y[:, :-1], x[:, 1:])
        positions.append(x)
    # Three contiguous streams inside the validation part, each read chunk after chunk.
    streams = np.concatenate(positions, axis=1).astype(int)  # (3, 30)
    assert ((streams - 900 % 251) % 251 < 100).all()  # only validation characters
    assert (np.diff(streams, axis=1) % 251 == 1).all()  # consecutive: the state can carry


def test_val_streams_split_across_ranks_without_overlap():
    _, val = split_corpus(np.arange(10000, dtype=np.int32), DataConfig(seq_len=10, stride=10))
    ranks = [np.concatenate([x for x, _ in val_chunks(val, r, 2)], axis=1) for r in range(2)]
    assert ranks[0].shape == ranks[1].shape
    assert not set(ranks[0].ravel().tolist()) & set(ranks[1].ravel().tolist())


def test_a_held_out_text_shorter_than_one_chunk_per_rank_is_still_scored():
    # 1,100 characters: 110 held out, one 100-character chunk, and 2 (or 4) workers. Every rank
    # used to get a stream shorter than a chunk, no rank scored anything, and the run died with
    # ZeroDivisionError in the all-reduced mean.
    _, val = split_corpus(np.arange(1100, dtype=np.int32), DataConfig(seq_len=100, stride=100))
    for world in (1, 2, 4):
        per_rank = [[x.shape for x, _ in val_chunks(val, r, world)] for r in range(world)]
        assert per_rank[0] == [(1, 100)] and all(p == [] for p in per_rank[1:])


def test_offsets_and_order_change_with_the_epoch_and_are_reproducible():
    train, _ = split_corpus(_ids(5000), DataConfig(seq_len=20, stride=20))
    plans = [EpochPlan(train, seed=7, epoch=e) for e in range(6)]
    assert len({p.offset for p in plans}) > 1
    assert not np.array_equal(plans[0].perm, plans[1].perm)
    again = EpochPlan(train, seed=7, epoch=3)
    assert again.offset == plans[3].offset and np.array_equal(again.perm, plans[3].perm)


def test_the_epoch_order_is_the_one_earlier_versions_computed():
    """Resuming mid-epoch recomputes the epoch's order: it must be what the run that saved the
    checkpoint visited, which earlier versions drew with `rng.permutation` (int64)."""
    for n, seed, epoch in ((5000, 7, 3), (123_457, 1337, 0), (1, 0, 5)):
        train, _ = split_corpus(_ids(n * 20 + 500), DataConfig(seq_len=20, stride=20))
        rng = np.random.default_rng([seed, epoch])
        offset = int(rng.integers(0, train.max_offset + 1))
        plan = EpochPlan(train, seed=seed, epoch=epoch)
        assert plan.offset == offset and plan.perm.dtype == np.int32
        assert np.array_equal(plan.perm, rng.permutation(train.num_windows))


def test_an_epoch_covers_each_training_character_once_as_a_target():
    train, _ = split_corpus(_ids(5000), DataConfig(seq_len=20, stride=20))
    plan = EpochPlan(train, seed=0, epoch=2)
    batches = list(local_index_batches(train.num_windows, 16))
    seen = np.concatenate([plan.starts(b) for b in batches])
    assert len(seen) == len(set(seen)) == train.num_windows
    covered = (seen[:, None] + 1 + np.arange(20)).ravel()
    assert len(np.unique(covered)) == len(covered) >= len(train.ids) - 2 * 20


def test_the_held_out_texts_signature_is_the_one_saved_checkpoints_hold():
    """Checkpoints keep this digest and a resumed run compares it: it is the SHA-256 of the
    held-out ids' bytes (uint8 and uint16 alike), as earlier versions computed it."""
    for ids in (_ids(5000), (np.arange(5000) % 300).astype(np.uint16)):
        _, val = split_corpus(ids, DataConfig(seq_len=20, stride=20))
        for max_chars, n in ((0, len(val.ids)), (100, 101)):
            want = hashlib.sha256(val.ids[:n].tobytes()).hexdigest()[:16]
            assert val_signature(val, max_chars) == want


def test_memory_is_linear_in_the_corpus():
    ids = np.zeros(2_000_000, dtype=np.uint8)
    train, _ = split_corpus(ids, DataConfig(seq_len=100, stride=100))
    plan = EpochPlan(train, seed=0, epoch=0)
    # ids (1 byte/char) + a permutation of N/stride windows (4 bytes each); nothing N x seq_len.
    assert plan.perm.nbytes <= ids.nbytes * 4 / 100


def test_too_short_corpus():
    with pytest.raises(CorpusError, match="too short for one 100-character window"):
        split_corpus(np.zeros(300, dtype=np.uint8), DataConfig(seq_len=100))
