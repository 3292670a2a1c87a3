# Shared helpers for keel-switch integration tests and benchmarks (sourced, not run).
# Everything a test starts is recorded and torn down by pid / by name in cleanup.

KSW_NETNS=()
KSW_PIDS=()
KSW_OVS_DIRS=()
KSW_TMP=""
KSW_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

ksw_cleanup() {
  local pid ns dir
  for dir in "${KSW_OVS_DIRS[@]}"; do bash "$KSW_HERE/ovs_peer.sh" stop "$dir" || true; done
  for pid in "${KSW_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  for ns in "${KSW_NETNS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  [[ -n "$KSW_TMP" ]] && rm -rf "$KSW_TMP"
}

ksw_init() {
  KSW_TMP=$(mktemp -d /tmp/ksw-test.XXXXXX)
  trap ksw_cleanup EXIT
}

# ksw_netns NAME: a fresh network namespace with loopback up.
ksw_netns() {
  ip netns del "$1" 2>/dev/null || true
  ip netns add "$1"
  ip -n "$1" link set lo up
  KSW_NETNS+=("$1")
}

# ksw_start_keel NETNS DIR: runs keel-switch inside NETNS with state in DIR; sets KSW_CTL.
ksw_start_keel() {
  local ns=$1 dir=$2
  mkdir -p "$dir"
  ip netns exec "$ns" "$KSW_BIN/keel-switch" --state-dir "$dir" --ctl-socket "$dir/ctl.sock" \
    --log-level "${KSW_LOG_LEVEL:-info}" >"$dir/keel-switch.log" 2>&1 &
  KSW_PIDS+=($!)
  for _ in $(seq 100); do [[ -S "$dir/ctl.sock" ]] && break; sleep 0.05; done
  [[ -S "$dir/ctl.sock" ]] || { echo "keel-switch did not start"; cat "$dir/keel-switch.log"; return 1; }
  KSW_CTL="$KSW_BIN/keel-switch-ctl --socket $dir/ctl.sock"
}

# ksw_start_ovs NETNS DIR BRIDGE PORT
ksw_start_ovs() {
  KSW_OVS_DIRS+=("$2")
  bash "$KSW_HERE/ovs_peer.sh" start "$2" "$1" "$3" "$4" >/dev/null 2>&1 || {
    echo "Open vSwitch did not start"; cat "$2"/*.log; return 1; }
  KSW_OVS_VSCTL="ovs-vsctl --db=unix:$2/db.sock --timeout=20"
}

# ksw_wait_of NETNS PORT: waits until an OpenFlow listener answers.
ksw_wait_of() {
  for _ in $(seq 100); do
    ip netns exec "$1" ovs-ofctl -O OpenFlow13 show "tcp:127.0.0.1:$2" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "no OpenFlow listener on $1:$2"; return 1
}
