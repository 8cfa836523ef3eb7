"""The OpenAPI the service publishes matches what it does: schemathesis generates requests from /docs.json
(positive and negative cases, bounded examples) against a real `bentoml serve` and fails on any 5xx, an
undocumented status code, or a response that does not match its documented schema. Driven through schemathesis'
Python API and hypothesis directly (not its pytest plugin, which does not support this pytest)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_retrieve_conforms_to_its_openapi(server, mode):
    schema = schemathesis.openapi.from_url(f"{server}/docs.json")
    operation = schema["/retrieve"]["POST"]
    seen: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def conforms(case):
        response = case.call_and_validate(base_url=server, timeout=30)
        seen.append(response.status_code)

    conforms()
    assert seen and not [s for s in seen if s >= 500]
    if mode is GenerationMode.NEGATIVE:
        assert 400 in seen   # invalid bodies were really sent and refused as documented


def test_the_served_document_is_the_generated_reference(server):
    """docs/reference/openapi.json (and the HTTP API page rendered from it) is the document the service serves."""
    import json
    from pathlib import Path

    import httpx

    served = httpx.get(f"{server}/docs.json", timeout=30).json()
    reference = json.loads((Path(__file__).resolve().parents[2] / "docs" / "reference" / "openapi.json").read_text())
    assert served == reference, "the service's /docs.json differs from docs/reference/openapi.json (make docs-gen)"


def test_livez_answers_like_healthz(server):
    import httpx

    for path in ("/livez", "/healthz"):
        r = httpx.get(f"{server}{path}", timeout=30)
        assert r.status_code == 200 and r.json() == {"status": "ok"}, (path, r.status_code, r.text)


@pytest.mark.parametrize("seed", [1, 2])
def test_every_operation_passes_every_check(server, seed, tmp_path):
    """schemathesis' own runner, as a user runs it, with every check it has, over every operation of the document
    (its coverage phase's boundary values and its fuzzing phase, schema-valid and invalid data): no failure. A
    request the schema accepts is answered 2xx or, when the live data, the clock or the log refuses it, 409."""
    import subprocess
    import sys
    from pathlib import Path

    st = Path(sys.executable).with_name("st")
    run = subprocess.run([str(st), "run", f"{server}/docs.json", "--checks", "all", "--max-examples", "40",
                          "--seed", str(seed), "--no-color"], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)   # its cache folder (.schemathesis/) stays out of the checkout
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "7 passed" in run.stdout, run.stdout[-2000:]
