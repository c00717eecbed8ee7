#!/usr/bin/env bash
# Run every CUDA code path once on one GPU (meant to take a few minutes; not yet run on one) and say what was checked.
#
#   bash benchmarks/gpu_smoke.sh            # on a machine with a GPU (needs ../shared beside the repo)
#   bash benchmarks/gpu_smoke.sh --cpu      # the same steps on the CPU (gloo), as the test suite runs it
#   PYTHON=/path/to/venv/bin/python bash benchmarks/gpu_smoke.sh   # the interpreter: $PYTHON, else python3 on PATH
#
# With 2 or more GPUs visible it also trains step 6's run with 2 NCCL processes (FSDP2 across two
# GPUs) and checks it gives run 1's adapter; with fewer, and with --cpu, it says it skipped that.
# Uses stories260K (tiny, real) for the training and evaluation paths, so the numbers mean nothing;
# what matters is that each path runs and agrees with its twin:
#   1. train.py TruthfulQA (DPO) in float32        5. eval.py MQuAKE: generation, bf16-trained adapter
#   2. train.py MQuAKE (CE, generation) in bf16     6. torchrun, 1 process (NCCL), --sharding shard: FSDP2
#   3. --stop-after 1, then --resume == run 2          gives run 1's adapter
#   4. eval.py TruthfulQA: prefix cache == full prompts  7. benchmarks/bench.py gpu section (Llama-2-7B shape)
# Any failed step stops the script with a non-zero status.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python || true)}"
if [[ -z "$PY" ]]; then
  echo "error: no python3 on PATH; set PYTHON to the interpreter of the project's environment" >&2
  exit 2
fi

DEVICE=cuda
BENCH=(--gpu-model 7b)
if [[ "${1:-}" == "--cpu" ]]; then
  DEVICE=cpu
  BENCH=(--gpu-model tiny --gpu-batch 2 --gpu-seq 64 --repeats 1)
  export OMP_NUM_THREADS=1
elif ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "error: no CUDA device is visible to torch; run with --cpu for the dry run" >&2
  exit 2
fi
SHARED="${LOFIT_SHARED:-../shared}"
MODEL="$SHARED/weights/stories260K_hf"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
TRAIN=(--model "$MODEL" --data-dir "$SHARED/datasets" --device "$DEVICE" --epochs 1 --train-size 6 --batch-size 3
       --k 4 --lr-a 0.05 --lr-v 0.05 --limit-eval 3 --eval-batch-size 2)
started=$SECONDS

checked() { echo "checked ($((SECONDS - started)) s): $*"; }

same_adapters() {  # same_adapters A B TOLERANCE: the two adapter files hold the same heads and vectors
  "$PY" - "$@" <<'EOF'
import sys
import torch
from safetensors.torch import load_file
a, b, tol = load_file(sys.argv[1]), load_file(sys.argv[2]), float(sys.argv[3])
assert a.keys() == b.keys(), (a.keys(), b.keys())
assert torch.equal(a["heads"], b["heads"]), "different heads"
for name in a:
    diff = (a[name].double() - b[name].double()).abs().max().item()
    assert diff <= tol, f"{name} differs by {diff} > {tol}"
EOF
}

json_field() {  # json_field FILE EXPRESSIONS: print values of a JSON file (d is the document)
  "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); print($2)" "$1"
}

expect() {  # expect FILE EXPRESSIONS WANTED: stop unless json_field prints WANTED
  local got
  got="$(json_field "$1" "$2")"
  [[ "$got" == "$3" ]] || { echo "error: $1: $2 is '$got', expected '$3'" >&2; exit 1; }
}

"$PY" train.py --task truthfulqa --dtype float32 --out "$OUT/tqa" "${TRAIN[@]}" > "$OUT/tqa.log"
expect "$OUT/tqa/config.json" "d['resolved']['dtype'], d['device']" "float32 $DEVICE"
checked "1. train.py truthfulqa (DPO, reference pass, MC scoring) in float32 on $DEVICE"

"$PY" train.py --task mquake --dtype bfloat16 --out "$OUT/mq" "${TRAIN[@]}" > "$OUT/mq.log"
expect "$OUT/mq/config.json" "d['resolved']['dtype']" bfloat16
checked "2. train.py mquake (CE, greedy generation) in bfloat16, LoFiT in float32"

"$PY" train.py --task mquake --dtype bfloat16 --out "$OUT/mq_resumed" --stop-after 1 "${TRAIN[@]}" > "$OUT/stop.log"
"$PY" train.py --task mquake --dtype bfloat16 --out "$OUT/mq_resumed" --resume "${TRAIN[@]}" > "$OUT/resume.log"
same_adapters "$OUT/mq/adapter.safetensors" "$OUT/mq_resumed/adapter.safetensors" 1e-5
checked "3. --stop-after 1 then --resume gives run 2's adapter"

EVAL=(--model "$MODEL" --data-dir "$SHARED/datasets" --device "$DEVICE" --limit 4 --eval-batch-size 2 --quiet)
"$PY" eval.py --task truthfulqa --adapter "$OUT/tqa/adapter.safetensors" --out "$OUT/cached.json" "${EVAL[@]}" > /dev/null
"$PY" eval.py --task truthfulqa --adapter "$OUT/tqa/adapter.safetensors" --out "$OUT/full.json" --no-prefix-cache \
  "${EVAL[@]}" > /dev/null
"$PY" - "$OUT/cached.json" "$OUT/full.json" <<'EOF'
import json, sys
cached, full = (json.load(open(p)) for p in sys.argv[1:])
scores = lambda r: [c["score"] for d in r["details"] for c in d["true"] + d["false"]]
worst = max(abs(a - b) for a, b in zip(scores(cached), scores(full)))
assert len(scores(cached)) == len(scores(full)) and worst < 1e-3, worst
EOF
checked "4. eval.py truthfulqa: prefix-cached scores == full-prompt scores (float32)"

"$PY" eval.py --task mquake --adapter "$OUT/mq/adapter.safetensors" --out "$OUT/gen.json" "${EVAL[@]}" > /dev/null
expect "$OUT/gen.json" "d['summary']['n'], d['config']['dtype']" "4 float32"
checked "5. eval.py mquake: batched greedy generation with a KV cache, bf16-trained adapter scored in float32"

"$PY" -m torch.distributed.run --standalone --nproc_per_node 1 train.py --task truthfulqa --dtype float32 \
  --sharding shard --out "$OUT/tqa_fsdp" "${TRAIN[@]}" > "$OUT/fsdp.log"
expect "$OUT/tqa_fsdp/config.json" "d['sharding']['choice'], d['world_size']" "shard 1"
same_adapters "$OUT/tqa/adapter.safetensors" "$OUT/tqa_fsdp/adapter.safetensors" 1e-4
checked "6. torchrun, one $([[ $DEVICE == cuda ]] && echo NCCL || echo gloo) rank, FSDP2-sharded base: run 1's adapter"

GPUS=0
[[ $DEVICE == cuda ]] && GPUS="$("$PY" -c "import torch; print(torch.cuda.device_count())")"
if (( GPUS >= 2 )); then
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 train.py --task truthfulqa --dtype float32 \
    --sharding shard --out "$OUT/tqa_fsdp2" "${TRAIN[@]}" > "$OUT/fsdp2.log"
  expect "$OUT/tqa_fsdp2/config.json" "d['sharding']['choice'], d['world_size']" "shard 2"
  same_adapters "$OUT/tqa/adapter.safetensors" "$OUT/tqa_fsdp2/adapter.safetensors" 1e-4
  echo "also checked ($((SECONDS - started)) s): torchrun, two NCCL ranks on two GPUs, FSDP2-sharded base: run 1's adapter"
elif [[ $DEVICE == cuda ]]; then
  echo "skipped: the two-process NCCL step needs 2 GPUs; $GPUS is visible"
else
  echo "skipped: the two-process NCCL step (needs 2 GPUs; two gloo processes are in tests/test_train_distributed.py)"
fi

"$PY" benchmarks/bench.py --only gpu --device "$DEVICE" "${BENCH[@]}" --out "$OUT/bench.json" > "$OUT/bench.log"
json_field "$OUT/bench.json" "d['markdown']"
checked "7. benchmarks/bench.py gpu section (${BENCH[*]})"
echo "gpu_smoke: all 7 steps passed on $DEVICE in $((SECONDS - started)) s"
