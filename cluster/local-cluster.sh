#!/usr/bin/env bash
# A real multi-node Ray cluster on this machine: a head and N worker nodes, each its own `ray start` process
# tree with its own ports, its own temp dir ($DIR/node_I) and a custom resource naming it (distpg_node_0 is
# the head, distpg_node_1..N the workers), for multi-node tests, demos and scaling runs.
#
#   cluster/local-cluster.sh start [N]   start a head and N worker nodes (default 2); prints the addresses
#   cluster/local-cluster.sh stop        stop every process of this cluster (and nothing else)
#   cluster/local-cluster.sh status      `ray status` of this cluster
#   cluster/local-cluster.sh env         export lines for a client shell: eval "$(cluster/local-cluster.sh env)"
#   cluster/local-cluster.sh stop-node I kill worker node I (SIGKILL, its whole process tree): a node lost
#   cluster/local-cluster.sh start-node I start worker node I (again, after stop-node, or a new one): a node
#                                        joining, with the CPUs and object store the others were started with
#
# Loopback only: every port of every node (GCS, raylets, object managers, dashboard, agents, metrics, the
# Ray client server) listens on 127.0.0.1, nothing on the machine's network address. Ray's CLI rewrites
# 127.0.0.1 and localhost to the machine's routable address, so the head is started with Ray's own switch
# for single-machine clusters (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: keep 127.0.0.1) and the workers and
# clients join through `LOCALHOST:PORT`, which resolves to 127.0.0.1 but is not the literal Ray rewrites.
# Use the printed address (RAY_ADDRESS) as is.
#
# Token authentication is on: the script writes a fresh token to $DIR/auth_token and every node it starts
# uses it (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH). Clients must do the same (cluster/submit.sh does);
# set DISTPG_CLUSTER_AUTH=off to start a cluster without authentication.
#
# Environment: DISTPG_CLUSTER_DIR (state and Ray temp dirs, default /tmp/distpg-cluster; short enough for Ray's
# Unix sockets under it, see check_socket_room), DISTPG_CLUSTER_CPUS
# (CPUs per node, default 1), DISTPG_CLUSTER_OBJECT_STORE_MB (object store per node, default 256),
# DISTPG_CLUSTER_PORT (GCS port, default: a free one), DISTPG_CLUSTER_TIMEOUT (seconds each `ray start`
# may take, default 120). `stop` kills exactly the process trees this script started, so other Ray
# runtimes on the machine are left alone (unlike `ray stop`, which stops every Ray of the machine).
set -euo pipefail

DIR="${DISTPG_CLUSTER_DIR:-/tmp/distpg-cluster}"
CPUS="${DISTPG_CLUSTER_CPUS:-1}"
STORE_MB="${DISTPG_CLUSTER_OBJECT_STORE_MB:-256}"
TIMEOUT="${DISTPG_CLUSTER_TIMEOUT:-120}"
PY="${PYTHON:-python3}"
RAY="${RAY:-ray}"

# A free loopback port that this script has not handed out yet for this cluster ($DIR/ports): the kernel may
# give a closed port out again, and Ray refuses to start a node whose components were given the same port.
free_port() {
  "$PY" -c '
import os, socket, sys
used = set(open(sys.argv[1]).read().split()) if os.path.exists(sys.argv[1]) else set()
while True:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    if str(port) not in used:
        break
with open(sys.argv[1], "a") as f:
    f.write(f"{port}\n")
print(port)' "$DIR/ports"
}

# Ray binds Unix sockets under each node's temp dir, and a socket path holds at most 107 bytes (108 with its
# NUL): past that the head's dashboard fails with a bare "Module MetricsHead failed to start". The longest is
# the head's $DIR/node_0/session_<YYYY-MM-DD_HH-MM-SS_ffffff>_<pid of ray start>/sockets/dash_MetricsHead
# (the dashboard's modules' sockets; a worker node's, plasma_store and raylet, are shorter). Checked before
# anything starts, with the longest pid this kernel hands out (kernel.pid_max).
check_socket_room() {
  local abs="$DIR" top_pid=4194303 bytes longest
  [[ "$abs" = /* ]] || abs="$PWD/$abs"
  [ -r /proc/sys/kernel/pid_max ] && top_pid=$(( $(cat /proc/sys/kernel/pid_max) - 1 ))
  bytes=$(printf %s "$abs" | wc -c)
  # /node_0/ + session_ + date (26) + _ + pid + /sockets/ + dash_MetricsHead
  longest=$(( bytes + 8 + 8 + 26 + 1 + ${#top_pid} + 9 + 16 ))
  if [ "$longest" -gt 107 ]; then
    echo "local-cluster.sh: DISTPG_CLUSTER_DIR=$abs is too long: Ray's Unix sockets under it" \
         "(node_0/session_..._PID/sockets/dash_MetricsHead) would take up to $longest bytes, and a Unix socket" \
         "path holds at most 107 (the head's dashboard would fail: 'Module MetricsHead failed to start');" \
         "allowed: a DISTPG_CLUSTER_DIR of at most $((107 - longest + bytes)) bytes (default /tmp/distpg-cluster)" >&2
    exit 2
  fi
}

descendants() {  # a pid and all its descendants
  local pid=$1 child
  echo "$pid"
  for child in $(pgrep -P "$pid" 2>/dev/null); do descendants "$child"; done
}

cluster_pids() {  # this cluster's processes and their descendants; prints nothing once it is gone
  local pid pattern="$DIR/" recorded=""
  # The GCS port and the pids recorded at start count only while processes naming this cluster's dir live:
  # a stale state dir must never match another cluster that reuses the port (or a reused pid).
  pgrep -f -- "$DIR/" > /dev/null 2>&1 || return 0
  if [ -f "$DIR/gcs_port" ]; then pattern="$DIR/|LOCALHOST:$(cat "$DIR/gcs_port")( |$)"; fi
  for pid in $(cat "$DIR/pids" 2>/dev/null); do
    { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | grep -qi ray && recorded="$recorded $pid"
  done
  for pid in $(pgrep -f -- "$pattern" 2>/dev/null) $recorded; do
    [ "$pid" = "$$" ] || descendants "$pid"
  done | sort -u
}

start_node() {  # $1 = node index (0 = head)
  local i=$1 args
  # every port a node opens is named here, so two clusters (or another Ray) on the machine never collide
  args=(--num-cpus="$CPUS" --resources="{\"distpg_node_$i\": 1}" --disable-usage-stats
        --temp-dir="$DIR/node_$i" --object-store-memory=$((STORE_MB * 1024 * 1024))
        --node-manager-port="$(free_port)" --object-manager-port="$(free_port)"
        --dashboard-agent-listen-port="$(free_port)" --dashboard-agent-grpc-port="$(free_port)"
        --metrics-export-port="$(free_port)" --runtime-env-agent-port="$(free_port)")
  if [ "$i" = 0 ]; then
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 AUTOSCALER_METRIC_PORT="$(free_port)" DASHBOARD_METRIC_PORT="$(free_port)" \
      timeout "$TIMEOUT" "$RAY" start --head --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" \
      --ray-client-server-port="$(free_port)" "${args[@]}" > "$DIR/node_$i.log" 2>&1
  else
    timeout "$TIMEOUT" "$RAY" start --address="$ADDRESS" "${args[@]}" > "$DIR/node_$i.log" 2>&1
  fi || { echo "node $i failed to start (or took over ${TIMEOUT}s); its log:" >&2; tail -20 "$DIR/node_$i.log" >&2
          [ "${STOP_ON_FAILURE:-1}" = 1 ] && { "$0" stop >&2 || true; }; exit 1; }
}

case "${1:-}" in
  start)
    N="${2:-2}"
    [[ "$N" =~ ^[0-9]+$ ]] || { echo "local-cluster.sh: N must be a number of worker nodes, got '$N'" >&2; exit 2; }
    check_socket_room
    if [ -n "$(cluster_pids)" ]; then
      echo "a cluster is already running from $DIR (address $(cat "$DIR/address" 2>/dev/null)); stop it first" >&2
      exit 1
    fi
    rm -rf "$DIR"; mkdir -p "$DIR"
    if [ "${DISTPG_CLUSTER_AUTH:-on}" = on ]; then
      (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$DIR/auth_token")
      export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
    else
      export RAY_AUTH_MODE=disabled
    fi
    export RAY_USAGE_STATS_ENABLED=0
    GCS_PORT="${DISTPG_CLUSTER_PORT:-$(free_port)}"; DASH_PORT="$(free_port)"
    echo "$GCS_PORT" > "$DIR/gcs_port"
    echo "$CPUS $STORE_MB" > "$DIR/node_shape"  # for start-node: a node joining later is like the others
    ADDRESS="LOCALHOST:$GCS_PORT"
    start_node 0
    for i in $(seq 1 "$N"); do start_node "$i"; done
    # record every process now, while the GCS port is surely ours: Ray's client server names only the
    # head's 127.0.0.1:PORT, which a later cluster could reuse
    { cluster_pids; pgrep -f -- "127\.0\.0\.1:$GCS_PORT( |$)"; } | sort -u > "$DIR/pids"
    echo "$ADDRESS" > "$DIR/address"
    echo "http://127.0.0.1:$DASH_PORT" > "$DIR/dashboard"
    echo "cluster up: head + $N worker nodes ($CPUS CPU each), every port on 127.0.0.1; state in $DIR"
    echo "RAY_ADDRESS=$ADDRESS                   # for distpg train --address / distpg doctor / ray.init"
    echo "RAY_API_SERVER_ADDRESS=$(cat "$DIR/dashboard")   # for ray job submit (cluster/submit.sh)"
    [ -f "$DIR/auth_token" ] && echo "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIR/auth_token   # clients need the token"
    echo "for this shell: eval \"\$(DISTPG_CLUSTER_DIR=$DIR $0 env)\""
    ;;
  stop)
    pids="$(cluster_pids)"
    if [ -z "$pids" ]; then echo "no cluster processes under $DIR"; exit 0; fi
    kill -TERM $pids 2>/dev/null || true
    alive=""
    # 2 s of grace, then SIGKILL: the raylets and their runtime-env agents (and the GCS) outlasted SIGTERM for
    # any grace tried (10 s: every stop took 11 s), and a killed node loses nothing a stopped cluster needs
    # (stop-node kills outright, and the object store's shared memory goes with its process)
    for _ in $(seq 1 4); do
      alive=""; for p in $pids; do [ -d "/proc/$p" ] && ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null \
        && alive="$alive $p"; done
      [ -z "$alive" ] && break; sleep 0.5
    done
    [ -n "$alive" ] && kill -KILL $alive 2>/dev/null || true
    rm -f "$DIR/pids" "$DIR/gcs_port" "$DIR/address"  # this state describes nothing any more
    echo "stopped $(echo "$pids" | wc -w) processes"
    ;;
  stop-node)
    I="${2:-}"
    [[ "$I" =~ ^[1-9][0-9]*$ ]] || { echo "local-cluster.sh: stop-node takes a worker node index >= 1, got '$I'" >&2; exit 2; }
    pids="$(for pid in $(pgrep -f -- "$DIR/node_$I/" 2>/dev/null); do descendants "$pid"; done | sort -u)"
    [ -n "$pids" ] || { echo "no processes of node $I under $DIR" >&2; exit 1; }
    kill -KILL $pids 2>/dev/null || true
    echo "killed node $I ($(echo "$pids" | wc -w) processes)"
    ;;
  start-node)
    I="${2:-}"
    [[ "$I" =~ ^[1-9][0-9]*$ ]] || { echo "local-cluster.sh: start-node takes a worker node index >= 1, got '$I'" >&2; exit 2; }
    [ -f "$DIR/address" ] && [ -n "$(cluster_pids)" ] || { echo "no cluster running under $DIR; start one first" >&2; exit 1; }
    if pgrep -f -- "$DIR/node_$I/" > /dev/null 2>&1; then echo "node $I is running already" >&2; exit 1; fi
    if [ -f "$DIR/auth_token" ]; then export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
    else export RAY_AUTH_MODE=disabled; fi
    export RAY_USAGE_STATS_ENABLED=0
    ADDRESS="$(cat "$DIR/address")"
    read -r cpus store_mb < "$DIR/node_shape" || true
    CPUS="${DISTPG_CLUSTER_CPUS:-${cpus:-$CPUS}}"; STORE_MB="${DISTPG_CLUSTER_OBJECT_STORE_MB:-${store_mb:-$STORE_MB}}"
    rm -rf "${DIR:?}/node_$I"  # a lost node's session files; the node starts afresh
    STOP_ON_FAILURE=0 start_node "$I"  # a node that fails to join leaves the rest of the cluster running
    { cat "$DIR/pids" 2>/dev/null; pgrep -f -- "$DIR/node_$I/"; } | sort -u > "$DIR/pids.new" && mv "$DIR/pids.new" "$DIR/pids"
    echo "node $I joined $ADDRESS ($CPUS CPU)"
    ;;
  env)
    [ -f "$DIR/address" ] || { echo "no cluster state under $DIR" >&2; exit 1; }
    echo "export RAY_ADDRESS=$(cat "$DIR/address") RAY_API_SERVER_ADDRESS=$(cat "$DIR/dashboard")"
    if [ -f "$DIR/auth_token" ]; then
      echo "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIR/auth_token"
    fi
    ;;
  status)
    [ -f "$DIR/address" ] || { echo "no cluster state under $DIR" >&2; exit 1; }
    [ -f "$DIR/auth_token" ] && export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
    RAY_ADDRESS="$(cat "$DIR/address")" timeout "$TIMEOUT" "$RAY" status
    ;;
  *)
    sed -n '2,13p' "$0"; exit 2 ;;
esac
