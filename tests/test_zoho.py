"""The zoho-crm hook against a local fake of Zoho that validates every request against Zoho's
published OpenAPI descriptions (../shared/crm/zoho/)."""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from fake_zoho import MODULE_IDS, OAS_DIR, FakeZoho, OpenApi
from sentlink.config import load_config_text
from sentlink.config.models import HookConfig
from sentlink.errors import ConfigError
from sentlink.hooks import Event, Result, build_hook
from sentlink.hooks.zoho import ZohoCredentials, ZohoCrmHook, rate_limit_delay
from sentlink.linker import Linker
from sentlink.outbox import OutboxWorker, runners_from_config
from sentlink.store import open_store
from sentlink.testing import make_event, sample_message_linked_data

CREDENTIALS = ZohoCredentials("1000.CLIENT", "client-secret", "1000.refresh")
MESSAGE_ID = "20240501.1234@example.test"


class Clock:
    def __init__(self) -> None:
        self.now = 1_714_557_600.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def openapi() -> OpenApi:
    if not OAS_DIR.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"Zoho's OpenAPI descriptions are missing at {OAS_DIR} (CI=true)")
        pytest.skip(f"Zoho's OpenAPI descriptions not found at {OAS_DIR}")
    return OpenApi.load(OAS_DIR)


@pytest.fixture
def fake(openapi: OpenApi) -> Iterator[FakeZoho]:
    with FakeZoho(openapi) as zoho:
        yield zoho
    assert zoho.violations == []


def hook(fake: FakeZoho, clock: Clock | None = None, allow_private: bool = True) -> ZohoCrmHook:
    return ZohoCrmHook(
        "zoho", fake.url, fake.url, CREDENTIALS, 5.0, allow_private, clock or Clock()
    )


def linked_event(records: list[tuple[str, str]], **changes: object) -> Event:
    data = sample_message_linked_data(
        participants=[
            {"email": "bob@customer.test", "role": "to", "name": "Bob Buyer"},
            {"email": "carol@prospect.test", "role": "cc", "name": ""},
        ],
        records=[
            {"kind": k, "id": f"{k}-1", "name": "", "email": e, "role": "to", "via": "address"}
            for k, e in records
        ],
        **changes,
    )
    return make_event(data=data)


def test_fake_refuses_requests_the_description_does_not_allow(openapi: OpenApi) -> None:
    search = openapi.match("GET", "/crm/v8/Contacts/search")
    assert search is not None
    op, params = search
    assert openapi.check_request(op, params, {"email": ["a@b.test"], "per_page": ["1"]}, b"") == []
    missing = openapi.check_request(op, params, {"email": ["a@b.test"]}, b"")
    assert any("per_page" in p for p in missing)
    assert openapi.check_request(op, params, {"per_page": ["x"]}, b"")
    assert openapi.check_request(op, params, {"per_page": ["1"], "mail": ["a@b.test"]}, b"")
    associate = openapi.match("POST", "/crm/v8/Leads/42/actions/associate_email")
    assert associate is not None
    op, params = associate
    person = {"user_name": "a", "email": "a@b.test"}
    item = {
        "from": person,
        "to": [person],
        "original_message_id": "x@y",
        "sent": True,
        "date_time": "2024-05-01T10:00:00+00:00",
        "linked_record": {"module": {"api_name": "Leads", "id": "1"}, "id": "42"},
    }
    assert openapi.check_request(op, params, {}, json.dumps({"Emails": [item]}).encode()) == []
    for bad in (
        {k: v for k, v in item.items() if k != "original_message_id"},
        {**item, "sent": "true"},
        {**item, "date_time": "Wed, 01 May 2024 10:00:00 +0000"},
        {**item, "subject": ""},
        {**item, "orginal_message_id": "x@y"},
    ):
        assert openapi.check_request(op, params, {}, json.dumps({"Emails": [bad]}).encode()), bad


def test_contact_found_gets_the_message_associated_as_zoho_describes(fake: FakeZoho) -> None:
    fake.contacts["bob@customer.test"] = "3652397000000500001"
    result = hook(fake).deliver(linked_event([("contact", "bob@customer.test")]))
    assert result == Result.done()
    ((module, record_id, item),) = fake.associations
    assert (module, record_id) == ("Contacts", "3652397000000500001")
    assert item["original_message_id"] == MESSAGE_ID
    assert item["sent"] is True
    assert item["from"] == {"user_name": "Alice Seller", "email": "alice@example.test"}
    assert item["to"] == [{"user_name": "Bob Buyer", "email": "bob@customer.test"}]
    assert item["cc"] == [{"user_name": "carol", "email": "carol@prospect.test"}]
    assert item["subject"] == "Quote for 20 units"
    assert item["date_time"] == "2024-05-01T10:00:00+00:00"
    assert item["content"] == "Quote for 20 units"  # no body unless include_body
    assert item["linked_record"] == {
        "module": {"api_name": "Contacts", "id": MODULE_IDS["Contacts"]},
        "id": "3652397000000500001",
    }
    assert not fake.api_requests("GET", "/Leads/search")


def test_lead_found_when_no_contact_has_the_address(fake: FakeZoho) -> None:
    fake.leads["bob@customer.test"] = "3652397000000600001"
    assert hook(fake).deliver(linked_event([("lead", "bob@customer.test")])) == Result.done()
    searched = [r.path for r in fake.api_requests("GET") if r.path.endswith("/search")]
    assert searched == ["/crm/v8/Contacts/search", "/crm/v8/Leads/search"]
    assert [(m, r) for m, r, _ in fake.associations] == [("Leads", "3652397000000600001")]


def test_no_zoho_record_means_done_without_any_associate_call(fake: FakeZoho) -> None:
    event = linked_event([("contact", "bob@customer.test"), ("lead", "carol@prospect.test")])
    assert hook(fake).deliver(event) == Result.done()
    assert len(fake.api_requests("GET", "/search")) == 4
    assert fake.api_requests("POST") == []
    assert fake.associations == []


def test_same_message_id_twice_is_associated_once_and_counts_as_done(fake: FakeZoho) -> None:
    fake.contacts["bob@customer.test"] = "3652397000000500001"
    event = linked_event([("contact", "bob@customer.test")])
    assert hook(fake).deliver(event) == Result.done()
    # A redelivery (worker killed after Zoho answered, or a second node): Zoho says duplicate.
    assert hook(fake).deliver(event) == Result.done()
    assert len(fake.api_requests("POST", "/associate_email")) == 2
    assert len(fake.associations) == 1


def test_access_token_is_cached_until_it_expires(fake: FakeZoho) -> None:
    fake.contacts["bob@customer.test"] = "3652397000000500001"
    clock = Clock()
    zoho = hook(fake, clock)
    for n in range(3):
        zoho.deliver(linked_event([("contact", "bob@customer.test")], message_id=f"m{n}@x"))
    assert len(fake.tokens_issued) == 1
    clock.now += fake.token_lifetime - 30  # within the refresh margin of the expiry
    zoho.deliver(linked_event([("contact", "bob@customer.test")], message_id="late@x"))
    assert len(fake.tokens_issued) == 2
    tokens = {r.headers["authorization"] for r in fake.api_requests()}
    assert tokens == {f"Zoho-oauthtoken {t}" for t in fake.tokens_issued}


def test_401_refreshes_the_token_once_and_retries(fake: FakeZoho) -> None:
    fake.contacts["bob@customer.test"] = "3652397000000500001"
    zoho = hook(fake)
    assert zoho.deliver(linked_event([("contact", "bob@customer.test")])) == Result.done()
    fake.revoke_tokens()  # Zoho expired the token before its stated lifetime
    event = linked_event([("contact", "bob@customer.test")], message_id="second@x")
    assert zoho.deliver(event) == Result.done()
    assert len(fake.tokens_issued) == 2
    assert [a["original_message_id"] for _m, _r, a in fake.associations] == [MESSAGE_ID, "second@x"]


def test_refused_refresh_token_is_retried_later_and_not_logged(
    fake: FakeZoho, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = ZohoCredentials("1000.CLIENT", "client-secret", "1000.revoked")
    zoho = ZohoCrmHook("zoho", fake.url, fake.url, wrong, 5.0, True)
    result = zoho.deliver(linked_event([("contact", "bob@customer.test")]))
    assert result.outcome == "retry" and "invalid_client" in result.reason
    assert fake.api_requests() == []
    assert "1000.revoked" not in caplog.text and "client-secret" not in caplog.text


@pytest.mark.parametrize(
    ("headers", "delay"),
    [
        ({"Retry-After": "120"}, 120.0),
        ({"X-RATELIMIT-LIMIT": "100", "X-RATELIMIT-REMAINING": "0"}, None),
        ({"X-RATELIMIT-RESET": str(int((Clock().now + 90) * 1000))}, 90.0),
    ],
)
def test_429_is_retried_at_the_time_zoho_names(
    fake: FakeZoho, headers: dict[str, str], delay: float | None
) -> None:
    fake.contacts["bob@customer.test"] = "3652397000000500001"
    fake.throttle(headers)
    zoho = hook(fake)
    event = linked_event([("contact", "bob@customer.test")])
    assert zoho.deliver(event) == Result.retry("HTTP 429: Zoho rate limit", delay)
    assert fake.associations == []
    assert zoho.deliver(event) == Result.done()
    assert len(fake.associations) == 1


def test_rate_limit_reset_in_seconds_or_milliseconds() -> None:
    now = 1_714_557_600.0
    assert rate_limit_delay({"x-ratelimit-reset": str(int(now) + 30)}, now) == 30.0
    assert rate_limit_delay({"x-ratelimit-reset": "45"}, now) == 45.0
    assert rate_limit_delay({"retry-after": "7", "x-ratelimit-reset": "45"}, now) == 7.0
    assert rate_limit_delay({}, now) is None


def test_private_api_address_is_refused_without_allow_private(fake: FakeZoho) -> None:
    result = hook(fake, allow_private=False).deliver(linked_event([("contact", "b@c.test")]))
    assert result.outcome == "failed" and "not a public address" in result.reason
    assert fake.requests == []


def test_record_created_for_a_known_address_creates_no_lead(fake: FakeZoho) -> None:
    fake.contacts["dana@newco.test"] = "3652397000000500009"
    data = {"record": {"kind": "lead", "id": "x", "name": "Dana", "emails": ["dana@newco.test"]}}
    assert hook(fake).deliver(make_event("record.created", data)) == Result.done()
    assert fake.api_requests("POST") == []


def write_secrets(directory: Path, fake: FakeZoho) -> str:
    lines = []
    for key, value in zip(
        ("client_id_file", "client_secret_file", "refresh_token_file"),
        fake.credentials,
        strict=True,
    ):
        path = directory / key
        path.write_text(value + "\n")
        lines.append(f"{key}: {path}")
    return ", ".join(lines)


def test_built_from_config_and_refused_when_a_secret_file_is_missing(
    fake: FakeZoho, tmp_path: Path
) -> None:
    write_secrets(tmp_path, fake)
    config = HookConfig(
        "zoho",
        "zoho-crm",
        api_domain=fake.url,
        accounts_url=fake.url,
        client_id_file=tmp_path / "client_id_file",
        client_secret_file=tmp_path / "client_secret_file",
        refresh_token_file=tmp_path / "refresh_token_file",
        allow_private=True,
    )
    fake.contacts["bob@customer.test"] = "3652397000000500001"
    built = build_hook(config)
    assert built.deliver(linked_event([("contact", "bob@customer.test")])) == Result.done()
    (tmp_path / "refresh_token_file").unlink()
    with pytest.raises(ConfigError, match="refresh_token_file"):
        build_hook(config)


def test_create_lead_path_through_linker_outbox_and_worker(fake: FakeZoho, tmp_path: Path) -> None:
    """crm.unmatched: create-lead -> record.created then message.linked in the outbox -> the
    worker creates the lead in Zoho, then associates the message with it; a 429 on the way is
    retried at the time Zoho named."""
    maildir = tmp_path / "mail"
    (maildir / ".Sent" / "cur").mkdir(parents=True)
    secrets = write_secrets(tmp_path, fake)
    config = load_config_text(
        textwrap.dedent(f"""\
            internal_domains: [example.test]
            crm: {{unmatched: create-lead}}
            accounts: [{{name: alice, addresses: [alice@example.test], maildir: {maildir}}}]
            hooks:
              - {{name: zoho, type: zoho-crm, api_domain: "{fake.url}",
                  accounts_url: "{fake.url}", allow_private: true,
                  events: [message.linked, record.created], {secrets}}}
            outbox: {{backoff_seconds: [0]}}
            """),
        "s.yaml",
    )
    store = open_store(f"sqlite:///{tmp_path}/db.sqlite")
    msg = maildir / ".Sent" / "cur" / "1714557600.M1P2.host,S=300:2,S"
    msg.write_bytes(
        b"From: Alice <alice@example.test>\r\nTo: Dana Doe <dana@newco.test>\r\n"
        b"Subject: Hello Dana\r\nMessage-ID: <hello.1@example.test>\r\n"
        b"Date: Wed, 01 May 2024 10:00:00 +0000\r\n\r\nbody\r\n"
    )
    result = Linker(store, config).link_file(config.accounts[0], "Sent", msg, "sent")
    assert result.status == "linked" and len(result.new_records) == 1
    (runner,) = runners_from_config(config.hooks)
    worker = OutboxWorker(store, [runner], config.outbox)
    fake.throttle({"Retry-After": "600"})
    before = time.time()
    worker.deliver_batch(runner)
    (row,) = store.outbox_rows({"pending"}, limit=1)
    assert row["type"] == "record.created" and row["last_error"].startswith("HTTP 429")
    next_at = datetime.fromisoformat(row["next_attempt"]).timestamp()
    assert next_at >= before + 599
    assert fake.leads == {}
    store.retry_deliveries("zoho", [], time.time())  # as `sentlink outbox retry` does
    for _ in range(3):
        worker.deliver_batch(runner)
    assert [r["state"] for r in store.outbox_rows({"pending", "dead"})] == []
    lead_id = fake.leads["dana@newco.test"]
    ((module, record_id, item),) = fake.associations
    assert (module, record_id) == ("Leads", lead_id)
    assert item["original_message_id"] == "hello.1@example.test"
    (insert,) = fake.api_requests("POST", "/crm/v8/Leads")
    assert insert.json() == {
        "data": [{"Last_Name": "Doe", "First_Name": "Dana", "Email": "dana@newco.test"}]
    }
    posts = [r.path for r in fake.api_requests("POST")]
    assert posts.index("/crm/v8/Leads") < posts.index(
        f"/crm/v8/Leads/{lead_id}/actions/associate_email"
    )
    store.close()
