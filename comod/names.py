"""Names of the modulation kinds and sites (torch-free: configs and search
files are checked without importing torch).

Sites in forward order: the backbone's stages ``stem``, ``layer1`` ..
``layer4`` are modulated per channel; the pooled backbone output ``pool``
and the decoder's hidden layers ``decoder1``, ``decoder2``, ... per unit
(docs/method.md, "Modulation sites").
"""
from __future__ import annotations

import re

KINDS = ("none", "deterministic", "stochastic")
"""Modulation kinds, the choices of the config's ``modulation.kind``; :data:`comod.mechanisms.MECHANISMS`
maps each to its class, in the same order."""

BACKBONE_SITES = ("stem", "layer1", "layer2", "layer3", "layer4")
POOL_SITE = "pool"
_DECODER = re.compile(r"^decoder([1-9][0-9]*)$")


def site_names(decoder_depth: int) -> tuple[str, ...]:
    """Every site of a model whose decoder has ``decoder_depth`` hidden layers, in forward order."""
    return BACKBONE_SITES + (POOL_SITE,) + tuple(f"decoder{i}" for i in range(1, decoder_depth + 1))


def decoder_layer(site: str) -> int | None:
    """The decoder layer (1-based) a ``decoderN`` site names, else None."""
    match = _DECODER.match(site)
    return int(match.group(1)) if match else None


def is_site_name(site: str) -> bool:
    """Whether ``site`` names a site of some model (``decoderN`` for any N >= 1)."""
    return site in BACKBONE_SITES or site == POOL_SITE or decoder_layer(site) is not None


SITE_CHOICES = "stem, layer1, layer2, layer3, layer4, pool, decoder1 .. decoderN (N: len(model.decoder_hidden))"
