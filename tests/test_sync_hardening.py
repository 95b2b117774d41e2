"""Issue 11, the client's side: keys never leak, refused segments do not block the rest,
upload() says what the collector holds, malformed answers are a SyncError."""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest

from pyodlog.io import WriterConfig
from pyodlog.sync import CollectorClient, SyncConfig, SyncError, check_api_key
from pyodlog.sync.secret import Secret
from tests.helpers.collector_process import (
    KEY_A,
    CollectorProcess,
    FakeCollector,
    FlakyProxy,
    write_keys,
)
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger
from tests.test_sync import FAST, log_calls, make_logger

# Characters that JSON and URLs escape: the redaction must catch every form an echo can take.
ECHO_KEY = 'echo-key+/with"quote\\and-0123456789-SECRET'


def fragments(key: str) -> list[str]:
    """Every 8-character piece of the key: no part of it may show."""
    return [key[i : i + 8] for i in range(0, len(key) - 7)]


def assert_no_key(text: str, key: str = ECHO_KEY) -> None:
    for piece in fragments(key):
        assert piece not in text, f"{piece!r} of the key in {text[:500]!r}"


# -- 2: keys are validated at construction ----------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        KEY_A + "\n",
        KEY_A + "\r\n",
        "\t" + KEY_A,
        KEY_A[:10] + " " + KEY_A[10:],
        KEY_A + "\x00",
        KEY_A + "\x7f",
        KEY_A[:5] + "é" + KEY_A[5:],
    ],
    ids=["lf", "crlf", "tab", "space", "nul", "del", "non-ascii"],
)
def test_a_key_with_whitespace_or_control_characters_is_refused_at_construction(
    tmp_path, monkeypatch, bad
):
    model = TinyDetector().eval()
    kwargs = dict(api_endpoint="http://127.0.0.1:9", auto_sync=False)
    with pytest.raises(ValueError, match="api_key has .* at position") as error:
        TinyDetectorLogger(model, "tiny", "v1", api_key=bad, **kwargs)
    assert_no_key(str(error.value), KEY_A)
    if "\x00" not in bad:  # an environment variable cannot hold NUL
        monkeypatch.setenv("PYODLOG_API_KEY", bad)
        with pytest.raises(ValueError, match="api_key has") as error:
            TinyDetectorLogger(model, "tiny", "v1", **kwargs)
        assert_no_key(str(error.value), KEY_A)
    with pytest.raises(ValueError, match="api_key has"):
        CollectorClient("http://127.0.0.1:9", Secret(bad))
    assert check_api_key(KEY_A) == KEY_A


# -- a fake collector: echoes the request's headers, or answers malformed ------------------------------


def collector_like(put=None, status=None, listing=None):
    """Answers like a collector; ``put``/``status``/``listing`` override one kind of answer."""

    def answers(method, path, headers):
        if method == "PUT":
            return put(headers) if put else (201, {}, {"status": "stored"})
        if path.split("?")[0].count("/") == 5:  # /v1/segments/m/v/r
            return listing(headers) if listing else (200, {}, {"segments": []})
        return status(headers) if status else (200, {}, {"status": "absent", "received": 0})

    return answers


def echo(status: int, as_json: bool = True):
    def answer(headers):
        if as_json:
            return status, {}, {"error": "echo", "detail": f"you sent {headers}"}
        return status, {"Content-Type": "text/plain"}, json.dumps(headers).encode()

    return answer


ECHOES = {
    "listing-500-json": collector_like(listing=echo(500)),
    "listing-500-text": collector_like(listing=echo(500, as_json=False)),
    "listing-401": collector_like(listing=echo(401)),
    "listing-400": collector_like(listing=echo(400)),
    "status-502-text": collector_like(status=echo(502, as_json=False)),
    "put-413": collector_like(put=echo(413)),
    "put-422-text": collector_like(put=echo(422, as_json=False)),
    "redirect": collector_like(
        listing=lambda h: (302, {"Location": f"http://elsewhere/?{h['Authorization']}"}, b"")
    ),
}


@pytest.mark.parametrize("answers", ECHOES.values(), ids=ECHOES.keys())
def test_a_collector_echoing_the_key_never_gets_it_into_errors_logs_or_stats(
    tmp_path, caplog, capsys, answers
):
    caplog.set_level(logging.DEBUG)
    fake = FakeCollector(answers)
    try:
        logger = make_logger(tmp_path / "local", fake.url, key=ECHO_KEY)
        log_calls(logger, 1)
        texts = []
        try:
            summary = logger.upload()
            texts.append(repr(summary))
        except SyncError as error:
            texts.append(str(error))
            assert type(error) is SyncError
        texts.append(json.dumps(logger.syncer.stats()))
        logger.close()
        # The same through auto_sync's background thread: its log lines and stats().
        background = make_logger(
            tmp_path / "local2",
            fake.url,
            key=ECHO_KEY,
            auto_sync=True,
            sync=SyncConfig(**dict(FAST, close_timeout=1)),
        )
        log_calls(background, 1)
        background.sink.rotate()
        background.syncer.notify()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stats = background.syncer.stats()
            if stats["last_error"] or stats["refused"] or stats["segments_sent"]:
                break
            time.sleep(0.05)
        texts.append(json.dumps(background.syncer.stats()))
        background.close()
    finally:
        fake.close()
    assert len(fake.requests) > 0
    printed = capsys.readouterr()
    texts += [caplog.text, printed.out, printed.err]
    for path in list((tmp_path / "local").rglob("*")) + list((tmp_path / "local2").rglob("*")):
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    for text in texts:
        assert_no_key(text)


# -- 9: malformed answers ----------------------------------------------------------------------------


def progressless(headers):
    return 202, {}, {"status": "partial", "received": 0}


MALFORMED = {
    "listing-not-json": collector_like(listing=lambda h: (200, {}, b"<html>hello</html>")),
    "listing-array": collector_like(listing=lambda h: (200, {}, [])),
    "listing-no-segments": collector_like(listing=lambda h: (200, {}, {})),
    "listing-segments-not-list": collector_like(listing=lambda h: (200, {}, {"segments": 3})),
    "listing-entry-without-id": collector_like(
        listing=lambda h: (200, {}, {"segments": [{"sha256": 1}]})
    ),
    "status-without-status": collector_like(status=lambda h: (200, {}, {})),
    "status-received-string": collector_like(
        status=lambda h: (200, {}, {"status": "partial", "received": "12"})
    ),
    "status-stored-sha-int": collector_like(
        status=lambda h: (200, {}, {"status": "stored", "sha256": 5})
    ),
    "put-202-without-received": collector_like(put=lambda h: (202, {}, {"status": "partial"})),
    "put-202-received-beyond-total": collector_like(
        put=lambda h: (202, {}, {"status": "partial", "received": 10**15})
    ),
    "put-202-received-negative": collector_like(
        put=lambda h: (202, {}, {"status": "partial", "received": -1})
    ),
    "put-409-received-null": collector_like(
        put=lambda h: (409, {}, {"error": "offset_mismatch", "received": None})
    ),
    "put-201-not-json": collector_like(put=lambda h: (201, {}, b"stored!")),
    "put-no-progress": collector_like(put=progressless),
}


@pytest.mark.parametrize("answers", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_collector_answer_is_a_sync_error_saying_what_was_wrong(tmp_path, answers):
    fake = FakeCollector(answers)
    try:
        logger = make_logger(
            tmp_path / "local", fake.url, sync=SyncConfig(**dict(FAST, chunk_bytes=1 << 20))
        )
        log_calls(logger, 1)
        with pytest.raises(SyncError) as error:
            logger.upload()
        assert type(error.value) is SyncError
        assert fake.url in str(error.value) or "collector" in str(error.value)
        assert any(
            word in str(error.value) for word in ("malformed", "not a JSON object", "no progress")
        ), str(error.value)
        logger.close()
    finally:
        fake.close()


# -- 3, 4: a refused segment does not block the rest; the summary says what the collector holds ----------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_segment_refused_for_good_is_recorded_and_the_others_are_sent(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pyodlog")
    server = CollectorProcess(tmp_path / "collector", write_keys(tmp_path / "keys.txt"))
    server.port = free_port()
    url = f"http://127.0.0.1:{server.port}"
    logger = make_logger(
        tmp_path / "local",
        url,
        heavy=True,
        writer=WriterConfig(flush_interval=0.05, segment_max_records=1),
    )
    log_calls(logger, 1, size=(160, 200))  # the first segment is the big one
    log_calls(logger, 2, seed=1, size=(32, 40))
    logger.sink.rotate()
    big, *small = sorted(logger.sink.segments())
    assert len(small) == 2 and big.stat().st_size > max(p.stat().st_size for p in small)
    limit = (big.stat().st_size + max(p.stat().st_size for p in small)) // 2
    server.extra_args = ["--max-segment-bytes", str(limit)]
    server.start()
    try:
        summary = logger.upload()
        assert summary.segments == 2 and summary.pending == 0
        assert list(summary.refused) == [big.name]
        assert "segment_too_large" in summary.refused[big.name]
        assert sorted(p.name for p in server.segments("tenant-a", "tiny", "v1", "run")) == [
            p.name for p in small
        ]
        assert f"refused segment {big.name} for good" in caplog.text
        # Later passes skip it, with a warning, and still report it.
        puts = server.log().count("PUT ")
        caplog.clear()
        again = logger.upload()
        assert (again.segments, again.pending, list(again.refused)) == (0, 0, [big.name])
        assert server.log().count("PUT ") == puts
        assert f"not sending segment {big.name}" in caplog.text
        assert logger.syncer.pending() == [] and logger.syncer.stats()["refused"] == 1
        # Another logger on the result (a restart) knows it too.
        logger.close()
        with make_logger(tmp_path / "local", url, heavy=True) as later:
            assert later.upload().refused.keys() == {big.name}
    finally:
        server.stop()


def test_upload_after_auto_sync_reports_what_the_collector_holds(tmp_path):
    server = CollectorProcess(tmp_path / "collector", write_keys(tmp_path / "keys.txt")).start()
    try:
        logger = make_logger(
            tmp_path / "local",
            server.url,
            auto_sync=True,
            writer=WriterConfig(flush_interval=0.05, segment_max_records=1),
        )
        log_calls(logger, 3)
        logger.sink.rotate()
        logger.syncer.notify()
        deadline = time.monotonic() + 20
        while logger.syncer.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert logger.syncer.pending() == []
        summary = logger.upload()  # everything went in the background already
        assert (summary.segments, summary.already_stored, summary.pending) == (0, 0, 0)
        assert summary.sent_earlier == 3 and summary.held == 3 and summary.refused == {}
        logger.close()
        assert len(server.segments("tenant-a", "tiny", "v1", "run")) == 3
    finally:
        server.stop()


def test_pieces_fit_the_largest_request_the_collector_announces(tmp_path):
    server = CollectorProcess(
        tmp_path / "collector", write_keys(tmp_path / "keys.txt"), ["--max-request-bytes", "64K"]
    ).start()
    try:
        # chunk_bytes above the collector's limit: its status answer says X-Max-Request-Bytes.
        logger = make_logger(
            tmp_path / "local", server.url, sync=SyncConfig(**dict(FAST, chunk_bytes=1 << 20))
        )
        log_calls(logger, 1)
        summary = logger.upload()
        assert summary.segments == 1 and not summary.refused
        assert " 413 " not in server.log()
        logger.close()
    finally:
        server.stop()


class _BodyLimitProxy(FlakyProxy):
    """A proxy in front of the collector that refuses request bodies above ``limit`` (413, HTML)."""

    def __init__(self, upstream_port: int, limit: int) -> None:
        self.limit = limit
        super().__init__(upstream_port, failures=0)

    def respond(self, handler, body):
        if body is not None and len(body) > self.limit:
            return (
                413,
                [("Content-Type", "text/html")],
                b"<html>413 Request Entity Too Large</html>",
            )
        return super().respond(handler, body)


def test_a_piece_too_large_for_a_proxy_is_a_configuration_error_not_a_refusal(tmp_path):
    server = CollectorProcess(tmp_path / "collector", write_keys(tmp_path / "keys.txt")).start()
    proxy = _BodyLimitProxy(server.port, 64 << 10)
    try:
        logger = make_logger(
            tmp_path / "local", proxy.url, sync=SyncConfig(**dict(FAST, chunk_bytes=1 << 20))
        )
        log_calls(logger, 1)
        with pytest.raises(SyncError, match=r"HTTP 413 http_413.*chunk_bytes"):
            logger.upload()
        assert logger.syncer.state.refused_names() == set()  # nothing recorded: fix the setting
        logger.close()
        fixed = make_logger(
            tmp_path / "local", proxy.url, sync=SyncConfig(**dict(FAST, chunk_bytes=32 << 10))
        )
        assert fixed.upload().segments == 1
        fixed.close()
    finally:
        proxy.close()
        server.stop()
