"""What the Ray Data jobs (``didp batch``, ``didp index``) share: starting Ray, and rows embedded by
model actors handed back shard by shard, in order.

A job's rows carry the ``shard`` they belong to; ``stream_shards`` sends them through a pool of
actors (each loading the models once) and calls ``on_shard(k, table)`` in shard order as soon as
shard ``k``'s rows are all back, so that the driver writes every shard whole and a rerun skips
the shards written.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Callable
from importlib import metadata

import pyarrow as pa

from commands.signals import Terminated, terminate_as_interrupt


def versions() -> dict[str, str]:
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name, package in (("ray", "ray"), ("pyarrow", "pyarrow"), ("package", "deep-image-diffusion-prior")):
        try:
            found[name] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found


def stoppable(run: Callable[[object, dict], int], args, state: dict) -> int:
    """``run(args, state)`` with Ctrl-C (130) and SIGTERM (143) stopping it between shards, saying
    how many of ``state["shards"]`` were written (``state["written"]``) and how to resume."""
    with terminate_as_interrupt():
        try:
            return run(args, state)
        except KeyboardInterrupt as interrupt:
            what = "terminated" if isinstance(interrupt, Terminated) else "interrupted"
            total = f" of {state['shards']}" if state["shards"] is not None else ""
            print(
                f"\n{what}: {state['written']}{total} shards are written in {args.output}; "
                "run the same command again to resume",
                file=sys.stderr,
            )
            return 143 if isinstance(interrupt, Terminated) else 130


def start_ray(address: str | None) -> bool:
    """Join the cluster at ``address``, or start a local Ray in this process (no dashboard, its
    logs kept off the terminal); a Ray already started in this process is used as it is. Whether
    Ray was started here (and is to be shut down here)."""
    import ray

    if ray.is_initialized():
        configure_data()
        return False

    quiet = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        # the workers at this command's priority: Ray starts them at niceness 15, which lets any other
        # load on the machine take their CPU: beside niced test runs a full-size embedding job ran
        # 3.2x slower than the same batches in this process, 1.28x at the command's own niceness
        ray.init(num_cpus=os.cpu_count(), _system_config={"worker_niceness": os.nice(0)}, **quiet)
    configure_data()
    return True


def configure_data() -> None:
    from ray.data import DataContext

    context = DataContext.get_current()
    context.execution_options.preserve_order = True  # the driver writes shards in input order
    context.enable_progress_bars = False  # ours, in rows per second
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # not "progress bars disabled": ours are on


def stream_shards(
    rows: pa.Table,
    pending: list[int],
    expected: list[int],
    schema: pa.Schema,
    worker: type,
    worker_kwargs: dict,
    workers: int,
    batch_size: int,
    on_shard: Callable[[int, pa.Table], None],
    on_rows: Callable[[int], None],
) -> None:
    """Send ``rows`` (the ``pending`` shards' rows in order, each with its ``shard``) through
    ``workers`` actors of ``worker(**worker_kwargs)`` in batches of ``batch_size``; call
    ``on_rows(n)`` as rows arrive and ``on_shard(k, table)`` (rows of ``schema``) in shard order as
    soon as shard ``k``'s ``expected[k]`` rows are all in (also for shards that expect none).
    The workers share out all the CPUs: this driver mostly waits."""
    import ray

    waiting = list(pending)  # shards not yet handed on, in order
    buffer: list[pa.Table] = []
    held = 0

    def hand_on_empty_before(shard: int) -> None:
        while waiting and waiting[0] != shard and expected[waiting[0]] == 0:
            on_shard(waiting.pop(0), schema.empty_table())

    if rows.num_rows:
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        cpus = ray.cluster_resources().get("CPU", 1)
        blocks = [rows.slice(i, batch_size) for i in range(0, rows.num_rows, batch_size)]
        dataset = ray.data.from_arrow(blocks).map_batches(
            worker,
            fn_constructor_kwargs=worker_kwargs,
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers),
            # on GPUs one each; on CPUs the machine's cores shared out (torch's threads follow num_cpus)
            **({"num_gpus": 1} if gpus else {"num_cpus": max(1, int(cpus // workers))}),
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            shards = batch["shard"].to_pylist()
            on_rows(len(shards))
            start = 0
            while start < len(shards):
                shard = shards[start]
                end = start
                while end < len(shards) and shards[end] == shard:
                    end += 1
                hand_on_empty_before(shard)
                buffer.append(batch.slice(start, end - start).drop_columns(["shard"]))
                held += end - start
                if held == expected[shard]:
                    waiting.pop(0)
                    on_shard(shard, pa.concat_tables(buffer).cast(schema))
                    buffer, held = [], 0
                start = end
    for shard in list(waiting):
        if expected[shard]:
            raise RuntimeError(f"shard {shard}: the workers returned {held} of its {expected[shard]} rows")
        on_shard(waiting.pop(0), schema.empty_table())
