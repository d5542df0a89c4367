"""The client's balancing settings, without a server: which targets are balanced, the gRPC service config, and
bad settings refused (the behaviour through real replicas is tests/test_fleet.py)."""

from __future__ import annotations

import json

import pytest

from nst_client import NSTClient
from nst_client.client import is_balanced_target, service_config


def test_balanced_targets():
    assert is_balanced_target("ipv4:127.0.0.1:5001,127.0.0.1:5002")
    assert is_balanced_target("dns:///nst-headless.nst.svc.cluster.local:50051")
    assert is_balanced_target("ipv6:[::1]:5001")
    assert not is_balanced_target("127.0.0.1:50051") and not is_balanced_target("localhost:50051")


def test_service_config_round_robin_retries_and_health():
    config = json.loads(service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "nst.v1.StyleTransfer"}]
    policy = method["retryPolicy"]
    assert policy["maxAttempts"] == 5
    assert set(policy["retryableStatusCodes"]) == {"RESOURCE_EXHAUSTED", "UNAVAILABLE"}
    assert config["healthCheckConfig"] == {"serviceName": "nst.v1.StyleTransfer"}
    assert "healthCheckConfig" not in json.loads(service_config(health_check=False))
    for bad in (1, 6):
        with pytest.raises(ValueError, match="between 2 and 5"):
            service_config(max_attempts=bad)


def test_client_settings():
    with NSTClient("ipv4:127.0.0.1:1,127.0.0.1:2") as client:
        assert client.balanced and client.max_resubmits == 2 and client.busy_retry_s == 0
    with NSTClient("127.0.0.1:1") as client:
        assert not client.balanced
    with NSTClient("127.0.0.1:1", balance=True) as client:
        assert client.balanced
    with pytest.raises(ValueError, match="max_resubmits"):
        NSTClient("127.0.0.1:1", max_resubmits=-1)
    with pytest.raises(ValueError, match="keepalive_time_s"):
        NSTClient("127.0.0.1:1", keepalive_time_s=0.1)
