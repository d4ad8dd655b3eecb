#!/usr/bin/env bash
# torchreid's OSNet-x0.25 (Market-1501) as it is, evaluated on the CUHK03 crops through torch and
# ONNX FP32 / FP16 / INT8 (TensorRT flavour and CPU flavour, `reid-export quantize`'s defaults: the
# gated search over every calibration method, 512 calibration images from bounding_box_train, seed 0;
# figures dated before 2026-12-01 were made when entropy alone was the default), plus the OpenCV-bilinear
# preprocessing for comparison. Reports (JSON) and models go to $OUT (default logs/osnet_torchreid).
#   bash benchmarks/osnet_torchreid_eval.sh [../shared]
set -euo pipefail
SHARED=${1:-../shared}
OUT=${OUT:-logs/osnet_torchreid}
CKPT=$SHARED/models/torchreid_osnet_x0_25_market1501.pt
DATA=$SHARED/data/cuhk03-labeled
CFG=configs/torchreid/osnet_x0_25.yml
mkdir -p "$OUT"
PY=${PYTHON:-python3}
echo "date $(date -u '+%Y-%m-%d %H:%M') UTC; environment $("$PY" benchmarks/common.py)"
[ -f "$OUT/osnet_x0_25.onnx" ] || reid-export onnx "$CKPT" --config "$CFG" -o "$OUT/osnet_x0_25.onnx"
[ -f "$OUT/osnet_x0_25.fp16.onnx" ] || reid-export quantize "$OUT/osnet_x0_25.onnx" -o "$OUT/osnet_x0_25.fp16.onnx" \
    --precision fp16 --no-progress || echo "fp16 exit $?"
# INT8 with quantize's defaults; --allow-below-gate so that a model missing quantize's accuracy gate is
# still written (marked below-gate in its metadata) and evaluated; the gate's verdict is in the log
# and in int8-$target.json.
for target in tensorrt cpu; do
  reid-export quantize "$OUT/osnet_x0_25.onnx" -o "$OUT/osnet_x0_25.int8-$target.onnx" --precision int8 \
      --target "$target" --calib-dir "$DATA/Market-1501-v15.09.15/bounding_box_train" --allow-below-gate \
      --report "$OUT/int8-$target.json" --no-progress || echo "int8 $target exit $?"
done
models=("$CKPT" "$OUT/osnet_x0_25.onnx")
for f in "$OUT/osnet_x0_25.fp16.onnx" "$OUT/osnet_x0_25.int8-tensorrt.onnx" "$OUT/osnet_x0_25.int8-cpu.onnx"; do
  [ -f "$f" ] && models+=("$f")
done
reid-export eval "${models[@]}" --config "$CFG" --dataset-root "$DATA" --report "$OUT/eval.json" --no-progress || echo "eval exit $?"
# the same checkpoint with OpenCV's bilinear resize instead of torchreid's Pillow resize
printf '_BASE_: %s\nINPUT:\n  INTERPOLATION: linear\n' "$(realpath "$CFG")" > "$OUT/osnet_x0_25_opencv_linear.yml"
reid-export eval "$CKPT" --config "$OUT/osnet_x0_25_opencv_linear.yml" --dataset-root "$DATA" \
    --report "$OUT/eval_opencv_linear.json" --no-progress || echo "eval (opencv) exit $?"
echo "done $(date -u '+%H:%M') UTC; environment $("$PY" benchmarks/common.py)"
