#!/usr/bin/env bash
# keel-switch vs Open vSwitch (userspace netdev datapath), same topology, same run, alternating:
#   host A (netns) --veth--> switch (netns) --veth--> host B (netns), offloads off on every veth.
# Measures 64-byte packets per second (A -> B, AF_PACKET sendmmsg generator), TCP throughput (iperf3
# A -> B), each with NORMAL only and with 10,000 installed flows, and the flow-mod rates of
# `ovs-ofctl add-flows`, `mod-flows` and `del-flows` with 10,000 flows. Prints medians and keel/OVS ratios.
# Then a second scenario, offloads on (the veths' defaults: checksum and segmentation offload, so
# hosts send 64 KB TCP super-frames), TCP with NORMAL, OVS restarted with userspace-tso-enable=true.
# Usage: bench/switch/run.sh [BUILD_DIR] [ROUNDS]   (root; builds nothing)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build=${1:-$here/../../build}
rounds=${2:-3}
KSW_BIN=$build/src/switch
pktgen=$build/bench/switch/ksw-pktgen
tcp_seconds=${TCP_SECONDS:-5}
pps_seconds=${PPS_SECONDS:-3}
source "$here/../../tests/integration/switch/lib.sh"
ksw_init
for tool in iperf3 ovs-vswitchd ethtool "$pktgen" "$KSW_BIN/keel-switch"; do
  command -v "$tool" >/dev/null || { echo "missing $tool"; exit 1; }
done

declare -A SW A B
for kind in keel ovs; do
  SW[$kind]=kb-$kind-sw
  A[$kind]=kb-$kind-a
  B[$kind]=kb-$kind-b
  ksw_netns "${SW[$kind]}"
  ksw_netns "${A[$kind]}"
  ksw_netns "${B[$kind]}"
  ip -n "${SW[$kind]}" link add pa type veth peer name eth0 netns "${A[$kind]}"
  ip -n "${SW[$kind]}" link add pb type veth peer name eth0 netns "${B[$kind]}"
  ip -n "${A[$kind]}" addr add 10.0.0.1/24 dev eth0
  ip -n "${B[$kind]}" addr add 10.0.0.2/24 dev eth0
  ip -n "${B[$kind]}" link set eth0 address 02:00:00:00:00:02
  for ns in "${A[$kind]}" "${B[$kind]}"; do
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
    ip -n "$ns" link set eth0 up
    ip netns exec "$ns" ethtool -K eth0 tx off tso off gso off gro off >/dev/null 2>&1 || true
  done
  for p in pa pb; do
    ip -n "${SW[$kind]}" link set $p up
    ip netns exec "${SW[$kind]}" ethtool -K $p tx off tso off gso off gro off >/dev/null 2>&1 || true
  done
done

ksw_start_keel "${SW[keel]}" "$KSW_TMP/keel"
$KSW_CTL add-br br0 -- set-controller br0 ptcp:6653:127.0.0.1 -- add-port br0 pa -- add-port br0 pb
ksw_start_ovs "${SW[ovs]}" "$KSW_TMP/ovs" br0 6653
$KSW_OVS_VSCTL add-port br0 pa -- add-port br0 pb
ksw_wait_of "${SW[keel]}" 6653
ksw_wait_of "${SW[ovs]}" 6653

for kind in keel ovs; do
  ip netns exec "${B[$kind]}" iperf3 -s -D -p 5201 --pidfile "$KSW_TMP/iperf-$kind.pid"
  sleep 0.3
  KSW_PIDS+=("$(cat "$KSW_TMP/iperf-$kind.pid")")
  # Warm up ARP and MAC learning.
  ip netns exec "${A[$kind]}" ping -c 3 -i 0.2 -W 1 10.0.0.2 >/dev/null
done

tcp_gbps() {  # kind
  ip netns exec "${A[$1]}" iperf3 -c 10.0.0.2 -p 5201 -t "$tcp_seconds" -J 2>/dev/null |
    python3 -c 'import json,sys; print("%.3f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}
pps() {  # kind
  local ns=${B[$1]} before after
  before=$(ip netns exec "$ns" cat /sys/class/net/eth0/statistics/rx_packets)
  ip netns exec "${A[$1]}" "$pktgen" eth0 "$pps_seconds" 64 02:00:00:00:00:02 16 >/dev/null
  sleep 0.2
  after=$(ip netns exec "$ns" cat /sys/class/net/eth0/statistics/rx_packets)
  echo $(((after - before) / pps_seconds))
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A RESULT
measure() {  # scenario
  local scenario=$1 kind r
  declare -A tcp pp
  for kind in keel ovs; do tcp[$kind]=""; pp[$kind]=""; done
  for r in $(seq "$rounds"); do
    for kind in keel ovs; do
      tcp[$kind]+="$(tcp_gbps $kind) "
      pp[$kind]+="$(pps $kind) "
    done
  done
  for kind in keel ovs; do
    RESULT[$scenario,tcp,$kind]=$(tr ' ' '\n' <<<"${tcp[$kind]}" | grep . | median)
    RESULT[$scenario,pps,$kind]=$(tr ' ' '\n' <<<"${pp[$kind]}" | grep . | median)
    echo "  $scenario $kind: tcp Gb/s [${tcp[$kind]}] pps [${pp[$kind]}]"
  done
}

# ONLY=flowmod skips the traffic figures (TCP, pps, vhost-user) while iterating on the control plane.
only=${ONLY:-all}
if [[ $only != flowmod ]]; then
echo "== NORMAL ($rounds rounds, TCP ${tcp_seconds}s, pps ${pps_seconds}s)"
measure normal
fi

# 10,000 flows that the test traffic does not hit, in a few different shapes (so several subtables),
# above the priority-0 NORMAL flow that carries the traffic.
flows=$KSW_TMP/flows10k.txt
: >"$flows"
for i in $(seq 0 9999); do
  case $((i % 4)) in
    0) echo "priority=$((100 + i % 50)),tcp,nw_dst=172.16.$((i / 256)).$((i % 256)),tp_dst=$((i % 1000 + 1)),actions=output:1" ;;
    1) echo "priority=$((100 + i % 50)),udp,nw_src=172.17.$((i / 256)).0/24,udp_dst=$((i % 2000 + 1)),actions=output:2" ;;
    2) echo "priority=$((200 + i % 50)),ip,nw_dst=172.18.$((i / 256)).$((i % 256)),actions=drop" ;;
    3) echo "priority=$((300 + i % 50)),dl_src=02:11:00:00:$(printf %02x $((i / 256))):$(printf %02x $((i % 256))),actions=NORMAL" ;;
  esac
done >>"$flows"

# The same 10,000 matches again: mod-flows rewrites their actions, del-flows (no priority: non-strict
# commands ignore it) removes them, one flow-mod per line as ovs-ofctl sends them (each with a barrier).
sed 's/actions=.*/actions=drop/' "$flows" >"$KSW_TMP/mod10k.txt"
sed -e 's/^priority=[0-9]*,//' -e 's/,actions=.*//' "$flows" >"$KSW_TMP/del10k.txt"

echo "== flow-mod rate (ovs-ofctl -O OpenFlow13 add-flows / mod-flows / del-flows, 10,000 flows)"
declare -A FM FMR
flow_count() {  # kind
  ip netns exec "${SW[$1]}" ovs-ofctl -O OpenFlow13 dump-aggregate tcp:127.0.0.1:6653 | grep -o 'flow_count=[0-9]*' | cut -d= -f2
}
timed_rate() {  # kind ovs-ofctl-args... : flow-mods per second of 10,000 lines
  local kind=$1 t0 t1
  shift
  t0=$(date +%s.%N)
  ip netns exec "${SW[$kind]}" ovs-ofctl -O OpenFlow13 "$@"
  t1=$(date +%s.%N)
  python3 -c "print(int(10000/($t1-$t0)))"
}
for kind in keel ovs; do for op in add mod del; do FMR[$kind,$op]=""; done; done
for r in $(seq "$rounds"); do
  for kind in keel ovs; do
    ip netns exec "${SW[$kind]}" ovs-ofctl -O OpenFlow13 del-flows tcp:127.0.0.1:6653
    ip netns exec "${SW[$kind]}" ovs-ofctl -O OpenFlow13 add-flow tcp:127.0.0.1:6653 "priority=0,actions=NORMAL"
    FMR[$kind,add]+="$(timed_rate $kind add-flows tcp:127.0.0.1:6653 "$flows") "
    n=$(flow_count $kind)
    [[ $n == 10001 ]] || { echo "$kind: expected 10001 flows, have $n"; exit 1; }
    FMR[$kind,mod]+="$(timed_rate $kind mod-flows tcp:127.0.0.1:6653 - <"$KSW_TMP/mod10k.txt") "
    n=$(ip netns exec "${SW[$kind]}" ovs-ofctl -O OpenFlow13 dump-flows tcp:127.0.0.1:6653 | grep -c 'actions=drop')
    [[ $n == 10000 ]] || { echo "$kind: expected 10000 modified flows, have $n"; exit 1; }
    FMR[$kind,del]+="$(timed_rate $kind del-flows tcp:127.0.0.1:6653 - <"$KSW_TMP/del10k.txt") "
    n=$(flow_count $kind)
    [[ $n == 1 ]] || { echo "$kind: expected 1 flow after del-flows, have $n"; exit 1; }
  done
done
for kind in keel ovs; do
  for op in add mod del; do
    FM[$kind,$op]=$(tr ' ' '\n' <<<"${FMR[$kind,$op]}" | grep . | median)
  done
  echo "  $kind: flows/s add [${FMR[$kind,add]}] mod [${FMR[$kind,mod]}] del [${FMR[$kind,del]}]"
done

if [[ $only != flowmod ]]; then
for kind in keel ovs; do
  ip netns exec "${SW[$kind]}" ovs-ofctl -O OpenFlow13 add-flows tcp:127.0.0.1:6653 "$flows"
done
echo "== 10,000 flows installed"
measure flows10k
fi

OVS_TSO="offloads-on scenario skipped"
if [[ $only != flowmod ]]; then
echo "== offloads on (veth defaults: tx, tso, gso on), NORMAL"
for kind in keel ovs; do
  for ns in "${A[$kind]}" "${B[$kind]}"; do
    ip netns exec "$ns" ethtool -K eth0 tx on tso on gso on >/dev/null 2>&1 || true
  done
  for p in pa pb; do ip netns exec "${SW[$kind]}" ethtool -K $p tx on tso on gso on >/dev/null 2>&1 || true; done
done
bash "$here/../../tests/integration/switch/ovs_peer.sh" restart-tso "$KSW_TMP/ovs" "${SW[ovs]}" >/dev/null 2>&1 ||
  { echo "Open vSwitch did not restart"; cat "$KSW_TMP/ovs/ovs-vswitchd.log"; exit 1; }
ksw_wait_of "${SW[ovs]}" 6653
for kind in keel ovs; do
  ip netns exec "${SW[$kind]}" ovs-ofctl -O OpenFlow13 del-flows tcp:127.0.0.1:6653
  ip netns exec "${SW[$kind]}" ovs-ofctl -O OpenFlow13 add-flow tcp:127.0.0.1:6653 "priority=0,actions=NORMAL"
  ip netns exec "${A[$kind]}" ping -c 3 -i 0.2 -W 1 10.0.0.2 >/dev/null || echo "  $kind: ping failed after the change"
done
if grep -q "TCP Segmentation Offloading support enabled" "$KSW_TMP/ovs/ovs-vswitchd.log"; then
  OVS_TSO="OVS: userspace TSO enabled"
else
  OVS_TSO="OVS: userspace TSO NOT enabled (see its log); it segments like keel"
fi
echo "  $OVS_TSO"
declare -A tcpo
for kind in keel ovs; do tcpo[$kind]=""; done
for r in $(seq "$rounds"); do
  for kind in keel ovs; do tcpo[$kind]+="$(tcp_gbps $kind) "; done
done
for kind in keel ovs; do
  RESULT[offloads,tcp,$kind]=$(tr ' ' '\n' <<<"${tcpo[$kind]}" | grep . | median)
  echo "  offloads $kind: tcp Gb/s [${tcpo[$kind]}]"
done
fi

ratio() { python3 -c "print('%.2fx' % ($1/$2) if float($2) > 0 else 'n/a')"; }
echo
echo "offloads off unless said ($OVS_TSO)"
printf '%-28s %14s %14s %8s\n' "metric" "keel-switch" "OVS netdev" "ratio"
scenarios=(normal flows10k)
[[ $only == flowmod ]] && scenarios=()
for scenario in "${scenarios[@]}"; do
  printf '%-28s %14s %14s %8s\n' "TCP Gb/s ($scenario)" "${RESULT[$scenario,tcp,keel]}" "${RESULT[$scenario,tcp,ovs]}" \
    "$(ratio "${RESULT[$scenario,tcp,keel]}" "${RESULT[$scenario,tcp,ovs]}")"
  printf '%-28s %14s %14s %8s\n' "64B pps ($scenario)" "${RESULT[$scenario,pps,keel]}" "${RESULT[$scenario,pps,ovs]}" \
    "$(ratio "${RESULT[$scenario,pps,keel]}" "${RESULT[$scenario,pps,ovs]}")"
done
if [[ $only != flowmod ]]; then
  printf '%-28s %14s %14s %8s\n' "TCP Gb/s (offloads on)" "${RESULT[offloads,tcp,keel]}" "${RESULT[offloads,tcp,ovs]}" \
    "$(ratio "${RESULT[offloads,tcp,keel]}" "${RESULT[offloads,tcp,ovs]}")"
fi
for op in add mod del; do
  printf '%-28s %14s %14s %8s\n' "flow-mods/s ($op-flows)" "${FM[keel,$op]}" "${FM[ovs,$op]}" \
    "$(ratio "${FM[keel,$op]}" "${FM[ovs,$op]}")"
done

# The vhost-user path at full speed: two synthetic guests (tests/unit/vhost's front-end playing
# QEMU and a virtio-net driver on shared memory) through an in-process keel-switch Bridge, next to
# the same Bridge with AF_UNIX stream ports, and next to the veth pps measured above; it ends with
# TCP between the two guests with and without segmentation offload (64 KB super-frames vs 1514 B).
vhost_bench=$build/bench/switch/ksw-vhost-bench
if [[ $only == flowmod ]]; then
  :
elif [[ -x $vhost_bench ]]; then
  echo
  echo "== vhost-user VM -> keel-switch -> VM (ksw-vhost-bench)"
  "$vhost_bench" --rounds "$rounds" --veth-pps-normal "${RESULT[normal,pps,keel]}" \
    --veth-pps-flows "${RESULT[flows10k,pps,keel]}"
else
  echo "(build ksw-vhost-bench for the vhost-user figures)"
fi
