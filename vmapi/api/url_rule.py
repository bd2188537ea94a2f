"""URL rules whose URL builders are compiled on first use.

Werkzeug compiles two URL builders (``url_for``'s, as Python source through ``ast`` and
``compile()``) for every rule as it is added: about 90 % of ``create_app``'s time for
vmapi's ~150 rules (some 80 ms), paid by every gunicorn worker as it starts and by every
test's app. vmapi builds no URL from its rules in a request (no ``url_for``), so
:class:`LazyBuilderRule` compiles a builder only when a URL is first built from its rule:
the same werkzeug builder, later. Matching is untouched (it uses the rule's parts, which
``compile`` still makes at once).

It overrides ``Rule._compile_builder``, a werkzeug internal: Werkzeug is pinned in
requirements.txt, and tests/api/test_url_rule.py builds every route's URL through both
kinds of rule and fails if they differ or if ``create_app`` compiles a builder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from werkzeug.routing import Rule

__all__ = ["LazyBuilderRule"]

#: the instance attributes ``Rule.compile`` keeps its two builders in, by ``append_unknown``
_BUILDER_ATTRIBUTE = {False: "_build", True: "_build_unknown"}


class LazyBuilderRule(Rule):
    """A werkzeug :class:`Rule` whose two URL builders are compiled by their first call."""

    def _compile_builder(self, append_unknown: bool = True) -> Callable[..., tuple[str, str]]:
        compile_real = super()._compile_builder

        def build_lazily(rule: LazyBuilderRule, *args: Any, **kwargs: Any) -> tuple[str, str]:
            real = compile_real(append_unknown)
            # the compiled builder replaces this stub on the rule (``compile`` stores a
            # bound method there): later builds call werkzeug's builder directly
            setattr(rule, _BUILDER_ATTRIBUTE[append_unknown], real.__get__(rule, None))
            return real(rule, *args, **kwargs)

        return build_lazily
