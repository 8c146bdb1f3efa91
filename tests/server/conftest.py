"""Fixtures of the server tests: a small bundle repository exported once per session, and a running app.

    repo/criteo/1   lma on the Criteo schema (seed 0)
    repo/criteo/2   lma on the Criteo schema (seed 1: other weights, other scores)
    repo/avazu/1    hash on the Avazu schema (no dense features)

and, apart (runtime tests), criteo-full/1: the full embedding on the Criteo schema.

Tests that change a repository copy bundles into a folder of their own (``make_repo``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from export.bundle import Bundle
from server.app import build_app
from tests.helpers.serving import Bundles, export_bundles, export_full_bundle, settings_for


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    return export_bundles(tmp_path_factory.mktemp("server-bundles"))


@pytest.fixture(scope="session")
def full_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return export_full_bundle(tmp_path_factory.mktemp("server-full"))


@pytest.fixture(scope="module")
def app_client(bundles: Bundles) -> Iterator[TestClient]:
    """A running app (lifespan done) over the shared repository, for tests that change nothing."""
    with TestClient(build_app(settings_for(bundles.repo))) as client:
        yield client
