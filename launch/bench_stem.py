"""How fast I3D's stem conv runs in each exact form, and I3D with each, on this machine.

    python -m launch.bench_stem [--batch 32] [--frames 16] [--crop 224] [--size full]

The stem is a (5, 7, 7) conv of the 3 colour channels. On an H100 in bf16, cuDNN has no
tensor-core kernel for a 3-D conv with 3 input channels and ran a generic one: 41 ms of I3D's
81 ms at batch 32 (``launch/figures/gpu/h100_stem_forms.txt``). The forms timed here compute the
same sums:

- ``conv3d``: ``nn.Conv3d`` as built (what pytorchvideo runs);
- ``conv3d, channels padded to 8``: zero channels on input and weight;
- ``conv2d over temporal taps``: :meth:`fusion.backbones.i3d.Stem.conv_as_2d`, what I3D runs on
  CUDA: the 5 temporal taps of the 3 colours become 15 (+1) channels of a 2-D 7x7 conv over the
  B*T frames.

Each form's output is compared with the fp32 ``conv3d`` (relative error), and the whole I3D is
timed with the stem's 3-D conv and with the 2-D form. Backbones in bf16 on CUDA, fp32 on CPU,
random weights (speed and numerics only). Ratios are against ``conv3d`` in the same run.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from fusion.backbones.i3d import build_i3d


def time_ms(run: Callable[[], torch.Tensor], device: torch.device, iterations: int) -> float:
    """Median milliseconds of ``run`` after two warm-up calls."""
    times = []
    with torch.no_grad():
        for index in range(iterations + 2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index >= 2:
                times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got.double() - reference.double()).norm() / reference.double().norm())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench_stem", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="clips per forward (default 32)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip, T (default 16)")
    parser.add_argument("--crop", type=int, default=224, help="frame side in pixels (default 224)")
    parser.add_argument("--size", choices=("full", "debug"), default="full", help="I3D size (default full)")
    parser.add_argument("--iterations", type=int, default=10, help="timed calls of each form (default 10)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    logging.getLogger("fusion.backbones").setLevel(logging.ERROR)  # random weights: said in the header
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        i3d = build_i3d(None, args.size).to(device).eval()
    stem = i3d.blocks[0]
    clips = torch.randint(0, 256, (args.batch, args.frames, 3, args.crop, args.crop), dtype=torch.uint8, device=device)
    with torch.no_grad():
        x32 = (clips.permute(0, 2, 1, 3, 4).float() / 255 - 0.45) / 0.225
        reference = stem.conv(x32)
    fp32_stem = stem
    stem_low = type(stem)(stem.conv.out_channels).to(device)
    stem_low.load_state_dict(fp32_stem.state_dict())
    stem_low = stem_low.to(dtype).eval()
    x = x32.to(dtype)
    conv = stem_low.conv

    def padded() -> torch.Tensor:
        extra = 8 - conv.in_channels
        return F.conv3d(F.pad(x, (0, 0, 0, 0, 0, 0, 0, extra)), F.pad(conv.weight, (0, 0, 0, 0, 0, 0, 0, extra)), None,
                        conv.stride, conv.padding)

    forms = {"conv3d": lambda: conv(x), "conv3d, channels padded to 8": padded, "conv2d over temporal taps": lambda: stem_low.conv_as_2d(x)}
    print(f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), {dtype}, batch {args.batch}, "
          f"T={args.frames}, {args.crop} px, I3D {args.size}, torch {torch.__version__}")
    print(f"{'stem conv form':36s} {'ms':>9s} {'vs conv3d':>10s} {'rel. error vs fp32':>19s}")
    base = None
    for name, run in forms.items():
        ms = time_ms(run, device, args.iterations)
        base = base or ms
        with torch.no_grad():
            error = relative_error(run().float(), reference)
        print(f"{name:36s} {ms:9.2f} {base / ms:9.2f}x {error:19.2e}")

    model = i3d.to(dtype)
    as_built = stem.forward

    def plain_stem(inputs: torch.Tensor) -> torch.Tensor:
        return stem.pool(stem.activation(stem.norm(stem.conv(inputs))))

    print(f"{'whole I3D, stem as':36s} {'ms':>9s} {'vs conv3d':>10s}")
    stem.forward = plain_stem
    whole_3d = time_ms(lambda: model(clips), device, args.iterations)
    stem.forward = as_built
    whole_now = time_ms(lambda: model(clips), device, args.iterations)
    print(f"{'conv3d':36s} {whole_3d:9.2f} {1.0:9.2f}x")
    print(f"{'as built (' + ('2-D taps on CUDA' if device.type == 'cuda' else 'conv3d on CPU') + ')':36s} {whole_now:9.2f} "
          f"{whole_3d / whole_now:9.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
