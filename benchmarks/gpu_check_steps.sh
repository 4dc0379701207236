# Step helpers of gpu_check.sh (sourced; tests/test_gpu_check.py sources them too).
# Expect WORK (a folder for the logs), SUMMARY (the summary file) and started (a start time, seconds).

say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND under `timeout`, output to NAME.log; says how it ended.
step() {
  local name=$1 limit=$2 begin rc
  shift 2
  begin=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  local verdict="ok"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then verdict="TIMED OUT after ${limit} s"; elif [ "$rc" != 0 ]; then verdict="FAILED (exit $rc)"; fi
  say "=== $name: $verdict, $(( $(date +%s) - begin )) s (limit $limit s, total $(( $(date +%s) - started )) s)"
  tail -n "${TAIL:-4}" "$WORK/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
  return "$rc"
}

skipped() { say "=== $1: skipped (dry run: no GPU)"; }

finish() {
  say "=== done in $(( $(date +%s) - started )) s"
  cp "$SUMMARY" "$OUT/summary.txt"
  tar -czf "$OUT/gpu_check.tar.gz" -C "$(dirname "$WORK")" gpu_check
  exit "${1:-0}"
}

