"""``Schedule``: which steps are sampled (period and offset), the step counter and its state."""

import pytest

from esswatch.watch.schedule import Schedule


def test_offset_shifts_the_sampled_steps():
    assert [s for s in range(16) if Schedule(5).due(s)] == [0, 5, 10, 15]
    assert [s for s in range(16) if Schedule(5, offset=4).due(s)] == [4, 9, 14]
    assert [s for s in range(4) if Schedule(1, offset=0).due(s)] == [0, 1, 2, 3]


@pytest.mark.parametrize("bad", [-1, 5, 1.0, True, None])
def test_offset_is_validated(bad):
    with pytest.raises(ValueError, match="offset must be an int in"):
        Schedule(5, offset=bad)


# -- due / advance / state -------------------------------------------------------------------


@pytest.mark.parametrize("every,offset", [(1, 0), (3, 0), (3, 2), (7, 6)])
def test_due_is_step_mod_period_equal_offset(every, offset):
    sched = Schedule(every, offset=offset)
    assert [s for s in range(30) if sched.due(s)] == list(range(offset, 30, every))


def test_advance_walks_the_steps_and_due_now_follows():
    sched = Schedule(4, offset=1)
    seen = []
    for _ in range(10):
        seen.append((sched.step, sched.due_now))
        assert sched.advance() == seen[-1][0] + 1
    assert seen == [(s, s % 4 == 1) for s in range(10)]
    assert sched.step == 10


def test_start_step_and_state_round_trip():
    sched = Schedule(5, step=12, offset=3)
    assert sched.step == 12 and sched.due_now is False
    sched.advance()
    assert sched.due_now is True  # 13 % 5 == 3
    state = sched.state_dict()
    assert state == {"step": 13, "every_n_steps": 5}
    resumed = Schedule(5, offset=3)
    resumed.load_state_dict(state)
    assert resumed.step == 13 and resumed.due_now
    assert [s for s in range(13, 30) if resumed.due(s)] == [s for s in range(13, 30) if sched.due(s)]
    # the period and offset are the loading schedule's own: the state carries only the step
    other = Schedule(2)
    other.load_state_dict(state)
    assert other.step == 13 and other.every_n_steps == 2 and other.offset == 0 and not other.due_now


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"every_n_steps": 0}, "every_n_steps must be an int >= 1"),
        ({"every_n_steps": True}, "every_n_steps must be an int >= 1"),
        ({"every_n_steps": 2.0}, "every_n_steps must be an int >= 1"),
        ({"every_n_steps": 2, "step": -1}, "step must be an int >= 0"),
        ({"every_n_steps": 2, "step": 1.0}, "step must be an int >= 0"),
    ],
)
def test_constructor_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


@pytest.mark.parametrize("bad", [-1, 2.0, True, None])
def test_load_state_dict_rejects_a_bad_step(bad):
    sched = Schedule(3, step=4)
    with pytest.raises(ValueError, match="Schedule state: step must be an int >= 0"):
        sched.load_state_dict({"step": bad, "every_n_steps": 3})
    assert sched.step == 4
