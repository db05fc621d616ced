"""The streaming data pipeline: WebDataset shards (a local folder or ``s3://bucket/prefix``)
to batches of uint8 clips ``[B, T, 3, H, W]``, split over ranks and loader workers.

The stages, one module each (webdataset's pipeline of small stages is the model):

- :mod:`fusion.data.plan`: the plan. Which positions each rank and lane takes (steps 1-3, 5);
  reads nothing.
- :mod:`fusion.data.read`: the reads. Segments to raw samples (ranged reads, the node cache,
  checks, waits on storage), then a lane's stream in shuffle windows (steps 4-7).
- :mod:`fusion.data.decode`: the decode. Raw sample to clip: frames, crop, JPEG decode;
  :mod:`fusion.data.region` decodes only a training crop's region of a frame.
- :mod:`fusion.data.loader`: the batches. Workers, equal batches, refills, :class:`Loader`,
  :func:`train_loader`, :func:`val_loader`.
- :mod:`fusion.data.common`: what they share (:class:`DataConfig`, :class:`ShardSet`, limits,
  counters).

Start reading at :func:`train_loader` and :func:`val_loader`; :class:`ShardSet` opens a shard
folder through its ``manifest.json`` (written by ``sharding.make_shards``).

How an epoch is planned (the whole order is decided up front, from the manifest alone, so
every rank takes the same decisions without talking to the others):

1. **Shard order.** The shard list is shuffled with ``(seed, epoch)``; its samples, in order,
   form one global sequence of ``num_samples`` positions. Every rank computes the same one
   (shuffling after the node split gave ranks different orders: WebDataset #233).
2. **Rank split by samples, not by shards.** Each rank takes ``L * batch_size`` consecutive
   positions, ``L = num_samples // (world_size * batch_size)`` (the tail that does not fill a
   batch on every rank is dropped, a different tail every epoch). Ranks therefore get exactly
   the same number of batches, also when there are fewer shards than ranks x workers: two
   ranks simply read different sample ranges of one shard (WebDataset #225, #188, #68; no
   ``with_epoch``/``resampled`` needed: #379, #303, #440).
3. **Lanes.** A rank's batches are dealt round-robin to ``lanes = max(1, num_workers)``
   lanes: batch ``i`` belongs to lane ``i % lanes``, and each lane owns one contiguous run of
   the rank's positions. A lane reads its run sequentially (a worker streams a few shards)
   and permutes it in windows of ``shuffle_window`` samples, each window with its
   own ``(seed, epoch, rank, lane, window)`` generator. Batch ``j`` of a lane is positions
   ``j*B .. (j+1)*B`` of that lane's stream. The contents of batch ``i`` are thus a pure
   function of ``(seed, epoch, rank, world_size, num_workers, batch_size)`` and the manifest;
   worker timing plays no part.
4. **Workers.** The DataLoader asks its workers in order and returns their batches in order
   (``in_order=True``), so worker ``w``'s ``m``-th batch is the rank's batch
   ``skip + m*workers + w``: a worker serves lane ``(skip + w) % lanes``.
5. **Mid-epoch resume.** ``skip_batches=k`` starts every lane at its first batch ``>= k``; the
   skipped positions of a lane are not read: whole windows are passed over by position, and of
   the window the resume falls in only the positions still to come are read. A sample lost
   with its shard keeps its position (a stand-in the batch skips), so windows never shift. The resumed
   loader yields exactly the batches ``k..L-1`` of the uninterrupted one (MosaicML #880,
   LitData #213, WebDataset #177/#271), provided seed, world size, workers and batch size are
   the same. **With another layout** (ranks, workers or batch size), the old layout is passed
   as a :class:`Stint` (its batches done per rank): the positions its lanes consumed follow
   from its plan alone (a lane's first ``j`` batches are the first ``j*B`` positions of its
   run in window order), and the rest of the sequence, in order, is planned afresh for the new
   layout as in steps 2-3. Every clip the stopped run had not trained is trained once (but a
   tail that does not fill a batch on every rank), none it trained is read again, and stints
   chain when a run changes layout twice in an epoch. The next epoch plans the new layout
   from scratch. A sample lost with its shard keeps its position (a stand-in that the batch
   replaces, step 7), so windows never shift and the consumed positions stay the plan's.
6. **Reads.** A shard whose manifest entry has ``offsets`` (:mod:`sharding.shard_index`) is
   read from the first byte of the segment's first sample to the last byte of its last (a
   seek, an S3 ``Range`` GET), so a lane that starts mid-shard reads nothing before its run;
   each sample's bytes are read in one piece and checked against the index's CRC-32C before
   they are parsed (an index without them: a whole shard with a sha256 is read entire, to
   check it). Without offsets (shards packed
   before the index) a segment streams its shard from the start. With ``data.cache_dir`` the
   same bytes come from the node's checked copy of the whole shard (:mod:`sharding.cache`).
   Lanes count what they read (``bytes_read``, ``samples_read``, ``cache_*`` in :attr:`Loader.stats`).
7. **Errors.** Only ``NNN.jpg``, ``cls`` and ``json`` members (and features' ``sem.npy`` and
   ``mot.npy``) are read; any other member
   (``.pyd``, ``.pickle`` ...) is never loaded, let alone unpickled. Bad data is skipped and
   counted in :attr:`Loader.stats`, with a warning the training process prints:

   - a sample that does not decode, or whose frames are larger than the manifest allows (in
     bytes from the tar header, in pixels from the JPEG header: both checked before anything is
     read or allocated, see :class:`FrameLimits`), or whose bytes do not match the index's
     CRC-32C (a damaged byte that would still decode: a label digit), is ``corrupt_samples``;
   - a shard that is not what the manifest says (another size, a tar error, missing, too few
     samples, another sha256, hashed as it streams) is ``corrupt_shards``;
   - an unreachable store is not bad data: it is waited for with backoff up to
     ``storage_timeout_s`` (``read_retries`` counts the re-opens), then the loader raises
     :class:`sharding.storage.StorageUnavailable` and the trainer stops with a checkpoint.

   A lane whose stream runs short (skipped samples
   or shards) fills its batches by reading further positions: past its run it reads the
   whole epoch's sample sequence with a fresh permutation (so a sample may then appear twice
   in an epoch). Every sample a batch takes in place of a lost one of its own ``B`` positions
   is counted as ``refilled_samples`` (so it equals the clips lost), which the trainer holds
   to its ``max_skipped_fraction`` budget. Batch ``j`` takes the first ``B`` good
   samples from position ``j*B`` on, so this depends only on positions: a run resumed with
   ``skip_batches`` still matches, and every rank still yields exactly ``L`` batches, so DDP
   never hangs (WebDataset #225).

Validation reads the manifest order unshuffled; rank ``r`` takes positions
``[r*N//W, (r+1)*N//W)`` and each lane a contiguous part of those, so each clip is seen
exactly once over all ranks (the last batch of a lane may be short).

Clips stay uint8 (the model normalises on the device). Training takes one random resized crop
for all ``T`` frames of a clip, validation the centre square; there is no plain horizontal
flip, only the optional flip that also swaps SSv2's left/right labels (``flip: true``).
With ``decode: gpu`` the workers only move JPEG bytes and crop boxes, and the batch is decoded
on the GPU with ``torchvision.io.decode_jpeg(..., device="cuda")``. With ``resize_on: device``
the workers write each batch's whole frames into shared memory they reuse
(:class:`~fusion.data.loader.FrameSlots`) and send only where the frames lie; the training
process cuts them on the device, then releases the memory to its worker.

**Feature shards** (``launch/extract_features.py``, :mod:`fusion.features`) go through the same
plan, reads, skips and refills; their samples hold the frozen backbones' outputs instead of
frames (``sem.npy``, ``mot.npy``), and batches carry ``semantic`` and ``motion`` tensors
instead of ``clips``. A training epoch draws one of each clip's stored views at random.
"""

from __future__ import annotations

from fusion.data.common import (ASPECT_RATIOS, ERROR_KEYS, MANIFEST_FORMAT, MANIFEST_NAME, MAX_ASPECT, MAX_BACKOFF_S,
                                MAX_FRAME_SIDE, MAX_META_BYTES, MAX_READ_PASSES, READ_KEYS, READ_MEMBER, SHARD_NAME,
                                DataConfig, DataEvents, FrameLimits, Oversize, ShardMismatch, ShardSet)
from fusion.data.plan import (LanePlan, Segment, Stint, batches_per_rank, epoch_positions, epoch_shard_order,
                              segments_for, segments_of, train_plan, val_plan)
from fusion.data.read import TarStream, read_segment
from fusion.data.decode import (ClipView, CorruptSample, Sampling, center_box, cut_on_device, decode_clip,
                                decode_on_device, random_resized_box, segment_bounds, spatial_boxes,
                                train_frame_indices, view_frame_indices)
from fusion.data.loader import Loader, crop_seed_text, init_worker, train_loader, val_loader, worker_context

__all__ = ["ASPECT_RATIOS", "ClipView", "CorruptSample", "DataConfig", "DataEvents", "ERROR_KEYS", "FrameLimits",
           "LanePlan", "Loader", "MANIFEST_FORMAT", "MANIFEST_NAME", "MAX_ASPECT", "MAX_BACKOFF_S", "MAX_FRAME_SIDE",
           "MAX_META_BYTES", "MAX_READ_PASSES", "Oversize", "READ_KEYS", "READ_MEMBER", "SHARD_NAME", "Sampling",
           "Segment", "ShardMismatch", "ShardSet", "Stint", "TarStream", "batches_per_rank", "center_box",
           "crop_seed_text", "cut_on_device", "decode_clip", "decode_on_device", "epoch_positions",
           "epoch_shard_order", "init_worker", "random_resized_box", "read_segment", "segment_bounds", "segments_for",
           "segments_of", "spatial_boxes", "train_frame_indices", "train_loader", "train_plan", "val_loader",
           "val_plan", "view_frame_indices", "worker_context"]
