"""The backbone registry: one module per backbone, each registering a ``Backbone``.

A backbone says which parameters it has (after the shared item tables ``item_emb`` and
``item_bias``), which of them are its head, a key only it has (how a parameter dict is
recognised), and how it turns windows and candidates into logits. Adding one: a module
here that calls ``register(Backbone(...))``, and its name in the import list below.
"""
from devices.backbones.registry import REGISTRY, Backbone, register  # noqa: F401

# Registration order is the order of ``devices.models.BACKBONES``.
from devices.backbones import gru4rec, din, sasrec  # noqa: E402,F401
