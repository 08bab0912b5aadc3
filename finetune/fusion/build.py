"""``build_fusion``: the strategy a ``fusion:`` config names, over a release's encoder."""

from __future__ import annotations

from finetune.fusion.config import STRATEGY_NAMES, FusionConfig
from finetune.fusion.late import LateFusion
from finetune.fusion.mbt import BottleneckFusion
from finetune.fusion.mi2p import InjectionFusion
from finetune.fusion.muse import ExchangeFusion
from finetune.fusion.routing import FusionEncoder
from finetune.fusion.single_stream import SingleStreamFusion
from pretrain.model import ImageBertModel


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
