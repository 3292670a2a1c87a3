#!/usr/bin/env bash
# Internal ports outlive a keel-switch crash, as Open vSwitch's do: the host's address on the bridge's
# internal port stays while the switch is killed (SIGKILL) and restarted from its state, traffic to it
# flows again through the restarted switch, and del-port / del-br delete the taps.
# Usage: internal_restart.sh BUILD_BIN_DIR
set -euo pipefail
KSW_BIN=$1
source "$(dirname "$0")/lib.sh"
ksw_init

sw=ksw-ir-sw-$$ host=ksw-ir-h-$$
ksw_netns "$sw"
ksw_netns "$host"
ip -n "$sw" link add v1 type veth peer name eth0 netns "$host"
ip netns exec "$host" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
ip -n "$host" addr add 10.9.0.2/24 dev eth0
ip -n "$host" link set eth0 up

ksw_start_keel "$sw" "$KSW_TMP/keel"
$KSW_CTL add-br br0 -- add-port br0 v1 -- add-port br0 int1 -- set interface int1 type=internal
ip -n "$sw" addr add 10.9.0.1/24 dev br0
ip -n "$sw" link set br0 up

pass=0 fail=0
expect() {  # expect ok|fail DESCRIPTION COMMAND...
  local want=$1 what=$2 got
  shift 2
  if "$@" >/dev/null 2>&1; then got=ok; else got=fail; fi
  if [[ $got == "$want" ]]; then pass=$((pass + 1)); echo "ok   $what"
  else fail=$((fail + 1)); echo "FAIL $what (wanted $want, got $got)"; fi
}
has_addr() { ip -n "$sw" -4 addr show dev br0 2>/dev/null | grep -q "10.9.0.1/24"; }
ping_bridge() { ip netns exec "$host" ping -c 1 -W 1 10.9.0.1; }

for _ in $(seq 50); do ping_bridge >/dev/null 2>&1 && break; sleep 0.1; done
expect ok "host pings the internal port" ping_bridge
kill -9 "${KSW_PIDS[-1]}"
wait "${KSW_PIDS[-1]}" 2>/dev/null || true
expect ok "br0 and its address outlive SIGKILL" has_addr
expect ok "int1 outlives SIGKILL" ip -n "$sw" link show int1

ksw_start_keel "$sw" "$KSW_TMP/keel"
for _ in $(seq 50); do ping_bridge >/dev/null 2>&1 && break; sleep 0.1; done
expect ok "the restarted switch carries traffic to the same br0" ping_bridge
expect ok "br0 kept its address across the restart" has_addr

$KSW_CTL del-port br0 int1
expect fail "del-port deletes the internal tap" ip -n "$sw" link show int1
$KSW_CTL del-br br0
expect fail "del-br deletes the bridge's internal tap" ip -n "$sw" link show br0

echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
