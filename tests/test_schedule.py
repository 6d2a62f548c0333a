"""``Schedule``'s offset (the Lightning adapter samples where Lightning logs the loss)."""
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
