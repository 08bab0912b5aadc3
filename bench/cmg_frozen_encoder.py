"""CMG's modules trained on a frozen pretrained encoder (the paper's setting), and the transfer
their codes give: a diagnostic of the objectives apart from pretraining.

CMG (Xia et al., NeurIPS 2023) trains its semantic and specific encoders, codebook, CLUB and
Cross-CPC networks on the features of frozen pretrained unimodal encoders. This bench does that
with a release's encoder: each sample's caption alone and its regions alone go once through the
frozen encoder (``encode_alone``, as ``ImageBertForPretraining.cmg_losses`` does), and
``pretrain.cmg.CMGObjectives`` trains in-process on those fixed states (AdamW, gradients clipped
to 1, the EMA codebook moving as in pretraining), with the loss weights of ``CMGConfig`` and the
variant's changes:

- training states: 1,000 scenes of the release's pretraining features (``--features``, shards
  00000-00004, as ``configs/pretrain/bench-small.yaml`` trains on);
- probe: the ``shape`` task (``finetune.synth_tasks``, 1,000 train / 300 test, extracted through
  the same network, ``project_runs.prepare_task``); a linear head on the mean of one modality's
  codes (or semantic vectors, or encoder states) is fitted on the train split and tested on the
  other modality's test split (text→image, image→text), and on the same one as a control.

Not the trainer: the head is fitted full-batch here (300 Adam steps, lr 1e-2, as the
``cross-modal-*`` fine-tuning configs' schedule); ``bench/cmg_transfer.py`` runs the protocol
through ``python -m finetune`` on releases pretrained with CMG.

    .venv/bin/python bench/cmg_frozen_encoder.py --work /tmp/cmg-frozen --release RELEASE --features FEATURES
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from project_runs import prepare_task  # noqa: E402  (bench/, this script's directory)

CODEBOOK = {"num_codes": 64, "code_dim": 64, "dead_after": 100}  # bench/cmg_transfer.py's CMG_ON
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
            parts["text"].append(encoder.encode_alone(encoder.embed_tokens(b["input_ids"], segment=0), b["attention_mask"]))
            parts["regions"].append(encoder.encode_alone(
                encoder.embed_regions(b["region_features"].float(), b["region_geometry"]), b["region_mask"]))
            parts["text_mask"].append(b["attention_mask"].bool())
            parts["region_mask"].append(b["region_mask"].bool())
            parts["geometry"].append(b["region_geometry"])
    out = {}
    for name, tensors in parts.items():
        length = max(t.shape[1] for t in tensors)
        out[name] = torch.cat([F.pad(t, (0, 0) * (t.dim() - 2) + (0, length - t.shape[1])) for t in tensors])
    return out


def pretraining_states(release, features: Path) -> dict[str, torch.Tensor]:
    from pretrain.data import pad_captions, pad_regions, read_eval_samples
    from pretrain.data_config import DataConfig

    data = DataConfig(max_text_length=32, max_regions=10)  # configs/pretrain/bench-small.yaml's
    samples = read_eval_samples(str(features / "{00000..00004}.tar"), release.tokenizer, release.feature_spec, data, 1000)
    batches = [{**pad_captions(samples[i:i + 100], release.tokenizer.pad_token_id), **pad_regions(samples[i:i + 100])}
               for i in range(0, len(samples), 100)]
    return unimodal_states(release, batches)


def task_states(release, root: Path, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    from finetune.config import DataConfig, TaskConfig
    from finetune.data import TaskCollate, read_samples

    task = TaskConfig(name="classification", label_names=["circle", "square", "triangle", "cross", "star"])
    data = DataConfig(train="-", max_text_length=40, max_regions=10)  # configs/finetune/cross-modal-*.yaml's
    samples = read_samples(str(root / split / "00000.tar"), release.tokenizer, release.feature_spec, data, task)
    collate = TaskCollate(release.tokenizer.pad_token_id, task)
    batches = [collate(samples[i:i + 100]) for i in range(0, len(samples), 100)]
    return unimodal_states(release, batches), torch.cat([b["labels"] for b in batches])


def train_cmg(states: dict[str, torch.Tensor], weights: dict[str, float], hidden: int, steps: int, seed: int, log):
    from pretrain.cmg import CMGObjectives

    torch.manual_seed(seed)
    dim = CODEBOOK["code_dim"]
    cmg = CMGObjectives(hidden, num_codes=CODEBOOK["num_codes"], code_dim=dim, specific_dim=dim, club_hidden=dim,
                        cpc_context=dim, dead_after=CODEBOOK["dead_after"], seed=seed)
    optimizer = torch.optim.AdamW(cmg.parameters(), lr=5e-4, weight_decay=0.01)  # bench-small.yaml's peak lr
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
    vectors, mask = (states["text"], states["text_mask"]) if modality == "text" else (states["regions"], states["region_mask"])
    with torch.no_grad():
        if representation != "hidden":
            vectors, _ = (cmg.text if modality == "text" else cmg.regions)(vectors)
            if representation == "codes":
                vectors = cmg.codebook.codes(vectors)
    weights = mask.float()[..., None]
    return (vectors * weights).sum(1) / weights.sum(1).clamp(min=1)


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

    from pretrain.model_config import CMGConfig
    from pretrain.release import load_release

    release = load_release(args.release)
    root = prepare_task("shape", args.work.resolve(), 1000, 300, args.features.resolve())
    training = pretraining_states(release, args.features)
    (train, train_y), (test, test_y) = task_states(release, root, "train"), task_states(release, root, "test")
    chance = (test_y == test_y.mode().values).float().mean().item() * 100
    hidden = training["text"].shape[-1]
    rows = []
    for name in args.variants:
        start = time.perf_counter()
        print(f"{name}:", flush=True)
        weights = {**CMGConfig().loss_weights(), **VARIANTS[name]}
        cmg, last = train_cmg(training, weights, hidden, args.steps, args.seed, lambda line: print(line, flush=True))
        for representation in ("codes", "semantic") + (("hidden",) if name == args.variants[0] else ()):
            accuracy = [probe(pooled(cmg, train, a, representation), train_y, pooled(cmg, test, b, representation), test_y, 5)
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
