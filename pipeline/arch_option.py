"""The hidden ``--arch`` option of the commands that build a backbone: timm architecture overrides
as a JSON object, so tests and demos run the real commands on tiny models."""
from __future__ import annotations

import json

import click


def parse_arch(ctx, param, value):
    """Click callback: the hidden --arch JSON object of timm architecture overrides (tiny test models)."""
    if value is None:
        return None
    try:
        arch = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not JSON ({e})") from None
    if not isinstance(arch, dict):
        raise click.BadParameter("must be a JSON object")
    return arch


arch_option = click.option("--arch", default=None, callback=parse_arch, hidden=True,
                           help="JSON of timm architecture overrides (tiny test models).")
