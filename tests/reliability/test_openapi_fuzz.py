"""schemathesis against a running hub's own /openapi.json: no 5xx, and every answer conforms to
the document (status, content type, headers, body schema), for valid and invalid input alike.

The event streams (``channel_events``, ``multi_events``, ``job_events``, and ``jobs_events``
in its GET and POST forms) are left out: a valid request to them does not end (the jobs'
streams only once their jobs finish), and schemathesis reads whole bodies. Their bad input
answers like every other route's, through the same parsers (tests/server covers them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import HubProcess

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
#: A fixed seed keeps CI repeatable; set BACKCHANNEL_FUZZ_SEED to explore others.
SEED = os.environ.get("BACKCHANNEL_FUZZ_SEED", "20261128")
#: Examples per operation: about 20 s here for the 16 operations.
MAX_EXAMPLES = os.environ.get("BACKCHANNEL_FUZZ_EXAMPLES", "25")
STREAMS = ("channel_events", "multi_events", "job_events", "jobs_events", "jobs_events_of_body")


def test_the_api_conforms_to_its_openapi_document(
    hub_factory: type[HubProcess], tmp_path: Path
) -> None:
    # Short waits keep long polls, claims and Prefer: wait within a second each; the document
    # the hub serves carries these limits, so the fuzzer stays inside them.
    hub = hub_factory(
        "--no-tcp", "--max-wait", "0.5", "--job-lease", "2", "--job-max-lease", "5"
    ).start()
    with hub.client() as client:
        jobs = [client.post("/v1/queues/fuzz/jobs", json={"n": n}).json()["id"] for n in range(2)]
    # Jobs that exist, so that the job operations get past 404 half of the time.
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        (HERE / "schemathesis.toml").read_text()
        + f"\n[dictionaries.jobs]\nvalues = {json.dumps(jobs)}\n\n"
        + '[parameters]\n"path.job" = { dictionary = "jobs", probability = 0.5 }\n'
    )
    report = tmp_path / "report.json"
    command = [
        str(Path(sys.executable).with_name("st")),
        "--config-file",
        str(config),
        "run",
        f"{hub.url}/openapi.json",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        MAX_EXAMPLES,
        "--seed",
        SEED,
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--no-color",
        "--output-sanitize",
        "false",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    for operation in STREAMS:
        command += ["--exclude-operation-id", operation]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    result = json.loads(report.read_text())
    assert result["complete"], result["stop_reason"]
    assert result["failures"] == [] and result["errors"] == []
    assert result["operations"]["tested"] == result["operations"]["total"] - len(STREAMS)
    assert result["test_cases"]["generated"] >= 300, result["test_cases"]
    # The hub is still up, and logged no failure of its own.
    assert hub.proc is not None and hub.proc.poll() is None
    assert "unhandled error" not in hub.stderr() and "Traceback" not in hub.stderr()
