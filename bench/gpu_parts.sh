#!/usr/bin/env bash
# Every GPU figure of bench/README.md in parts that each fit in 10 minutes on one H100: for the 3B, then the
# 7B architecture (random weights, built once into the cache), SFT (build + load + 20 steps), then GRPO with
# each sampler (hf, static, static + CUDA graph). Each part's figures land in runs/bench/<arch>-<part>.json
# as it ends, so a part cut short loses only itself; the table is printed from whatever finished.
#     bash bench/gpu_parts.sh            # both architectures
#     bash bench/gpu_parts.sh 7b         # one
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
mkdir -p runs/bench
archs=("$@")
[ $# -eq 0 ] && archs=(3b 7b)
for arch in "${archs[@]}"; do
  for part in sft hf static graph; do
    timeout 600 "$PY" bench/gpu_grpo.py --arch "$arch" --runs "$part" --json "runs/bench/$arch-$part.json" \
      || echo "part $arch $part did not finish (exit $?)"
  done
done
"$PY" bench/gpu_grpo.py --table runs/bench/*.json
