#!/usr/bin/env bash
# Every matched-sparsity sweep on the embedded default, one after the other, each into a
# fixed folder so that running this again resumes where it stopped (resume=auto skips
# finished runs and continues interrupted ones from their checkpoint), then its report.
# A sweep that fails (a run that diverged, say) is named at the end and the exit status is
# non-zero; the sweeps after it still run.
#   nohup experiments/run_matched.sh > outputs/run_matched.log 2>&1 &
#   experiments/run_matched.sh atr_matched tc_sae_matched   # only these, in this order
set -uo pipefail
export WANDB_MODE="${WANDB_MODE:-disabled}"
sweeps=("$@")
if [ ${#sweeps[@]} -eq 0 ]; then
  sweeps=(pa_sae_matched tc_sae_matched atr_matched hierarchical_matched curriculum_matched
          synthetic_matched)
fi
failed=()
for sweep in "${sweeps[@]}"; do
  dir="outputs/sweeps/${sweep}/embedded"
  [ "$sweep" = synthetic_matched ] && dir="outputs/sweeps/${sweep}/run"
  echo "== ${sweep} -> ${dir} ($(date -u +%FT%TZ))"
  python -m posae.train -m "+experiment=${sweep}" "hydra.sweep.dir=${dir}" resume=auto \
    && python -m posae.report "${dir}" || failed+=("${sweep}")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]} (see above; relaunch to resume them)" >&2
  exit 1
fi
