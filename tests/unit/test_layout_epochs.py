"""Per-shard layout epochs: an epoch change calls only the shards whose slots it changes, and
requests to the others keep naming the slot maps those shards already hold."""

import pytest
import torch

from moefleet.cluster.experts.dispatcher import Dispatcher
from moefleet.cluster.experts.transport import InProcessTransport
from moefleet.cluster.placement.placement import Placement, placement_from_dict, placement_to_dict
from moefleet.cluster.placement.staging_plan import layout_epochs
from tests.conftest import shard_with_layer


def test_unchanged_shards_keep_their_layout_epoch():
    old = Placement(3, 4, {0: ((0, 1), (2,), (3,))}, shard_epochs=(1, 3, 2))
    # Shard "b" gains expert 1, "a" loses it, "c" is untouched, "d" is new.
    new = Placement(4, 4, {0: ((0,), (2, 1), (3,), (1,))})
    assert layout_epochs(old, ["a", "b", "c"], new, ["a", "b", "c", "d"]) == (4, 4, 2, 4)
    # Same experts, other slot order: the slot maps differ, so the shard is staged.
    reordered = Placement(4, 4, {0: ((1, 0), (2,), (3,))})
    assert layout_epochs(old, ["a", "b", "c"], reordered, ["a", "b", "c"]) == (4, 3, 2)
    # A lost shard's replacement (same index, new name) is staged; so is a lost index kept by name.
    same = Placement(4, 4, old.shard_experts)
    assert layout_epochs(old, ["a", "b", "c"], same, ["a", "x", "c"]) == (1, 4, 2)
    assert layout_epochs(old, ["a", "b", "c"], same, ["a", "b", "c"], lost={0}) == (4, 3, 2)
    # Shards are matched by name, not index: removing the first shard moves the others down.
    shifted = Placement(4, 4, {0: ((2,), (3,))})
    assert layout_epochs(old, ["a", "b", "c"], shifted, ["b", "c"]) == (3, 2)
    assert layout_epochs(None, [], new, ["a", "b", "c", "d"]) == (4, 4, 4, 4)


def test_shard_epochs_round_trip_and_validate():
    p = Placement(5, 2, {0: ((0,), (1,))}, shard_epochs=(5, 2))
    assert placement_from_dict(placement_to_dict(p)) == p
    plain = Placement(5, 2, {0: ((0,), (1,))})
    assert placement_from_dict(placement_to_dict(plain)).shard_epochs is None and plain.layout_epoch(1) == 5
    with pytest.raises(ValueError, match="shard_epochs"):
        Placement(5, 2, {0: ((0,), (1,))}, shard_epochs=(6, 2)).validate()
    with pytest.raises(ValueError, match="shard_epochs"):
        Placement(5, 2, {0: ((0,), (1,))}, shard_epochs=(5,)).validate()


def test_requests_name_each_shards_layout_epoch():
    """A dispatcher on epoch 2 whose shard 1 was not restaged computes with shard 1's epoch-1
    slots: the result equals a dispatcher over freshly staged shards."""
    torch.manual_seed(0)
    d, i, e = 8, 4, 4
    w13, w2 = torch.randn(e, 2 * i, d), torch.randn(e, d, i)
    first = Placement(1, e, {0: ((0, 1), (2, 3))})
    shards = [shard_with_layer(s, e, 0, experts, w13[list(experts)], w2[list(experts)], epoch=1)
              for s, experts in enumerate(first.shard_experts[0])]
    # Epoch 2 moves expert 1 to a new slot order on shard 0 only; shard 1 keeps epoch 1's maps.
    second = Placement(2, e, {0: ((1, 0), (2, 3))})
    second = Placement(2, e, second.shard_experts, layout_epochs(first, ["s0", "s1"], second, ["s0", "s1"]))
    assert second.shard_epochs == (2, 1) and second.restaged_shards() == [0]
    shards[0].install_epoch(2, second.experts_of_shard(0))
    hidden = torch.randn(5, d)
    ids = torch.tensor([[0, 2], [1, 3], [3, 0], [2, 1], [0, 1]])
    weights = torch.rand(5, 2)
    staged = Dispatcher(second, InProcessTransport(shards)).combine(0, hidden, weights, ids)
    reference = Dispatcher(first, InProcessTransport(shards)).combine(0, hidden, weights, ids)
    torch.testing.assert_close(staged, reference)
    assert sorted(shards[1].epochs) == [1]  # never asked to stage epoch 2
