#!/usr/bin/env bash
# Starts a local Sluice cluster on loopback: a Redis Cluster of 3 primaries + 3 replicas
# and 3 Sluice nodes serving it (`sluice serve --storage redis`), each on free ports this
# script picks. All state (Redis data, nodes.conf, logs, PIDs, addresses) goes under
# $SLUICE_CLUSTER_DIR (default ./sluice-cluster):
#
#   pids        "<kind> <pid> <port>" per process (what cluster-down.sh kills)
#   redis-seeds the Redis nodes' URLs, comma-separated (what --redis was given)
#   grpc-addrs  the Sluice nodes' gRPC addresses, one a line
#   http-addrs  their HTTP (metrics, health, dashboard) addresses, one a line
#
#   scripts/cluster-up.sh      # prints the gRPC addresses
#   scripts/cluster-down.sh    # stops every process it started (--purge: removes the dir)
#
# target/release/sluice is built (cargo build --release --bin sluice) only when missing;
# $SLUICE_BIN names another binary instead.
# If anything fails to start, whatever this run started is stopped again.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${SLUICE_CLUSTER_DIR:-./sluice-cluster}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
bin="${SLUICE_BIN:-$root/target/release/sluice}"

if [[ -s "$dir/pids" ]]; then
    echo "cluster-up: $dir/pids exists: a cluster may be running; run scripts/cluster-down.sh first" >&2
    exit 1
fi
if compgen -G "$dir/redis-*/nodes.conf" >/dev/null; then
    echo "cluster-up: $dir holds an old cluster's state; run scripts/cluster-down.sh --purge first" >&2
    exit 1
fi

if [[ -z "${SLUICE_BIN:-}" && ! -x "$bin" ]]; then
    (cd "$root" && cargo build --release --bin sluice)
fi

# On failure, stop what this run started (by the PIDs it recorded).
started=0
cleanup() {
    if [[ "$started" -eq 0 ]]; then
        SLUICE_CLUSTER_DIR="$dir" bash "$root/scripts/cluster-down.sh" >&2 || true
    fi
}
trap cleanup EXIT

# Ports already handed out by this run (a port is probed free before it is bound).
taken=" "

# Whether something listens on 127.0.0.1:$1.
listening() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Prints a port in 20000-29999 (below the usual ephemeral range) that nothing listens on
# and this run has not handed out yet.
free_port() {
    local port
    for _ in $(seq 200); do
        port=$((20000 + RANDOM % 10000))
        if [[ "$taken" != *" $port "* ]] && ! listening "$port"; then
            taken+="$port "
            echo "$port"
            return 0
        fi
    done
    echo "cluster-up: no free port found" >&2
    return 1
}

# Waits (up to $3 seconds) until 127.0.0.1:$2 accepts connections while PID $1 lives.
wait_listening() {
    local pid=$1 port=$2 limit=$3 log=$4
    local deadline=$((SECONDS + limit))
    until listening "$port"; do
        if ! kill -0 "$pid" 2>/dev/null || ((SECONDS >= deadline)); then
            echo "cluster-up: process $pid did not listen on 127.0.0.1:$port; the end of $log:" >&2
            tail -n 20 "$log" >&2 || true
            return 1
        fi
        sleep 0.1
    done
}

: >"$dir/pids"

redis_ports=()
for i in 1 2 3 4 5 6; do
    node="$dir/redis-$i"
    mkdir -p "$node"
    port=$(free_port)
    bus=$(free_port)
    # The bus port is explicit (--cluster-port, Redis 7): port + 10000 could be taken.
    redis-server --port "$port" --bind 127.0.0.1 --protected-mode no \
        --cluster-enabled yes --cluster-config-file "$node/nodes.conf" \
        --cluster-node-timeout 1000 --cluster-port "$bus" \
        --appendonly yes --dir "$node" --logfile "$node/redis.log" \
        </dev/null >/dev/null 2>&1 &
    echo "redis $! $port" >>"$dir/pids"
    wait_listening "$!" "$port" 10 "$node/redis.log"
    redis_ports+=("$port")
done

addrs=()
seeds=()
for port in "${redis_ports[@]}"; do
    addrs+=("127.0.0.1:$port")
    seeds+=("redis://127.0.0.1:$port")
done
redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
    >"$dir/cluster-create.log" 2>&1 || {
    echo "cluster-up: redis-cli --cluster create failed:" >&2
    cat "$dir/cluster-create.log" >&2
    exit 1
}

# Every node must see the whole cluster serving every slot before Sluice connects.
deadline=$((SECONDS + 30))
for port in "${redis_ports[@]}"; do
    until redis-cli -h 127.0.0.1 -p "$port" CLUSTER INFO | grep -q '^cluster_state:ok'; do
        if ((SECONDS >= deadline)); then
            echo "cluster-up: node 127.0.0.1:$port never reported cluster_state:ok" >&2
            exit 1
        fi
        sleep 0.2
    done
done
(IFS=,; echo "${seeds[*]}") >"$dir/redis-seeds"
redis_arg="$(cat "$dir/redis-seeds")"

: >"$dir/grpc-addrs"
: >"$dir/http-addrs"
for i in 1 2 3; do
    node="$dir/sluice-$i"
    mkdir -p "$node"
    grpc=$(free_port)
    http=$(free_port)
    "$bin" serve --storage redis --redis "$redis_arg" \
        --listen "127.0.0.1:$grpc" --http "127.0.0.1:$http" \
        </dev/null >"$node/sluice.log" 2>&1 &
    echo "sluice $! $grpc" >>"$dir/pids"
    wait_listening "$!" "$grpc" 30 "$node/sluice.log"
    echo "127.0.0.1:$grpc" >>"$dir/grpc-addrs"
    echo "127.0.0.1:$http" >>"$dir/http-addrs"
done

started=1
echo "Redis Cluster: $redis_arg"
echo "Sluice gRPC addresses (also in $dir/grpc-addrs):"
cat "$dir/grpc-addrs"
