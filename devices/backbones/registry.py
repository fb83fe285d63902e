"""The backbone type and registry (see ``devices.backbones``)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Backbone:
    """One recommender backbone (all functions take params with a leading model dim M)."""

    name: str
    marker: str  # a parameter only this backbone has
    shapes: Callable[[Any], dict[str, tuple[int, ...]]]  # spec -> its parameters' shapes (item tables excluded)
    head_keys: tuple[str, ...]  # DUET's dynamic part; the rest is the body
    logits: Callable[..., torch.Tensor]  # (params, windows (M,N,L), candidates (M,N,C)) -> (M,N,C)
    # the body's output (M, N, d) when it does not look at the candidate, else None (DIN)
    body: Callable[..., torch.Tensor] | None = None
    head1_width: Callable[[Any], int] | None = None  # width after the first head layer (default: dim)
    check: Callable[[Any], None] | None = None  # extra checks of a ModelSpec


REGISTRY: dict[str, Backbone] = {}


def get(name: str) -> Backbone:
    """The backbone called ``name``: a registered one, or the import path
    ``package.module:NAME`` of a ``Backbone`` (imported on first use, in whichever process
    asks -- the driver or a host -- and registered under that path). ``KeyError`` says why not."""
    backbone = REGISTRY.get(name)
    if backbone is None and isinstance(name, str) and ":" in name:
        from devices.errors import ConfigError
        from devices.settings import load_object

        try:
            backbone = load_object(name, "model.backbone", "a Backbone")
        except ConfigError as exc:
            raise KeyError(exc.allowed) from None
        if not isinstance(backbone, Backbone):
            raise KeyError(f"{name} is not a devices.backbones.Backbone")
        backbone = REGISTRY[name] = replace(backbone, name=name)
    if backbone is None:
        raise KeyError(f"one of {', '.join(REGISTRY)}, or the import path 'package.module:NAME' of a Backbone")
    return backbone


def register(backbone: Backbone) -> Backbone:
    if backbone.name in REGISTRY:
        raise ValueError(f"backbone {backbone.name!r} is registered twice")
    REGISTRY[backbone.name] = backbone
    return backbone
