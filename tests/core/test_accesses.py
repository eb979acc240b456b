"""The per-site report window of out-of-context accesses (``core.accesses``)."""

from __future__ import annotations

from ctxtrace.core.accesses import AccessKey, AccessWindow

KEY: AccessKey = ("current_app", "/srv/app.py", 3, "runtime")
S = 1_000_000_000


def test_repeats_of_a_reported_outcome_are_only_counted() -> None:
    window: AccessWindow[None] = AccessWindow(60.0)
    assert not window.is_repeat(KEY, 0)
    assert window.tell(KEY, "handled", repeat=False, access=None) == 0
    for at in range(1, 4):
        assert window.is_repeat(KEY, at)
        assert window.tell(KEY, "handled", repeat=True, access=None) is None
    assert window.repeats.items() == [(("current_app", "runtime", "handled"), 3)]


def test_an_outcome_new_to_the_window_is_reported_even_when_it_repeats() -> None:
    """An escape after caught accesses at one site must not hide behind them."""
    window: AccessWindow[None] = AccessWindow(60.0)
    assert not window.is_repeat(KEY, 0)
    window.tell(KEY, "handled", repeat=False, access=None)
    assert window.is_repeat(KEY, 1)
    assert window.tell(KEY, "escaped", repeat=True, access=None) == 0
    assert window.is_repeat(KEY, 2)
    assert window.tell(KEY, "escaped", repeat=True, access=None) is None
    assert window.repeats.items() == [(("current_app", "runtime", "escaped"), 1)]


def test_the_next_window_carries_the_count_to_its_first_report() -> None:
    window: AccessWindow[None] = AccessWindow(1.0)
    assert not window.is_repeat(KEY, 0)
    window.tell(KEY, "handled", repeat=False, access=None)
    for at in (1, 2):
        assert window.is_repeat(KEY, at)
        window.tell(KEY, "handled", repeat=True, access=None)
    assert not window.is_repeat(KEY, 2 * S)
    assert window.tell(KEY, "handled", repeat=False, access=None) == 2
    assert window.is_repeat(KEY, 2 * S + 1)
    assert window.tell(KEY, "handled", repeat=True, access=None) is None
    assert not window.is_repeat(KEY, 4 * S)
    assert window.tell(KEY, "handled", repeat=False, access=None) == 1


def test_sites_and_phases_have_windows_of_their_own() -> None:
    window: AccessWindow[None] = AccessWindow(60.0)
    assert not window.is_repeat(KEY, 0)
    others: list[AccessKey] = [
        ("current_app", "/srv/app.py", 4, "runtime"),
        ("current_app", "/srv/other.py", 3, "runtime"),
        ("current_app", "/srv/app.py", 3, "import"),
        ("g", "/srv/app.py", 3, "runtime"),
    ]
    for at, key in enumerate(others, 1):
        assert not window.is_repeat(key, at)
    assert window.is_repeat(KEY, 4)


def test_off_reports_every_access() -> None:
    window: AccessWindow[None] = AccessWindow(None)
    for at in range(3):
        assert not window.is_repeat(KEY, at)
        assert window.tell(KEY, "handled", repeat=False, access=None) == 0
    assert window.repeats.items() == []


def test_summaries_say_what_no_report_mentioned_once_its_window_passed() -> None:
    window: AccessWindow[str] = AccessWindow(1.0)
    assert not window.is_repeat(KEY, 0)
    window.tell(KEY, "handled", repeat=False, access="first")
    for at, name in ((1, "second"), (2, "third")):
        assert window.is_repeat(KEY, at)
        window.tell(KEY, "handled", repeat=True, access=name)
    assert window.summaries(S // 2) == []
    assert window.summaries(S + 1) == [("third", "handled", 2)]
    assert window.summaries(None) == []
    # Said in a summary: the next report does not count them again.
    assert not window.is_repeat(KEY, 3 * S)
    assert window.tell(KEY, "handled", repeat=False, access="fourth") == 0
    assert window.repeats.items() == [(("current_app", "runtime", "handled"), 2)]
