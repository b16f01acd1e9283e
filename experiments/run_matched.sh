#!/usr/bin/env bash
# Every matched-sparsity sweep on the embedded default, one after the other, each into a
# fixed folder under experiments/runs/ so that running this again resumes where it stopped
# (resume=auto skips finished runs by their folder name and continues interrupted ones
# from their checkpoint), then its report, also of a sweep with failed runs. Each finished
# run's small files (metrics, configs, logs; experiments/runs/.gitignore) are meant to be
# committed: a fresh clone resumes the sweep from them and reports it. Failed sweeps are named
# at the end and the exit status is non-zero; an interrupt (Ctrl-C, kill) stops it all.
#   nohup experiments/run_matched.sh > outputs/run_matched.log 2>&1 &
#   git add experiments/runs && git commit   # the finished runs, at any point
#   experiments/run_matched.sh atr_matched tc_sae_matched   # only these, in this order
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export WANDB_MODE="${WANDB_MODE:-disabled}"
mkdir -p outputs
exec 9> outputs/.run_matched.lock
if ! flock -n 9; then
  echo "run_matched.sh: another instance holds outputs/.run_matched.lock" >&2
  exit 1
fi
child=
trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null; wait; exit 130' INT TERM
run() {  # in the background, so that the trap can forward a signal to it
  "$PYTHON" "$@" & child=$!
  wait "$child"; local rc=$?; child=
  return $rc
}
sweeps=("$@")
if [ ${#sweeps[@]} -eq 0 ]; then
  sweeps=(pa_sae_matched tc_sae_matched atr_matched hierarchical_matched curriculum_matched
          synthetic_matched)
fi
failed=()
for sweep in "${sweeps[@]}"; do
  dir="experiments/runs/${sweep}/embedded"
  [ "$sweep" = synthetic_matched ] && dir="experiments/runs/${sweep}/run"
  echo "== ${sweep} -> ${dir} ($(date -u +%FT%TZ))"
  run -m posae.train -m "+experiment=${sweep}" "hydra.sweep.dir=${dir}" resume=auto \
    || failed+=("${sweep} (training)")
  run -m posae.report "${dir}" || failed+=("${sweep} (report)")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "run_matched.sh: failed: ${failed[*]}; relaunch to resume" >&2
  exit 1
fi
