#!/usr/bin/env bash
# The GPU checks of issue #9, in one command for a lent GPU machine whose minutes are few: each
# stage runs under its own time cap and under one overall deadline, so a slow stage costs only
# itself and what has finished is always written out. Logs and tables go to $OUT (or ./cuda_out).
#
#   DEADLINE=480 bash benchmarks/cuda_check.sh       # tests, table, profile, clgroups, compiled
#   STAGES="tests table" DEADLINE=300 bash benchmarks/cuda_check.sh
#
# Stages, in the order they run: tests (tests/test_cuda.py on the GPU, ~55 s), table (run_all.py
# eager, both shapes, ~200 s), profile (GPU tasks, GPU and wall time per call and the torch ops
# that spend the GPU time, at the large shape, ~70 s), clgroups (channels-last group/instance
# norm, both routes, benchmarks/cl_groups.py, ~25 s), launches (the same as profile for every
# layer at both shapes, ~130 s; not run unless named), compiled (run_all.py --compile, the variants
# and training batch norm at the large shape, float32, ~22 s a row). Times as on the H200 of
# 2026-12-04, whose machine started in ~30 s. TABLE_ARGS replaces the table's --shapes (say
# "--shapes 128x128x56x56 --dtypes low" to finish a table cut short); PROFILE_LAYERS and
# COMPILED_LAYERS choose those stages' layers.
set -u
out=${OUT:-cuda_out}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD" PYTHONUNBUFFERED=1
stages=${STAGES:-tests table profile clgroups compiled}
end=$((SECONDS + ${DEADLINE:-480}))
small=64x64x32x32
large=128x128x56x56

stage() { # stage NAME CAP_SECONDS LOG COMMAND...: run COMMAND, teeing into $out/LOG
    local name=$1 cap=$2 log=$3 left=$((end - SECONDS))
    shift 3
    case " $stages " in *" $name "*) ;; *) return 0 ;; esac
    ((left < cap)) && cap=$left
    if ((cap < 10)); then
        echo "== $name skipped: deadline"
        return 0
    fi
    echo "== $(date +%T) $name (at most ${cap}s): $*"
    timeout "$cap" "$@" 2>&1 | tee "$out/$log" | tail -n 25
    echo "== $name exit ${PIPESTATUS[0]} after $((SECONDS - end + ${DEADLINE:-480}))s of the run"
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "cuDNN", torch.backends.cudnn.version())'
python3 -c 'import triton; print("triton", triton.__version__)' || echo "triton: none (normlab's kernels off)"
stage tests 170 test_cuda.log \
    python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 8 tests/test_cuda.py
# shellcheck disable=SC2086 # TABLE_ARGS: several words
stage table 260 table.log \
    python3 benchmarks/run_all.py --device cuda --min-time 0.08 ${TABLE_ARGS:---shapes $small $large} \
    --out "$out/cuda_table.md"
stage profile 90 profile.log \
    python3 benchmarks/launches.py --device cuda --shape $large --verbose \
    --layers ${PROFILE_LAYERS:-"BatchNorm2d train" Renorm Ghost L1 Linf InstanceNorm GroupNorm} \
    --out "$out/profile.md"
stage clgroups 60 clgroups.log \
    python3 benchmarks/cl_groups.py --device cuda --out "$out/cl_groups.md"
stage launches 150 launches.log bash -c "
    python3 benchmarks/launches.py --device cuda --shape $small --out $out/launches_small.md &&
    python3 benchmarks/launches.py --device cuda --shape $large --verbose --out $out/launches_large.md"
stage compiled 400 compiled.log \
    python3 benchmarks/run_all.py --device cuda --compile --min-time 0.08 --shapes $large \
    --dtypes float32 --layers ${COMPILED_LAYERS:-"BatchNorm2d train" Renorm Ghost L1 Linf Noisy} \
    --out "$out/cuda_compiled.md"
echo "== done after ${SECONDS}s"
