"""Every input of the bad-input catalogue (tests/bad_inputs.py, the table of docs/reliability.md) is
refused before any run starts, with the library's own error in one line naming the input."""
from __future__ import annotations

import pytest

from bad_inputs import API, CLI, DEMO, SWEEPS, Workspace, outcome, served_demo


def _params(cases):
    return [pytest.param(c, id=c.id, marks=[pytest.mark.embedded] if "smollm2" in c.id else []) for c in cases]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("bad-inputs"))


@pytest.mark.parametrize("case", _params(API + CLI + SWEEPS))
def test_bad_input_is_refused_in_one_line(case, ws):
    result = outcome(case, ws)
    assert result.kind == "error", result  # not a traceback, not taken silently, nothing half done
    assert case.expect in result.message and "\n" not in result.message, result.message


@pytest.fixture(scope="module")
def client(ws):
    with served_demo(ws) as client:
        yield client


@pytest.mark.parametrize("case", _params(DEMO))
def test_bad_demo_input_is_a_message_in_the_page(case, ws, client):
    result = outcome(case, ws, client)
    assert result.kind == "error", result
    assert case.expect in result.message, result.message


def test_catalogue_ids_are_distinct():
    ids = [c.id for c in API + CLI + SWEEPS + DEMO]
    assert len(ids) == len(set(ids)) and len(ids) >= 40
