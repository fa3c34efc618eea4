"""The autoscalers (deploy/components/keda, deploy/components/hpa) scale on a metric that a real
running service actually exports: start ``python -m hero_service`` on loopback, wait for
/readyz, read /metrics."""

from __future__ import annotations

import re

import httpx
from support import ServerProcess

from hero_service.metrics import QUEUE_DEPTH_METRIC


def test_queue_depth_metric_is_exported_by_a_running_service():
    with ServerProcess(["--verifier-workers", "1"], ready_timeout_s=60) as server:
        assert server.url.startswith("http://127.0.0.1:")
        ready = httpx.get(server.url + "/readyz", timeout=5)
        assert ready.status_code == 200
        response = httpx.get(server.url + "/metrics", timeout=10)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text
        assert f"# TYPE {QUEUE_DEPTH_METRIC} gauge" in text
        # An idle service has nothing queued: the sample exists and reads 0.
        sample = re.search(rf"^{QUEUE_DEPTH_METRIC} (\S+)$", text, re.MULTILINE)
        assert sample is not None, text[:2000]
        assert float(sample.group(1)) == 0.0
        # The probes the Deployment uses answer on the same port.
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
    assert server.proc is not None and server.proc.poll() is not None, "server stopped"
