#!/usr/bin/env bash
# Submit a distpg training job to a Ray cluster with `ray job submit`.
#
#   cluster/submit.sh [--no-wait] CONFIG [--set key=value ...] --run-dir /ABS/DIR   a new run
#   cluster/submit.sh [--no-wait] --resume /ABS/RUN_DIR                             continue a stopped run
#
# Runs `ray job submit --working-dir REPO --runtime-env cluster/runtime_env.yaml -- python -m distpg train ...`:
# this repository is uploaded with the job, so the cluster runs exactly the code you have. CONFIG is a path
# from your current folder to a file inside this repository (not in an ignored folder such as runs/). The
# job runs in Ray's temporary copy of the repository on the head, so --run-dir and --resume take absolute
# paths on the head. The dashboard address comes from $RAY_API_SERVER_ADDRESS (or $DISTPG_CLUSTER_DIR/dashboard,
# as written by cluster/local-cluster.sh). With token authentication on, set RAY_AUTH_MODE=token and
# RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN); a local-cluster.sh token is picked up by itself. Prints the job id
# and how to follow it. Without --no-wait it tails the logs and exits with the job's status: 0 only for
# SUCCEEDED, 124 if still running after $DISTPG_SUBMIT_TIMEOUT seconds (default 3600; the job goes on).
set -euo pipefail

usage() { sed -n '2,15p' "$0"; exit 2; }
fail() { echo "submit.sh: $*" >&2; exit 2; }
ROOT="$(cd -P "$(dirname "$0")/.." && pwd -P)"

WAIT=1 CONFIG="" RUN_DIR="" RESUME="" HAVE_RUN_DIR=0 HAVE_RESUME=0 SETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-wait) WAIT=0 ;;
    --set) [ $# -ge 2 ] || fail "--set needs key=value"; SETS+=(--set "$2"); shift ;;
    --set=*) SETS+=(--set "${1#--set=}") ;;
    --run-dir) [ $# -ge 2 ] || fail "--run-dir needs a folder"; RUN_DIR="$2"; HAVE_RUN_DIR=1; shift ;;
    --run-dir=*) RUN_DIR="${1#--run-dir=}"; HAVE_RUN_DIR=1 ;;
    --resume) [ $# -ge 2 ] || fail "--resume needs a run folder"; RESUME="$2"; HAVE_RESUME=1; shift ;;
    --resume=*) RESUME="${1#--resume=}"; HAVE_RESUME=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) fail "unknown option '$1' (submit.sh takes --no-wait, --set, --run-dir and --resume)" ;;
    *) [ -z "$CONFIG" ] || fail "one CONFIG only, got '$CONFIG' and '$1'"; CONFIG="$1" ;;
  esac
  shift
done

if [ "$HAVE_RESUME" = 1 ]; then
  # distpg train --resume takes the config from the run folder and continues in that folder
  [ -z "$CONFIG" ] && [ ${#SETS[@]} -eq 0 ] \
    || fail "--resume continues a run with the config in its folder; drop CONFIG and --set (to change a \
setting, e.g. run.steps, edit RUN_DIR/config.yaml first: the resume names each change)"
  [ "$HAVE_RUN_DIR" = 0 ] || fail "--resume continues the run in RUN_DIR itself; drop --run-dir"
  [[ "$RESUME" == /* ]] || fail "--resume '$RESUME': give the run folder's absolute path on the head (as the \
job printed it): the job runs in Ray's temporary copy of this repository, so a relative path would be looked \
up there"
  TRAIN_ARGS=(--resume "$RESUME")
  WHAT="--resume $RESUME"
else
  [ -n "$CONFIG" ] || usage
  [ "$HAVE_RUN_DIR" = 1 ] || fail "give --run-dir /ABSOLUTE/PATH on the head for the run folder: the job runs \
in Ray's temporary copy of this repository, so the default runs/... would land in Ray's temporary folder on the \
head (shared by jobs, deleted when the cluster restarts)"
  [[ "$RUN_DIR" == /* ]] || fail "--run-dir '$RUN_DIR' is relative; give an absolute path on the head: the job \
runs in Ray's temporary copy of this repository, so a relative path would land in Ray's temporary folder on the \
head (shared by jobs, deleted when the cluster restarts)"
  # CONFIG is a path from the caller's folder; the job reads it from its copy of the repository
  [ -f "$CONFIG" ] || fail "config file '$CONFIG' not found (from $PWD)"
  CONFIG_ABS="$(cd -P "$(dirname "$CONFIG")" && pwd -P)/$(basename "$CONFIG")"
  case "$CONFIG_ABS" in
    "$ROOT"/*) CONFIG_REL="${CONFIG_ABS#"$ROOT"/}" ;;
    *) fail "config file '$CONFIG' ($CONFIG_ABS) is outside $ROOT, the folder uploaded with the job, so the \
job could not read it; copy it into the repository (e.g. configs/) and submit that" ;;
  esac
  # what the upload leaves out: runtime_env.yaml's excludes and .gitignore'd paths (Ray honours .gitignore)
  excluded=0
  case "/$CONFIG_REL" in /.git/*|/.venv/*|/runs/*|/.device/*|*/__pycache__/*) excluded=1 ;; esac
  if git -C "$ROOT" check-ignore --no-index -q -- "$CONFIG_REL" 2>/dev/null; then excluded=1; fi
  [ "$excluded" = 0 ] || fail "config file '$CONFIG' ($CONFIG_REL) is in a folder left out of the upload \
(cluster/runtime_env.yaml excludes, .gitignore), so the job could not read it; copy it to e.g. configs/"
  TRAIN_ARGS=("$CONFIG_REL" ${SETS[@]+"${SETS[@]}"} --run-dir "$RUN_DIR")
  WHAT="$CONFIG_REL (run folder $RUN_DIR)"
fi
cd "$ROOT"

CLUSTER_DIR="${DISTPG_CLUSTER_DIR:-/tmp/distpg-cluster}"
ADDRESS="${RAY_API_SERVER_ADDRESS:-$(cat "$CLUSTER_DIR/dashboard" 2>/dev/null || true)}"
[ -n "$ADDRESS" ] || fail "set RAY_API_SERVER_ADDRESS to the cluster's dashboard (http://HOST:8265)"
AUTH_PREFIX=""  # what the printed commands need in a fresh shell
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] && [ -f "$CLUSTER_DIR/auth_token" ]; then
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$CLUSTER_DIR/auth_token"
  AUTH_PREFIX="RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$(printf '%q' "$RAY_AUTH_TOKEN_PATH") "
fi
RAY="${RAY:-ray}"
TIMEOUT="${DISTPG_SUBMIT_TIMEOUT:-3600}"

SUBMISSION_ID="distpg-$(date +%Y%m%d-%H%M%S)-$RANDOM"
echo "submitting $WHAT to $ADDRESS as job $SUBMISSION_ID"
LOG="$(mktemp)"; trap 'rm -f "$LOG"' EXIT
# the submission itself is one HTTP request; 120 s covers uploading the working dir on a slow link
if ! timeout 120 "$RAY" job submit --address "$ADDRESS" --submission-id "$SUBMISSION_ID" --working-dir . \
    --runtime-env cluster/runtime_env.yaml --no-wait -- python -m distpg train "${TRAIN_ARGS[@]}" > "$LOG" 2>&1; then
  echo "submit.sh: the cluster at $ADDRESS did not accept the job:" >&2
  grep -v '^\s*$' "$LOG" | tail -8 >&2
  exit 1
fi
Q_RAY="$(printf '%q' "$RAY")" Q_ADDRESS="$(printf '%q' "$ADDRESS")"
echo "job id:  $SUBMISSION_ID"
echo "follow:  $AUTH_PREFIX$Q_RAY job logs --address $Q_ADDRESS --follow $SUBMISSION_ID"
echo "status:  $AUTH_PREFIX$Q_RAY job status --address $Q_ADDRESS $SUBMISSION_ID"
echo "stop:    $AUTH_PREFIX$Q_RAY job stop --address $Q_ADDRESS $SUBMISSION_ID"
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
