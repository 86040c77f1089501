"""The rules give the one shared ``NO_RULE`` decision when none matches, equal to the default
one that a reconcile's worker sends as None; a matching rule still gives its own decision."""

from __future__ import annotations

from sentlink.config.models import RuleActions, RuleCondition, WatchRule
from sentlink.headers import parse_header_bytes
from sentlink.watch.rules import NO_RULE, Decision, MessageFacts, RuleSet


def test_no_matching_rule_gives_the_default_decision() -> None:
    rules = RuleSet.compile(
        [WatchRule("lists", RuleCondition(header={"List-Id": ".+"}), RuleActions(link=False))]
    )
    plain = MessageFacts(parse_header_bytes(b"From: a@x\nTo: b@y"), None)
    assert rules.decide(plain) is NO_RULE
    assert Decision(True, None, "", ()) == NO_RULE
    listed = MessageFacts(parse_header_bytes(b"From: a@x\nList-Id: <l.x>"), None)
    assert rules.decide(listed) == Decision(False, None, "", ("rule lists",))
    assert RuleSet().decide(plain) is NO_RULE
