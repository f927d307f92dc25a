import itertools

import pytest
import torch

from fedmr.maths import (
    RunningMean,
    draw_permutations,
    key_blocks,
    mean_pairwise_cosine,
    pool_mean,
    recombine,
    recombine_,
    replicate,
    slot,
    stack_states,
    weighted_mean,
)


def random_pool(k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = [{
        "conv.weight": torch.randn(3, 2, 2, generator=g),
        "conv.bias": torch.randn(3, generator=g),
        "bn.running_mean": torch.randn(3, generator=g),
        "bn.num_batches_tracked": torch.tensor(i * 10),
        "fc.weight": torch.randn(5, 3, generator=g),
    } for i in range(k)]
    return states, stack_states(states)


def test_recombination_keeps_the_elementwise_mean():
    _, pool = random_pool()
    before = pool_mean(pool)
    after = pool_mean(recombine(pool, draw_permutations(list(pool), 4, torch.Generator().manual_seed(1))))
    for key in before:
        assert torch.allclose(before[key].float(), after[key].float(), atol=1e-6)


def test_every_new_entry_is_the_same_entry_of_some_old_model():
    states, pool = random_pool()
    new = recombine(pool, draw_permutations(list(pool), 4, torch.Generator().manual_seed(3)))
    for key in pool:
        for i in range(4):
            assert any(torch.equal(new[key][i], s[key]) for s in states)
        # a permutation: every old model's entry is used exactly once
        used = sorted(next(j for j, s in enumerate(states) if torch.equal(new[key][i], s[key])) for i in range(4))
        assert used == [0, 1, 2, 3]


def test_entries_are_shuffled_independently_and_every_permutation_appears():
    k, keys = 3, ["a", "b"]
    gen = torch.Generator().manual_seed(0)
    joint, single = set(), set()
    for _ in range(600):
        perms = draw_permutations(keys, k, gen)
        single.add(tuple(perms["a"].tolist()))
        joint.add((tuple(perms["a"].tolist()), tuple(perms["b"].tolist())))
    assert single == set(itertools.permutations(range(k)))
    # independence: all 6 x 6 pairs of permutations occur for two keys
    assert len(joint) == 36


@pytest.mark.parametrize("seed", range(20))
def test_in_place_recombination_matches_the_pure_one(seed):
    _, pool = random_pool(k=6, seed=seed)
    perms = draw_permutations(list(pool), 6, torch.Generator().manual_seed(seed))
    expected = recombine(pool, perms)
    tensors = {key: value.data_ptr() for key, value in pool.items()}
    recombine_(pool, perms)
    for key in pool:
        assert torch.equal(pool[key], expected[key])
        assert pool[key].data_ptr() == tensors[key]  # permuted in place, no second pool


def test_key_blocks():
    keys = [f"k{i}" for i in range(10)]
    assert key_blocks(keys, None) == [[k] for k in keys]
    assert key_blocks(keys, 1.0) == [keys]
    assert key_blocks(keys, 0.3) == [keys[0:3], keys[3:6], keys[6:9], keys[9:]]
    with pytest.raises(ValueError):
        key_blocks(keys, 0.0)


def test_blockwise_recombination_moves_whole_blocks():
    states, pool = random_pool(k=5)
    keys = list(pool)
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        new = recombine(pool, draw_permutations(keys, 5, gen, block_fraction=0.4))
        for block in key_blocks(keys, 0.4):
            for i in range(5):
                sources = {next(j for j, s in enumerate(states) if torch.equal(new[key][i], s[key])) for key in block}
                assert len(sources) == 1  # the whole block came from one model


def test_block_fraction_one_moves_whole_models():
    states, pool = random_pool(k=4)
    new = recombine(pool, draw_permutations(list(pool), 4, torch.Generator().manual_seed(9), block_fraction=1.0))
    for i in range(4):
        assert any(all(torch.equal(new[k][i], s[k]) for k in pool) for s in states)


def test_pool_mean_includes_buffers_and_keeps_integer_dtype():
    states, pool = random_pool()
    mean = pool_mean(pool)
    assert torch.allclose(mean["bn.running_mean"], torch.stack([s["bn.running_mean"] for s in states]).mean(0))
    assert mean["bn.num_batches_tracked"].dtype == torch.int64
    assert int(mean["bn.num_batches_tracked"]) == 15  # mean of 0, 10, 20, 30


def test_weighted_mean_weights_by_sample_count():
    states, pool = random_pool(k=2)
    mean = weighted_mean(pool, [30, 10])
    assert torch.allclose(mean["fc.weight"], 0.75 * states[0]["fc.weight"] + 0.25 * states[1]["fc.weight"])
    running = RunningMean()
    running.add(states[0], 30)
    running.add(states[1], 10)
    assert torch.allclose(running.result()["fc.weight"], mean["fc.weight"], atol=1e-6)
    with pytest.raises(ValueError):
        weighted_mean(pool, [1.0])


def test_replicate_and_slot():
    states, _ = random_pool(k=1)
    pool = replicate(states[0], 3)
    assert pool["fc.weight"].shape == (3, 5, 3)
    assert torch.equal(slot(pool, 2)["conv.bias"], states[0]["conv.bias"])


def test_mean_pairwise_cosine():
    a = {"w": torch.tensor([1.0, 0.0])}
    b = {"w": torch.tensor([0.0, 1.0])}
    assert mean_pairwise_cosine(stack_states([a, a])) == pytest.approx(1.0)
    assert mean_pairwise_cosine(stack_states([a, b])) == pytest.approx(0.0, abs=1e-12)
    c = {"w": torch.tensor([1.0, 1.0])}
    # pairs: (a,b)=0, (a,c)=(b,c)=1/sqrt(2)
    expected = 2 / 3 / 2 ** 0.5 * 1.0 * 1.0 + 0.0
    assert mean_pairwise_cosine(stack_states([a, b, c]), chunk_numel=1) == pytest.approx(expected, rel=1e-9)
