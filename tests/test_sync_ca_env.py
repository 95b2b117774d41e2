"""The collector's TLS certificate is verified against ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE``
when no ``SyncConfig(ca_bundle=...)`` is given (what ``SyncConfig`` documents: "default: the
system's / REQUESTS_CA_BUNDLE"), also now that the client's session reads the environment only
once (``trust_env=False``); a ``ca_bundle`` given still wins over the environment."""

from __future__ import annotations

import pytest

from pyodlog.sync import SyncConfig, SyncError
from tests.helpers.collector_process import make_tls_files, start_tls_collector
from tests.test_sync import FAST, log_calls, make_logger


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_a_private_ca_in_the_environment_verifies_the_collector(tmp_path, monkeypatch, variable):
    server, ca = start_tls_collector(tmp_path)
    other_ca, _, _ = make_tls_files(tmp_path / "other")
    try:
        endpoint = f"https://localhost:{server.port}"
        monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
        monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
        monkeypatch.setenv(variable, str(ca))
        trusting = make_logger(tmp_path / "local", endpoint, sync=SyncConfig(**FAST))
        log_calls(trusting, 1)
        try:
            assert trusting.upload().segments == 1
        finally:
            trusting.close()
        # A ca_bundle given explicitly is used, not the environment's.
        monkeypatch.setenv(variable, str(ca))
        pinned = make_logger(
            tmp_path / "local2",
            endpoint,
            result_name="run2",
            sync=SyncConfig(**dict(FAST, ca_bundle=str(other_ca))),
        )
        log_calls(pinned, 1)
        try:
            with pytest.raises(SyncError, match="TLS verification of the collector failed"):
                pinned.upload()
        finally:
            pinned.close()
    finally:
        server.stop()
