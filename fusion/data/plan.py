"""Stage 1, the plan: which samples each rank and loader lane takes in an epoch, decided up
front from the manifest alone (steps 1-3 and 5 of :mod:`fusion.data`). Nothing here reads a
byte: :func:`train_plan` and :func:`val_plan` give each lane its :class:`Segment` runs;
:func:`epoch_positions` gives what an epoch has left after :class:`Stint` s of other layouts."""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Iterator

from fusion.data.common import ShardSet


@dataclass(frozen=True)
class Segment:
    """Positions ``[start, stop)`` of one shard, in the shard's own sample order."""

    shard: str
    start: int
    stop: int


@dataclass(frozen=True)
class LanePlan:
    """One lane of one rank: the run of samples it reads and the batches it makes."""

    lane: int
    segments: tuple[Segment, ...]
    num_samples: int
    batch_ids: tuple[int, ...]  # the rank's batch indices this lane produces, in order
    refill: tuple[Segment, ...] = ()  # read (permuted afresh) when the lane's own run runs short


def batches_per_rank(num_samples: int, batch_size: int, world_size: int) -> int:
    """Training batches every rank yields per epoch (the same on all ranks)."""
    count = num_samples // (batch_size * world_size)
    if count == 0:
        raise ValueError(
            f"{num_samples} samples cannot fill one batch of {batch_size} on each of {world_size} ranks: "
            "lower the batch size or add data"
        )
    return count


def epoch_shard_order(shardset: ShardSet, seed: int, epoch: int) -> list[int]:
    """Shard indices in this epoch's order: identical on every rank."""
    order = list(range(len(shardset.shards)))
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def segments_for(shardset: ShardSet, order: list[int], start: int, stop: int) -> tuple[Segment, ...]:
    """The shard pieces that hold global positions ``[start, stop)`` of the sequence ``order``."""
    names, sizes = shardset.shards, shardset.shard_sizes
    segments, offset = [], 0
    for index in order:
        lo, hi = max(start, offset), min(stop, offset + sizes[index])
        if lo < hi:
            segments.append(Segment(names[index], lo - offset, hi - offset))
        offset += sizes[index]
    return tuple(segments)


def _balanced_bounds(total: int, parts: int, part: int) -> tuple[int, int]:
    return total * part // parts, total * (part + 1) // parts


@dataclass(frozen=True)
class Stint:
    """Part of an epoch that a run with another layout trained already, which a run resumed
    with a new layout must not repeat: that run's ranks, loader lanes (``max(1, num_workers)``),
    batch size and shuffle window, and how many batches each of its ranks finished."""

    world_size: int
    lanes: int
    batch_size: int
    shuffle_window: int
    batches: int


def _lane_runs(count: int, per_rank: int, batch_size: int, rank: int, lanes: int) -> Iterator[tuple[int, int, int, tuple[int, ...]]]:
    """(lane, start, stop, batch ids) of ``rank``'s lanes over a sequence of ``count`` positions."""
    offset = rank * per_rank * batch_size
    for lane in range(lanes):
        batch_ids = tuple(range(lane, per_rank, lanes))
        size = len(batch_ids) * batch_size
        yield lane, offset, offset + size, batch_ids
        offset += size


def window_permutation(size: int, seed_text: str) -> list[int]:
    """The order one shuffle window of ``size`` samples is read in, as their indices: the one
    definition the read stage (:func:`fusion.data.read._windowed`, a resume's first window) and
    the plan of a stint's consumed positions share."""
    order = list(range(size))
    random.Random(seed_text).shuffle(order)
    return order


def _window_order(count: int, window: int, seed_text: str) -> list[int]:
    """The order :func:`fusion.data.read._windowed` puts ``count`` samples in, as their indices."""
    order: list[int] = []
    for number, start in enumerate(range(0, count, window)):
        order += [start + index for index in window_permutation(min(window, count - start), f"{seed_text}:{number}")]
    return order


def _order_text(seed: int, epoch: int, rank: int, world_size: int, stints: int) -> str:
    """What seeds a lane's windows (with the lane, read pass and window number)."""
    return f"order:{seed}:{epoch}:{rank}:{world_size}" + (f":after{stints}" if stints else "")


def epoch_positions(shardset: ShardSet, *, seed: int, epoch: int, stints: tuple[Stint, ...] = ()) -> list[int]:
    """The positions of the epoch's sequence (step 1 of the module docstring) still to train,
    in order: all of them without ``stints``; after each stint, every position its layout's
    plan had not consumed yet. A lane's first ``j`` batches consumed the first ``j * B`` positions
    of its run in window order, so this needs nothing but the plan; the tail a stint's layout
    dropped stays in (those clips were not trained)."""
    positions = list(range(shardset.num_samples))
    for number, stint in enumerate(stints):
        per_rank = batches_per_rank(len(positions), stint.batch_size, stint.world_size)
        if not 0 <= stint.batches <= per_rank:
            raise ValueError(f"stint {number}: {stint.batches} batches done, but its layout has {per_rank} per rank")
        taken: set[int] = set()
        for rank in range(stint.world_size):
            text = _order_text(seed, epoch, rank, stint.world_size, number)
            for lane, start, stop, batch_ids in _lane_runs(len(positions), per_rank, stint.batch_size, rank, stint.lanes):
                done = sum(1 for batch_id in batch_ids if batch_id < stint.batches) * stint.batch_size
                order = _window_order(stop - start, stint.shuffle_window, f"{text}:{lane}:0")
                taken.update(positions[start + index] for index in order[:done])
        positions = [position for position in positions if position not in taken]
    return positions


def segments_of(shardset: ShardSet, order: list[int], positions: list[int]) -> tuple[Segment, ...]:
    """The shard pieces that hold ``positions`` of the sequence ``order``, in their order: runs
    of consecutive positions in one shard become one segment (one ranged read)."""
    names, sizes = shardset.shards, shardset.shard_sizes
    starts, offset = [], 0
    for index in order:
        starts.append(offset)
        offset += sizes[index]
    slots = [bisect.bisect_right(starts, position) - 1 for position in positions]
    return tuple(segments_of_items([(names[order[slot]], position - starts[slot]) for slot, position in zip(slots, positions)]))


def segments_of_items(items: list[tuple[str, int]]) -> list[Segment]:
    """(shard, index) pairs -> segments of consecutive indices of one shard, in order."""
    segments: list[Segment] = []
    for shard, index in items:
        if segments and segments[-1].shard == shard and segments[-1].stop == index:
            segments[-1] = Segment(shard, segments[-1].start, index + 1)
        else:
            segments.append(Segment(shard, index, index + 1))
    return segments


def train_plan(shardset: ShardSet, *, batch_size: int, rank: int, world_size: int, epoch: int, seed: int, lanes: int,
               stints: tuple[Stint, ...] = ()) -> list[LanePlan]:
    """The lanes of ``rank`` for one training epoch (see the module docstring, steps 1-3); with
    ``stints``, for what they left of it (step 5)."""
    order = epoch_shard_order(shardset, seed, epoch)
    positions = epoch_positions(shardset, seed=seed, epoch=epoch, stints=stints) if stints else None
    count = shardset.num_samples if positions is None else len(positions)
    per_rank = batches_per_rank(count, batch_size, world_size)
    whole_epoch = segments_for(shardset, order, 0, shardset.num_samples)
    plans = []
    for lane, start, stop, batch_ids in _lane_runs(count, per_rank, batch_size, rank, lanes):
        segments = (segments_for(shardset, order, start, stop) if positions is None
                    else segments_of(shardset, order, positions[start:stop]))
        plans.append(LanePlan(lane, segments, stop - start, batch_ids, whole_epoch))
    return plans


def val_plan(shardset: ShardSet, *, batch_size: int, rank: int, world_size: int, lanes: int) -> list[LanePlan]:
    """The lanes of ``rank`` for validation: every clip on exactly one rank and lane."""
    order = list(range(len(shardset.shards)))
    rank_start, rank_stop = _balanced_bounds(shardset.num_samples, world_size, rank)
    plans = []
    for lane in range(lanes):
        lo, hi = _balanced_bounds(rank_stop - rank_start, lanes, lane)
        size = hi - lo
        num_batches = -(-size // batch_size)
        plans.append(LanePlan(lane, segments_for(shardset, order, rank_start + lo, rank_start + hi), size, tuple(range(num_batches))))
    return plans
