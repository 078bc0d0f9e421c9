"""Fixtures of the deployment checks (helpers in deploy_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest
from deploy_helpers import CHART, VALUE_SETS, render, values_of


@pytest.fixture(scope="session")
def chart() -> Iterator[Any]:
    """The chart loaded once by the Helm SDK."""
    with helm.Chart.load(str(CHART)) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def rendered_sets(chart: Any) -> dict[str, list[dict[str, Any]]]:
    """Rendered objects of each acceptance value set."""
    return {name: render(chart, values_of(name)) for name in VALUE_SETS}
