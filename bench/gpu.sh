#!/usr/bin/env bash
# One machine's figures in one go: extraction, training, the loader and ZeRO memory.
#
#   bench/gpu.sh --out DIR             # on a machine with one GPU: about 3 minutes on an H200
#   bench/gpu.sh --cpu-smoke --out DIR # anywhere: tiny sizes, every script once (the test suite runs it)
#
# Writes DIR/gpu.json (every step's figures, exit status and seconds) and DIR/gpu.md (the
# table docs/benchmarks.md shows), plus each benchmark's own JSON and log in DIR:
#
#   extract.json   bench/extract_speed.py: detector images/s, torchvision ResNet-50 FPN and
#                  detectron2 ResNet-101 C4, backbone in fp32 and in bf16 (skipped, with the reason, where detectron2 is missing;
#                  bench/device_bundle.sh makes a .d2/ that needs no compiled extension)
#   train_ref.json bench/pretrain.py at the reference shape (hidden 384, 6 layers, 2048-d regions,
#                  40 tokens + 36 regions, batch 32), bf16 where the device has it, fused AdamW
#   train_base.json the same at BERT-base (hidden 768, 12 layers, 12 heads), batch 64
#   loader.json    bench/pretrain_data.py: samples/s of one loader worker at the GPU shape (2048-d
#                  float16 features, 36 regions, 40 tokens), against the BERT-base step's rate
#   zero.json      bench/zero_memory.py: per-rank peak memory at ZeRO-0/2/3 and ZeRO-2 with the
#                  optimizer offloaded, on as many ranks as there are GPUs (one GPU: partitioning
#                  saves nothing on one rank, only offloading shows)
#
# Uses `python3` (or $PYTHON); packages that python lacks can be put on PYTHONPATH. Each step
# runs under `timeout` so a hang costs one figure, not the run; a failed step is recorded in
# gpu.json with its log's last lines and the others still run.
set -uo pipefail

OUT=""
SMOKE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument $1 (use --out DIR [--cpu-smoke])" >&2; exit 2 ;;
  esac
done
[[ -n "$OUT" ]] || { echo "bench/gpu.sh: --out DIR is required" >&2; exit 2; }
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu
  [[ $SMOKE == 1 ]] || echo "bench/gpu.sh: no GPU visible to $PY; the figures are the CPU's" >&2
fi

# name, time limit (s), command...: runs one benchmark, its output in $OUT/NAME.log
step() {
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  echo "== $name: $*" >&2
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $((SECONDS - start))" >>"$OUT/steps.txt"
  [[ $rc == 0 ]] || { echo "== $name failed (exit $rc), last lines of $OUT/$name.log:" >&2; tail -5 "$OUT/$name.log" >&2; }
}
: >"$OUT/steps.txt"

if [[ $SMOKE == 1 ]]; then
  TINY=(--hidden 32 --layers 1 --heads 2 --vocab 1000 --feature-dim 64 --batch 4 --text 8 --regions 4
        --steps 1 --rounds 1 --warmup 1 --skip-visualbert)
  step extract 300 "$PY" bench/extract_speed.py --quick --device cpu --detector torchvision:fasterrcnn_resnet50_fpn \
    --json "$OUT/extract.json"
  # (train_base runs the same script at other sizes: at tiny sizes it would repeat train_ref)
  step train_ref 300 "$PY" bench/pretrain.py "${TINY[@]}" --out "$OUT/train_ref.json"
  step loader 300 "$PY" bench/pretrain_data.py --regions 4 --feature-dim 64 --max-text-length 8 --batches 3 --repeats 1 \
    --num-workers 1 --target-rate 100 --json "$OUT/loader.json"
  step zero 300 "$PY" bench/zero_memory.py --quick --nproc 2 --configs zero0,zero3 --json "$OUT/zero.json"
else
  step extract 180 "$PY" bench/extract_speed.py --json "$OUT/extract.json" --batches 6 --precision fp32 bf16 \
    --detector torchvision:fasterrcnn_resnet50_fpn --detector detectron2:COCO-Detection/faster_rcnn_R_101_C4_3x.yaml
  step train_ref 75 "$PY" bench/pretrain.py --text 40 --regions 36 --feature-dim 2048 --precision auto \
    --steps 20 --rounds 3 --warmup 3 --out "$OUT/train_ref.json"
  step train_base 90 "$PY" bench/pretrain.py --hidden 768 --layers 12 --heads 12 --batch 64 --text 40 --regions 36 \
    --feature-dim 2048 --precision auto --steps 10 --rounds 3 --warmup 3 --out "$OUT/train_base.json"
  RATE=$("$PY" -c "import json,sys; print(round(json.load(open(sys.argv[1]))['samples_per_s']['trainer']))" \
    "$OUT/train_base.json" 2>/dev/null || echo 3000)
  step loader 75 "$PY" bench/pretrain_data.py --num-workers 1 --target-rate "$RATE" --json "$OUT/loader.json"
  NPROC=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")
  step zero 150 "$PY" bench/zero_memory.py --nproc "$NPROC" --precision bf16 --json "$OUT/zero.json"
fi

"$PY" bench/gpu_report.py "$OUT"
