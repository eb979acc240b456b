"""Putting wrappers on other people's objects, and taking them off again exactly.

``uninstrument()`` must hand back the identical original object, and must not
unpick a wrapper another tool put on top of ours later: such a patch stays, and
our wrapper inside it turns itself into a plain pass-through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_MISSING = object()


@dataclass(slots=True)
class Patch:
    """One attribute replaced on a class or a proxy slot."""

    target: Any
    attr: str
    replacement: Any
    slot: bool = False
    original: Any = _MISSING

    def apply(self) -> None:
        if self.slot:
            self.original = object.__getattribute__(self.target, self.attr)
            object.__setattr__(self.target, self.attr, self.replacement)
        else:
            self.original = vars(self.target).get(self.attr, _MISSING)
            setattr(self.target, self.attr, self.replacement)

    def revert(self) -> bool:
        """Restore the original if ours is still the outermost; say whether it was."""
        if self.slot:
            current = object.__getattribute__(self.target, self.attr)
        else:
            current = vars(self.target).get(self.attr, _MISSING)
        if current is not self.replacement:
            return False
        if self.slot:
            object.__setattr__(self.target, self.attr, self.original)
        elif self.original is _MISSING:
            delattr(self.target, self.attr)
        else:
            setattr(self.target, self.attr, self.original)
        return True


def copy_names(wrapper: Callable[..., Any], original: Callable[..., Any]) -> None:
    """Keep the wrapped method's identity for introspection, without functools overhead."""
    wrapper.__name__ = getattr(original, "__name__", wrapper.__name__)
    wrapper.__qualname__ = getattr(original, "__qualname__", wrapper.__qualname__)
    wrapper.__doc__ = original.__doc__
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]


def put_wrapper(
    target: Any, attr: str, wrapper: Callable[..., Any], original: Callable[..., Any]
) -> Callable[[], None]:
    """Put ``wrapper`` (of ``original``) at ``target.attr``, named like it; returns the undo."""
    copy_names(wrapper, original)
    patch = Patch(target, attr, wrapper)
    patch.apply()

    def remove() -> None:
        patch.revert()

    return remove
