"""Convert a prior checkpoint (.pth, any supported wrapper) to safetensors for fast loading.

    python -m prior.convert prior_ema_fp16.pth weights/mine/prior.safetensors

The result keeps the checkpoint's tensor names and precision and loads without unpickling,
memory-mapping or copying the whole file: point ``DIDP_WEIGHTS`` at its directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .weights import convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prior.convert", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a .pth or .safetensors prior checkpoint")
    parser.add_argument("target", type=Path, help="the .safetensors file to write (e.g. DIR/prior.safetensors)")
    args = parser.parse_args(argv)
    if args.target.suffix != ".safetensors":
        parser.error("target must end in .safetensors")
    try:
        convert(args.source, args.target)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(args.target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
