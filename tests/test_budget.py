"""`train.max_minutes` belongs to the invocation: a restarted attempt goes on from what its
checkpoint says was used (the Ray end-to-end case is in test_ray_train.py)."""

from charrnn.budget import TimeBudget


def test_a_restored_budget_goes_on_from_what_was_used(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("charrnn.budget.time.monotonic", lambda: clock[0])
    b = TimeBudget(max_minutes=1)
    b.start()
    clock[0] += 20
    assert b.sync(lambda v: [v[0] * 2], world=2) is False  # two ranks, each 20 s in
    assert (b.synced_s, b.progress(), b.used_s(), b.left_s()) == (20.0, 20 / 60, 20.0, 40.0)
    restarted = TimeBudget(max_minutes=1)
    restarted.restore(b.used_s())
    assert restarted.progress() == 20 / 60  # the LR's time progress does not go back to 0
    restarted.start()
    clock[0] += 39
    assert restarted.sync(lambda v: v, world=1) is False and restarted.left_s() == 1.0
    clock[0] += 2
    assert restarted.sync(lambda v: v, world=1) is True  # 61 s of the invocation's 60
    unlimited = TimeBudget(max_minutes=0)
    unlimited.start()
    clock[0] += 1e6
    assert unlimited.sync(lambda v: v, world=1) is False
    assert (unlimited.progress(), unlimited.left_s()) == (0.0, None)
