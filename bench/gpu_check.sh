#!/usr/bin/env bash
# The GPU check of fastmerge, in one command, for a machine with a CUDA GPU (e.g. the H200
# lent through the device tool; bench/README.md has the exact call). In order:
#
#   peers      lap (wheel), lapjv and torch-linear-assignment (sdists built here) from
#              .whl/ (bench/gpu_wheels.sh fetches them), into a target dir: skipped with a
#              message each when absent or when its build fails
#   wheel      `pip wheel --no-build-isolation --no-deps .` (FASTMERGE_CUDA=ON), its
#              contents checked (_C, _cuda, the Triton kernels), installed into a target dir
#   info       `fastmerge info` (archs, PTX, CUDA runtime needed, driver verdict)
#   tests-gpu  the test suite's cuda-marked tests (cuda and triton backends on the GPU,
#              Triton compiled for real: TRITON_INTERPRET=0), and the build/driver tests
#   tests-cpu  only with --with-cpu-tests: the rest of the suite (CI runs it anyway)
#   device     the GPU, driver, and the device-to-device copy bandwidth
#   bench:S    `fastmerge bench S --device cuda --quick --json ...` for S in scope_stats,
#              linear_assignment, feature_stats, least_squares, lowrank_mixture
#   merge      TIES on the 168M-parameter set (bench/bench_merge_cli.py builds it) with
#              `fastmerge merge --device cuda` beside `--device cpu`
#   report     one Markdown page: $OUT/gpu_check-<date>.md through the device tool, else
#              bench/results/gpu_check-<date>.md (or --out DIR)
#
# Budget: everything ends within --budget seconds (default 480, 8 minutes): each stage has
# its own timeout, cut to what is left, and a stage that no longer fits is skipped and
# says so in the report. Without a GPU (or with --dry-run) nothing is built or run: the
# script checks the tools and modules it needs, lists each command with its timeout, says
# whether .whl/ is there, and exits 0 (1 if the script itself cannot run here).
#
# Usage: bench/gpu_check.sh [--dry-run] [--out DIR] [--budget SECONDS] [--with-cpu-tests]
#                           [--full-bench] [--small-merge]
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1

dry=0
dry_reason="--dry-run"
out_dir=""
budget=480
cpu_tests=0
quick="--quick"
small_merge=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out_dir="$2"; shift ;;
    --budget) budget="$2"; shift ;;
    --with-cpu-tests) cpu_tests=1 ;;
    --full-bench) quick="" ;;
    --small-merge) small_merge="--small" ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# The interpreter with torch: $PYTHON, else this checkout's .venv, else python3 (on the
# GPU machine, python3 is the one with torch).
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py="$(command -v python3)"; fi
fi

if [ "$dry" = 0 ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    dry=1; dry_reason="no GPU: nvidia-smi is missing or lists none"
  elif ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    dry=1; dry_reason="no GPU: torch ($py) sees no CUDA device"
  fi
fi

day="$(date -u +%Y-%m-%d)"
if [ -z "$out_dir" ]; then
  if [ -n "${OUT:-}" ]; then out_dir="$OUT"; elif [ "$dry" = 0 ]; then out_dir="$root/bench/results"; fi
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/fastmerge-gpu-check.XXXXXX")"
stages="$work/stages.tsv"
log="$work/gpu_check.log"
: >"$stages"
: >"$log"
started=$(date +%s)
reserve=15  # seconds kept for the report
site="$work/site"        # the peers
fm_site="$work/fm-site"  # the fastmerge wheel
export PYTHONPATH="$fm_site:$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

# One row of the stage table; a multi-line command is cut to its first line.
record() {
  local note="${4%%$'\n'*}"
  [ "$note" = "$4" ] || note="$note …\`"
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$note" >>"$stages"
}

# stage NAME CAP MIN COMMAND: run COMMAND (a bash string) with a timeout of CAP seconds,
# cut to the budget left; skip it when less than MIN seconds are left. Returns its status.
stage() {
  local name="$1" cap="$2" min="$3" cmd="$4"
  local left=$(( budget - ($(date +%s) - started) - reserve ))
  if [ "$dry" = 1 ]; then
    record "$name" "would run" "" "timeout ${cap}s: \`$cmd\`"
    echo "[dry-run] $name (timeout ${cap}s): $cmd"
    return 0
  fi
  if [ "$left" -lt "$min" ]; then
    record "$name" "skipped" "" "${left}s of the ${budget}s budget left, it needs ${min}s"
    echo "== $name: skipped (${left}s left)" | tee -a "$log"
    return 3
  fi
  local t=$(( cap < left ? cap : left ))
  echo "== $name (timeout ${t}s): $cmd" | tee -a "$log"
  local s=$(date +%s)
  timeout -k 5 "$t" bash -c "$cmd" >>"$log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - s ))
  if [ "$rc" = 0 ]; then
    record "$name" "ok" "$took" ""
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    record "$name" "timed out" "$took" "stopped after ${t}s; see the log"
  else
    record "$name" "failed" "$took" "exit $rc; see the log"
  fi
  echo "   -> exit $rc after ${took}s" | tee -a "$log"
  return "$rc"
}

# ---- what this machine has ---------------------------------------------------------
missing_tools=()
for tool in nvcc cmake ninja git timeout; do
  command -v "$tool" >/dev/null 2>&1 || missing_tools+=("$tool")
done
missing_modules="$("$py" - <<'EOF' 2>/dev/null
import importlib.util
names = ["torch", "triton", "scikit_build_core", "pybind11", "pytest", "scipy", "safetensors",
         "transformers", "numpy", "yaml"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
)" || missing_modules="(could not ask $py)"
wheels=()
whl="${GPU_CHECK_WHEELS:-$root/.whl}"  # where bench/gpu_wheels.sh puts them
if [ -d "$whl" ]; then
  for f in "$whl"/*.whl "$whl"/*.tar.gz; do [ -e "$f" ] && wheels+=("$f"); done
  wheel_note=".whl/ ($whl) holds ${#wheels[@]} file(s): $(ls "$whl" | tr '\n' ' ')"
else
  wheel_note=".whl/ ($whl) is absent: the lap, lapjv and torch-linear-assignment rows will be skipped (bench/gpu_wheels.sh fetches them; carry \".whl\")"
fi
echo "python: $py"
echo "tools missing: ${missing_tools[*]:-none}"
echo "python modules missing: ${missing_modules:-none}"
echo "$wheel_note"
[ "$dry" = 1 ] && echo "dry run: $dry_reason"

# ---- peers ---------------------------------------------------------------------------
pip_target=(-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site")
have_whl=0
for f in "${wheels[@]}"; do
  case "$f" in *.whl) have_whl=1 ;; esac
done
if [ "$have_whl" = 1 ]; then
  stage "peers:wheels" 30 10 "'$py' ${pip_target[*]} '$whl'/*.whl"
else
  record "peers:wheels" "skipped" "" "no wheel in .whl/ (lap's rows are skipped)"
fi
for name in lapjv torch_linear_assignment; do
  sdist=""
  for f in "${wheels[@]}"; do case "$(basename "$f")" in ${name}-*.tar.gz) sdist="$f" ;; esac; done
  if [ -n "$sdist" ]; then
    stage "peers:$name" 60 15 "'$py' ${pip_target[*]} --no-build-isolation '$sdist'" ||
      record "peers:$name" "skipped" "" "$name could not be built here: its benchmark rows are skipped"
  else
    record "peers:$name" "skipped" "" "no $name sdist in .whl/: its benchmark rows are skipped"
  fi
done

# ---- the wheel -----------------------------------------------------------------------
dist="$work/dist"
stage "wheel" 240 60 "FASTMERGE_CUDA=ON '$py' -m pip wheel --no-build-isolation --no-deps --no-cache-dir -C build-dir='$work/build' -w '$dist' '$root'"
built=$?
stage "wheel:contents" 15 5 "'$py' - '$dist' <<'EOF'
import sys, zipfile, pathlib
wheels = sorted(pathlib.Path(sys.argv[1]).glob('fastmerge-*.whl'))
assert len(wheels) == 1, f'expected one wheel, found {wheels}'
names = zipfile.ZipFile(wheels[0]).namelist()
need = {'_C': 'fastmerge/_C.', '_cuda': 'fastmerge/_cuda.', 'kernels': 'fastmerge/kernels/ties_combine.py'}
lost = [k for k, prefix in need.items() if not any(n.startswith(prefix) for n in names)]
print(wheels[0].name, len(names), 'files')
sys.exit(f'the wheel lacks {lost}' if lost else 0)
EOF"
if [ "$dry" = 1 ] || [ "$built" = 0 ]; then
  stage "wheel:install" 30 10 "'$py' -m pip install -q --no-index --no-deps --no-cache-dir --target '$fm_site' '$dist'/fastmerge-*.whl"
  stage "info" 20 5 "cd '$work' && '$py' -m fastmerge info | tee '$work/info.txt'"
  # Triton compiled for real on the GPU (the test conftest chooses the interpreter only by
  # default); -m cuda selects the cuda and triton-cuda parametrizations.
  # 698 tests, most of them compiling a Triton specialization first: spread over 8
  # workers (pytest-xdist, in the image), one test file per worker to reuse what it compiled.
  xdist=""
  "$py" -c "import xdist" 2>/dev/null && xdist="-n 8 --dist loadfile"
  stage "tests-gpu" 180 45 "TRITON_INTERPRET=0 '$py' -m pytest tests -q -m cuda $xdist -p no:cacheprovider --junitxml='$work/tests-gpu.xml'"
  stage "tests-build" 30 10 "'$py' -m pytest -q -p no:cacheprovider tests/test_cuda_requirements.py tests/test_gpu_build.py::test_cuda_extension_is_built_with_sm80_and_sm90"
  if [ "$cpu_tests" = 1 ]; then
    stage "tests-cpu" 300 120 "'$py' -m pytest tests -q -m 'not cuda and not dist' -p no:cacheprovider --junitxml='$work/tests-cpu.xml'"
  else
    record "tests-cpu" "skipped" "" "the CPU tests run in CI; --with-cpu-tests adds them here"
  fi
  stage "device" 30 10 "'$py' '$root/bench/gpu_check_stages.py' device --json '$work/device.json'"
  for suite in scope_stats linear_assignment feature_stats least_squares lowrank_mixture; do
    stage "bench:$suite" 35 15 "cd '$work' && '$py' -m fastmerge bench $suite --device cuda $quick --no-progress --json '$work/bench-$suite.json'"
  done
  stage "merge" 150 60 "'$py' '$root/bench/gpu_check_stages.py' merge $small_merge --workdir '$work/merge' --json '$work/merge.json'; rc=\$?; rm -rf '$work/merge'; exit \$rc"
else
  record "after the wheel" "skipped" "" "the wheel did not build: tests, benchmarks and the merge need it"
fi

# ---- the report ----------------------------------------------------------------------
header=(
  "--header" "Date: $day (UTC); host $(hostname); budget ${budget}s, used $(( $(date +%s) - started ))s."
  "--header" ""
  "--header" "Python: $py; tools missing: ${missing_tools[*]:-none}; Python modules missing: ${missing_modules:-none}."
  "--header" ""
  "--header" "Peers: $wheel_note."
)
[ "$dry" = 1 ] && header+=("--header" "" "--header" "**Dry run** ($dry_reason): nothing was built or run; the commands are listed below.")
if [ -n "$out_dir" ]; then
  mkdir -p "$out_dir"
  report="$out_dir/gpu_check-$day.md"
else
  report="$work/gpu_check-$day.md"
fi
"$py" "$root/bench/gpu_check_stages.py" report --stages "$stages" --work "$work" --out "$report" "${header[@]}"
report_rc=$?
if [ -n "$out_dir" ] && [ "$dry" = 0 ]; then
  cp "$log" "$out_dir/gpu_check-$day.log"
  for f in "$work"/tests-gpu.xml "$work"/merge.json; do [ -e "$f" ] && cp "$f" "$out_dir/"; done
  "$py" - "$work" "$out_dir/gpu_check-bench-$day.json" <<'EOF'
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
rows = []
for path in sorted(work.glob("bench-*.json")):
    try:
        rows += json.loads(path.read_text()).get("rows", [])
    except ValueError:
        pass
out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
EOF
fi
[ "$dry" = 1 ] && cat "$report"
echo "report: $report"
if [ "$dry" = 1 ]; then
  rm -rf "$work"
  exit "$report_rc"  # 0: the script parsed, found its interpreter and wrote the report
fi
exit 0
