"""``didp``: run the predictor without Docker, with ``cog predict``'s ``-i key=value`` syntax.

    didp -i prompt="a lighthouse at night" -i iterations=100 --weights tiny -o outputs/

Inputs are checked by the same rules as the Cog server before any model is loaded; files are
copied to ``-o`` as they are produced and their paths printed; when the first one arrives, an
earlier run's files there (known by their names, ``OUTPUT_NAMES``) are removed so that runs do
not mix. One run at a time writes into a directory: a second one there is refused. Ctrl-C or
SIGTERM ends a run with one line: the files already copied stay whole, the temporary ones go.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

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


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the clean-up of an interrupted run happens."""


@contextlib.contextmanager
def terminate_as_interrupt():
    """While inside, SIGTERM raises ``Terminated`` (as Ctrl-C raises ``KeyboardInterrupt``) instead
    of ending the process on the spot, which would leave the run's temporary files behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, _handler(previous))


def _handler(previous):
    """A handler that ``signal.signal`` returned, as it can be set again (``None``: set outside Python)."""
    return signal.SIG_DFL if previous is None else previous


@contextlib.contextmanager
def uninterrupted():
    """Hold Ctrl-C and SIGTERM back until the block has run (clean-up, copying a file): a signal
    that arrives meanwhile is raised again after it, to the handler it would have met.

    The handlers are swapped rather than the signals masked: a signal may be delivered to any
    thread (PyTorch's included), but Python runs its handlers in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {}
    try:
        for kind in (signal.SIGINT, signal.SIGTERM):  # one at a time: a signal between them finds its own restored
            previous[kind] = signal.signal(kind, lambda signum, frame: arrived.append(signum))
        yield
    finally:
        for kind, handler in previous.items():
            signal.signal(kind, _handler(handler))
        if arrived:
            signal.raise_signal(arrived[0])


class OutputBusy(Exception):
    """Another run is writing into the output directory."""


@contextlib.contextmanager
def output_directory(path: Path):
    """``path``, created if needed, for this run alone while it lasts.

    A second run into the same directory would remove this run's files when it replaces an
    earlier run's, so it is refused (``OutputBusy``); see ``pipeline.locks``. A directory created
    here and left empty (setup failed) is removed again.
    """
    from pipeline.locks import DirectoryBusy, hold, release

    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        lock = hold(path)
    except DirectoryBusy:
        raise OutputBusy(
            f"-o {path}: another didp run is writing there; wait for it to end or choose another directory"
        ) from None
    try:
        yield path
    finally:
        if created:  # while still held: another run may take the directory once it is released
            with contextlib.suppress(OSError):
                path.rmdir()  # only if empty
        release(lock)


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


_URL = re.compile(r"[a-z][a-z0-9+.-]*://|data:", re.ASCII | re.IGNORECASE)


def _local_file(name: str, value: str) -> Path:
    """The file a path input names (``@path`` or ``path``); a missing one is an error naming the input."""
    text = value.removeprefix("@")
    if not text.strip():
        raise ValueError(f"{name}: give a file: -i {name}=@path")
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if _URL.match(text):
        raise ValueError(f"{name}: didp reads local files (-i {name}=@path); a URL or data: URI works over HTTP")
    raise ValueError(f"{name}: no such file: {path}")


def check_before_setup(values: dict, fields: dict) -> None:
    """The predictor's own checks that need no model, run before the models load, so that a request
    that cannot work fails at once rather than after loading (or downloading) the weights: files
    exist and are pictures, the inputs combine (``Request.check``), ``num_scales`` fits ``size``
    (``DipSettings``)."""
    from dip.settings import DipSettings
    from pipeline.media import load_image
    from pipeline.request import Request

    for name, value in values.items():
        field = fields.get(name)
        if field is not None and field.type.primitive.name == "PATH" and value is not None:
            load_image(_local_file(name, value))  # the run decodes it again: a few ms, not a model load
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
            with uninterrupted():  # every copy made is known to the clean-up
                handle, copy = tempfile.mkstemp(suffix=path.suffix[:16])
                os.close(handle)
                copies.append(Path(copy))
            shutil.copyfile(path, copy)
            files[name] = CogPath(copy)
        yield {**values, **files}
    finally:
        with uninterrupted():
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


@dataclasses.dataclass
class Progress:
    """How far a run got: its output directory once chosen, and the files copied there whole."""

    output: Path | None = None
    written: list[Path] = dataclasses.field(default_factory=list)

    def interrupted(self, interrupt: KeyboardInterrupt) -> str:
        what = "terminated" if isinstance(interrupt, Terminated) else "interrupted"
        if not self.written:
            return f"{what}: nothing was written" + (f" to {self.output}" if self.output else "")
        if self.written[-1].name == "result.json":
            return f"{what} after the run had finished: its files are in {self.output}"
        files = "the 1 file" if len(self.written) == 1 else f"the {len(self.written)} files"
        return f"{what}: the run did not finish; {files} written so far are in {self.output} (no result.json)"


# Exit codes of a run ended by a signal, as a shell reports a process killed by it.
SIGNAL_EXIT_CODES = {130: signal.SIGINT, 143: signal.SIGTERM}


def main(argv: list[str] | None = None) -> int:
    """``didp``; Ctrl-C (exit code 130) and SIGTERM (143) end it with one line and no leftovers."""
    progress = Progress()
    with terminate_as_interrupt():
        try:
            return _main(argv, progress)
        except KeyboardInterrupt as interrupt:
            print(f"\n{progress.interrupted(interrupt)}", file=sys.stderr)
            return 143 if isinstance(interrupt, Terminated) else 130


def console() -> None:
    """The ``didp`` command: ``main``; a run that a signal ended, once cleaned up, ends the process by
    that signal, so that a shell loop around ``didp`` stops at Ctrl-C as it does for other commands."""
    code = main()
    if code in SIGNAL_EXIT_CODES:
        sys.stdout.flush()
        sys.stderr.flush()
        kind = SIGNAL_EXIT_CODES[code]
        signal.signal(kind, signal.SIG_DFL)
        os.kill(os.getpid(), kind)
    sys.exit(code)


def _main(argv: list[str] | None, progress: Progress) -> int:
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

    from pipeline.validation import validate_inputs

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
        except OSError as error:  # the directory cannot be made or opened: a bad -o, as a file there is
            print(f"error: -o {args.output}: {error.strerror or error}", file=sys.stderr)
            return 2
        progress.output = args.output
        return _run(values, fields, progress)


def _run(values: dict, fields: dict, progress: Progress) -> int:
    """Set up the predictor and run it once, copying its files to ``progress.output`` as they come
    (each one, once whole, recorded in ``progress.written``)."""
    output = progress.output
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
                    with uninterrupted():
                        earlier = remove_earlier_outputs(output)
                    if earlier:
                        print(f"replaced the {len(earlier)} files of an earlier run in {output}", file=sys.stderr)
                target = output / Path(produced).name
                with uninterrupted():  # a file in -o is whole, counted and printed
                    try:
                        shutil.copyfile(produced, target)
                    except BaseException:
                        target.unlink(missing_ok=True)
                        raise
                    progress.written.append(target)
                    print(target, flush=True)
    except ValueError as error:  # an input, or a combination of inputs, refused before any work
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as error:  # out of memory, unwritable outputs: the message says what to do
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        with uninterrupted():
            predictor.discard_outputs()  # copied to -o already; the server's copy would outlive this process
    return 0


if __name__ == "__main__":
    console()
