"""Plugin registries: objectives and evaluation tasks are found by importing their packages' modules."""
from __future__ import annotations

import sys

import pytest

from cosettle.core.registry import Registry
from cosettle.eval.task import discover as discover_tasks
from cosettle.trainer.objective import discover as discover_objectives


def test_every_plugin_module_is_discovered():
    assert set(discover_objectives()) == {"cosettle", "vthcl", "cstp", "concepts"}
    tasks = discover_tasks()
    assert {n: t.family for n, t in tasks.items()} == {
        "davis": "frame", "jhmdb": "frame", "vip": "frame", "metrics": "frame", "ucf101": "video", "hmdb51": "video"}


def test_a_new_module_is_a_new_entry(tmp_path, monkeypatch):
    """Adding a plugin is adding a file: nothing central names it."""
    package = tmp_path / "myplugins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "alpha.py").write_text("from registry_under_test import REGISTRY\nREGISTRY.register('alpha', 1)\n")
    (package / "beta.py").write_text("from registry_under_test import REGISTRY\nREGISTRY.register('beta', 2)\n")
    registry: Registry[int] = Registry("widget", "myplugins", "cosettle.test-widgets")
    module = type(sys)("registry_under_test")
    module.REGISTRY = registry
    monkeypatch.setitem(sys.modules, "registry_under_test", module)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.discover() == {"alpha": 1, "beta": 2}
    assert registry.get("beta") == 2
    with pytest.raises(KeyError, match="unknown widget 'gamma'; known: alpha, beta"):
        registry.get("gamma")
    with pytest.raises(ValueError, match="widget 'alpha' is registered twice"):
        registry.register("alpha", 3)
