"""Shared fixtures: the dalle2-pytorch 0.11.5 oracle, random OpenAI-format CLIP weights, and the
predictor on the tiny models, in this process and behind the real Cog server. The helpers behind
them live in ``testkit`` (``testkit.oracles``, ``testkit.predictor``, ``testkit.cog_server``)."""

from __future__ import annotations

import pytest

from testkit.cog_server import CogServer
from testkit.oracles import SMALL_PRIOR, openai_clip_model, oracle_prior
from testkit.predictor import tiny_predictor


@pytest.fixture(scope="session")
def small_oracle():
    return oracle_prior(SMALL_PRIOR)


@pytest.fixture(scope="session")
def small_clip_model():
    return openai_clip_model()


# -- the predictor on the tiny models ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor():
    """``predict.Predictor`` set up in this process on the tiny models, with the default memory budget."""
    return tiny_predictor()


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    """The output directory of the module's ``server``."""
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def server(output_dir, tmp_path_factory):
    """The real Cog server on the tiny models, one per test module, writing into ``output_dir``."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with CogServer(weights="tiny", output_dir=output_dir, log_path=log_path) as running:
        yield running
