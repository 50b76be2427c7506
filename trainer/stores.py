"""Opening the feature stores a run trains on, and checking that they can be combined."""
from __future__ import annotations

from pathlib import Path

from cosettle.core.provenance import mismatches
from cosettle.pipeline.store import FeatureStore, StoreError, open_store

# Stores combine when they differ only in which videos they hold (shards, or several datasets).
PER_STORE_KEYS = ("num_videos", "videos_sha256")


def open_stores(paths: list[str | Path]) -> list[FeatureStore]:
    """Open finished stores for training; refuses incomplete ones, mixed settings and duplicates."""
    stores = [open_store(Path(p)) for p in paths]
    first = stores[0]
    shared = {k: v for k, v in first.settings.items() if k not in PER_STORE_KEYS}
    seen: dict[str, Path] = {}
    for s in stores:
        # a setting only one side records (e.g. autocast, recorded since --amp) is a difference too
        diff = mismatches(shared | dict.fromkeys(s.settings.keys() - first.settings.keys()), s.settings)
        if diff:
            raise StoreError(f"{s.path}: cannot be combined with {first.path} ({'; '.join(diff)})")
        digest = s.settings["videos_sha256"]
        if digest in seen:
            raise StoreError(f"{s.path}: holds the same videos as {seen[digest]}; give each store once")
        seen[digest] = s.path
    return stores


def provenance(stores: list[FeatureStore]) -> list[dict]:
    """What each store says about how it was made, for the run's config.json."""
    return [
        {
            "path": str(s.path.resolve()),
            "settings": s.settings,
            "environment": s.meta.get("environment"),
            "created": s.meta.get("created"),
            "completed": s.meta.get("completed"),
            "valid_videos": int(s.valid().sum()),
        }
        for s in stores
    ]
