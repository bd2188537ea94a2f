"""The libvirt URI grammar is said once (issue 21): URIs generated from the OpenAPI
pattern are accepted by the validator (when the directories allow their files), what the
validator accepts matches the pattern, and no mutation that could reach a shell or a file
(quotes, %-escapes, $(...), ;, backticks, spaces, newlines, ..) gets through."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmapi.hypervisor.uri import URI_PATTERN, UriPolicy, matches_grammar, validate_libvirt_uri

#: A policy whose directories allow every file: what is left is the grammar alone.
ANYWHERE = UriPolicy(test_driver_dir="/", credential_dirs=("/",))
STRICT = UriPolicy()
GENERATED = st.from_regex(URI_PATTERN, fullmatch=True).filter(lambda u: len(u) <= 1024)
#: What a shell, libvirt's URI decoder or a path lookup reads as more than plain text.
UNSAFE = ["'", '"', "%27", "%2F", "%3B", "$(id)", "${IFS}", ";", "`id`", " ", "\n", "\t",
          "\\", "/..", "/../", "|", "&&", ">", "<", "*", "%", "#", "\x00"]  # fmt: skip
DANGEROUS_IN_RESULT = re.compile(r"['\"%;$`\s\\|<>*#\x00]|/\.\.?(?:/|$|[?&])")

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(GENERATED)
def test_every_uri_of_the_pattern_is_accepted(uri):
    validate_libvirt_uri(uri, ANYWHERE)


@SETTINGS
@given(GENERATED, st.sampled_from(UNSAFE), st.data())
def test_no_unsafe_mutation_is_accepted(uri, unsafe, data):
    at = data.draw(st.integers(min_value=0, max_value=len(uri)))
    mutated = uri[:at] + unsafe + uri[at:]
    for policy in (ANYWHERE, STRICT):
        try:
            validate_libvirt_uri(mutated, policy)
        except ValueError:
            continue
        # accepted: then it is still in the grammar, and nothing unsafe is left in it
        assert matches_grammar(mutated), mutated
        assert not DANGEROUS_IN_RESULT.search(mutated), mutated


@SETTINGS
@given(st.text(alphabet=st.sampled_from("qemutsh+:/@?&=.-_[]1ax%';$` \n"), max_size=60))
def test_what_the_validator_accepts_matches_the_pattern(text):
    try:
        validate_libvirt_uri(text, ANYWHERE)
    except ValueError:
        return
    assert re.search(URI_PATTERN, text) and matches_grammar(text)


@SETTINGS
@given(GENERATED)
def test_strict_policy_refuses_only_for_directories(uri):
    try:
        validate_libvirt_uri(uri, STRICT)
    except ValueError as exc:
        assert "TEST_DRIVER_DIR" in str(exc) or "LIBVIRT_CREDENTIAL_DIRS" in str(exc), exc
