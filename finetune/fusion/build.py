"""``build_fusion``: the strategy a ``fusion:`` config names, over a release's encoder."""

from __future__ import annotations

from finetune.fusion.config import STRATEGY_NAMES, FusionConfig
from finetune.fusion.cross_modal import CrossModalTransfer
from finetune.fusion.late import LateFusion
from finetune.fusion.mbt import BottleneckFusion
from finetune.fusion.mi2p import InjectionFusion
from finetune.fusion.muse import ExchangeFusion
from finetune.fusion.routing import FusionEncoder
from finetune.fusion.single_stream import SingleStreamFusion
from pretrain.cmg import CMGObjectives
from pretrain.model import ImageBertModel, build_cmg_objectives


def build_fusion(cfg: FusionConfig, encoder: ImageBertModel, task: str, cmg: CMGObjectives | None = None) -> FusionEncoder:
    """The strategy ``cfg.name`` over ``encoder``'s pretrained layers (and, for ``cross_modal``, the
    release's CMG modules ``cmg``) for task ``task``; depth defaults resolved here."""
    cfg = cfg.resolved(encoder.config.num_hidden_layers)
    if cfg.name == "cross_modal":
        if task not in ("classification", "multilabel", "sentiment", "retrieval"):
            raise ValueError(f"fusion.name cross_modal pools whole sequences; it has no per-word states for task {task!r}")
        # A release's own modules, or (a fine-tuned model being loaded) new ones its weights fill.
        cmg = cmg if cmg is not None else build_cmg_objectives(encoder.config)
        return CrossModalTransfer(encoder, cfg, cmg, retrieval=task == "retrieval")
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
