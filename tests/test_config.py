"""sentlink.config: the reference file, typed validation with positions, semantic checks."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any, get_args, get_type_hints

import pytest
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from sentlink.config import (
    AccountConfig,
    Config,
    MilterConfig,
    MilterSocket,
    default_config_path,
    load_config,
    load_config_text,
    models,
    parse_listen,
)
from sentlink.errors import ConfigError

REFERENCE = Path(__file__).resolve().parents[1] / "config" / "sentlink.yaml"


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config_text(textwrap.dedent(text), "s.yaml")
    return caught.value.problems


def dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds, directly, as `X | None` or as `tuple[X, ...]`."""
    for candidate in (hint, *get_args(hint)):
        if dataclasses.is_dataclass(candidate) and isinstance(candidate, type):
            return candidate
    return None


def missing_keys(cls: type, node: CommentedMap, where: str) -> list[str]:
    """Fields of ``cls`` (recursively) that have no key in the YAML mapping ``node``."""
    hints = get_type_hints(cls, globalns=vars(models))
    missing = []
    for f in dataclasses.fields(cls):
        key = f.metadata.get("key", f.name)  # `if`, `from`, `continue` are Python keywords
        if key not in node:
            missing.append(f"{where}{key}")
            continue
        inner = dataclass_of(hints[f.name])
        value = node[key]
        if inner is not None:
            items = value if isinstance(value, list) else [value]
            assert items, f"{where}{f.name}: show at least one example item"
            for item in items:
                if not isinstance(item, dict):
                    continue  # a word or null where a section may also stand (auth: none)
                missing += missing_keys(inner, item, f"{where}{f.name}.")
    return missing


def test_reference_file_loads_with_the_example_account_and_milter() -> None:
    config = load_config(REFERENCE)
    assert config.accounts == (
        AccountConfig(
            name="alice",
            addresses=("alice@example.test", "a.smith@example.test"),
            maildir=Path("var/mail/alice"),
            logins=("alice",),
            upstream=models.UpstreamConfig(host="smtp.provider.test"),
        ),
    )
    assert config.milter is not None
    assert config.milter.listen == "unix:./var/milter.sock"
    assert config.internal_domains == ("example.test",)
    assert config.store.url.startswith("sqlite:///./var/")


def test_reference_file_has_every_model_field_as_a_key() -> None:
    tree = YAML(typ="rt").load(REFERENCE.read_text())
    assert missing_keys(Config, tree, "") == []


def test_reference_file_shows_the_default_of_every_key_but_the_example() -> None:
    config = load_config(REFERENCE)
    assert config.milter == MilterConfig()
    assert config.metrics == models.MetricsConfig()  # shown enabled, with its defaults
    example = {"internal_domains", "accounts", "milter", "hooks", "watch", "proxy", "metrics"}
    for f in dataclasses.fields(Config):
        if f.name not in example:
            assert getattr(config, f.name) == getattr(Config(), f.name), f.name
    assert dataclasses.replace(config.watch, rules=()) == models.WatchConfig()
    account = config.accounts[0]
    for f in dataclasses.fields(AccountConfig):
        if f.default is not dataclasses.MISSING and f.name not in ("logins", "upstream"):
            assert getattr(account, f.name) == f.default, f.name


def test_reference_file_comments_every_setting() -> None:
    lines = REFERENCE.read_text().splitlines()
    uncommented = []

    def walk(node: object) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        if not isinstance(node, CommentedMap):
            return
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value)
                continue
            walk(value)
            line = node.lc.key(key)[0]
            if not lines[line - 1].lstrip().startswith("#"):
                uncommented.append(f"{line + 1}: {key}")

    walk(YAML(typ="rt").load(REFERENCE.read_text()))
    assert uncommented == []


def test_empty_file_gives_every_default(tmp_path: Path) -> None:
    path = tmp_path / "sentlink.yaml"
    path.write_text("# nothing set yet\n")
    assert load_config(path) == Config()
    assert load_config_text("", "s.yaml") == Config()


def test_unknown_key_is_reported_at_the_key_with_a_suggestion() -> None:
    problems = problems_of(
        """\
        milter:
          listen: "unix:./m.sock"
          listn: x
        """
    )
    assert problems == ["s.yaml:3:3: unknown key 'listn' in milter (did you mean 'listen'?)"]


def test_unknown_top_level_key_is_reported() -> None:
    assert problems_of("storage: {}\n") == [
        "s.yaml:1:1: unknown key 'storage' at the top level (did you mean 'store'?)"
    ]


def test_wrong_type_is_reported_at_the_value() -> None:
    problems = problems_of(
        """\
        milter:
          timeout:   "ten"
        """
    )
    assert problems == ["s.yaml:2:14: milter.timeout: expected an integer, got a string"]


def test_several_problems_are_reported_together_in_file_order() -> None:
    problems = problems_of(
        """\
        store: {url: 5}
        accounts:
          - name: bob
            addresses: [bob@example.test]
            maildir: ./var/mail/bob
            colour: blue
          - name: carol
            addresses: carol@example.test
            maildir: ./var/mail/carol
        milter:
          listen: "inet:127.0.0.1:8891"
          outbound: {auth: 1}
        log: {level: verbose}
        """
    )
    assert problems == [
        "s.yaml:1:14: store.url: expected a string, got an integer (put the value in quotes)",
        "s.yaml:6:5: unknown key 'colour' in accounts[0]",
        "s.yaml:8:16: accounts[1].addresses: expected a list, got a string",
        "s.yaml:11:11: milter.listen: 'inet:127.0.0.1:8891' is Postfix syntax (inet:HOST:PORT);"
        " libmilter wants 'inet:8891@127.0.0.1'",
        "s.yaml:12:20: milter.outbound.auth: expected a boolean (true or false), got an integer",
        "s.yaml:13:14: log.level: expected one of 'debug', 'info', 'warning', 'error', got "
        "'verbose'",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("log:\n  level: info: x\n", "s.yaml:2:14: mapping values are not allowed here"),
        ("store:\n  url: 'sqlite:///x.db\n", "s.yaml:3:1: found unexpected end of stream"),
        ("log:\n\tlevel: info\n", "s.yaml:2:1: found character '\\t' that cannot start"),
        ("log: {level: 'in\x07fo'}\n", "s.yaml:1:17: character U+0007 is not allowed in YAML"),
    ],
)
def test_yaml_syntax_error_is_reported_with_its_position(text: str, expected: str) -> None:
    [problem] = problems_of(text)
    assert problem.startswith(expected)


def test_duplicate_key_is_a_syntax_error() -> None:
    assert problems_of("log: {}\nlog: {}\n")[0].startswith("s.yaml:2:1: found duplicate key")


def test_top_level_must_be_a_mapping() -> None:
    assert problems_of("- a\n- b\n") == [
        "s.yaml:1:1: the top level must be a mapping of keys, got a list"
    ]


def test_missing_required_key_is_reported_at_its_mapping() -> None:
    problems = problems_of(
        """\
        accounts:
          - name: bob
            addresses: [bob@example.test]
        """
    )
    assert problems == ["s.yaml:2:5: accounts[0]: missing required key 'maildir'"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("crm: {strip_plus_tags: 1}", "expected a boolean (true or false), got an integer"),
        ("crm: {strip_plus_tags: 'yes'}", "got a string (write true or false)"),
        ("watch: {rescan_seconds: true}", "expected an integer, got a boolean"),
        ("watch: {rescan_seconds: '300'}", "expected an integer, got a string (remove the quotes)"),
        ("milter: {socket_mode: 0660}", "expected a string, got an integer (put the value in"),
        ("site_secret_file: ''", "expected a path, got an empty string"),
        ("internal_domains: example.test", "expected a list, got a string"),
        ("crm: {private: [x]}", "crm.private: expected a mapping, got a list"),
    ],
)
def test_values_are_never_coerced_between_types(line: str, expected: str) -> None:
    [problem] = problems_of(line + "\n")
    assert expected in problem


def test_empty_sections_and_lists_take_their_defaults() -> None:
    config = load_config_text("milter:\ncrm:\ninternal_domains:\n", "s.yaml")
    assert config.milter == MilterConfig()
    assert config == Config(milter=MilterConfig())


def test_address_may_belong_to_only_one_account() -> None:
    problems = problems_of(
        """\
        accounts:
          - name: alice
            addresses: [alice@example.test]
            maildir: ./var/mail/alice
          - name: bob
            addresses: [bob@example.test, Alice@Example.TEST]
            maildir: ./var/mail/bob
        """
    )
    assert problems == [
        "s.yaml:6:35: accounts[1].addresses[1]: 'alice@example.test' already belongs to "
        "account 'alice' (line 3)"
    ]


def test_login_and_account_name_may_be_used_once() -> None:
    problems = problems_of(
        """\
        accounts:
          - {name: alice, addresses: [a@example.test], maildir: m/a, logins: [alice]}
          - {name: bob, addresses: [b@example.test], maildir: m/b, logins: [alice, bob, bob]}
          - {name: alice, addresses: [c@example.test], maildir: m/a}
        """
    )
    assert problems == [
        "s.yaml:3:69: accounts[1].logins[0]: login 'alice' already belongs to account 'alice' "
        "(line 2)",
        "s.yaml:3:81: accounts[1].logins[2]: login 'bob' is listed twice (first at line 3)",
        "s.yaml:4:12: accounts[2].name: account 'alice' is defined twice (first at line 2)",
        "s.yaml:4:57: accounts[2].maildir: Maildir 'm/a' already belongs to account 'alice' "
        "(line 2)",
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "accounts: [{name: 'a b', addresses: [x@example.test], maildir: m}]",
            "accounts[0].name: 'a b' is not an account name",
        ),
        (
            "accounts: [{name: a, addresses: ['Al <al@example.test>'], maildir: m}]",
            "accounts[0].addresses[0]: 'Al <al@example.test>' is not an address (local@domain)",
        ),
        (
            "accounts: [{name: a, addresses: [], maildir: m}]",
            "accounts[0].addresses: an account needs at least one address",
        ),
        ("internal_domains: ['exa mple.test']", "'exa mple.test' is not a domain name"),
        ("store: {url: 'mysql://x/y'}", "store.url: must be sqlite:///PATH or postgresql://"),
        ("store: {url: 'postgres://u:secret@h/db'}", "postgres:// is spelled postgresql://"),
        ("milter: {socket_mode: '0999'}", "'0999' is not an octal file mode like \"0660\""),
        ("milter: {timeout: 0}", "milter.timeout: must be a positive number of seconds"),
        (
            "milter: {outbound: {internal_hosts: [10.0.0.0/33]}}",
            "milter.outbound.internal_hosts[0]: '10.0.0.0/33' is not an IP address or network",
        ),
        ("crm: {never_log: [example.com]}", "'example.com' is neither an address nor @domain"),
        ("crm: {private: {header: 'X CRM'}}", "'X CRM' is not a header field name"),
    ],
)
def test_semantic_problems_are_reported(line: str, expected: str) -> None:
    [problem] = problems_of(line + "\n")
    assert problem.startswith("s.yaml:1:")
    assert expected in problem


def test_store_url_with_password_is_never_echoed() -> None:
    [problem] = problems_of("store: {url: 'postgres://u:secret@h/db'}\n")
    assert "secret" not in problem


def test_addresses_and_domains_are_lower_cased_and_paths_stay_relative() -> None:
    config = load_config_text(
        """\
internal_domains: [Example.TEST]
accounts:
  - {name: a, addresses: [A.Smith@Example.Test], maildir: ./var/mail/a, logins: [A.Smith]}
crm: {never_log: ['@News.Example.COM', Boss@Example.Org]}
milter: {outbound: {internal_hosts: ['192.0.2.0/24', '2001:db8::/32', 127.0.0.1]}}
""",
        "s.yaml",
    )
    assert config.internal_domains == ("example.test",)
    assert config.accounts[0].addresses == ("a.smith@example.test",)
    assert config.accounts[0].logins == ("A.Smith",)  # SASL logins are compared as given
    assert config.accounts[0].maildir == Path("var/mail/a")
    assert not config.accounts[0].maildir.is_absolute()
    assert config.crm.never_log == ("@news.example.com", "boss@example.org")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("unix:./var/milter.sock", MilterSocket("unix", path=Path("var/milter.sock"))),
        ("local:/run/m.sock", MilterSocket("unix", path=Path("/run/m.sock"))),
        ("inet:8891@127.0.0.1", MilterSocket("inet", port=8891, host="127.0.0.1")),
        ("inet6:8891@::1", MilterSocket("inet6", port=8891, host="::1")),
    ],
)
def test_libmilter_socket_forms_are_accepted(spec: str, expected: MilterSocket) -> None:
    assert parse_listen(spec) == expected
    assert load_config_text(f"milter: {{listen: '{spec}'}}\n", "s.yaml").milter is not None


def test_inherited_fd_socket_parses_but_the_milter_refuses_it() -> None:
    assert parse_listen("fd:3") == MilterSocket("fd", fd=3)
    with pytest.raises(ConfigError, match="inherited fd"):
        load_config_text("milter: {listen: 'fd:3'}\n", "s.yaml")


@pytest.mark.parametrize(
    ("spec", "hint"),
    [
        ("inet:localhost:8891", "libmilter wants 'inet:8891@localhost'"),
        ("inet6:[::1]:8891", "libmilter wants 'inet6:8891@::1'"),
        ("inet:8891", "write inet:PORT@HOST"),
        ("/var/run/milter.sock", "write unix:PATH"),
        ("inet:99999@127.0.0.1", "port must be a number from 1 to 65535"),
        ("tcp:8891@127.0.0.1", "unknown socket type 'tcp'"),
    ],
)
def test_listen_outside_libmilter_syntax_is_rejected_with_a_hint(spec: str, hint: str) -> None:
    [problem] = problems_of(f"milter:\n  listen: '{spec}'\n")
    assert problem.startswith("s.yaml:2:11: milter.listen: ")
    assert hint in problem


def test_default_config_path_prefers_the_environment() -> None:
    assert default_config_path({"SENTLINK_CONFIG": "/srv/s.yaml"}) == Path("/srv/s.yaml")
    assert default_config_path({}) == Path("/etc/sentlink/sentlink.yaml")
    assert default_config_path({"SENTLINK_CONFIG": ""}) == Path("/etc/sentlink/sentlink.yaml")


def test_unreadable_or_undecodable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml")
    assert caught.value.problems == [
        f"{tmp_path / 'absent.yaml'}: cannot read: No such file or directory"
    ]
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"log: {}\n# caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_config(latin1)
    assert caught.value.problems == [f"{latin1}:2:6: not UTF-8 text"]
