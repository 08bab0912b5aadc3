"""The ``fusion:`` section of a fine-tuning config: which strategy, and its knobs.

Layer-index defaults depend on the encoder's depth, which the config does not know; they stay
``None`` here and ``resolved(num_layers)`` fills them in once the release is loaded (and
checks explicit values against the depth). docs/fusion.md explains every key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# The strategies that fuse both modalities (any task, any release) ...
FUSION_STRATEGIES = ("single_stream", "mbt", "muse", "mi2p", "late")
# ... and every fusion.name: cross_modal reads one modality at a time (CMG's protocol; no NER).
STRATEGY_NAMES = (*FUSION_STRATEGIES, "cross_modal")
MBT_PARAMETERS = ("per_modality", "shared")
MBT_CLASSIFIERS = ("shared", "per_modality")
MI2P_FOREIGN = ("frozen_copy", "shared")
CROSS_MODAL_MODALITIES = ("text", "image")
CROSS_MODAL_REPRESENTATIONS = ("codes", "semantic", "hidden")


@dataclass
class FusionConfig:
    name: str = "single_stream"  # single_stream | mbt | muse | mi2p | late | cross_modal

    # MBT (Nagrani et al. 2021): B bottleneck tokens from layer L_f on (0-based layer index).
    mbt_bottlenecks: int = 4  # B; 0 lets nothing cross between the modalities
    mbt_fusion_layer: int | None = None  # L_f; None -> min(round(2/3 * num_layers), num_layers - 2), the paper's mid fusion
    mbt_parameters: str = "per_modality"  # per_modality: the image stream runs its own copy of the layers (the paper's) | shared
    mbt_classifier: str = "shared"  # shared: one linear on both [CLS], logits averaged (the paper's) | per_modality

    # MuSE (Zhu et al. 2023): token exchange in layers mu..eta (0-based, inclusive).
    muse_exchange_start: int | None = None  # mu; None -> max(1, num_layers // 6) (MuSE's run scripts: 1 of 6)
    muse_exchange_end: int | None = None  # eta; None -> max(mu, num_layers // 2) (MuSE's run scripts: 3 of 6)
    # theta: the tokens whose [CLS] attention lies below this quantile are exchanged (MuSE's --use_quantile rule)
    muse_exchange_quantile: float = 0.1  # MuSE's run scripts: 0.1
    muse_caption_weight: float = 0.001  # alpha: captioning from region embeddings; 0 disables (no decoder built)
    muse_generation_weight: float = 0.001  # beta: region-feature generation from text; 0 disables
    muse_aux_noise: float = 1.0  # std of the Gaussian noise added to embeddings before the decoders (training only)

    # MI2P (Liang et al. 2022): injection plug-ins after every layer of each host stream.
    mi2p_heads: int = 4  # attention heads of each plug-in; must divide hidden_size
    # frozen_copy: the foreign extractor is a frozen copy of the pretrained encoder (the paper's) |
    # shared: the host's own (fine-tuned) encoder, run without gradient
    mi2p_foreign: str = "frozen_copy"

    # CMG's cross-modal generalisation protocol (Xia et al. 2023; finetune/fusion/cross_modal.py):
    # the frozen release reads one modality at a time; the head trains on one and is tested on the other.
    cross_modal_train: str = "text"  # the modality training batches are read through: text | image
    cross_modal_eval: str | None = None  # the modality evaluation reads; None -> the other one
    # what the head reads, mean-pooled: codes (quantised semantic vectors, the paper's) | semantic | hidden
    # (the encoder's states: a release pretrained without CMG's objectives has nothing else)
    cross_modal_representation: str = "codes"

    def __post_init__(self) -> None:
        if self.name not in STRATEGY_NAMES:
            raise ValueError(f"fusion.name is {self.name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
        for key, choices in (
            ("mbt_parameters", MBT_PARAMETERS), ("mbt_classifier", MBT_CLASSIFIERS), ("mi2p_foreign", MI2P_FOREIGN),
            ("cross_modal_train", CROSS_MODAL_MODALITIES), ("cross_modal_representation", CROSS_MODAL_REPRESENTATIONS),
        ):
            if getattr(self, key) not in choices:
                raise ValueError(f"fusion.{key} is {getattr(self, key)!r}; choose one of {', '.join(choices)}")
        if self.cross_modal_eval is not None and self.cross_modal_eval not in CROSS_MODAL_MODALITIES:
            raise ValueError(
                f"fusion.cross_modal_eval is {self.cross_modal_eval!r}; choose one of {', '.join(CROSS_MODAL_MODALITIES)} "
                "(or null: the modality training did not read)"
            )
        if self.mbt_bottlenecks < 0:
            raise ValueError(f"fusion.mbt_bottlenecks is {self.mbt_bottlenecks}; use 0 or more (paper: 4)")
        for key in ("mbt_fusion_layer", "muse_exchange_start", "muse_exchange_end"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ValueError(f"fusion.{key} is {value}; layer indices are 0-based and non-negative")
        if not 0.0 <= self.muse_exchange_quantile <= 1.0:
            raise ValueError(f"fusion.muse_exchange_quantile is {self.muse_exchange_quantile}; use a value in [0, 1]")
        for key in ("muse_caption_weight", "muse_generation_weight", "muse_aux_noise"):
            if getattr(self, key) < 0:
                raise ValueError(f"fusion.{key} is {getattr(self, key)}; use 0 or more")
        if self.mi2p_heads < 1:
            raise ValueError(f"fusion.mi2p_heads is {self.mi2p_heads}; use 1 or more")

    def resolved(self, num_layers: int) -> "FusionConfig":
        """A copy with depth-dependent defaults filled in, checked against ``num_layers``."""
        # MBT's default: two thirds of the depth, but leave at least one layer after L_f, since the
        # text first sees what the image wrote into the bottlenecks one layer after they are written.
        default_fusion = min(round(2 * num_layers / 3), max(0, num_layers - 2))
        fusion_layer = self.mbt_fusion_layer if self.mbt_fusion_layer is not None else default_fusion
        start = self.muse_exchange_start if self.muse_exchange_start is not None else max(1, num_layers // 6)
        start = min(start, num_layers - 1) if self.muse_exchange_start is None else start
        end = self.muse_exchange_end if self.muse_exchange_end is not None else max(start, num_layers // 2)
        if fusion_layer > num_layers:
            raise ValueError(
                f"fusion.mbt_fusion_layer is {fusion_layer} but the encoder has {num_layers} layers; "
                f"use 0..{num_layers} ({num_layers} means no fusion layer: late fusion)"
            )
        if self.name == "muse" and not start <= end < num_layers:
            raise ValueError(
                f"fusion.muse_exchange_start={start}, muse_exchange_end={end} with {num_layers} layers; "
                f"need 0 <= start <= end <= {num_layers - 1}"
            )
        return replace(self, mbt_fusion_layer=fusion_layer, muse_exchange_start=start, muse_exchange_end=end)
