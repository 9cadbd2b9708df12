"""``didp``: run the pipeline without Docker, with ``cog predict``'s ``-i key=value`` syntax.

    didp -i prompt="a lighthouse at night" -i iterations=100 --weights tiny -o outputs/
    didp batch captions.parquet -o embeddings/     # many captions: commands.batch
    didp ui --weights tiny                          # the local web page: commands.ui
    didp index photos/ -o my-index/                # a searchable index of images: commands.index
    didp search my-index/ -i prompt="a red bicycle" -i k=20 -o found/

Inputs are checked by the same rules as the Cog server before any model is loaded; files are
copied to ``-o`` as they are produced and their paths printed; when the first one arrives, an
earlier run's files there (known by their names, ``OUTPUT_NAMES``) are removed so that runs do
not mix. One run at a time writes into a directory: a second one there is refused. Ctrl-C or
SIGTERM ends a run with one line: the files already copied stay whole, the temporary ones go.

The environment, read here only: ``DIDP_WEIGHTS`` (``--weights`` wins), ``DIDP_OUTPUT_DIR`` (where
runs are made before their files are copied to ``-o``), ``DIDP_MEMORY_BUDGET_MB`` and ``DIDP_INDEX``
(the index ``mode=search`` searches; ``--index`` and ``didp search INDEX_DIR`` win).
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
from pathlib import Path

from commands.outputs import OUTPUT_NAMES, OutputBusy, output_directory, remove_earlier_outputs
from commands.signals import SIGNAL_EXIT_CODES, Terminated, terminate_as_interrupt, uninterrupted

__all__ = ["OUTPUT_NAMES", "SIGNAL_EXIT_CODES", "Progress", "Terminated", "console", "main"]

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


def parse_assignments(assignments: list[str]) -> dict:
    """``["iterations=100", ...]`` -> typed values (errors name the input)."""
    from pipeline.request import Request

    specs = {spec.name: spec for spec in Request.input_specs()}
    values: dict = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        if not sep:
            raise ValueError(f"{assignment!r}: expected name=value")
        spec = specs.get(name)
        if spec is None:
            raise ValueError(f"{name}: unknown input (see didp --help)")
        values[name] = _convert(text, spec.kind)
    return values


def _convert(text: str, kind: str):
    """The typed value, or the text itself when it is not of the type (validation then says so
    in the server's words)."""
    try:
        if kind == "integer":
            try:
                return int(text)
            except ValueError:
                number = float(text)  # "8.0" or "1e3", whole numbers the server takes as integers too
                return int(number) if number.is_integer() else number
        if kind == "float":
            return float(text)
    except ValueError:
        pass
    if kind == "bool" and text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def checked_request(assignments: list[str]):
    """The request of ``-i`` assignments, checked as the server checks it and as the pipeline does
    before any model is loaded (files exist and are pictures, the inputs combine), so that a
    request that cannot work fails at once rather than after loading the weights."""
    from pipeline.embedding_file import load_embedding
    from pipeline.media import load_image, load_image_as
    from pipeline.request import Request
    from pipeline.validation import validate_inputs

    values = validate_inputs(parse_assignments(assignments))
    for spec in Request.input_specs():
        if spec.kind == "path" and values.get(spec.name) is not None:
            values[spec.name] = _local_file(spec.name, values[spec.name])
    if values.get("image") is not None:
        load_image(values["image"])  # the run decodes it again: a few ms, not a model load
    if values.get("init_image") is not None:
        load_image_as("init_image", values["init_image"])
    if values.get("embedding") is not None:
        load_embedding(values["embedding"], None)  # its width once CLIP is loaded
    return Request.check(**values)


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


def main(argv: list[str] | None = None) -> int:
    """``didp``; Ctrl-C (exit code 130) and SIGTERM (143) end it with one line and no leftovers.
    ``didp batch ...`` is the batch job (``commands.batch``), ``didp ui ...`` the web page (``commands.ui``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["batch"]:
        from commands.batch import main as batch

        return batch(argv[1:])
    if argv[:1] == ["ui"]:
        from commands.ui import main as ui

        return ui(argv[1:])
    if argv[:1] == ["index"]:
        from commands.index import main as index

        return index(argv[1:])
    if argv[:1] == ["search"]:
        if argv[1:2] in (["-h"], ["--help"]):
            print(SEARCH_HELP)
            return 0
        argv = search_arguments(argv[1:])
        if argv is None:
            return 2
    progress = Progress()
    with terminate_as_interrupt():
        try:
            return _main(argv, progress)
        except KeyboardInterrupt as interrupt:
            print(f"\n{progress.interrupted(interrupt)}", file=sys.stderr)
            return 143 if isinstance(interrupt, Terminated) else 130


SEARCH_HELP = """usage: didp search INDEX_DIR -i prompt=... [-i k=20] [--weights W] [-o OUT]

The images of INDEX_DIR (built by didp index) nearest the query: the prior's image embedding of
the prompt (default), mixed with its text embedding (-i text_weight=...), an -i image=@picture or
an -i embedding=@file.npy. Writes OUT/query_embedding.npy, OUT/contact_sheet.png and
OUT/result.json and prints the matches (rank, score, id). Every input: didp --help."""


def search_arguments(argv: list[str]) -> list[str] | None:
    """``didp search INDEX_DIR ARGS`` as ``didp --index INDEX_DIR -i mode=search ARGS`` (``None``,
    with the message printed, when that cannot be)."""
    if not argv or argv[0].startswith("-"):
        print("error: didp search INDEX_DIR -i prompt=...: give the index directory first", file=sys.stderr)
        return None
    modes = [a for a in argv if a.startswith("mode=")]
    if any(mode != "mode=search" for mode in modes):
        print(f"error: didp search runs mode=search, not {modes[0].partition('=')[2]}", file=sys.stderr)
        return None
    return ["--index", argv[0], "-i", "mode=search", *argv[1:], "--print-matches"]


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


def _parser() -> argparse.ArgumentParser:
    from commands.input_docs import inputs_help

    parser = argparse.ArgumentParser(
        prog="didp",
        description="What CLIP sees for a caption: the diffusion prior and the deep-image-prior visualiser. "
        "Many captions at once, from a file, on Ray: see didp batch --help. A web page: didp ui --help. "
        "Search your own images: didp index --help, then didp search INDEX_DIR -i prompt=...",
        epilog=inputs_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-i", "--input", action="append", default=[], metavar="NAME=VALUE", help="an input")
    parser.add_argument("--weights", help="tiny, laion or a directory of weights (default: $DIDP_WEIGHTS or laion)")
    parser.add_argument(
        "--index", type=Path, help="an index directory built by didp index, for mode=search (default: $DIDP_INDEX)"
    )
    parser.add_argument("--print-matches", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("outputs"),
        help="output directory (default outputs/); an earlier run's files there are replaced; one run at a time",
    )
    return parser


def _main(argv: list[str] | None, progress: Progress) -> int:
    args = _parser().parse_args(argv)
    try:
        request = checked_request(args.input)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.output.exists() and not args.output.is_dir():
        print(f"error: -o {args.output}: not a directory", file=sys.stderr)
        return 2
    index = args.index or os.environ.get("DIDP_INDEX") or None
    if request.mode == "search":
        try:
            _check_index(index)  # before the weights load
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except RuntimeError as error:  # FAISS missing
            print(f"error: {error}", file=sys.stderr)
            return 1
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
        code = _run(request, args.weights or os.environ.get("DIDP_WEIGHTS", "laion"), progress, index)
    if code == 0 and args.print_matches:
        print_matches(args.output / "result.json")
    return code


def _check_index(index: str | Path | None) -> None:
    """``mode=search``'s index opens (``ValueError`` saying what to do if not, ``RuntimeError``
    without FAISS); whether its CLIP is the weights' is checked once they are loaded."""
    from pipeline.search import NOT_CONFIGURED

    if index is None:
        raise ValueError(NOT_CONFIGURED)
    from retrieval.query import IndexUnusable, SearchIndex

    try:
        SearchIndex.open(Path(index))
    except IndexUnusable as error:
        raise ValueError(f"mode=search: {error}") from None


def print_matches(result: Path) -> None:
    """A search's matches, one a line: rank, score, id."""
    import json

    found = json.loads(result.read_text()).get("search") or {}
    for match in found.get("matches", []):
        print(f"{match['rank']:>4}  {match['score']:.4f}  {match['id']}")


def _run(request, weights: str, progress: Progress, index: str | Path | None = None) -> int:
    """Load the models and run ``request`` once, copying its files to ``progress.output`` as they
    come (each one, once whole, recorded in ``progress.written``)."""
    from pipeline.runner import Pipeline

    output = progress.output
    try:
        pipeline = Pipeline(
            weights,
            output_root=Path(os.environ.get("DIDP_OUTPUT_DIR", Path(tempfile.gettempdir()) / "didp-outputs")),
            memory_budget=os.environ.get("DIDP_MEMORY_BUDGET_MB"),
            index=index,
        )
    except Exception as error:  # a clear message, not a traceback, for missing or broken weights
        print(f"error: setup failed: {error}", file=sys.stderr)
        return 1
    run_dir = None
    try:
        job = pipeline.prepare(request)
        with uninterrupted():  # the clean-up below knows of every directory made
            run_dir = pipeline.new_run_directory()
        replacing = True
        for produced in pipeline.run(job, run_dir):
            if replacing:  # only once the run has produced something: a refused run keeps the old files
                replacing = False
                with uninterrupted():
                    earlier = remove_earlier_outputs(output)
                if earlier:
                    print(f"replaced the {len(earlier)} files of an earlier run in {output}", file=sys.stderr)
            _copy(produced, output / produced.name, progress)
    except ValueError as error:  # an input, or a combination of inputs, refused before any work
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as error:  # out of memory, unwritable outputs: the message says what to do
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if run_dir is not None:
            with uninterrupted():
                run_dir.discard()  # copied to -o already
    return 0


def _copy(produced: Path, target: Path, progress: Progress) -> None:
    with uninterrupted():  # a file in -o is whole, counted and printed
        try:
            shutil.copyfile(produced, target)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        progress.written.append(target)
        print(target, flush=True)


if __name__ == "__main__":
    console()
