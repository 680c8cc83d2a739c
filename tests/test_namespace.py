"""``smm.Namespace()`` against ``multiprocessing.Manager().Namespace()``."""

from __future__ import annotations

import multiprocessing as mp
import pickle
from collections.abc import Iterator
from typing import Any

import pytest

from sharedobj import SharedMemoryManager


@pytest.fixture(scope="module")
def stdlib() -> Iterator[Any]:
    with mp.Manager() as m:
        yield m


def _scenario(ns: Any) -> list[object]:
    out: list[object] = [ns.a, ns.b]
    ns.c = [1, 2]
    ns.a += 1
    out += [ns.a, ns.c]
    ns._local = "mine"  # private names stay on this object
    out.append(ns._local)
    del ns.b
    for attr in ("b", "missing", "_nope"):
        try:
            getattr(ns, attr)
            out.append("found")
        except AttributeError:
            out.append(f"AttributeError {attr}")
    try:
        del ns.missing
    except AttributeError:
        out.append("del AttributeError")
    out.append(sorted(k for k in ("a", "b", "c") if hasattr(ns, k)))
    return out


def test_same_behaviour_as_the_stdlib(stdlib: Any, smm: SharedMemoryManager) -> None:
    assert _scenario(smm.Namespace(a=1, b="x")) == _scenario(stdlib.Namespace(a=1, b="x"))


def _child(ns: Any) -> None:
    ns.total = ns.total + 10
    ns.seen = ns._hidden if hasattr(ns, "_hidden") else "not sent"


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_shared_with_a_child(smm: SharedMemoryManager, method: str) -> None:
    ns = smm.Namespace(total=5)
    ns._hidden = "local"
    p = mp.get_context(method).Process(target=_child, args=(ns,))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    # fork inherits the object itself (private names included); spawn unpickles it
    assert ns.total == 15 and ns.seen == ("local" if method == "fork" else "not sent")
    assert len(pickle.dumps(ns)) < 160  # the shared dict's handle and two names
    assert repr(ns) == f"Namespace(seen={ns.seen!r}, total=15)"
