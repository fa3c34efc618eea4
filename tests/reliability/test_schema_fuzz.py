"""Schema fuzzing of the OpenAPI with schemathesis (bounded examples per operation): no 5xx, and
every 4xx carries the JSON error shape.

Cases come from schemathesis' strategies driven by hypothesis directly: its pytest plugin does not
work with the pytest 9 this project uses."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

MAX_EXAMPLES = 80


def test_no_server_errors_and_json_errors_everywhere(server, auth, figures):
    api = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    sent: dict[str, int] = {}
    statuses: dict[int, int] = {}

    def fuzzer(operation):
        key = f"{operation.method.upper()} {operation.path}"

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            response = case.call(headers=auth, timeout=60)
            sent[key] = sent.get(key, 0) + 1
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (key, response.status_code, response.text[:500])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert isinstance(error["code"], str) and error["message"], response.text

        return fuzz

    for operation in operations:
        fuzzer(operation)()

    assert set(sent) == {f"{op.method.upper()} {op.path}" for op in operations}
    assert "POST /v1/rewards" in sent and "POST /get_reward" in sent
    figures.record("schema fuzzing", "operations fuzzed", len(sent))
    figures.record("schema fuzzing", "requests sent", sum(sent.values()))
    figures.record("schema fuzzing", "status codes seen",
                   ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
