"""Test and benchmark support, not product code: what ``tests/`` and ``benchmarks/`` share.

- ``testkit.cog_server``: the real Cog server on a free loopback port, a webhook receiver, data URIs
  and server-sent events;
- ``testkit.predictions``: one prediction over HTTP, sent with retries, its outputs decoded and checked;
- ``testkit.workloads``: endurance, concurrency and cancellation workloads against the server;
- ``testkit.hostile``: hostile requests and schemathesis fuzzing, each answer judged;
- ``testkit.inputs``: small, fast request inputs;
- ``testkit.predictor``: ``predict.Predictor`` in this process on the tiny models;
- ``testkit.locks``: a directory held by another process;
- ``testkit.batch``: ``didp batch`` in a process of its own, killed with SIGKILL after its first shard;
- ``testkit.images``: folders of generated and hostile images, and an image index built in this process;
- ``testkit.oracles``: the dalle2-pytorch 0.11.5 prior and the OpenAI CLIP model as oracles.

Nothing in ``backbone``, ``prior``, ``dip``, ``pipeline``, ``commands`` or ``predict.py`` imports it;
it is a package of the project only so that the (editable) install puts it on the import path of
``pytest`` and of ``python benchmarks/run.py``.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: predict.py, cog.yaml, .cog/
