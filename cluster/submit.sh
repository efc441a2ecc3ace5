#!/usr/bin/env bash
# Submit a distpg training job to a Ray cluster with `ray job submit`.
#
#   cluster/submit.sh [--no-wait] CONFIG [--set key=value ...] [--run-dir DIR]
#
# Runs `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m distpg train
# CONFIG ...`: this repository is uploaded with the job, so the cluster runs exactly the code you have.
# The dashboard address comes from $RAY_API_SERVER_ADDRESS (or $DISTPG_CLUSTER_DIR/dashboard, as written by
# cluster/local-cluster.sh). With token authentication on, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH
# (or RAY_AUTH_TOKEN); a local-cluster.sh token is picked up by itself. Prints the job id and how to follow
# it. Without --no-wait it tails the logs and exits with the job's status: 0 only for SUCCEEDED, 124 if the
# job is still running after $DISTPG_SUBMIT_TIMEOUT seconds (default 3600; the job goes on running).
set -euo pipefail
cd "$(dirname "$0")/.."

WAIT=1
if [ "${1:-}" = "--no-wait" ]; then WAIT=0; shift; fi
if [ $# -lt 1 ]; then sed -n '2,12p' "$0"; exit 2; fi
CONFIG="$1"; shift
[ -f "$CONFIG" ] || { echo "submit.sh: config file '$CONFIG' not found" >&2; exit 2; }

CLUSTER_DIR="${DISTPG_CLUSTER_DIR:-/tmp/distpg-cluster}"
ADDRESS="${RAY_API_SERVER_ADDRESS:-$(cat "$CLUSTER_DIR/dashboard" 2>/dev/null || true)}"
[ -n "$ADDRESS" ] || { echo "submit.sh: set RAY_API_SERVER_ADDRESS to the cluster's dashboard (http://HOST:8265)" >&2; exit 2; }
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] && [ -f "$CLUSTER_DIR/auth_token" ]; then
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$CLUSTER_DIR/auth_token"
fi
RAY="${RAY:-ray}"
TIMEOUT="${DISTPG_SUBMIT_TIMEOUT:-3600}"

SUBMISSION_ID="distpg-$(date +%Y%m%d-%H%M%S)-$RANDOM"
echo "submitting $CONFIG to $ADDRESS as job $SUBMISSION_ID"
LOG="$(mktemp)"; trap 'rm -f "$LOG"' EXIT
# the submission itself is one HTTP request; 120 s covers uploading the working dir on a slow link
if ! timeout 120 "$RAY" job submit --address "$ADDRESS" --submission-id "$SUBMISSION_ID" --working-dir . \
    --runtime-env cluster/runtime_env.yaml --no-wait -- python -m distpg train "$CONFIG" "$@" > "$LOG" 2>&1; then
  echo "submit.sh: the cluster at $ADDRESS did not accept the job:" >&2
  grep -v '^\s*$' "$LOG" | tail -8 >&2
  exit 1
fi
echo "job id:  $SUBMISSION_ID"
echo "follow:  $RAY job logs --address $ADDRESS --follow $SUBMISSION_ID"
echo "status:  $RAY job status --address $ADDRESS $SUBMISSION_ID"
echo "stop:    $RAY job stop --address $ADDRESS $SUBMISSION_ID"
[ "$WAIT" = 1 ] || exit 0
timeout "$TIMEOUT" "$RAY" job logs --address "$ADDRESS" --follow "$SUBMISSION_ID" || true
STATUS="$(timeout 60 "${PYTHON:-python3}" -c 'import sys; from ray.job_submission import JobSubmissionClient as C
print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)' "$ADDRESS" "$SUBMISSION_ID" || echo UNKNOWN)"
echo "job $SUBMISSION_ID: $STATUS"
case "$STATUS" in
  SUCCEEDED) exit 0 ;;
  PENDING|RUNNING) echo "still $STATUS after ${TIMEOUT}s; it goes on running (stop it with the command above)" >&2
                   exit 124 ;;
  *) exit 1 ;;
esac
