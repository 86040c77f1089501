"""Hooks: webhook (Standard Webhooks signing, answers, address policy) and command (sysexits)."""

from __future__ import annotations

import base64
import os
import subprocess
import time
from pathlib import Path

import pytest

from hookutil import HOOKS_DIR, load_example_verifier
from sentlink.config.models import HookConfig
from sentlink.errors import ConfigError
from sentlink.hooks import Result, build_hook
from sentlink.hooks.command import CommandHook
from sentlink.hooks.signing import read_secrets, sign, verify
from sentlink.hooks.webhook import WebhookHook, check_address, retry_after_seconds
from sentlink.testing import Response, WebhookReceiver, make_event, signature_valid

OLD = b"old-secret"
NEW = base64.b64decode(base64.b64encode(b"\x01new secret bytes\xff"))


def webhook(receiver: WebhookReceiver, secrets: list[bytes] | None = None) -> WebhookHook:
    return WebhookHook("crm", receiver.url, secrets or [OLD], 5.0, allow_private=True)


def test_webhook_posts_the_event_with_standard_webhooks_headers_signed_by_every_secret() -> None:
    event = make_event()
    with WebhookReceiver() as receiver:
        assert webhook(receiver, [OLD, NEW]).deliver(event) == Result.done()
    (request,) = receiver.received()
    assert request.body == event.body
    assert request.headers["webhook-id"] == event.id == request.json()["id"]
    assert request.headers["content-type"] == "application/json"
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 60
    assert len(request.headers["webhook-signature"].split()) == 2
    # Each secret alone verifies: receivers can rotate.
    assert signature_valid([OLD], request) and signature_valid([NEW], request)
    assert not signature_valid([b"other"], request)
    verifier = load_example_verifier()
    h = request.headers
    args = (h["webhook-id"], h["webhook-timestamp"], h["webhook-signature"])
    assert verifier.verify([NEW], *args, request.body)


def test_example_verifier_rejects_tampered_body_timestamp_id_and_stale_requests() -> None:
    verifier = load_example_verifier()
    body = make_event().body
    ts = str(int(time.time()))
    signature = sign([OLD], "msg_1", ts, body)
    assert verifier.verify([OLD], "msg_1", ts, signature, body)
    assert not verifier.verify([OLD], "msg_1", ts, signature, body.replace(b"alice", b"mallo"))
    assert not verifier.verify([OLD], "msg_1", str(int(ts) + 1), signature, body)
    assert not verifier.verify([OLD], "msg_2", ts, signature, body)
    old_ts = str(int(time.time()) - 3600)
    assert not verifier.verify([OLD], "msg_1", old_ts, sign([OLD], "msg_1", old_ts, body), body)
    assert not verifier.verify([OLD], "msg_1", ts, "v2," + signature[3:], body)


def test_example_verifier_runs_as_a_command(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("whsec_" + base64.b64encode(NEW).decode() + "\n")
    body = make_event().body
    ts = str(int(time.time()))
    signature = sign(read_secrets(secret_file), "msg_1", ts, body)
    argv = [str(HOOKS_DIR / "verify-webhook"), str(secret_file), "msg_1", ts, signature]
    ok = subprocess.run(argv, input=body, capture_output=True, timeout=30)
    assert (ok.returncode, ok.stdout) == (0, b"valid\n")
    bad = subprocess.run(argv, input=body + b" ", capture_output=True, timeout=30)
    assert (bad.returncode, bad.stdout) == (1, b"invalid\n")


def test_signing_library_verify_agrees_and_rejects_a_changed_timestamp() -> None:
    body = b'{"id":"msg_1"}'
    ts = str(int(time.time()))
    headers = {"webhook-id": "msg_1", "webhook-timestamp": ts}
    headers["webhook-signature"] = sign([OLD], "msg_1", ts, body)
    assert verify([OLD], headers, body, time.time())
    assert not verify([OLD], {**headers, "webhook-timestamp": str(int(ts) - 1)}, body, time.time())


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, {}, Result.done()),
        (202, {}, Result.done()),
        (500, {}, Result.retry("HTTP 500")),
        (503, {"Retry-After": "120"}, Result.retry("HTTP 503", 120.0)),
        (429, {"Retry-After": "7"}, Result.retry("HTTP 429", 7.0)),
        (400, {}, Result.failed("HTTP 400")),
        (
            302,
            {"Location": "http://127.0.0.1:1/"},
            Result.failed("HTTP 302: redirects are not followed"),
        ),
        (410, {}, Result.failed("HTTP 410 Gone: the receiver asked for no more events", True)),
    ],
)
def test_webhook_maps_answers_to_done_retry_failed_and_disable(
    status: int, headers: dict[str, str], expected: Result
) -> None:
    with WebhookReceiver(lambda _r: Response(status, headers)) as receiver:
        assert webhook(receiver).deliver(make_event()) == expected
        assert len(receiver.received()) == 1  # a redirect is not followed


def test_retry_after_takes_seconds_or_an_http_date() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds("30", now) == 30.0
    assert retry_after_seconds("Tue, 14 Nov 2023 22:14:20 GMT", now) == 60.0
    assert retry_after_seconds("soon", now) is None


def test_unreachable_receiver_is_retried_and_a_kept_alive_connection_is_renewed() -> None:
    receiver = WebhookReceiver()
    receiver.up()
    hook = webhook(receiver)
    try:
        assert hook.deliver(make_event()).outcome == "done"
        receiver.down()
        result = hook.deliver(make_event())
        assert result.outcome == "retry"
        receiver.up()  # same port
        assert hook.deliver(make_event()).outcome == "done"
    finally:
        hook.close()
        receiver.down()


def test_slow_receiver_times_out_and_is_retried() -> None:
    def slow(_request: object) -> Response:
        time.sleep(1.5)
        return Response()

    with WebhookReceiver(slow) as receiver:
        hook = WebhookHook("crm", receiver.url, [OLD], 0.3, allow_private=True)
        assert hook.deliver(make_event()) == Result.retry("timed out")
        hook.close()


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "169.254.169.254",
        "::1",
        "fd00:ec2::254",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "100.64.0.1",
    ],
)
def test_private_loopback_link_local_and_metadata_addresses_are_refused(address: str) -> None:
    with pytest.raises(Exception, match="not a public address"):
        check_address(address)


def test_loopback_url_fails_without_allow_private_and_sends_nothing() -> None:
    with WebhookReceiver() as receiver:
        hook = WebhookHook("crm", receiver.url, [OLD], 5.0)
        result = hook.deliver(make_event())
    assert result.outcome == "failed" and "allow_private" in result.reason
    assert receiver.received() == []


def test_public_addresses_pass_the_address_check() -> None:
    check_address("93.184.216.34")
    check_address("2606:2800:220:1:248:1893:25c8:1946")


# command hooks


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "hook.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(
    ("code", "outcome"), [(0, "done"), (75, "retry"), (1, "failed"), (65, "failed")]
)
def test_command_hook_exit_codes_follow_sysexits(tmp_path: Path, code: int, outcome: str) -> None:
    hook = CommandHook(
        "cmd", script(tmp_path, f"cat > {tmp_path}/got\necho oops >&2\nexit {code}\n")
    )
    event = make_event()
    result = hook.deliver(event)
    assert result.outcome == outcome
    assert (tmp_path / "got").read_bytes() == event.body
    if code:
        assert result.reason == f"exit {code}: oops"


def test_command_hook_timeout_kills_the_process_group_and_retries(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    hook = CommandHook(
        "cmd", script(tmp_path, f"sleep 30 &\necho $! > {pidfile}\nwait\n"), timeout=0.5
    )
    assert hook.deliver(make_event()) == Result.retry("timed out after 0.5 s")
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the hook's child outlived the timeout")


def test_command_hook_gets_a_clean_environment_and_no_shell(tmp_path: Path) -> None:
    os.environ["SENTLINK_TEST_SECRET"] = "leak"
    try:
        hook = CommandHook(
            "cmd",
            script(tmp_path, f'env > {tmp_path}/env\necho "$1" > {tmp_path}/arg\n'),
            args=("a b; rm -rf /",),
        )
        assert hook.deliver(make_event()).outcome == "done"
    finally:
        del os.environ["SENTLINK_TEST_SECRET"]
    env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines())
    assert "SENTLINK_TEST_SECRET" not in env
    assert env["SENTLINK_EVENT_ID"] == make_event().id
    assert env["SENTLINK_EVENT_TYPE"] == "message.linked"
    assert (tmp_path / "arg").read_text() == "a b; rm -rf /\n"


def test_example_append_hook_appends_one_line_per_event(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    hook = CommandHook("log", HOOKS_DIR / "append-jsonl", (str(out),))
    assert hook.deliver(make_event(id="msg_a")).outcome == "done"
    assert hook.deliver(make_event(id="msg_b")).outcome == "done"
    assert [line[:14] for line in out.read_text().splitlines()] == ['{"id":"msg_a",'] * 1 + [
        '{"id":"msg_b",'
    ]
    unwritable = CommandHook("log", HOOKS_DIR / "append-jsonl", (str(tmp_path / "no/such"),))
    assert unwritable.deliver(make_event()).outcome == "retry"


def test_unknown_hook_type_and_missing_settings_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown type 'carrier-pigeon'"):
        build_hook(HookConfig(name="x", type="carrier-pigeon"))
    with pytest.raises(ConfigError, match="not an executable"):
        build_hook(HookConfig(name="x", type="command", path=tmp_path / "none"))
    secret = tmp_path / "s"
    secret.write_text("# only a comment\n")
    with pytest.raises(ConfigError, match="no secret"):
        build_hook(HookConfig(name="x", type="webhook", url="https://h.test/", secret_file=secret))
