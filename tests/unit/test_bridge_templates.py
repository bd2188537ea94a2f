"""Bridge templates (vmapi.bridges): what a node's ``bridge`` may say and what it names."""

import pytest

from vmapi.bridges import DEFAULT_TEMPLATE, bridge_name, shared, template_problem


def test_names_from_the_template():
    assert bridge_name(DEFAULT_TEMPLATE, "abcd-0a0b0c", None) == "br-abcd-0a0b0c"
    assert bridge_name("br0", "abcd-0a0b0c", 120) == "br0"
    assert bridge_name("br{vlan}", "abcd-0a0b0c", 120) == "br120"
    assert bridge_name("br{vlan}", "abcd-0a0b0c", None) == "br"
    assert bridge_name("v{vlan}-{suffix}", "12-34", 7) == "v7-12-34"


def test_shared_bridges_name_no_suffix():
    assert shared("br0") and shared("br{vlan}")
    assert not shared(DEFAULT_TEMPLATE) and not shared("x{suffix}{vlan}")


@pytest.mark.parametrize("template", ["br0", "br-{suffix}", "br{vlan}", "{suffix}", "v{vlan}",
                                      "vmbr.{vlan}", "a_b", "x" * 15])  # fmt: skip
def test_good_templates(template):
    assert template_problem(template) is None


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("", "non-empty"),
        ("{name}", "only placeholders"),
        ("br-{suffix.__class__}", "only placeholders"),
        ("br{0}", "only placeholders"),
        ("br{", "only placeholders"),
        ("br}x", "only placeholders"),
        ("br-{vm_id}-{interface_id}", "only placeholders"),
        ("bridge-{suffix}", "up to 19 characters"),  # 7 + 12: past Linux's 15
        ("b{vlan}{suffix}", "up to 17 characters"),
        ("x" * 16, "up to 16 characters"),
        ("br{vlan}{vlan}{vlan}{vlan}", "up to 18 characters"),
        ("{vlan}", "at least one"),  # nothing at all for an interface on no VLAN
        ("br 0", "letters, digits"),
        ("br/0", "letters, digits"),
        ("br:0", "letters, digits"),
        ("..", "letters, digits"),
    ],
)
def test_bad_templates_say_why(template, problem):
    assert problem in template_problem(template)


def test_every_name_an_accepted_template_makes_fits_linux():
    for template in ("br-{suffix}", "{suffix}", "vlan{vlan}x", "{vlan}.x", "x" * 15):
        assert template_problem(template) is None
        for suffix in ("a", "abcd-0a0b0c", "123456-12345"):
            for vlan in (None, 1, 4094):
                assert 1 <= len(bridge_name(template, suffix, vlan)) <= 15
