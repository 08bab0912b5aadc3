#!/usr/bin/env bash
# Prepare .d2/ in the repo root: detectron2 as plain Python source plus the dependencies a bare
# GPU image lacks, so that `PYTHONPATH=.d2 python bench/extract_speed.py` can run detectron2
# models on a machine without detectron2, internet or a package registry.
#
#   bench/device_bundle.sh DETECTRON2_SOURCE   # a detectron2 checkout, or its (bare) git dir
#
# No compiled extension (detectron2._C) goes in: Faster R-CNN R101-C4 / R50-FPN inference does
# not use it (detectron2 calls torchvision's nms and roi_align; _C serves only deformable conv,
# rotated boxes and the fast COCO evaluator). What goes in:
#   detectron2/                 the package, with model_zoo/configs copied from the repo's configs/
#                               (setup.py does that copy on install; model_zoo.get_config_file
#                               looks there through pkg_resources)
#   fvcore, antlr4 (4.9.3)      source from their sdists (no wheels exist on the registry)
#   iopath, yacs, termcolor, omegaconf   pure-Python wheels, unpacked
#   setuptools<81               for pkg_resources, which detectron2.model_zoo imports (81 removed it)
#   pycocotools                 manylinux x86_64 wheel for CPython >= $PYVER (abi3), imported by
#                               detectron2.structures.masks
# Assumed already on the GPU image: numpy, pillow, pyyaml, tabulate, tqdm, cloudpickle,
# portalocker, packaging (via matplotlib/transformers). hydra-core is not needed for these models.
# .d2/ is listed in .git/info/exclude (not committed); pass it to the device run as carried.
set -euo pipefail

SRC=${1:?usage: bench/device_bundle.sh DETECTRON2_SOURCE (checkout or git dir)}
PYTHON=${PYTHON:-python3}
PYVER=${PYVER:-3.12}  # the GPU image's CPython (pycocotools' abi3 wheel needs >= this)
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$REPO/.d2
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

rm -rf "$OUT"
mkdir -p "$OUT" "$TMP/src" "$TMP/dl"

# detectron2 source: a checkout's files, or the tree of HEAD in a git dir.
if [ -d "$SRC/detectron2" ] && [ -d "$SRC/configs" ]; then
  cp -r "$SRC/detectron2" "$SRC/configs" "$TMP/src/"
  commit=$(git -C "$SRC" rev-parse HEAD 2>/dev/null || echo unknown)
else
  git --git-dir="$SRC" archive HEAD detectron2 configs | tar -x -C "$TMP/src"
  commit=$(git --git-dir="$SRC" rev-parse HEAD)
fi
cp -r "$TMP/src/detectron2" "$OUT/"
rm -rf "$OUT/detectron2/model_zoo/configs" "$OUT"/detectron2/_C*.so  # a built checkout's extension stays out
cp -r "$TMP/src/configs" "$OUT/detectron2/model_zoo/configs"

pip_download() { "$PYTHON" -m pip download --quiet --no-deps --dest "$TMP/dl" "$@"; }
pip_download --only-binary=:all: --python-version "$PYVER" \
  "iopath>=0.1.7,<0.1.10" "yacs>=0.1.8" "termcolor>=1.1" "omegaconf>=2.1,<2.4" "setuptools<81"
pip_download --only-binary=:all: --python-version "$PYVER" --platform manylinux2014_x86_64 "pycocotools>=2.0.2"
pip_download --no-binary=:all: "fvcore>=0.1.5,<0.1.6" "antlr4-python3-runtime==4.9.3"

for wheel in "$TMP"/dl/*.whl; do
  "$PYTHON" -m zipfile -e "$wheel" "$OUT"
done
for sdist in "$TMP"/dl/*.tar.gz; do
  tar -xzf "$sdist" -C "$TMP"
done
cp -r "$TMP"/fvcore-*/fvcore "$OUT/"
cp -r "$TMP"/antlr4-python3-runtime-*/src/antlr4 "$OUT/"
# Only the packages: no install metadata, setuptools' .pth hook or IDE plugins.
rm -rf "$OUT"/*.dist-info "$OUT"/_distutils_hack "$OUT"/distutils-precedence.pth "$OUT"/pydevd_plugins
find "$OUT" -name __pycache__ -type d -prune -exec rm -rf {} +

{
  echo "detectron2 $commit (python source only, no _C)"
  (cd "$TMP/dl" && ls -1)
} > "$OUT/SOURCES.txt"

exclude="$(git -C "$REPO" rev-parse --git-path info/exclude)"
case "$exclude" in /*) ;; *) exclude="$REPO/$exclude" ;; esac
mkdir -p "$(dirname "$exclude")"
grep -qxF "/.d2/" "$exclude" 2>/dev/null || echo "/.d2/" >> "$exclude"

echo "$OUT: $(du -sh "$OUT" | cut -f1); use PYTHONPATH=$OUT (carry .d2 to the device machine)"
