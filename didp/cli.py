"""``didp``: run the predictor without Docker, with ``cog predict``'s ``-i key=value`` syntax.

    didp -i prompt="a lighthouse at night" -i iterations=100 --weights tiny -o outputs/

Inputs are checked by the same rules as the Cog server before any model is loaded; files are
copied to ``-o`` as they are produced and their paths printed; when the first one arrives, an
earlier run's files there (known by their names, ``OUTPUT_NAMES``) are removed so that runs do
not mix. One run at a time writes into a directory: a second one there is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: runs are not kept apart
    fcntl = None

PREDICTOR = ("predict", "Predictor")
# The names of the files a run writes (README, Outputs); a run into a directory replaces an
# earlier run's files.
OUTPUT_NAMES = re.compile(
    r"(text_tokens|text_embedding|image_embedding|target_embeddings)\.npy"
    r"|step_\d{4}(_\d{2})?\.png|(best|frame)_\d{2}\.png"
    r"|(progress|interpolation|edit)\.(webp|gif)|result\.json"
)


def remove_earlier_outputs(directory: Path) -> list[Path]:
    """Remove the files an earlier run wrote into ``directory`` (by their names; nothing else), so
    that runs do not mix; returns them."""
    earlier = sorted(p for p in directory.iterdir() if OUTPUT_NAMES.fullmatch(p.name) and p.is_file())
    for path in earlier:
        path.unlink(missing_ok=True)
    return earlier


class OutputBusy(Exception):
    """Another run is writing into the output directory."""


@contextlib.contextmanager
def output_directory(path: Path):
    """``path``, created if needed, for this run alone while it lasts.

    A second run into the same directory would remove this run's files when it replaces an
    earlier run's, so it is refused (``OutputBusy``). The lock is an advisory ``flock`` on the
    directory itself, released when the process ends, however it ends. A directory created here
    and left empty (setup failed) is removed again.
    """
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputBusy(
                    f"-o {path}: another didp run is writing there; wait for it to end or choose another directory"
                ) from None
            except OSError:  # a file system without locks: runs are not kept apart
                pass
        yield path
    finally:
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only if empty


def _predictor_inputs() -> dict:
    from cog import _inspector

    return _inspector.create_predictor(*PREDICTOR).inputs


def _describe(field) -> str:
    kind = field.type.primitive.name.lower()
    parts = [(field.description or "").rstrip(".")]
    if field.choices:
        parts.append(f"one of {', '.join(map(str, field.choices))}")
    if field.ge is not None or field.le is not None:
        low = "" if field.ge is None else _number(field.ge)
        high = "" if field.le is None else _number(field.le)
        parts.append(f"range {low}..{high}")
    if field.regex == r"\S":
        parts.append("not blank")
    elif field.min_length:
        parts.append(f"at least {field.min_length} character(s)")
    if kind == "path":
        parts.append("a file, name=@path or name=path")
    parts.append(default_text(field))
    return f"  {field.name} ({kind}): " + "; ".join(p for p in parts if p)


def is_optional(field) -> bool:
    from cog._adt import Repetition

    return field.type.repetition in (Repetition.OPTIONAL, Repetition.OPTIONAL_REPEATED)


def default_text(field) -> str:
    if field.default is not None:
        return f"default {field.default!r}"
    return "optional" if is_optional(field) else "required"


def _local_file(name: str, value: str) -> Path:
    """The file a path input names (``@path`` or ``path``); a missing one is an error naming the input."""
    path = Path(value.removeprefix("@")).expanduser()
    if not path.is_file():
        raise ValueError(f"{name}: no such file: {path}")
    return path


def check_before_setup(values: dict, fields: dict) -> None:
    """The predictor's own checks that need no model, run before the models load, so that a request
    that cannot work fails at once rather than after loading (or downloading) the weights: files
    exist, the inputs combine (``Request.check``), ``num_scales`` fits ``size`` (``DipSettings``)."""
    from didp.request import Request
    from dip.settings import DipSettings

    for name, value in values.items():
        field = fields.get(name)
        if field is not None and field.type.primitive.name == "PATH" and value is not None:
            _local_file(name, value)
    Request.check(**{f.name: values[f.name] for f in dataclasses.fields(Request) if f.name in values})
    DipSettings(**{f.name: values[f.name] for f in dataclasses.fields(DipSettings) if f.name in values}).validate()


@contextlib.contextmanager
def local_files(values: dict, fields: dict):
    """File inputs (``@path`` or ``path``) handed over as the server hands them over: as a copy in
    the temporary directory (removed afterwards). A missing file is an error that names the input."""
    from cog import Path as CogPath

    copies: list[Path] = []
    try:
        files = {}
        for name, value in values.items():
            field = fields.get(name)
            if field is None or field.type.primitive.name != "PATH" or value is None:
                continue
            path = _local_file(name, value)
            handle, copy = tempfile.mkstemp(suffix=path.suffix[:16])
            os.close(handle)
            copies.append(Path(copy))
            shutil.copyfile(path, copy)
            files[name] = CogPath(copy)
        yield {**values, **files}
    finally:
        for copy in copies:
            copy.unlink(missing_ok=True)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def inputs_help() -> str:
    fields = sorted(_predictor_inputs().values(), key=lambda f: f.order)
    return "inputs (-i name=value):\n" + "\n".join(_describe(f) for f in fields)


def parse_assignments(assignments: list[str], fields: dict) -> dict:
    """``["iterations=100", ...]`` -> typed values (errors name the input)."""
    values: dict = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        if not sep:
            raise ValueError(f"{assignment!r}: expected name=value")
        field = fields.get(name)
        if field is None:
            raise ValueError(f"{name}: unknown input (see didp --help)")
        values[name] = _convert(text, field.type.primitive.name)
    return values


def _convert(text: str, kind: str):
    """The typed value, or the text itself when it is not of the type (validation then says so
    in the server's words)."""
    try:
        if kind == "INTEGER":
            try:
                return int(text)
            except ValueError:
                number = float(text)  # "8.0" or "1e3", whole numbers the server takes as integers too
                return int(number) if number.is_integer() else number
        if kind == "FLOAT":
            return float(text)
    except ValueError:
        pass
    if kind == "BOOL" and text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="didp",
        description="What CLIP sees for a caption: the diffusion prior and the deep-image-prior visualiser.",
        epilog=inputs_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-i", "--input", action="append", default=[], metavar="NAME=VALUE", help="an input")
    parser.add_argument("--weights", help="tiny, laion or a directory of weights (default: $DIDP_WEIGHTS or laion)")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("outputs"),
        help="output directory (default outputs/); an earlier run's files there are replaced; one run at a time",
    )
    args = parser.parse_args(argv)

    from didp.validation import validate_inputs

    fields = _predictor_inputs()
    try:
        values = validate_inputs(parse_assignments(args.input, fields))
        check_before_setup(values, fields)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.output.exists() and not args.output.is_dir():
        print(f"error: -o {args.output}: not a directory", file=sys.stderr)
        return 2
    if args.weights:
        os.environ["DIDP_WEIGHTS"] = args.weights
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(output_directory(args.output))
        except OutputBusy as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except OSError as error:  # the directory cannot be made or opened
            print(f"error: -o {args.output}: {error.strerror or error}", file=sys.stderr)
            return 1
        return _run(args.output, values, fields)


def _run(output: Path, values: dict, fields: dict) -> int:
    """Set up the predictor and run it once, copying its files to ``output`` as they come."""
    from predict import Predictor

    predictor = Predictor()
    predictor.record_metric = lambda name, value: None
    try:
        predictor.setup()
    except Exception as error:  # a clear message, not a traceback, for missing or broken weights
        print(f"error: setup failed: {error}", file=sys.stderr)
        return 1
    try:
        with local_files(values, fields) as run_values:  # file inputs are copied first: one may be an output
            replacing = True
            for produced in predictor.run(**run_values):
                if replacing:  # only once the run has produced something: a refused run keeps the old files
                    replacing = False
                    if earlier := remove_earlier_outputs(output):
                        print(f"replaced the {len(earlier)} files of an earlier run in {output}", file=sys.stderr)
                target = output / Path(produced).name
                shutil.copyfile(produced, target)
                print(target, flush=True)
    except ValueError as error:  # an input, or a combination of inputs, refused before any work
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as error:  # out of memory, unwritable outputs: the message says what to do
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        predictor.discard_outputs()  # copied to -o already; the server's copy would outlive this process
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
