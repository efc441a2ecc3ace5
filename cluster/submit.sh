#!/usr/bin/env bash
# Submit a distpg training job to a Ray cluster with `ray job submit`.
#
#   cluster/submit.sh [--no-wait] CONFIG [--set key=value ...] [--run-dir DIR]
#
# The dashboard address comes from $RAY_API_SERVER_ADDRESS (or $DISTPG_CLUSTER_DIR/dashboard, as written by
# cluster/local-cluster.sh). With token authentication on, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH
# (or RAY_AUTH_TOKEN); a local-cluster.sh token is picked up by itself. Prints the job id and how to follow
# it. Without --no-wait it tails the logs and exits with the job's status (0 only for SUCCEEDED).
set -euo pipefail
cd "$(dirname "$0")/.."

WAIT=1
if [ "${1:-}" = "--no-wait" ]; then WAIT=0; shift; fi
if [ $# -lt 1 ]; then sed -n '2,9p' "$0"; exit 2; fi
CONFIG="$1"; shift
[ -f "$CONFIG" ] || { echo "submit.sh: config file '$CONFIG' not found" >&2; exit 2; }

CLUSTER_DIR="${DISTPG_CLUSTER_DIR:-/tmp/distpg-cluster}"
ADDRESS="${RAY_API_SERVER_ADDRESS:-$(cat "$CLUSTER_DIR/dashboard" 2>/dev/null || true)}"
[ -n "$ADDRESS" ] || { echo "submit.sh: set RAY_API_SERVER_ADDRESS to the cluster's dashboard (http://HOST:8265)" >&2; exit 2; }
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] && [ -f "$CLUSTER_DIR/auth_token" ]; then
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$CLUSTER_DIR/auth_token"
fi
RAY="${RAY:-ray}"

SUBMISSION_ID="distpg-$(date +%Y%m%d-%H%M%S)-$RANDOM"
echo "submitting $CONFIG to $ADDRESS as job $SUBMISSION_ID"
echo "follow:  $RAY job logs --address $ADDRESS --follow $SUBMISSION_ID"
echo "status:  $RAY job status --address $ADDRESS $SUBMISSION_ID"
echo "stop:    $RAY job stop --address $ADDRESS $SUBMISSION_ID"
"$RAY" job submit --address "$ADDRESS" --submission-id "$SUBMISSION_ID" --working-dir . \
  --runtime-env cluster/runtime_env.yaml --no-wait -- python -m distpg train "$CONFIG" "$@" > /dev/null
[ "$WAIT" = 1 ] || exit 0
"$RAY" job logs --address "$ADDRESS" --follow "$SUBMISSION_ID" || true
STATUS="$("${PYTHON:-python3}" -c 'import sys; from ray.job_submission import JobSubmissionClient as C
print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)' "$ADDRESS" "$SUBMISSION_ID")"
echo "job $SUBMISSION_ID: $STATUS"
[ "$STATUS" = SUCCEEDED ]
