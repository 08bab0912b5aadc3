"""Fusion strategies as attention-routing variants over the layers of the one pretrained encoder.

``build_fusion(cfg, encoder)`` wraps a release's ``ImageBertModel`` (its layers, embeddings and
pooler are reused, never copied) in the strategy ``cfg.name`` names. Every strategy returns a
``FusedOutput`` with the same fields, so any task head runs with any strategy. docs/fusion.md
describes the design, how each paper maps onto it, and every config key.
"""

from __future__ import annotations

from finetune.fusion.config import STRATEGY_NAMES, FusionConfig
from finetune.fusion.late import LateFusion
from finetune.fusion.mbt import BottleneckFusion
from finetune.fusion.mi2p import InjectionFusion
from finetune.fusion.muse import ExchangeFusion
from finetune.fusion.routing import FusedOutput, FusionEncoder
from finetune.fusion.single_stream import SingleStreamFusion
from pretrain.model import ImageBertModel

__all__ = ["STRATEGY_NAMES", "FusedOutput", "FusionConfig", "FusionEncoder", "build_fusion"]


def build_fusion(cfg: FusionConfig, encoder: ImageBertModel) -> FusionEncoder:
    """The strategy ``cfg.name`` over ``encoder``'s pretrained layers; depth defaults resolved here."""
    cfg = cfg.resolved(encoder.config.num_hidden_layers)
    if cfg.name == "single_stream":
        return SingleStreamFusion(encoder)
    if cfg.name == "late":
        return LateFusion(encoder)
    if cfg.name == "mbt":
        return BottleneckFusion(encoder, cfg)
    if cfg.name == "muse":
        return ExchangeFusion(encoder, cfg)
    if cfg.name == "mi2p":
        return InjectionFusion(encoder, cfg)
    raise ValueError(f"fusion.name is {cfg.name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
