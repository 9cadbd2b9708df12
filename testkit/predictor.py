"""``predict.Predictor`` in this process, on the tiny models, and the run directories it writes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

RUN_DIR = re.compile(r"run-[0-9a-f]{16}")  # the name of a run's directory under the output root


def tiny_predictor():
    """A ``predict.Predictor`` set up on the tiny models, with the default memory budget."""
    import predict

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIDP_WEIGHTS", "tiny")
        patch.delenv("DIDP_MEMORY_BUDGET_MB", raising=False)
        instance = predict.Predictor()
        instance.record_metric = lambda name, value: None
        instance.setup()
    return instance


def run_predictor(predictor, **inputs) -> list[Path]:
    """The files of one run of ``predictor`` (prompt "a lighthouse" unless given), inputs checked as the
    server checks them."""
    from pipeline.validation import validate_inputs

    return [Path(p) for p in predictor.run(**validate_inputs({"prompt": "a lighthouse", **inputs}))]
