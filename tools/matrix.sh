#!/usr/bin/env bash
# Run precisebn's core tests against several (torch, optree) version pairs, to check the
# version floors that pyproject.toml claims. A tool to run by hand; not part of CI.
#
#   tools/matrix.sh                           # the floors pyproject claims, and the newest here
#   tools/matrix.sh 2.3.1:0.12.1 2.14.1:0.20.0
#   PROJECT=/tmp/clone tools/matrix.sh ...    # test another checkout (default: this repo)
#   PYTEST_ARGS=-x tools/matrix.sh ...        # more pytest arguments
#
# A pair TORCH:OPTREE is installed as torch==TORCH optree==OPTREE: by default the lowest
# versions of pyproject's `torch>=` and `optree>=` (`==2.6` is 2.6.0), and 2.14.1:0.20.0,
# the newest that pip takes here. Each pair gets its own venv, .matrix/torch<T>-optree<O>
# in this repo (ignored by git), with pytest, hypothesis, scikit-learn, tqdm and precisebn
# (pip install --no-deps -e); a venv that exists is reused. A new venv takes about 1.5
# minutes and 5-6 GB: torch from PyPI is a CUDA build with its nvidia-* packages (it runs
# on the CPU), torch 2.14.1 and its packages lie on this machine's disk. The core tests take
# 1-2 minutes a pair on 2 cores; pairs run one after another.
#
# Core tests: tests/ and the doctests in src/, less the integrations (tests/test_lightning.py,
# tests/test_huggingface.py and src/precisebn/{lightning,huggingface}.py, which need
# Lightning or transformers) and tests/test_bench_smoke.py (fvcore, matplotlib). Tests that
# need CUDA skip themselves. Prints one summary line a pair and exits non-zero if a pair
# failed to install or failed a test. Logs: .matrix/<pair>.log and <pair>.install.log.
set -uo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
project="$(cd "${PROJECT:-$here}" && pwd)"
matrix="$here/.matrix"
pairs=("$@")
if [ ${#pairs[@]} -eq 0 ]; then
    floor() { grep -oE "\"$1>=[0-9.]+" "$project/pyproject.toml" | head -n 1 | cut -d= -f2; }
    pairs=("$(floor torch):$(floor optree)" 2.14.1:0.20.0)
fi

core=(tests src
    --ignore=tests/test_lightning.py --ignore=tests/test_huggingface.py
    --ignore=tests/test_bench_smoke.py
    --ignore=src/precisebn/lightning.py --ignore=src/precisebn/huggingface.py
    --ignore=src/precisebn/plot.py --ignore=src/precisebn/mmengine.py)

# pytest with SIGINT at its default: a script started in the background (`&`, nohup) has
# SIGINT ignored, and the CLI's Ctrl-C tests would inherit that and fail.
run_pytest='import signal, sys, pytest
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))'

mkdir -p "$matrix"
status=0
summary=()
for pair in "${pairs[@]}"; do
    t="${pair%%:*}" o="${pair#*:}"
    name="torch$t-optree$o"
    venv="$matrix/$name" log="$matrix/$name.log"
    echo "== $name (log: $log)"
    if [ ! -e "$venv/.installed" ]; then  # .installed marks a complete install
        rm -rf "$venv"
        start=$SECONDS
        if ! { python3 -m venv "$venv" &&
               "$venv/bin/python" -m pip install -q "torch==$t" "optree==$o" pytest hypothesis \
                   scikit-learn tqdm hatchling editables; } >"$matrix/$name.install.log" 2>&1; then
            summary+=("$name: INSTALL FAILED (see $matrix/$name.install.log)")
            status=1
            continue
        fi
        touch "$venv/.installed"
        echo "   installed in $((SECONDS - start)) s, $(du -sh "$venv" | cut -f1)"
    fi
    # Always reinstall precisebn: the venv may have been made for another checkout.
    if ! "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$project" \
            >"$log" 2>&1; then
        summary+=("$name: INSTALL OF PRECISEBN FAILED (see $log)")
        status=1
        continue
    fi
    versions="$("$venv/bin/python" -c 'import torch, optree
print(f"torch {torch.__version__}, optree {optree.__version__}")' 2>>"$log")"
    start=$SECONDS
    (cd "$project" && "$venv/bin/python" -c "$run_pytest" -q -p no:cacheprovider --tb=short \
        -rfE "${core[@]}" ${PYTEST_ARGS:-}) >>"$log" 2>&1
    rc=$?
    counts="$(tail -n 1 "$log" | grep -oE '[0-9]+ (passed|failed|errors?|skipped|xfailed|xpassed)' |
        paste -sd, -)"
    [ -n "$counts" ] || counts="$(grep -m 1 -E '^E ' "$log" || echo 'no counts')"
    if [ $rc -eq 0 ]; then verdict=ok; else verdict="FAIL (pytest exit $rc)"; status=1; fi
    summary+=("$name: $verdict: ${versions:-?}: $counts in $((SECONDS - start)) s")
done

echo
printf '%s\n' "${summary[@]}"
exit $status
