"""Plugin registries: named entries that modules add themselves to, found by importing every module
of a package and every installed entry point of a group (the timm / lm-eval-harness pattern)."""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name; ``discover()`` imports the plugin package's modules and the entry points once."""

    def __init__(self, kind: str, package: str, group: str):
        self.kind, self.package, self.group = kind, package, group
        self.entries: dict[str, T] = {}
        self._state = "new"  # new -> discovering (a plugin may call discover while it is imported) -> done

    def register(self, name: str, entry: T) -> T:
        """Add ``entry``; a name registered twice is an error."""
        if name in self.entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self.entries[name] = entry
        return entry

    def discover(self) -> dict[str, T]:
        """Every entry, after importing each plugin module (the package's, then the entry points')."""
        if self._state == "new":
            self._state = "discovering"
            try:
                package = importlib.import_module(self.package)
                for module in pkgutil.iter_modules(package.__path__):
                    importlib.import_module(f"{self.package}.{module.name}")
                for entry in entry_points(group=self.group):
                    entry.load()
            except BaseException:
                self._state = "new"  # a plugin that failed to import is retried (and fails loudly) next time
                raise
            self._state = "done"
        return self.entries

    def get(self, name: str) -> T:
        """The entry ``name``; an unknown name is a KeyError listing the known ones."""
        entries = self.discover()
        if name not in entries:
            raise KeyError(f"unknown {self.kind} '{name}'; known: {', '.join(sorted(entries))}")
        return entries[name]
