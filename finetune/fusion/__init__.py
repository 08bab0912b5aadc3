"""Fusion strategies as attention-routing variants over the layers of the one pretrained encoder.

``finetune.fusion.build.build_fusion(cfg, encoder, task)`` wraps a release's ``ImageBertModel`` (its
layers, embeddings and pooler are reused; only MBT's per-modality layers and MI2P's frozen
foreign extractor are copies, as their papers have it) in the strategy ``cfg.name`` names.
Every strategy embeds both modalities the same way (``routing.FusionEncoder``) and implements
only its ``route``; each returns a ``FusedOutput`` with the same fields, so any task head runs
with any strategy. docs/fusion.md describes the design, how each paper maps onto it, and every
config key. Importing this package loads only the config (no torch).
"""

from finetune.fusion.config import FUSION_STRATEGIES, STRATEGY_NAMES, FusionConfig

__all__ = ["FUSION_STRATEGIES", "STRATEGY_NAMES", "FusionConfig"]
