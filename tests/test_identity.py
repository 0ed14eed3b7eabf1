"""User names become cluster prefixes, label values and checkpoint directories."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from deskgpu.identity import MAX_USER_TOKEN, is_dns_label, safe_user


def test_clean_names_pass_through() -> None:
    assert [safe_user(u) for u in ("alice", "bob2", "u-1bob", "root")] == [
        "alice",
        "bob2",
        "u-1bob",
        "root",
    ]


def test_names_that_differ_stay_different() -> None:
    """Review finding: john.doe and john_doe once shared /checkpoints/john-doe."""
    pairs = [
        ("john.doe", "john_doe"),
        ("christopher.robinson1", "christopher.robinson2"),
        ("Alice", "alice"),
        ("1bob", "u-1bob"),
    ]
    for a, b in pairs:
        assert safe_user(a) != safe_user(b), (a, b)


@given(st.text(alphabet=string.ascii_letters + string.digits + "._-/ ", min_size=1, max_size=40))
def test_token_is_a_dns_label_without_path_parts(user: str) -> None:
    token = safe_user(user)
    assert is_dns_label(token) and len(token) <= MAX_USER_TOKEN
    assert "/" not in token and ".." not in token


@given(
    st.lists(
        st.text(alphabet=string.ascii_lowercase + "._-", min_size=1, max_size=30),
        min_size=2,
        max_size=2,
        unique=True,
    )
)
def test_distinct_users_get_distinct_tokens(users: list[str]) -> None:
    a, b = users
    assert safe_user(a) != safe_user(b)
