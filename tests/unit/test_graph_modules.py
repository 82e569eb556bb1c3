"""The walk's cache of module namespaces (kernel/_graph.py): it holds what it describes, so
no id in it can be reused by another object while it is kept."""

from __future__ import annotations

import gc
import sys
import types
import weakref

from nbcluster.kernel import _graph


def test_a_module_dropped_from_sys_modules_stays_alive_until_the_cache_moves_on() -> None:
    module = types.ModuleType("nbcluster_test_dropped_module")
    sys.modules[module.__name__] = module
    try:
        assert id(module.__dict__) in _graph._module_dict_ids()
    finally:
        del sys.modules[module.__name__]
    gone = weakref.ref(module)
    del module
    gc.collect()
    # Still described by the cache: its namespace's id must not go to a notebook object.
    assert gone() is not None
    ids = _graph._module_dict_ids()  # sys.modules changed: asked again, and let go
    gc.collect()
    assert gone() is None
    plain = [m for m in list(sys.modules.values()) if type(m) is types.ModuleType]
    assert plain and all(id(m.__dict__) in ids for m in plain)


def test_the_skip_set_is_the_modules_and_the_namespace_and_follows_both() -> None:
    namespace: dict[str, object] = {}
    other: dict[str, object] = {}
    skip = _graph._skip_ids(id(namespace))
    assert id(namespace) in skip and _graph._module_dict_ids() <= skip
    assert _graph._skip_ids(id(namespace)) is skip  # kept between walks
    assert id(other) in _graph._skip_ids(id(other)) and id(namespace) not in (
        _graph._skip_ids(id(other))
    )
    module = types.ModuleType("nbcluster_test_new_module")
    sys.modules[module.__name__] = module
    try:
        assert id(module.__dict__) in _graph._skip_ids(id(namespace))
    finally:
        del sys.modules[module.__name__]
