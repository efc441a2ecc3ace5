#!/usr/bin/env bash
# A real multi-node Ray cluster on this machine: a head and N worker nodes, each a `ray start` process
# tree with its own ports and a custom resource naming it (distpg_node_0 is the head, distpg_node_1..N
# the workers), for multi-node tests and demos.
#
#   cluster/local-cluster.sh start [N]   start a head and N worker nodes (default 2); prints the addresses
#   cluster/local-cluster.sh stop        stop every process of this cluster (and nothing else)
#   cluster/local-cluster.sh status      `ray status` of this cluster
#
# Token authentication is on: the script writes a fresh token to $DIR/auth_token and every node and client
# it starts uses it (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH). Clients must do the same (cluster/submit.sh
# does); set DISTPG_CLUSTER_AUTH=off to start a cluster without authentication.
#
# Environment: DISTPG_CLUSTER_DIR (state and Ray temp dir, default /tmp/distpg-cluster),
# DISTPG_CLUSTER_CPUS (CPUs per node, default 1), DISTPG_CLUSTER_PORT (GCS port, default: a free one).
# Ports are chosen free at start; `stop` kills exactly the process trees this script started, so other
# Ray runtimes on the machine are left alone (unlike `ray stop`).
set -euo pipefail

DIR="${DISTPG_CLUSTER_DIR:-/tmp/distpg-cluster}"
CPUS="${DISTPG_CLUSTER_CPUS:-1}"
PY="${PYTHON:-python3}"
RAY="${RAY:-ray}"

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

descendants() {  # a pid and all its descendants
  local pid=$1 child
  echo "$pid"
  for child in $(pgrep -P "$pid" 2>/dev/null); do descendants "$child"; done
}

cluster_pids() {  # every process whose command line names this cluster's dir or GCS address, and descendants
  local pid pattern="$DIR"
  [ -f "$DIR/address" ] && pattern="$DIR|address=$(cat "$DIR/address")( |$)"
  for pid in $(pgrep -f -- "$pattern" 2>/dev/null); do
    [ "$pid" = "$$" ] || descendants "$pid"
  done | sort -u
}

start_node() {  # $1 = node index (0 = head)
  local i=$1 args
  args=(--num-cpus="$CPUS" --resources="{\"distpg_node_$i\": 1}" --disable-usage-stats
        --dashboard-agent-listen-port="$(free_port)" --dashboard-agent-grpc-port="$(free_port)"
        --metrics-export-port="$(free_port)" --runtime-env-agent-port="$(free_port)")
  if [ "$i" = 0 ]; then
    "$RAY" start --head --port="$GCS_PORT" --temp-dir="$DIR/ray" --include-dashboard=true \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" --ray-client-server-port="$(free_port)" \
      "${args[@]}" > "$DIR/node_$i.log" 2>&1
  else
    "$RAY" start --address="$ADDRESS" "${args[@]}" > "$DIR/node_$i.log" 2>&1
  fi || { echo "node $i failed to start; its log:" >&2; tail -20 "$DIR/node_$i.log" >&2; exit 1; }
}

case "${1:-}" in
  start)
    N="${2:-2}"
    if [ -f "$DIR/address" ] && [ -n "$(cluster_pids)" ]; then
      echo "a cluster is already running from $DIR (address $(cat "$DIR/address")); stop it first" >&2; exit 1
    fi
    rm -rf "$DIR"; mkdir -p "$DIR"
    if [ "${DISTPG_CLUSTER_AUTH:-on}" = on ]; then
      "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$DIR/auth_token"; chmod 600 "$DIR/auth_token"
      export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
    else
      export RAY_AUTH_MODE=disabled
    fi
    GCS_PORT="${DISTPG_CLUSTER_PORT:-$(free_port)}"; DASH_PORT="$(free_port)"
    start_node 0
    ADDRESS="$(grep -o "ray start --address='[^']*'" "$DIR/node_0.log" | head -1 | sed "s/.*='\(.*\)'/\1/")"
    [ -n "$ADDRESS" ] || ADDRESS="127.0.0.1:$GCS_PORT"
    for i in $(seq 1 "$N"); do start_node "$i"; done
    echo "$ADDRESS" > "$DIR/address"
    echo "http://127.0.0.1:$DASH_PORT" > "$DIR/dashboard"
    echo "cluster up: head + $N worker nodes ($CPUS CPU each)"
    echo "RAY_ADDRESS=$ADDRESS                  # for distpg train / ray.init"
    echo "RAY_API_SERVER_ADDRESS=$(cat "$DIR/dashboard")   # for ray job submit (cluster/submit.sh)"
    [ -f "$DIR/auth_token" ] && echo "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIR/auth_token   # clients need the token"
    ;;
  stop)
    pids="$(cluster_pids)"
    if [ -z "$pids" ]; then echo "no cluster processes under $DIR"; exit 0; fi
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 20); do
      alive=""; for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
      [ -z "$alive" ] && break; sleep 0.5
    done
    [ -n "$alive" ] && kill -KILL $alive 2>/dev/null || true
    echo "stopped $(echo "$pids" | wc -w) processes"
    ;;
  status)
    [ -f "$DIR/auth_token" ] && export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
    RAY_ADDRESS="$(cat "$DIR/address")" "$RAY" status
    ;;
  *)
    sed -n '2,14p' "$0"; exit 2 ;;
esac
