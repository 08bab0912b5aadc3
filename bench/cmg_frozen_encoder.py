"""CMG's modules trained on a frozen pretrained encoder (the paper's setting), and the transfer
their codes give: a diagnostic of the objectives apart from pretraining.

CMG (Xia et al., NeurIPS 2023) trains its semantic and specific encoders, codebook, CLUB and
Cross-CPC networks on the features of frozen pretrained unimodal encoders. This bench does that
with a release's encoder: each sample's caption alone and its regions alone go once through the
frozen encoder (``encode_each_alone``, as ``ImageBertForPretraining.cmg_losses`` does), and CMG's
modules (``build_cmg_objectives``, the codebook of ``bench/cmg_transfer.py``) train in-process on
those fixed states (AdamW at ``bench-small.yaml``'s peak lr, gradients clipped to 1, the EMA
codebook moving as in pretraining), with the loss weights of ``CMGConfig`` and the variant's
changes:

- training states: 1,000 scenes of the release's pretraining features (``--features``, shards
  00000-00004, as ``configs/pretrain/bench-small.yaml`` trains on, read with its ``data`` settings);
- probe: the ``shape`` task (``finetune.synth_tasks``, 1,000 train / 300 test, extracted through
  the same network, ``project_runs.prepare_task``, read with ``cross-modal-text-to-image.yaml``'s
  ``data`` and ``task`` settings); a linear head on the mean of one modality's
  codes (or semantic vectors, or encoder states) is fitted on the train split and tested on the
  other modality's test split (text→image, image→text), and on the same one as a control.

Not the trainer: the head is fitted full-batch here (300 Adam steps, lr 1e-2, as the
``cross-modal-*`` fine-tuning configs' schedule); ``bench/cmg_transfer.py`` runs the protocol
through ``python -m finetune`` on releases pretrained with CMG.

    .venv/bin/python bench/cmg_frozen_encoder.py --work /tmp/cmg-frozen --release RELEASE --features FEATURES
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cmg_transfer import CODEBOOK  # noqa: E402  (bench/, this script's directory)
from project_runs import PRETRAIN_CONFIG, prepare_task  # noqa: E402

PROBE_CONFIG = REPO / "configs" / "finetune" / "cross-modal-text-to-image.yaml"
VARIANTS = {  # name -> loss weights changed from CMGConfig's defaults
    "CLUB weight 1 (CMG's)": {"club": 1.0},
    "CLUB weight 0.1": {"club": 0.1},
    "default (CLUB weight 0.01)": {},
    "without CLUB": {"club": 0.0, "club_approximation": 0.0},
    "without Cross-CPC": {"cross_cpc": 0.0},
    "without L_cmcm": {"code_matching": 0.0},
}
DIRECTIONS = (("text", "image"), ("image", "text"), ("text", "text"), ("image", "image"))


def unimodal_states(release, batches) -> dict[str, torch.Tensor]:
    """Each sample's caption alone and regions alone through the frozen encoder, padded to the
    longest of all batches."""
    encoder = release.model.imagebert.eval()
    parts: dict[str, list] = {"text": [], "text_mask": [], "regions": [], "region_mask": [], "geometry": []}
    with torch.no_grad():
        for b in batches:
            text, regions = encoder.encode_each_alone(
                b["input_ids"], b["attention_mask"], b["region_features"], b["region_geometry"], b["region_mask"])
            parts["text"].append(text)
            parts["regions"].append(regions)
            parts["text_mask"].append(b["attention_mask"].bool())
            parts["region_mask"].append(b["region_mask"].bool())
            parts["geometry"].append(b["region_geometry"])
    out = {}
    for name, tensors in parts.items():
        length = max(t.shape[1] for t in tensors)
        out[name] = torch.cat([F.pad(t, (0, 0) * (t.dim() - 2) + (0, length - t.shape[1])) for t in tensors])
    return out


def pretraining_states(release, features: Path, data) -> dict[str, torch.Tensor]:
    from pretrain.data import pad_captions, pad_regions, read_eval_samples

    samples = read_eval_samples(str(features / "{00000..00004}.tar"), release.tokenizer, release.feature_spec, data, 1000)
    batches = [{**pad_captions(samples[i:i + 100], release.tokenizer.pad_token_id), **pad_regions(samples[i:i + 100])}
               for i in range(0, len(samples), 100)]
    return unimodal_states(release, batches)


def task_states(release, root: Path, split: str, probe_config) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    from finetune.data import TaskCollate, read_samples

    samples = read_samples(str(root / split / "00000.tar"), release.tokenizer, release.feature_spec, probe_config.data, probe_config.task)
    collate = TaskCollate(release.tokenizer.pad_token_id, probe_config.task)
    batches = [collate(samples[i:i + 100]) for i in range(0, len(samples), 100)]
    return unimodal_states(release, batches), torch.cat([b["labels"] for b in batches])


def train_cmg(states: dict[str, torch.Tensor], weights: dict[str, float], model_config, lr: float, steps: int, seed: int, log):
    """CMG's modules of ``model_config.cmg``, trained on ``states`` for ``steps`` batches of 32."""
    from pretrain.model import build_cmg_objectives

    torch.manual_seed(seed)  # the modules' initialisation and the batches (the codebook has its own seed)
    cmg = build_cmg_objectives(model_config)
    optimizer = torch.optim.AdamW(cmg.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    cmg.train()
    for step in range(1, steps + 1):
        rows = torch.randint(0, len(states["text"]), (32,), generator=generator)
        losses, stats = cmg(*(states[k][rows] for k in ("text", "text_mask", "regions", "region_mask", "geometry")))
        optimizer.zero_grad()
        sum(weights[name] * loss for name, loss in losses.items()).backward()
        torch.nn.utils.clip_grad_norm_(cmg.parameters(), 1.0)
        optimizer.step()
        if step % 250 == 0 or step == steps:
            log(f"  step {step}: " + ", ".join(f"{k}={v.item():.3g}" for k, v in {**losses, **stats}.items()))
    return cmg.eval(), {k: v.item() for k, v in {**losses, **stats}.items()}


def pooled(cmg, states: dict[str, torch.Tensor], modality: str, representation: str) -> torch.Tensor:
    """One modality's mean codes, semantic vectors or encoder states (``CrossModalTransfer.represent``'s pooling)."""
    from pretrain.model import masked_mean

    vectors, mask = (states["text"], states["text_mask"]) if modality == "text" else (states["regions"], states["region_mask"])
    with torch.no_grad():
        if representation != "hidden":
            vectors, _ = (cmg.text if modality == "text" else cmg.regions)(vectors)
            if representation == "codes":
                vectors = cmg.codebook.codes(vectors)
    return masked_mean(vectors, mask)


def probe(train_x, train_y, test_x, test_y, classes: int) -> float:
    """Test accuracy (%) of a linear head fitted full-batch on (train_x, train_y)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        F.cross_entropy(head(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return (head(test_x).argmax(1) == test_y).float().mean().item() * 100


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="the shape task's data (reused across runs)")
    parser.add_argument("--release", type=Path, required=True, help="a release pretrained without CMG")
    parser.add_argument("--features", type=Path, required=True, help="its pretraining features (training states; "
                        "the probe task's extraction loads their batch-norm calibration)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=1000, help="CMG training steps (batch 32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from finetune.config import FinetuneConfig
    from preprocess.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.model_config import CMGConfig, complete_module_fields
    from pretrain.release import load_release

    pretraining = load_config(PretrainConfig, PRETRAIN_CONFIG)
    probe_config = load_config(FinetuneConfig, PROBE_CONFIG)
    release = load_release(args.release)
    model_config = copy.deepcopy(release.model.config)
    model_config.cmg = complete_module_fields(CMGConfig(enabled=True, **CODEBOOK).module_fields())
    root = prepare_task("shape", args.work.resolve(), 1000, 300, args.features.resolve())
    training = pretraining_states(release, args.features, pretraining.data)
    (train, train_y), (test, test_y) = (task_states(release, root, split, probe_config) for split in ("train", "test"))
    chance = (test_y == test_y.mode().values).float().mean().item() * 100
    classes = len(probe_config.task.label_names)
    rows = []
    for name in args.variants:
        start = time.perf_counter()
        print(f"{name}:", flush=True)
        weights = {**CMGConfig().loss_weights(), **VARIANTS[name]}
        cmg, last = train_cmg(training, weights, model_config, pretraining.stages[0].lr, args.steps, args.seed,
                              lambda line: print(line, flush=True))
        for representation in ("codes", "semantic") + (("hidden",) if name == args.variants[0] else ()):
            accuracy = [probe(pooled(cmg, train, a, representation), train_y, pooled(cmg, test, b, representation), test_y, classes)
                        for a, b in DIRECTIONS]
            label = "encoder states (no CMG)" if representation == "hidden" else f"{name} ({representation})"
            rows.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in accuracy) + " | "
                        + (f"{last['code_matching']:.2f} | {last['perplexity_text']:.1f} / {last['perplexity_regions']:.1f} |"
                           if representation != "hidden" else "- | - |"))
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    print(f"\nchance (the test set's majority shape): {chance:.1f} %")
    print("| CMG trained on the frozen encoder (what the head reads) | text→image | image→text | text→text | image→image "
          "| L_cmcm, last batch (chance ln 32 = 3.47) | code perplexity text / regions |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
