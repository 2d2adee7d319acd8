#!/usr/bin/env bash
# Stops the cluster scripts/cluster-up.sh started under $SLUICE_CLUSTER_DIR (default
# ./sluice-cluster): only the PIDs recorded in its `pids` file, and only while each still
# is the redis-server or sluice process it was (a PID reused since is left alone). SIGTERM
# first, SIGKILL after 10 s.
#
#   scripts/cluster-down.sh          # stop; keep the data and logs
#   scripts/cluster-down.sh --purge  # stop and remove the directory
set -euo pipefail

dir="${SLUICE_CLUSTER_DIR:-./sluice-cluster}"
purge=0
case "${1:-}" in
    "") ;;
    --purge) purge=1 ;;
    *)
        echo "usage: $0 [--purge]" >&2
        exit 2
        ;;
esac

# Whether PID $1 is alive and runs the program named $2 (redis-server or sluice).
is_ours() {
    local pid=$1 kind=$2 cmd
    cmd="$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")" || return 1
    case "$kind" in
        redis) [[ "$cmd" == *redis-server* ]] ;;
        sluice) [[ "$cmd" == */sluice\ serve* ]] ;;
        *) return 1 ;;
    esac
}

if [[ -f "$dir/pids" ]]; then
    pids=()
    while read -r kind pid _port; do
        [[ -n "${pid:-}" ]] || continue
        if is_ours "$pid" "$kind"; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done <"$dir/pids"
    deadline=$((SECONDS + 10))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do
            if ((SECONDS >= deadline)); then
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
    done
    echo "stopped ${#pids[@]} process(es) recorded in $dir/pids"
    rm -f "$dir/pids"
else
    echo "no $dir/pids: nothing to stop"
fi

if [[ "$purge" -eq 1 && -d "$dir" ]]; then
    rm -rf "$dir"
    echo "removed $dir"
fi
