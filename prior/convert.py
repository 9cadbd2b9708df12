"""Convert a prior checkpoint (.pth, any supported wrapper) to safetensors for fast loading.

    python -m prior.convert prior_ema_fp16.pth weights/mine/prior.safetensors

The result keeps the checkpoint's tensor names (and, unless ``--dtype`` says otherwise, its
precision) and loads without unpickling: point ``DIDP_WEIGHTS`` at its directory. A file stored
in the precision the network runs in (``--dtype bfloat16`` on a CPU, ``float16`` on CUDA; name it
``prior-<dtype>.safetensors``) is memory-mapped instead of converted at every start. Beside the
result goes its manifest, ``<target>.manifest.json`` (size and sha256, see ``prior.integrity``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .weights import convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prior.convert", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a .pth or .safetensors prior checkpoint")
    parser.add_argument("target", type=Path, help="the .safetensors file to write (e.g. DIR/prior.safetensors)")
    parser.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        help="store the network as it runs in this precision (mapped, not converted, at load); default: as stored",
    )
    args = parser.parse_args(argv)
    if args.target.suffix != ".safetensors":
        parser.error("target must end in .safetensors")
    try:
        convert(args.source, args.target, getattr(torch, args.dtype) if args.dtype else None)
    except (CheckpointError, OSError) as error:  # a damaged source, or a target that cannot be written
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(args.target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
