"""vmapi/api/url_rule.py: an app's URL builders are compiled on first use, and build what
werkzeug's own rules build (the check on the werkzeug internal it overrides)."""

from __future__ import annotations

from typing import Any

from flask import Flask, url_for
from werkzeug.routing import Map, Rule

from vmapi.api import IdConverter
from vmapi.api.url_rule import LazyBuilderRule
from vmapi.app import create_app


def test_create_app_compiles_no_url_builder(monkeypatch):
    compiled: list[str] = []
    real = Rule._compile_builder

    def counting(rule: Rule, append_unknown: bool = True):
        compiled.append(rule.rule)
        return real(rule, append_unknown)

    monkeypatch.setattr(Rule, "_compile_builder", counting)
    app = create_app({"DATABASE_URL": "sqlite://"})
    api_rules = [rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"]
    assert len(api_rules) > 100
    assert [r for r in compiled if not r.startswith("/static")] == []
    assert all(isinstance(rule, LazyBuilderRule) for rule in api_rules)

    with app.test_request_context():
        assert url_for("meta.health") == "/health"
    assert compiled.count("/health") == 1  # url_for's builder only, when first called


def sample_values(rule: Rule) -> dict[str, Any]:
    """A value for each of the rule's arguments, of its converter's kind."""
    return {
        name: 123 if isinstance(converter, IdConverter) else f"v{index}-x y"
        for index, (name, converter) in enumerate(sorted(rule._converters.items()))
    }


def test_every_route_builds_the_url_werkzeug_builds(app: Flask):
    stock = Map([Rule(rule.rule, **rule.get_empty_kwargs()) for rule in app.url_map.iter_rules()],
                converters=dict(app.url_map.converters))  # fmt: skip
    ours = app.url_map.bind("api.example", "/")
    theirs = stock.bind("api.example", "/")
    built = 0
    for rule in app.url_map.iter_rules():
        values = {**sample_values(rule), "page": "2 3"}  # an unknown one: the query
        for method in sorted(rule.methods or {"GET"}):
            # each builder as a stub first, then as the compiled builder it kept
            for append_unknown in (True, False, True, False):
                url = ours.build(rule.endpoint, values, method, append_unknown=append_unknown)
                expected = theirs.build(rule.endpoint, values, method,
                                        append_unknown=append_unknown)  # fmt: skip
                assert url == expected, (rule.rule, method, append_unknown)
                built += 1
    assert built > 600
