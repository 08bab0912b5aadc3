"""Gathers what ``bench/gpu.sh`` measured into DIR/gpu.json and a markdown table, DIR/gpu.md.

    python bench/gpu_report.py DIR

Reads DIR/steps.txt (each step's exit status and seconds) and the steps' JSON files; a step that
failed or wrote nothing is reported with the last lines of its log instead of figures. Published
anchors are set beside the training figures (they are other models on other GPUs: a scale, not a
target).
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

ANCHORS = [
    "NVIDIA's BERT-large pretraining (mixed precision, sequence length 128): about 580 sequences/s on one A100-80GB",
    "DeepSpeed's BERT-large pretraining: 64 TFLOP/s per V100",
]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def log_tail(out: Path, name: str, lines: int = 5) -> list[str]:
    try:
        return (out / f"{name}.log").read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def training_rows(name: str, run: dict) -> list[str]:
    model = run["model"]
    rates = run["samples_per_s"]
    shape = (f"hidden {model['hidden']}, {model['layers']} layers, {model['params'] / 1e6:.1f} M params; "
             f"batch {run['batch']}, {run['text']} tokens + {run['regions']} regions")
    rows = [
        f"| training, {name} ({shape}), {run['precision']}: trainer samples/s | {rates['trainer']:.1f} |",
        f"| ... bare PyTorch loop, samples/s | {rates['bare']:.1f} |",
        f"| ... (a) trainer / bare | {run['a_trainer_over_bare']:.2f} |",
    ]
    if "b_ours_over_visualbert" in run:
        rows.append(f"| ... (b) ours / VisualBertForPreTraining (bare loops) | {run['b_ours_over_visualbert']:.2f} |")
    rows.append(f"| ... (c) step FLOP/s / same-run matmul peak | {run['c_achieved_flops_per_s'] / 1e12:.1f} / "
                f"{run['c_matmul_peak_flops_per_s'] / 1e12:.1f} TFLOP/s = {run['c_utilisation']:.2f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    steps = {}
    for line in (out / "steps.txt").read_text().splitlines():
        name, rc, seconds = line.split()
        steps[name] = {"exit": int(rc), "seconds": int(seconds)}
    report: dict = {"machine": f"{platform.node()} ({platform.machine()})", "steps": steps, "anchors": ANCHORS}
    rows = ["| what | figure |", "|---|---|"]
    for name in steps:
        data = read_json(out / f"{name}.json")
        if steps[name]["exit"] != 0 or data is None:
            report[name] = {"failed": steps[name], "log_tail": log_tail(out, name)}
            rows.append(f"| {name} | failed (exit {steps[name]['exit']}): see {name}.log |")
            continue
        report[name] = data
        if name == "extract":
            for entry in data["results"]:
                if "images_per_s" in entry:
                    rows.append(f"| extraction, {entry['detector']} ({entry['precision']}, batch {entry['batch_size']}, "
                                f"{entry['detector_input']}), images/s | {entry['images_per_s']:.1f} |")
                else:
                    rows.append(f"| extraction, {entry['detector']} | {entry.get('skipped') or entry.get('failed')} |")
        elif name.startswith("train_"):
            rows += training_rows(name.removeprefix("train_"), data)
        elif name == "loader":
            rows.append(f"| loader, one worker ({data['shards']}, {data['text_length']} tokens), samples/s "
                        f"| {data['per_worker_samples_per_s']:.0f} |")
            rows.append(f"| ... workers needed for {data['target_samples_per_s']:.0f} samples/s "
                        f"(x{data['margin']} margin) | {data['workers_needed']} |")
        elif name == "zero":
            for row in data["rows"]:
                ratio = "" if row["config"] == "zero0" else (
                    f" ({row['model_states_ratio']:.2f}x / {row['peak_allocated_ratio']:.2f}x ZeRO-0)")
                rows.append(f"| ZeRO memory, {row['config']}, {data['nproc']} rank(s), {data['precision']}: model states / "
                            f"peak allocated per rank | {row['model_states'] / 2**30:.2f} / "
                            f"{row['peak_allocated'] / 2**30:.2f} GiB{ratio} |")
    rows += [f"| anchor | {anchor} |" for anchor in ANCHORS]
    (out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0 if all(step["exit"] == 0 for step in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
