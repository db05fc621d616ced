"""Stage 4, the batches: lanes as DataLoader workers (:class:`_LaneDataset`), equal batches on
every rank, bad samples skipped, counted and refilled, and :class:`Loader`, which turns what
the workers send into batches on the device; :func:`train_loader` and :func:`val_loader` are
where to start."""

from __future__ import annotations

import ctypes
import functools
import math
import os
import random
import signal
import time
from collections import Counter, deque
from typing import Any, Iterator

import numpy as np
import torch

from fusion.config import ConfigError
from fusion.data.common import ERROR_KEYS, MAX_READ_PASSES, READ_KEYS, DataConfig, DataEvents, ShardSet, log
from fusion.data.decode import (CorruptSample, Sampling, _decode_jpegs_on_cpu, _jpeg_bytes_clip, _label, cut_on_device,
                                decode_clip, decode_on_device)
from fusion.data.plan import LanePlan, Stint, _order_text, train_plan, val_plan
from fusion.data.read import _lane_stream
from fusion.features import CorruptFeatures, decode_features
from sharding import storage


class _LaneDataset(torch.utils.data.IterableDataset):
    """Yields whole batches (the DataLoader runs with ``batch_size=None``)."""

    def __init__(self, shardset: ShardSet, cfg: DataConfig, plans: list[LanePlan], *, sampling: Sampling, batch_size: int,
                 skip_batches: int, seed_text: str | None, crop_seed_text: str | None, fill: bool, require_label: bool,
                 announce: bool = True, feature_view: int = 0) -> None:
        self.shardset, self.cfg, self.plans, self.sampling = shardset, cfg, plans, sampling
        self.announce = announce  # print waits for storage at once (rank 0; the others report with their batches)
        self.batch_size, self.skip_batches = batch_size, skip_batches
        self.seed_text, self.crop_seed_text = seed_text, crop_seed_text
        self.fill, self.require_label = fill, require_label
        self.feature_view = feature_view  # feature shards: which stored view of each clip
        # data.resize_on: device: workers decode the chosen frames and the Loader cuts the batch
        self.cut_on_device = (cfg.decode == "cpu" and cfg.resize_on == "device" and sampling.views == 1
                              and not shardset.is_features)
        self.frame_slots: FrameSlots | None = None  # set by the Loader for its workers' batches of pixels
        self.worker, self.slotted = 0, 0  # this process's worker id; its batches sent through the slots
        self.arena: list[int] | None = None  # [first free byte, end] of the region the coming batch decodes into

    def frame_slot_bytes(self) -> int | None:
        """Room for one batch's pixels in :class:`FrameSlots`, None where batches carry none
        (features, ``decode: gpu``). Cut clips: exactly a full batch. Whole frames (``resize_on:
        device``): ``T`` frames a clip of the manifest's short side by up to twice that (SSv2's
        are under 2:1), None without a short side; a batch of wider frames goes the
        DataLoader's own way."""
        if self.shardset.is_features or self.cfg.decode != "cpu":
            return None
        if not self.cut_on_device:
            return self.batch_size * self.sampling.views * self.sampling.frames * 3 * self.cfg.crop_size ** 2
        short = self.shardset.manifest.get("short_side")
        if not isinstance(short, int) or short <= 0:
            return None
        return self.batch_size * self.sampling.frames * 3 * short * 2 * short

    def __iter__(self) -> Iterator[dict[str, Any]]:
        keep_freed_pages()  # this process decodes
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        self.worker, self.slotted = worker, 0
        # a worker's CPU time since its last batch, sent with each (worker_cpu_us in Loader.stats):
        # what the hand-over costs shows there, not in the training process
        self.cpu_mark = time.process_time() if info else None
        if workers == 1:
            # one process serves every lane, interleaved exactly as the workers would be
            streams = [self._lane_batches(plan) for plan in self.plans]
            yield from _round_robin(streams, len(self.plans), self.skip_batches)
            return
        yield from self._lane_batches(self.plans[(self.skip_batches + worker) % len(self.plans)])

    def _lane_batches(self, plan: LanePlan) -> Iterator[dict[str, Any]]:
        """The lane's batches; if storage fails for good, one last ``{"fatal": ...}`` item that
        the :class:`Loader` turns back into the exception in the training process (a worker's
        own exception would arrive wrapped in a traceback dump)."""
        events = DataEvents(self.announce)
        try:
            yield from self._lane_batches_of(plan, events)
        except storage.StorageError as error:
            counts, messages = events.take()
            yield {"fatal": (type(error).__name__, str(error)), "errors": counts, "messages": messages}

    def _lane_batches_of(self, plan: LanePlan, events: DataEvents) -> Iterator[dict[str, Any]]:
        first = sum(1 for batch_id in plan.batch_ids if batch_id < self.skip_batches)
        seed_text = f"{self.seed_text}:{plan.lane}" if self.seed_text is not None else None
        stream = _lane_stream(self.shardset, plan, self.cfg, seed_text, first * self.batch_size, events)
        pending: deque = deque()  # [raw sample, decoded result or None]
        for lane_batch in range(first, len(plan.batch_ids)):
            want = self.batch_size if self.fill else min(self.batch_size, plan.num_samples - lane_batch * self.batch_size)
            chosen, index, own = [], 0, 0
            self._open_arena()
            while len(chosen) < want:
                if index == len(pending):
                    sample = next(stream, None)
                    if sample is None:
                        break
                    pending.append([sample, None])
                item = pending[index]
                if item[1] is None:
                    item[1] = self._decode(item[0], events)
                if item[1] is not False:
                    chosen.append(item[1])
                    # a good sample of the batch's own B positions; any other stands in for a lost one
                    own += index < self.batch_size and not item[0].get("__refill__")
                index += 1
            if self.fill:
                events.count("refilled_samples", len(chosen) - own)
            if self.fill and len(chosen) < want:
                raise RuntimeError(
                    f"lane {plan.lane} of {self.shardset.url} found only {len(chosen)} readable samples for a batch of "
                    f"{want} after {MAX_READ_PASSES} passes: the shards are mostly corrupt, re-run sharding.make_shards"
                )
            for _ in range(min(self.batch_size if self.fill else index, len(pending))):
                pending.popleft()
            yield self._collate(chosen, events)

    def _decode(self, sample: dict[str, Any], events: DataEvents) -> Any:
        if sample.get("__lost__"):  # its shard broke: counted as corrupt_shards already
            return False
        key = sample["__key__"]
        rng = random.Random(f"{self.crop_seed_text}:{key}") if self.crop_seed_text is not None else None
        try:
            if self.shardset.is_features:
                semantic, motion, label = decode_features(sample, self.shardset.feature_spec, self.feature_view,
                                                          _label(sample, self.require_label))
                clip = (semantic, motion)
            elif self.cfg.decode == "gpu":
                clip, label = _jpeg_bytes_clip(sample, self.sampling, self.cfg, rng, self.require_label, self.shardset.limits)
            else:
                clip, label = decode_clip(sample, self.sampling, self.cfg, rng, self.require_label, self.shardset.limits,
                                          multi_view=self.sampling.views > 1, cut=not self.cut_on_device,
                                          out=self._frame_buffer if self.arena is not None else None)
        except (CorruptSample, CorruptFeatures) as error:
            events.count("corrupt_samples")
            events.warn(f"skipping sample {key} of {sample.get('__url__')}: {error}")
            return False
        return clip, label, key

    def _collate(self, chosen: list[tuple[Any, int, str]], events: DataEvents) -> dict[str, Any]:
        placed = self._place([clip for clip, _, _ in chosen], events)
        if self.cpu_mark is not None:
            now = time.process_time()  # all of this process's threads: the DataLoader's feeder's pickling too
            events.count("worker_cpu_us", round((now - self.cpu_mark) * 1e6))
            self.cpu_mark = now
        counts, messages = events.take()
        batch: dict[str, Any] = dict(
            labels=[label for _, label, _ in chosen],  # a tensor in the training process: no tensor, no shared file
            keys=[key for _, _, key in chosen],
            errors=counts,
            messages=messages,
        )
        if self.shardset.is_features:
            spec = self.shardset.feature_spec
            for position, (name, shape) in enumerate((("semantic", spec.semantic_shape), ("motion", spec.motion_shape))):
                batch[name] = (torch.stack([clip[position] for clip, _, _ in chosen]) if chosen
                               else torch.empty((0, *shape), dtype=torch.float32))
        elif self.cfg.decode == "gpu":
            batch["encoded"] = [clip for clip, _, _ in chosen]
        elif self.cut_on_device:
            if placed is not None:  # only where the frames lie crosses the process boundary
                batch["placed"] = placed
                batch["decoded"] = [dict(view=clip["view"]) for clip, _, _ in chosen]
            else:
                batch["decoded"] = [clip for clip, _, _ in chosen]
        elif placed is not None:
            batch["placed"] = placed
        elif chosen:
            batch["clips"] = torch.stack([clip for clip, _, _ in chosen])
        else:
            size = self.cfg.crop_size
            views = (self.sampling.views,) if self.sampling.views > 1 else ()
            batch["clips"] = torch.empty((0, *views, self.sampling.frames, 3, size, size), dtype=torch.uint8)
        return batch

    def _open_arena(self) -> None:
        """Whole frames (``resize_on: device``) decode straight into the coming batch's region,
        when it is free: no copy of ~5 MB a clip afterwards."""
        self.arena = None
        if self.frame_slots is not None and self.cut_on_device:
            start = self.frame_slots.region(self.worker, self.slotted, 0)
            if start is not None:
                self.arena = [start, start + self.frame_slots.slot_bytes]

    def _frame_buffer(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """Room for a clip's decoded frames in the open region (None when it is full)."""
        start, end = self.arena
        size = math.prod(shape)
        if start + size > end:
            return None
        self.arena[0] = start + size
        return self.frame_slots.memory[start : start + size].numpy().reshape(shape)

    def _place(self, clips: list[Any], events: DataEvents) -> dict[str, Any] | None:
        """The batch's pixels written to this worker's next :class:`FrameSlots` region: where
        they lie, or None (no slots, an empty batch, or no room: counted)."""
        if self.frame_slots is None or not clips:
            return None
        if self.cut_on_device:
            frames = [clip["frames"] for clip in clips]
            placed = self.frame_slots.place_frames(self.worker, self.slotted, frames,
                                                   free_from=self.arena[0] if self.arena is not None else None)
            if placed is None:  # frames decoded into shared memory would otherwise cross as references to it
                for clip in clips:
                    if self.frame_slots.holds(clip["frames"]):
                        clip["frames"] = clip["frames"].clone()
        else:
            placed = self.frame_slots.place_batch(self.worker, self.slotted, clips)
        self.arena = None
        if placed is None:
            events.count("frame_slot_misses")
        else:
            self.slotted += 1
        return placed


class FrameSlots:
    """Shared memory that loader workers write their batches' pixels into: each worker has
    ``slots`` regions of ``slot_bytes``, used in turn; a batch carries only where its pixels
    lie, and the training process, once it has used them, marks the batch released, which
    frees its region for the worker's batch ``slots`` later. Used: whole frames
    (``data.resize_on: device``: decoded straight into the region of the batch being made; the
    training process cuts them on the device from there) and cut clips (stacked there; copied
    out at once: into pinned memory where CUDA is, as the DataLoader's ``pin_memory`` would,
    else into the batch's own tensor).

    Why not let the DataLoader send the tensors: it copies each into a fresh shared-memory
    file, first touched page by page, and passes each file's descriptor through a socket. For
    a 16-frame 427x240 clip (4.9 MB of frames) that cost one worker more than decoding it:
    ``launch/bench_loader.py``, one worker, 9.8 ms of CPU a clip against 4.5 ms in one process;
    5.7 ms with the slots. Here the memory is allocated once an epoch and each page faulted once.

    On a GPU the device crop copies the frames from this pageable memory (synchronously: the
    region may be released when the copy returns); the clips are copied out into pinned memory.

    A worker whose region is still in use (it never is with ``slots`` = prefetch + 2: a
    worker has at most ``data.prefetch_batches`` batches requested, and the training process
    releases each before it asks for the next), or whose batch does not fit, sends that batch
    the DataLoader's way and counts a ``frame_slot_misses``.
    """

    def __init__(self, workers: int, slots: int, slot_bytes: int) -> None:
        self.slots, self.slot_bytes = slots, slot_bytes
        # one storage for all workers: one file descriptor goes to each worker with the dataset.
        # torch's own constructor of a fresh shared storage: share_memory_() would first copy a
        # private one, touching all of it in the training process
        storage = torch.UntypedStorage._new_shared(workers * slots * slot_bytes)
        self.memory = torch.empty(0, dtype=torch.uint8).set_(storage)
        # per worker, how many of its slotted batches the training process has released
        self.released = torch.zeros(workers, dtype=torch.int64).share_memory_()

    def region(self, worker: int, number: int, size: int) -> int | None:
        """Where the worker's slotted batch ``number`` starts, if its region is free and fits ``size`` bytes."""
        if int(self.released[worker]) < number - self.slots + 1 or size > self.slot_bytes:
            return None
        return (worker * self.slots + number % self.slots) * self.slot_bytes

    def place_frames(self, worker: int, number: int, frames: list[torch.Tensor], free_from: int | None = None
                     ) -> dict[str, Any] | None:
        """In a worker: the frames of its slotted batch ``number`` (each ``[N, 3, H, W]`` uint8,
        channels-last as decoded) in its next region: those decoded there already stay, the
        others are copied from ``free_from`` on (the region's first byte not decoded into); None
        if the region is still in use or too small."""
        start = self.region(worker, number, 0)
        if start is None:
            return None
        end, base = start + self.slot_bytes, self.memory.data_ptr()
        free = start if free_from is None else free_from  # [start, free_from): decoded in place already
        layout = []
        for clip in frames:
            pixels = clip.permute(0, 2, 3, 1)  # [N, H, W, 3]: the decoder's layout, so a copy is one memcpy
            if pixels.is_contiguous() and start <= pixels.data_ptr() - base < end:
                layout.append((pixels.data_ptr() - base, tuple(pixels.shape)))
                continue
            if free + pixels.numel() > end:
                return None
            self.memory[free : free + pixels.numel()].view(pixels.shape).copy_(pixels)
            layout.append((free, tuple(pixels.shape)))
            free += pixels.numel()
        return dict(worker=worker, number=number, layout=layout)

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s pixels lie in this shared memory."""
        offset = tensor.data_ptr() - self.memory.data_ptr()
        return 0 <= offset < self.memory.numel()

    def place_batch(self, worker: int, number: int, clips: list[torch.Tensor]) -> dict[str, Any] | None:
        """In a worker: stack equal-shaped ``clips`` (``[..., 3, S, S]``) into its next region;
        None if that is still in use or too small."""
        shape = (len(clips), *clips[0].shape)
        start = self.region(worker, number, math.prod(shape))
        if start is None:
            return None
        region = self.memory[start : start + math.prod(shape)]
        # as the crop leaves them, channels last: stacked so, each clip is one memcpy, and the
        # batch has the layout torch.stack gives them; into a plain contiguous batch every pixel
        # would be transposed (12 against 5 ms a batch of 8 at 224 px)
        pixels = [clip.movedim(-3, -1) for clip in clips]
        channels_last = all(clip.is_contiguous() for clip in pixels)
        if channels_last:
            torch.stack(pixels, out=region.view(len(clips), *pixels[0].shape))
        else:
            torch.stack(clips, out=region.view(shape))
        return dict(worker=worker, number=number, layout=[(start, shape)], channels_last=channels_last)

    def take_batch(self, placed: dict[str, Any], pin: bool) -> torch.Tensor:
        """In the training process: a placed batch of clips, copied out in its layout (into
        pinned memory with ``pin``), its region released."""
        (start, shape), = placed["layout"]
        region = self.memory[start : start + math.prod(shape)]
        if placed["channels_last"]:
            pixels = region.view(*shape[:-3], *shape[-2:], shape[-3]).movedim(-1, -3)
        else:
            pixels = region.view(shape)
        batch = torch.empty_strided(pixels.shape, pixels.stride(), dtype=torch.uint8, pin_memory=pin)
        batch.copy_(pixels)
        self.release(placed)
        return batch

    def frames(self, placed: dict[str, Any]) -> list[torch.Tensor]:
        """In the training process: the frames of a placed batch, views of the shared memory
        (valid until :meth:`release`)."""
        return [self.memory[start : start + math.prod(shape)].view(shape).permute(0, 3, 1, 2)
                for start, shape in placed["layout"]]

    def release(self, placed: dict[str, Any]) -> None:
        """In the training process, once the batch's frames have been used (a worker's batches
        arrive in order)."""
        self.released[placed["worker"]] = placed["number"] + 1


def _round_robin(streams: list[Iterator[dict[str, Any]]], lanes: int, skip: int) -> Iterator[dict[str, Any]]:
    active = [streams[(skip + offset) % lanes] for offset in range(lanes)]
    while active:
        still = []
        for stream in active:
            batch = next(stream, None)
            if batch is not None:
                yield batch
                still.append(stream)
        active = still


class Loader:
    """The batches of one rank for one epoch: ``len()`` of them, each
    ``dict(clips=uint8 [B, T, 3, S, S], labels=int64 [B], keys=list[str])``; from feature
    shards ``dict(semantic=float32 [B, T, Ds], motion=float32 [B, T', Dm], labels, keys)``.

    :attr:`stats` counts skipped samples and shards, retries and refills seen so far (the
    workers report them with each batch); log it, it is the only trace of bad data. With
    workers it also sums their CPU time (``worker_cpu_us``, all threads, the hand-over of
    batches included) and counts batches whose pixels did not fit their :class:`FrameSlots`
    region (``frame_slot_misses``).
    """

    def __init__(self, dataset: _LaneDataset, cfg: DataConfig, num_batches: int, device: str | torch.device | None) -> None:
        self.dataset, self.cfg = dataset, cfg
        self.num_batches = num_batches
        self.device = torch.device(device) if device is not None else None
        self.stats: Counter = Counter({key: 0 for key in ERROR_KEYS + READ_KEYS})

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = self.cfg.num_workers
        slot_bytes = self.dataset.frame_slot_bytes() if workers else None
        regions = self.cfg.prefetch_batches + 2
        if slot_bytes and not shared_memory_fits(2 * workers * regions * slot_bytes):
            log.warning("shared memory (/dev/shm) has no room for %d loader workers' batch regions (%.1f GB, twice that "
                        "asked for): batches go the DataLoader's slower way; give the job more (docker: --shm-size)",
                        workers, workers * regions * slot_bytes / 1e9)
            slot_bytes = None
        slots = FrameSlots(workers, regions, slot_bytes) if slot_bytes else None
        self.dataset.frame_slots = slots  # the workers get it with the dataset, as they start
        try:
            yield from self._batches(slots)
        finally:
            self.dataset.frame_slots = None

    def _batches(self, slots: FrameSlots | None) -> Iterator[dict[str, Any]]:
        workers = self.cfg.num_workers
        pinned = torch.cuda.is_available() and self.cfg.decode == "cpu"
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=pinned,
            prefetch_factor=self.cfg.prefetch_batches if workers else None,
            in_order=True,
            worker_init_fn=functools.partial(init_worker, dict(os.environ)),
            multiprocessing_context=worker_context() if workers else None,
        )
        for batch in loader:
            self.stats.update(batch.pop("errors"))
            for message in batch.pop("messages"):
                log.warning("%s", message)
            if "fatal" in batch:
                kind, message = batch["fatal"]
                raise (storage.StorageAccessError if kind == "StorageAccessError" else storage.StorageUnavailable)(message)
            batch["labels"] = torch.tensor(batch["labels"], dtype=torch.int64)
            placed = batch.pop("placed", None)
            if "encoded" in batch:
                batch = self._decode_on_device(batch)
            elif "decoded" in batch:
                decoded = batch.pop("decoded")
                if placed is not None:
                    decoded = [dict(clip, frames=frames) for clip, frames in zip(decoded, slots.frames(placed))]
                device = self.device or torch.device("cpu")
                size, steps = self.cfg.crop_size, self.dataset.sampling.frames
                # from pageable memory a copy to a GPU has read its source when it returns
                batch["clips"] = (cut_on_device(decoded, size, device) if decoded
                                  else torch.empty((0, steps, 3, size, size), dtype=torch.uint8, device=device))
                if placed is not None:
                    slots.release(placed)
            elif placed is not None:
                batch["clips"] = slots.take_batch(placed, pin=pinned)
            yield batch

    def _decode_on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        encoded = batch.pop("encoded")
        device = self.device or torch.device("cuda")
        size, steps = self.cfg.crop_size, self.dataset.sampling.frames
        if not encoded:  # a short validation lane's empty last batch
            batch["clips"] = torch.empty((0, steps, 3, size, size), dtype=torch.uint8, device=device)
            return batch
        try:
            batch["clips"] = decode_on_device(encoded, self.cfg.crop_size, device)
            return batch
        except RuntimeError:  # one bad JPEG fails the whole call: find it clip by clip
            pass
        keep, clips = [], []
        for index, clip in enumerate(encoded):
            try:
                clips.append(decode_on_device([clip], self.cfg.crop_size, device)[0])
                keep.append(index)
                continue
            except RuntimeError:
                pass
            try:  # nvJPEG refuses some files libjpeg-turbo reads (e.g. unusual subsampling)
                clips.append(_decode_jpegs_on_cpu(clip, self.cfg.crop_size).to(device))
                keep.append(index)
                self.stats["cpu_decode_fallbacks"] += 1  # a GPU figure must not be a CPU one: counted
            except ValueError as error:
                self.stats["corrupt_samples"] += 1
                log.warning("skipping sample %s: JPEG frames do not decode: %s", batch["keys"][index], error)
        batch["keys"] = [batch["keys"][i] for i in keep]
        batch["labels"] = batch["labels"][keep]
        batch["clips"] = torch.stack(clips) if clips else torch.empty((0, steps, 3, size, size), dtype=torch.uint8, device=device)
        return batch


def shared_memory_fits(size: int) -> bool:
    """Whether /dev/shm has ``size`` bytes free (where there is none to ask, e.g. macOS: True).
    Its pages are only taken when first written: a full one kills the writer with SIGBUS."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return True
    return stats.f_bavail * stats.f_frsize >= size


@functools.lru_cache(maxsize=1)
def worker_context() -> Any:
    """Loader workers are forked from a forkserver, not from the training process.

    The training process has threads (gloo, TensorBoard's writer, tqdm, the feeder threads of
    the previous epoch's loader, still closing), and CPython 3.11 can deadlock a child forked
    while another thread is being created or torn down (seen here: a validation worker stuck in
    ``PyOS_AfterFork_Child`` after the training loader was stopped, once in ~10 runs of the
    Slurm preemption test). The forkserver is started once, single-threaded, with what the
    workers need preloaded, so a worker still starts in milliseconds; Python 3.14 made it the
    default for the same reason.
    """
    import multiprocessing
    from multiprocessing import forkserver, resource_tracker

    context = multiprocessing.get_context("forkserver")
    # the server imports, once, what every worker needs: the main module (else each worker runs
    # it again), this module and torchvision's transforms (imported lazily here, ~1.5 s)
    context.set_forkserver_preload(["__main__", "fusion.data", "torchvision.transforms.v2.functional"])
    # A scheduler signals every process of a job, the server too: started with SIGTERM and
    # SIGUSR1 blocked (a signal mask survives fork and exec), it and the workers it forks never
    # take them, and the training process, which does, decides. Blocked, not ignored, here:
    # a signal arriving meanwhile is delivered when the mask is restored.
    # The same for multiprocessing's resource tracker (it ignores SIGTERM itself but would die
    # of SIGUSR1, and a new one would not know the semaphores to clean up); starting it
    # unblocks SIGTERM again, hence the second block before the server starts.
    job_signals = {signal.SIGTERM, signal.SIGUSR1}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, job_signals)
    try:
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, job_signals)
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return context


def init_worker(environment: dict[str, str], worker_id: int) -> None:
    """A loader worker takes the training process's environment as it is now (a forkserver
    child would otherwise see the one the server started with: credentials exported since, for
    one), and ignores SIGTERM and SIGUSR1. A scheduler signals every process of a job (Slurm
    does, before preempting it), and torch's workers die on a SIGTERM that does not come from
    their parent; the training process instead finishes its step and checkpoints, then stops
    its workers the usual way (they also leave when it is gone)."""
    os.environ.clear()
    os.environ.update(environment)
    for number in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, signal.SIG_IGN)




# glibc's malloc serves every allocation over its mmap threshold (128 KiB, rising only as far as
# the blocks freed) with fresh, zeroed pages from the kernel: each clip's ~5 MB frame buffer and
# batch cost ~80 page faults, ~0.4 ms a clip of ~5 ms on the demo's textured shards (a profile
# of the decode-only loader process, launch/bench_loader.py). Below these thresholds the heap
# keeps freed pages and the next clip reuses them; a decoding process then holds up to
# TRIM_THRESHOLD of freed memory more than it otherwise would.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


@functools.cache  # once a process
def keep_freed_pages() -> bool:
    """Tune glibc's malloc of this process so decoded frames reuse freed pages (elsewhere, e.g.
    musl or macOS, nothing changes). Returns whether glibc took both settings."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def crop_seed_text(seed: int, epoch: int) -> str:
    """What seeds a training clip's frames, crop and flip (with its key): feature extraction
    cuts view ``v`` with epoch ``v``'s, so cached views are the crops training would take."""
    return f"crop:{seed}:{epoch}"


def _check_rank(rank: int, world_size: int, batch_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size})")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")


def train_loader(cfg: DataConfig, shardset: ShardSet, *, batch_size: int, rank: int, world_size: int, epoch: int, seed: int,
                 skip_batches: int = 0, device: str | torch.device | None = None, stints: tuple[Stint, ...] = ()) -> Loader:
    """Training batches of ``rank`` for ``epoch``: shuffled, random-resized-cropped, a random
    frame from each of ``data.frames`` segments, every rank the same number;
    ``skip_batches=k`` resumes at batch ``k`` of the epoch exactly.

    ``stints``: the parts of this epoch that runs with other layouts (ranks, workers, batch
    size) trained before a resume; the epoch's rest is planned afresh for this layout, each
    remaining clip once, and nothing they consumed is read (step 5 of the module docstring).

    ``len()`` is the number of batches still to come (``batches_per_rank(...) - k``).
    ``device`` is where ``decode: gpu`` decodes the batch (default ``cuda``; ``cpu`` runs the
    same bytes-only path without a GPU); unused with ``decode: cpu``. A sample that fails to
    decode there is dropped from its batch (which is then short) and counted.
    """
    _check_rank(rank, world_size, batch_size)
    if cfg.flip:
        shardset.check_flip_labels()
    sampling = Sampling.of(cfg, shardset)
    lanes = max(1, cfg.num_workers)
    plans = train_plan(shardset, batch_size=batch_size, rank=rank, world_size=world_size, epoch=epoch, seed=seed, lanes=lanes,
                       stints=stints)
    per_rank = sum(len(plan.batch_ids) for plan in plans)
    if not 0 <= skip_batches <= per_rank:
        raise ValueError(f"skip_batches={skip_batches} is outside 0..{per_rank} (batches per rank this epoch)")
    dataset = _LaneDataset(
        shardset, cfg, plans, sampling=sampling, batch_size=batch_size, skip_batches=skip_batches,
        seed_text=_order_text(seed, epoch, rank, world_size, len(stints)), crop_seed_text=crop_seed_text(seed, epoch),
        fill=True, require_label=True, announce=rank == 0,
        feature_view=epoch % shardset.feature_spec.views if shardset.is_features else 0,
    )
    return Loader(dataset, cfg, per_rank - skip_batches, device)


def val_loader(cfg: DataConfig, shardset: ShardSet, *, batch_size: int, rank: int, world_size: int,
               device: str | torch.device | None = None, temporal_views: int = 1, spatial_crops: int = 1) -> Loader:
    """Validation batches of ``rank``: manifest order, each clip on exactly one rank once;
    batches may be short (or empty for a rank with no clips). Labels are -1 for unlabelled
    (test split) clips. One view (the segment middles, the centre square) gives clips
    ``[B, T, 3, S, S]``; ``temporal_views`` x ``spatial_crops`` views (see :class:`Sampling`)
    give ``[B, V, T, 3, S, S]``, temporal-major (``decode: cpu`` only)."""
    _check_rank(rank, world_size, batch_size)
    sampling = Sampling.of(cfg, shardset, temporal_views, spatial_crops)
    if sampling.views > 1 and shardset.is_features:
        raise ConfigError(f"{shardset.url} holds features of one view per clip: evaluate several views from frame shards")
    if sampling.views > 1 and cfg.decode == "gpu":
        raise ConfigError("several views per clip are cut on the CPU: set data.decode cpu for multi-view evaluation")
    lanes = max(1, cfg.num_workers)
    plans = val_plan(shardset, batch_size=batch_size, rank=rank, world_size=world_size, lanes=lanes)
    dataset = _LaneDataset(
        shardset, cfg, plans, sampling=sampling, batch_size=batch_size, skip_batches=0,
        seed_text=None, crop_seed_text=None, fill=False, require_label=False, announce=rank == 0,
    )
    return Loader(dataset, cfg, sum(len(plan.batch_ids) for plan in plans), device)
