"""The sampler: every sample of an epoch exactly once, whatever the global batch, world size or resize."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from hvd_abs.sampling import EpochSampler, epoch_permutation


def _consume(sampler: EpochSampler, G: int, b: int, W: int, steps: int | None = None) -> Counter:
    seen: Counter = Counter()
    n = 0
    while steps is None or n < steps:
        shards = [sampler.shard(G, b, W, r) for r in range(W)]
        if sampler.next_indices(G) is None:
            break
        for micro_list in shards:
            for micro in micro_list:
                seen.update(micro.tolist())
        sampler.advance(G)
        n += 1
    return seen


@pytest.mark.parametrize("N,G,b,W", [(1000, 128, 32, 1), (1000, 128, 32, 3), (1000, 96, 32, 4),
                                     (1000, 64, 128, 2), (777, 200, 64, 3)])
def test_every_sample_at_most_once_and_all_but_the_short_batch(N, G, b, W) -> None:
    s = EpochSampler(N, seed=3)
    seen = _consume(s, G, b, W)
    assert max(seen.values()) == 1
    assert len(seen) == (N // G) * G  # the short last global batch is skipped
    s.new_epoch()
    assert s.epoch == 1 and s.position == 0


def test_resize_mid_epoch_via_state_dict_loses_and_repeats_nothing() -> None:
    N, G, b = 1024, 128, 32
    a = EpochSampler(N, seed=5)
    seen = _consume(a, G, b, W=1, steps=3)              # 3 updates on 1 worker
    b_ = EpochSampler(N, seed=123)                      # a "new worker" with other defaults
    b_.load_state_dict(a.state_dict())
    seen += _consume(b_, G, b, W=3, steps=2)            # resized to 3 workers
    c = EpochSampler(N)
    c.load_state_dict(b_.state_dict())
    seen += _consume(c, G, b, W=2)                      # shrunk to 2 for the rest
    assert len(seen) == N and max(seen.values()) == 1


def test_assignment_is_a_pure_function_and_world_independent_as_a_set() -> None:
    s1, s2 = EpochSampler(500, seed=1), EpochSampler(500, seed=1)
    g1 = torch.cat([m for r in range(1) for m in s1.shard(256, 64, 1, r)])
    g4 = torch.cat([m for r in range(4) for m in s2.shard(256, 64, 4, r)])
    assert sorted(g1.tolist()) == sorted(g4.tolist())
    assert torch.equal(epoch_permutation(1, 0, 500), epoch_permutation(1, 0, 500))
    assert not torch.equal(epoch_permutation(1, 0, 500), epoch_permutation(1, 1, 500))


def test_state_round_trip_and_mismatch() -> None:
    s = EpochSampler(100, seed=9)
    s.advance(32)
    t = EpochSampler(100)
    t.load_state_dict(s.state_dict())
    assert torch.equal(t.next_indices(32), s.next_indices(32))
    with pytest.raises(ValueError, match="same dataset"):
        EpochSampler(99).load_state_dict(s.state_dict())
