"""mhaplug.data.sampling: literal batches, token budgets, the split over ranks, determinism and mid-epoch resume."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from mhaplug.data.sampling import (
    BaseBatchSampler,
    LengthGroupedBatchSampler,
    RandomBatchSampler,
    ResumableDataLoader,
    TokenBudgetBatchSampler,
    pad_fraction,
    padded_tokens,
)

LENGTHS = [3, 9, 1, 7, 5, 2, 8, 4]
SKEWED = np.random.default_rng(0).choice([8, 16, 32, 64, 128, 256], size=600, p=[0.3, 0.25, 0.2, 0.12, 0.08, 0.05])
SKEWED = (SKEWED + np.random.default_rng(1).integers(0, SKEWED // 2 + 1)).tolist()  # spread within each bucket

Make = Callable[..., BaseBatchSampler]
MAKERS: dict[str, Make] = {
    "random": lambda lengths, **kw: RandomBatchSampler(lengths, 4, **kw),
    "length_grouped": lambda lengths, **kw: LengthGroupedBatchSampler(lengths, 4, mega_batch_mult=3, **kw),
    "token_budget": lambda lengths, **kw: TokenBudgetBatchSampler(
        lengths, 512, pad_to_multiple_of=8, max_batch_size=16, mega_batch_mult=2, **kw
    ),
}


def all_ranks(make: Make, lengths: list[int], num_replicas: int, **kw: object) -> list[list[list[int]]]:
    return [list(make(lengths, num_replicas=num_replicas, rank=rank, **kw)) for rank in range(num_replicas)]


def interleave(per_rank: list[list[list[int]]]) -> list[list[int]]:
    """Undo ``batches[rank::num_replicas]``: the global list every rank split."""
    return [per_rank[r][i] for i in range(len(per_rank[0])) for r in range(len(per_rank))]


def expected_split(global_batches: list[list[int]], num_replicas: int, drop_last: bool) -> list[list[int]]:
    """The documented rule: drop the last few batches, or repeat the first few, to a multiple of num_replicas."""
    extra = len(global_batches) % num_replicas
    if not extra:
        return global_batches
    if drop_last:
        return global_batches[: len(global_batches) - extra]
    need = num_replicas - extra
    return global_batches + (global_batches * need)[:need]


# ----------------------------------------------------------------------------------------------------------
# Literal batches
# ----------------------------------------------------------------------------------------------------------


def test_random_without_shuffle_is_in_order() -> None:
    assert list(RandomBatchSampler(LENGTHS, 3, shuffle=False)) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert list(RandomBatchSampler(LENGTHS, 3, shuffle=False, drop_last=True)) == [[0, 1, 2], [3, 4, 5]]


def test_length_grouped_without_shuffle_sorts_each_mega_batch() -> None:
    # mega-batches of 2 * 2: [0..3] lengths 3 9 1 7 -> 1 3 0 2; [4..7] lengths 5 2 8 4 -> 6 4 7 5
    sampler = LengthGroupedBatchSampler(LENGTHS, 2, mega_batch_mult=2, shuffle=False)
    assert list(sampler) == [[1, 3], [0, 2], [6, 4], [7, 5]]
    assert len(sampler) == 4
    # 7 samples: the final mega-batch [4, 5, 6] sorts to 6 4 | 5, and drop_last drops the partial [5]
    sampler = LengthGroupedBatchSampler(LENGTHS[:7], 2, mega_batch_mult=2, shuffle=False, drop_last=True)
    assert list(sampler) == [[1, 3], [0, 2], [6, 4]]


def test_token_budget_without_shuffle_fills_greedily() -> None:
    # running token totals 3 12 13 | 20 25 27 | 35 39 -> mega-batches of 16 tokens: [0 1 2] [3 4 5] [6 7]
    sampler = TokenBudgetBatchSampler(LENGTHS, 16, mega_batch_mult=1, shuffle=False)
    assert list(sampler) == [[1], [0, 2], [3, 4], [5], [6, 7]]
    assert len(sampler) == 5
    sampler = TokenBudgetBatchSampler(LENGTHS, 16, mega_batch_mult=1, max_batch_size=1, shuffle=False)
    assert list(sampler) == [[1], [0], [2], [3], [4], [5], [6], [7]]


def test_token_budget_counts_rounding_to_pad_to_multiple_of() -> None:
    lengths = [5, 7, 7, 5]
    # 21 tokens: three rows of 7 fit, but only two rows once 5 and 7 are rounded up to 8
    assert list(TokenBudgetBatchSampler(lengths, 21, shuffle=False)) == [[1, 2, 0], [3]]
    assert list(TokenBudgetBatchSampler(lengths, 21, pad_to_multiple_of=8, shuffle=False)) == [[1, 2], [0, 3]]
    assert padded_tokens([5, 7], 8) == 16
    assert padded_tokens([5, 7]) == 14
    assert padded_tokens([]) == 0


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8, 64])
def test_token_budget_holds_for_every_batch(pad_to_multiple_of: int | None) -> None:
    lengths = [min(x, 300) for x in SKEWED]
    for epoch in range(3):
        for rank in range(2):
            sampler = TokenBudgetBatchSampler(
                lengths, 1024, pad_to_multiple_of=pad_to_multiple_of, max_batch_size=12, num_replicas=2, rank=rank
            )
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert max(padded_tokens([lengths[i] for i in b], pad_to_multiple_of) for b in batches) <= 1024
            assert max(len(b) for b in batches) == 12  # the short rows hit max_batch_size, not the budget


def test_pad_fraction_literal() -> None:
    assert pad_fraction([2, 4], [[0, 1]]) == 0.25  # 6 real of 2 * 4 slots
    assert pad_fraction([2, 4], [[0, 1]], pad_to_multiple_of=8) == 1 - 6 / 16
    assert pad_fraction([2, 4, 4], [[1, 2], [0]]) == 0.0
    assert pad_fraction([2, 4], []) == 0.0


def test_grouping_cuts_padding_on_skewed_lengths() -> None:
    # a long right tail, like documents: 17 to 404 tokens, mean 65
    lengths = (16 + np.random.default_rng(0).geometric(1 / 48, 2000)).tolist()
    random = pad_fraction(lengths, RandomBatchSampler(lengths, 16, seed=3))
    grouped = pad_fraction(lengths, LengthGroupedBatchSampler(lengths, 16, seed=3))
    budget = pad_fraction(lengths, TokenBudgetBatchSampler(lengths, 4096, seed=3))
    budget_8 = pad_fraction(lengths, TokenBudgetBatchSampler(lengths, 4096, pad_to_multiple_of=8, seed=3), 8)
    assert random > 0.6
    assert grouped < 0.1
    assert budget < 0.06
    assert budget < budget_8 < 0.1  # rounding up to a multiple of 8 costs padding too


def test_length_grouped_and_token_budget_put_the_longest_batch_first() -> None:
    for epoch in range(3):
        for sampler in (LengthGroupedBatchSampler(SKEWED, 8), TokenBudgetBatchSampler(SKEWED, 1024)):
            sampler.set_epoch(epoch)
            assert max(SKEWED[i] for i in next(iter(sampler))) == max(SKEWED)


# ----------------------------------------------------------------------------------------------------------
# Ranks, determinism, resume
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, drop_last",
    [("random", False), ("random", True), ("length_grouped", False), ("length_grouped", True), ("token_budget", False)],
)
@pytest.mark.parametrize("num_replicas", [1, 2, 3])
def test_ranks_split_one_global_list(name: str, num_replicas: int, drop_last: bool) -> None:
    make, lengths = MAKERS[name], SKEWED[:101]
    kw = {"drop_last": drop_last} if name != "token_budget" else {}  # token_budget has no drop_last: never drops
    global_batches = list(make(lengths, num_replicas=1, rank=0, seed=5, **kw))
    per_rank = all_ranks(make, lengths, num_replicas, seed=5, **kw)
    assert len({len(batches) for batches in per_rank}) == 1  # the same count on every rank
    assert [len(make(lengths, num_replicas=num_replicas, rank=r, seed=5, **kw)) for r in range(num_replicas)] == [
        len(b) for b in per_rank
    ]
    assert interleave(per_rank) == expected_split(global_batches, num_replicas, drop_last)
    # the global list covers each sample once, but for drop_last's final partial batch
    counts = Counter(i for batch in global_batches for i in batch)
    assert set(counts.values()) == {1}
    assert len(counts) == (100 if drop_last else 101)  # 101 = 25 batches of 4 + 1


def test_padding_repeats_the_first_batches() -> None:
    # 8 samples in batches of 3 -> 3 global batches; 2 ranks need 4, so batch 0 is repeated at the end
    per_rank = all_ranks(lambda n, **kw: RandomBatchSampler(n, 3, shuffle=False, **kw), LENGTHS, 2)
    assert per_rank == [[[0, 1, 2], [6, 7]], [[3, 4, 5], [0, 1, 2]]]
    per_rank = all_ranks(lambda n, **kw: RandomBatchSampler(n, 3, shuffle=False, drop_last=True, **kw), LENGTHS, 3)
    assert per_rank == [[], [], []]  # 2 full batches cannot go 3 ways: all dropped, as DistributedSampler would
    per_rank = all_ranks(lambda n, **kw: RandomBatchSampler(n, 8, **kw), LENGTHS, 3)
    assert per_rank[0] == per_rank[1] == per_rank[2]  # one batch repeated for every rank


@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=60),
    name=st.sampled_from(list(MAKERS)),
    num_replicas=st.integers(1, 4),
    drop_last=st.booleans(),
    seed=st.integers(0, 3),
)
def test_split_over_ranks_property(
    lengths: list[int], name: str, num_replicas: int, drop_last: bool, seed: int
) -> None:
    kw = {"drop_last": drop_last} if name != "token_budget" else {}
    global_batches = list(MAKERS[name](lengths, num_replicas=1, seed=seed, **kw))
    per_rank = all_ranks(MAKERS[name], lengths, num_replicas, seed=seed, **kw)
    assert len({len(batches) for batches in per_rank}) == 1
    assert interleave(per_rank) == expected_split(global_batches, num_replicas, drop_last and name != "token_budget")
    flat = [i for batch in global_batches for i in batch]
    assert len(flat) == len(set(flat))
    dropped = len(lengths) % 4 if drop_last and name != "token_budget" else 0
    assert len(flat) == len(lengths) - dropped


@pytest.mark.parametrize("name", MAKERS)
def test_same_seed_and_epoch_give_the_same_batches(name: str) -> None:
    make = MAKERS[name]
    first, second = make(SKEWED, seed=1), make(SKEWED, seed=1)
    epoch0 = list(first)
    assert list(second) == epoch0 and list(first) == epoch0  # a second pass over the same epoch is the same
    first.set_epoch(1)
    epoch1 = list(first)
    assert epoch1 != epoch0
    assert sorted(map(sorted, epoch1)) != sorted(map(sorted, epoch0))  # different contents, not only order
    assert list(make(SKEWED, seed=2)) != epoch0
    first.set_epoch(0)
    assert list(first) == epoch0
    # numpy arrays and tensors give the same batches as lists
    assert list(make(np.array(SKEWED), seed=1)) == list(make(torch.tensor(SKEWED), seed=1)) == epoch0


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("num_replicas", [1, 2])
@pytest.mark.parametrize("stop_after", [0, 1, 7])
def test_resume_mid_epoch_yields_exactly_the_rest(name: str, num_replicas: int, stop_after: int) -> None:
    make = MAKERS[name]
    for rank in range(num_replicas):
        uninterrupted = make(SKEWED, seed=4, num_replicas=num_replicas, rank=rank)
        uninterrupted.set_epoch(2)
        expected = list(uninterrupted)

        interrupted = make(SKEWED, seed=4, num_replicas=num_replicas, rank=rank)
        interrupted.set_epoch(2)
        iterator = iter(interrupted)
        seen = [next(iterator) for _ in range(stop_after)]
        state = json.loads(json.dumps(interrupted.state_dict()))  # survives a JSON checkpoint
        assert (state["epoch"], state["seed"], state["batches_yielded"]) == (2, 4, stop_after)

        resumed = make(SKEWED, seed=4, num_replicas=num_replicas, rank=rank)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # Lightning calls set_epoch with the same epoch on resume: keeps the position
        assert len(resumed) == len(expected)
        assert seen + list(resumed) == expected
        assert resumed.state_dict()["batches_yielded"] == 0  # epoch complete: the counter resets
        assert list(resumed) == expected  # ... and the next pass is the whole epoch again


def test_counter_follows_iteration_and_a_new_epoch_starts_at_zero() -> None:
    sampler = LengthGroupedBatchSampler(SKEWED, 16)
    iterator = iter(sampler)
    first = [next(iterator), next(iterator), next(iterator)]
    assert sampler.state_dict()["batches_yielded"] == 3
    assert list(sampler)[:3] == first  # a fresh __iter__ without load_state_dict starts the epoch at 0
    iterator = iter(sampler)
    next(iterator)
    sampler.set_epoch(1)
    assert sampler.state_dict()["batches_yielded"] == 0
    # a loop that stops at len() without exhausting the iterator (Lightning) leaves a finished epoch behind
    iterator = iter(sampler)
    epoch1 = [next(iterator) for _ in range(len(sampler))]
    state = sampler.state_dict()
    assert (state["epoch"], state["batches_yielded"]) == (1, len(sampler))
    resumed = LengthGroupedBatchSampler(SKEWED, 16)
    resumed.load_state_dict(state)
    assert list(resumed) == []
    resumed.set_epoch(2)
    sampler.set_epoch(2)
    assert list(resumed) == list(sampler) != epoch1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumable_loader_counts_the_batches_taken_not_those_prefetched_by_workers(num_workers: int) -> None:
    def loader(sampler: BaseBatchSampler) -> ResumableDataLoader:
        return ResumableDataLoader(
            list(range(len(SKEWED))), batch_sampler=sampler, num_workers=num_workers, collate_fn=lambda rows: rows
        )

    sampler = LengthGroupedBatchSampler(SKEWED, 16, seed=3)
    sampler.set_epoch(1)
    expected = list(sampler)
    interrupted = loader(sampler)
    iterator = iter(interrupted)
    seen = [next(iterator) for _ in range(3)]
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert (state["epoch"], state["batches_yielded"]) == (1, 3)
    # the sampler itself handed out the batches the workers prefetched too (prefetch_factor 2 per worker)
    assert sampler.state_dict()["batches_yielded"] == 3 + 2 * num_workers
    resumed_sampler = LengthGroupedBatchSampler(SKEWED, 16, seed=3)
    resumed = loader(resumed_sampler)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["batches_yielded"] == 3  # before the first batch, e.g. a checkpoint right away
    resumed_sampler.set_epoch(1)  # Lightning does, with the same epoch: the position stays
    rest = list(resumed)
    assert seen + rest == expected
    assert resumed.state_dict()["batches_yielded"] == 0  # epoch complete: a new pass starts at batch 0
    assert list(resumed) == expected
    iterator = iter(resumed)
    next(iterator)
    resumed_sampler.set_epoch(2)  # the next epoch, nothing of it taken yet
    assert (resumed.state_dict()["epoch"], resumed.state_dict()["batches_yielded"]) == (2, 0)


def test_resumable_loader_needs_a_mhaplug_batch_sampler() -> None:
    with pytest.raises(
        TypeError, match="batch_sampler must be a mhaplug.data.sampling.BaseBatchSampler .* got BatchSampler"
    ):
        ResumableDataLoader(LENGTHS, batch_sampler=torch.utils.data.BatchSampler(range(8), 2, False))


def test_state_of_one_rank_loads_on_another() -> None:
    rank0, rank1 = (RandomBatchSampler(SKEWED, 8, num_replicas=2, rank=r) for r in (0, 1))
    iterator = iter(rank0)
    next(iterator), next(iterator)
    rank1.load_state_dict(rank0.state_dict())
    assert list(rank1) == list(RandomBatchSampler(SKEWED, 8, num_replicas=2, rank=1))[2:]


def test_defaults_come_from_torch_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (RandomBatchSampler(LENGTHS, 2).num_replicas, RandomBatchSampler(LENGTHS, 2).rank) == (1, 0)
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 2)
    sampler = RandomBatchSampler(LENGTHS, 1, shuffle=False)
    assert (sampler.num_replicas, sampler.rank, list(sampler)) == (4, 2, [[2], [6]])


def test_works_as_a_dataloader_batch_sampler() -> None:
    sampler = LengthGroupedBatchSampler(LENGTHS, 2, mega_batch_mult=2, shuffle=False)
    loader = DataLoader(list(range(10, 18)), batch_sampler=sampler)
    assert [b.tolist() for b in loader] == [[11, 13], [10, 12], [16, 14], [17, 15]]
    assert len(loader) == 4


def test_lightning_sets_the_epoch() -> None:
    # Lightning calls set_epoch on dataloader.batch_sampler.sampler, which is the sampler itself
    from lightning_fabric.utilities.data import _set_sampler_epoch

    sampler = RandomBatchSampler(LENGTHS, 2)
    _set_sampler_epoch(DataLoader(list(range(8)), batch_sampler=sampler), 3)
    assert sampler.epoch == 3


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


def test_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match=r"lengths\[1\] is 0: an empty sequence cannot be batched; drop empty rows"):
        RandomBatchSampler([3, 0, 2], 2)
    with pytest.raises(ValueError, match="lengths is empty"):
        LengthGroupedBatchSampler([], 2)
    with pytest.raises(TypeError, match=r"lengths must hold ints \(token counts\), got lengths\[1\] = 2.5"):
        RandomBatchSampler([3, 2.5], 2)
    with pytest.raises(TypeError, match=r"got lengths\[0\] = 3.0"):
        RandomBatchSampler(torch.tensor([3.0, 2.0]), 2)
    with pytest.raises(TypeError, match=r"got lengths\[0\] = True"):
        RandomBatchSampler([True, True], 2)
    with pytest.raises(ValueError, match=r"lengths must be 1-D .* got shape \(2, 2\)"):
        RandomBatchSampler(torch.ones(2, 2, dtype=torch.long), 2)


def test_rejects_a_sequence_longer_than_the_token_budget() -> None:
    message = (
        r"lengths\[2\] is 40 tokens \(48 after pad_to_multiple_of=16\), more than max_tokens=32 \(1 of 3 samples do "
        r"not fit\): raise max_tokens to at least 48 or set max_length \(truncation\) in the collator"
    )
    with pytest.raises(ValueError, match=message):
        TokenBudgetBatchSampler([3, 30, 40], 32, pad_to_multiple_of=16)
    with pytest.raises(ValueError, match=r"lengths\[1\] is 30 tokens, more than max_tokens=16"):
        TokenBudgetBatchSampler([3, 30, 40], 16)


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        RandomBatchSampler(LENGTHS, 0)
    with pytest.raises(TypeError, match=r"batch_size must be an int >= 1, got 2.0 \(float\)"):
        LengthGroupedBatchSampler(LENGTHS, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1, got -5"):
        TokenBudgetBatchSampler(LENGTHS, -5)
    with pytest.raises(TypeError, match=r"pad_to_multiple_of must be an int >= 1 or None, got '8' \(str\)"):
        TokenBudgetBatchSampler(LENGTHS, 64, pad_to_multiple_of="8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"rank must be in \[0, num_replicas=2\), got rank=2"):
        RandomBatchSampler(LENGTHS, 2, num_replicas=2, rank=2)


def test_rejects_a_state_from_another_sampler() -> None:
    state = LengthGroupedBatchSampler(LENGTHS, 2).state_dict()
    with pytest.raises(ValueError, match=r"num_samples=8 in the state, 9 here; total_length=39 in the state, 45 here"):
        LengthGroupedBatchSampler(LENGTHS + [6], 2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"batch_size=2 in the state, 4 here.*same lengths and settings"):
        LengthGroupedBatchSampler(LENGTHS, 4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"seed=0 in the state, 1 here"):
        LengthGroupedBatchSampler(LENGTHS, 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"sampler='LengthGroupedBatchSampler' in the state, 'RandomBatchSampler'"):
        RandomBatchSampler(LENGTHS, 2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"batches_yielded'\] is 5 but epoch 0 has 4 batches on this rank"):
        LengthGroupedBatchSampler(LENGTHS, 2).load_state_dict({**state, "batches_yielded": 5})
    permuted = [LENGTHS[-1], *LENGTHS[:-1]]  # the same count and sum: other data all the same
    assert sorted(permuted) == sorted(LENGTHS) and permuted != LENGTHS
    with pytest.raises(ValueError, match=r"^state was saved by a sampler with other data or settings: lengths_digest="):
        LengthGroupedBatchSampler(permuted, 2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"state is missing \['fingerprint'\]"):
        LengthGroupedBatchSampler(LENGTHS, 2).load_state_dict({"epoch": 0, "seed": 0, "batches_yielded": 0})
