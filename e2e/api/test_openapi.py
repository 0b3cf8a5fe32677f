"""The operations API honours its OpenAPI document: schemathesis generates
valid and invalid requests from /api/v1/openapi.json and checks every answer
(status codes, content types, response schemas, no server errors, bad input
refused) against a real broker with real clients connected."""

import os
import subprocess
from pathlib import Path

from mqttclient import probe
from procs import free_port, start_broker

HERE = Path(__file__).resolve().parent


def test_the_api_matches_its_openapi_document():
    admin = free_port()
    gen = start_broker("capacity:\n  connections: 100\n", admin=admin)
    port = next(gen)
    try:
        # Traffic, so that totals, traces and reports are not all empty.
        c = probe(port, "GID_api@@@probe")
        result = subprocess.run(
            [
                "schemathesis",
                "--config-file",
                str(HERE / "schemathesis.toml"),
                "run",
                f"http://127.0.0.1:{admin}/api/v1/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                os.environ.get("SCHEMATHESIS_EXAMPLES", "100"),
                "--seed",
                os.environ.get("SCHEMATHESIS_SEED", "1"),
                # One worker: CPython 3.11 (the machines' Python) keeps one
                # AST recursion counter per interpreter, so two threads
                # parsing at once fail now and then with "SystemError: AST
                # constructor recursion depth mismatch" (python/cpython#106905).
                "--workers",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
        c.close()
    finally:
        gen.close()
