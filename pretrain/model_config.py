"""The model's settings that the pretraining config names, without torch: ``POOLINGS`` (the
choices of ``model.pooling``), ``STAGE_OBJECTIVES`` (those of ``stages[].objectives``),
``ObjectiveWeights`` (the ``objectives:`` section) and ``CMGConfig`` (the ``cmg:`` section).

Kept apart from the model (``pretrain.model``) so that ``python -m pretrain`` checks a config,
and reports a mistake, before torch and transformers are imported.
"""

from __future__ import annotations

from dataclasses import dataclass

POOLINGS = ("cls", "mean")
# What a stage trains (``ImageBertForPretraining.forward``'s ``objectives``, ``set_trainable``):
# "all": the masked objectives, ITM and, with CMG's modules, CMG's objectives, every parameter;
# "masked": the masked objectives and ITM, CMG's modules (if any) left as they are;
# "cmg": CMG's objectives alone, on the frozen encoder (CMG's setting: its modules learn on the
# features of frozen pretrained encoders), no multimodal pass.
STAGE_OBJECTIVES = ("all", "masked", "cmg")


@dataclass
class ObjectiveWeights:
    mlm: float = 1.0
    moc: float = 1.0
    mrfr: float = 1.0
    itm: float = 1.0
    moc_kl: bool = False  # False: cross-entropy to the detector's top label; True: KL to its distribution (UNITER)


# CMG's losses (pretrain.cmg.CMGObjectives), each with its weight key in the ``cmg:`` section.
CMG_LOSSES = ("reconstruction", "commitment", "club", "club_approximation", "cross_cpc", "code_matching")
# The codebook's on/off behaviours (the paper's ablations), saved in the release with the shape.
CMG_SWITCHES = ("multimodal_ema", "code_reset")


@dataclass
class CMGConfig:
    """The ``cmg:`` section: CMG's objectives (a codebook shared by text and regions) on top of
    the masked-modelling ones; off by default. The loss weights and ``encoder_gradients`` are
    training settings; the codebook's shape, decay, dead-code threshold and the two switches are
    the model's (``module_fields``, saved in the release as ``ImageBertConfig.cmg``)."""

    enabled: bool = False
    reconstruction: float = 1.0
    commitment: float = 0.25  # VQ-VAE's beta, which CMG keeps
    # The I(z; s) upper bound the model minimises. Not CMG's weight of 1: here that collapses the
    # codebook (the regions all take one code, L_cmcm stays at chance), since shrinking z towards
    # a constant is the cheapest way down the bound; 0.1 still does, 0.01 keeps the codes apart
    # (docs/benchmarks.md, Cross-modal transfer).
    club: float = 0.01
    club_approximation: float = 1.0  # trains only the CLUB networks q(s | z)
    cross_cpc: float = 1.0
    code_matching: float = 1.0  # L_cmcm: a caption and its regions choose the same codes
    num_codes: int = 512
    code_dim: int = 256
    decay: float = 0.99
    dead_after: int = 300  # updates without a vector before a code is reset onto a live one
    # false (CMG's setting: its modules learn on the features of frozen pretrained encoders): CMG's
    # losses reach only CMG's modules, the unimodal passes run without gradient. true: they also train
    # the encoder, competing with the masked objectives.
    encoder_gradients: bool = False
    multimodal_ema: bool = True  # False: each vector alone pulls its code, no cross-modal counterpart
    code_reset: bool = True  # False: a dead code is never reset

    def __post_init__(self) -> None:
        _check_switches(vars(self))
        for name in CMG_LOSSES:
            if getattr(self, name) < 0:
                raise ValueError(f"cmg.{name} is a loss weight and must be >= 0, got {getattr(self, name)}")
        if self.num_codes < 2:
            raise ValueError(f"cmg.num_codes must be >= 2, got {self.num_codes}")
        if self.code_dim < 1:
            raise ValueError(f"cmg.code_dim must be >= 1, got {self.code_dim}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"cmg.decay must be in [0, 1), got {self.decay}")
        if self.dead_after < 1:
            raise ValueError(f"cmg.dead_after must be >= 1, got {self.dead_after}")

    def loss_weights(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in CMG_LOSSES}

    def module_fields(self) -> dict[str, float | int | bool] | None:
        """``ImageBertConfig.cmg``: what builds the modules, or None when CMG is off."""
        if not self.enabled:
            return None
        return {name: getattr(self, name) for name in ("num_codes", "code_dim", "decay", "dead_after", *CMG_SWITCHES)}


def complete_module_fields(fields: dict) -> dict:
    """``fields`` (``ImageBertConfig.cmg``, e.g. a release's ``config.json``) with each switch it
    lacks at its default: a release written before the switches existed trained with the
    defaults, the paper's behaviour."""
    completed = {**{name: getattr(CMGConfig, name) for name in CMG_SWITCHES}, **fields}
    _check_switches(completed)
    return completed


def _check_switches(fields: dict) -> None:
    for name in CMG_SWITCHES:
        if not isinstance(fields[name], bool):
            raise ValueError(f"cmg.{name} must be true or false, got {fields[name]!r}")
