#!/usr/bin/env bash
# Data plane through keel-switch: hosts in network namespaces on veth pairs (AF_PACKET ports), a tap
# port and the internal port. Checks NORMAL learning (ping), VLAN access/trunk isolation, flows that
# ovs-ofctl installs steering and dropping traffic, and the MAC table.
# Usage: dataplane.sh BUILD_BIN_DIR
set -euo pipefail
KSW_BIN=$1
source "$(dirname "$0")/lib.sh"
ksw_init

sw=ksw-dp-sw-$$
ksw_netns "$sw"
hosts=()
for i in 1 2 3 4 5 6; do
  h=ksw-dp-h$i-$$
  ksw_netns "$h"
  hosts+=("$h")
  ip -n "$sw" link add v$i type veth peer name eth0 netns "$h"
  ip -n "$h" link set eth0 address 02:00:00:00:00:1$i
  ip netns exec "$h" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
  ip -n "$h" link set eth0 up
done
h1=${hosts[0]} h2=${hosts[1]} h3=${hosts[2]} h4=${hosts[3]} h5=${hosts[4]} h6=${hosts[5]}
ip -n "$h1" addr add 10.0.0.1/24 dev eth0
ip -n "$h2" addr add 10.0.0.2/24 dev eth0
ip -n "$h3" addr add 10.0.0.3/24 dev eth0

ksw_start_keel "$sw" "$KSW_TMP/keel"
$KSW_CTL add-br br0 -- set-controller br0 ptcp:6653:127.0.0.1 -- add-port br0 v1 -- add-port br0 v2 \
  -- add-port br0 v3 -- add-port br0 v4 -- add-port br0 tap0 -- set interface tap0 type=tap
ksw_wait_of "$sw" 6653
OF="ip netns exec $sw ovs-ofctl -O OpenFlow13"
T=tcp:127.0.0.1:6653

pass=0
fail=0
expect() {  # expect ok|fail DESCRIPTION COMMAND...
  local want=$1 what=$2
  shift 2
  if "$@" >/dev/null 2>&1; then got=ok; else got=fail; fi
  if [[ $got == "$want" ]]; then echo "ok: $what"; pass=$((pass + 1)); else echo "FAILED: $what (wanted $want)"; fail=$((fail + 1)); fi
}
ping_from() { ip netns exec "$1" ping -c 2 -i 0.2 -W 1 "$2"; }

# 1. NORMAL: a learning switch out of the box.
expect ok "h1 pings h2 through NORMAL" ping_from "$h1" 10.0.0.2
expect ok "h1 pings h3 through NORMAL" ping_from "$h1" 10.0.0.3
fdb=$($KSW_CTL fdb/show br0)
echo "$fdb"
expect ok "MAC table learned h1 on port 1" grep -Eq '^ +1 +0 +02:00:00:00:00:11' <<<"$fdb"

# TCP between hosts whose veths keep their default checksum and segmentation offloads: the switch
# completes partial checksums and cuts 64 KB super-frames into segments.
ip netns exec "$h2" iperf3 -s -1 -p 5401 >/dev/null 2>&1 &
iperf_server=$!
KSW_PIDS+=($iperf_server)
for _ in $(seq 50); do ip netns exec "$h2" ss -ltn | grep -q ':5401 ' && break; sleep 0.1; done
ip netns exec "$h1" iperf3 -c 10.0.0.2 -p 5401 -t 2 -J >"$KSW_TMP/tcp.json" 2>&1 || true
expect ok "TCP with offloads on: iperf3 h1 -> h2 moves data" python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
bps = d["end"]["sum_received"]["bits_per_second"]
print("  %.0f Mbit/s" % (bps / 1e6))
assert bps > 10e6
' "$KSW_TMP/tcp.json"

# 2. Tap and internal ports: the switch's own namespace reaches h1 over both.
ip -n "$sw" addr add 10.0.0.5/24 dev tap0
expect ok "tap port: h1 pings the tap's address" ping_from "$h1" 10.0.0.5
ip -n "$sw" addr add 10.0.0.6/24 dev br0
ip -n "$sw" link set br0 up
expect ok "internal port: h1 pings the bridge's LOCAL address" ping_from "$h1" 10.0.0.6

# 3. VLANs. br0: v1, v2 access VLAN 10; v3 access VLAN 20; a trunk (10, 20) over a veth pair to a
# second bridge br1, whose v5 is access VLAN 10 and v6 access VLAN 20.
ip -n "$sw" link add trunk0 type veth peer name trunk1
$KSW_CTL set port v1 tag=10 -- set port v2 tag=10 -- set port v3 tag=20 -- set port tap0 tag=30 \
  -- add-port br0 trunk0 trunks=10,20 -- add-br br1 -- add-port br1 trunk1 trunks=10,20 \
  -- add-port br1 v5 tag=10 -- add-port br1 v6 tag=20
ip -n "$h5" addr add 10.0.0.15/24 dev eth0
ip -n "$h6" addr add 10.0.0.16/24 dev eth0
expect ok "VLAN 10: h1 pings h2 (access-access)" ping_from "$h1" 10.0.0.2
expect fail "VLAN isolation: h1 (VLAN 10) cannot reach h3 (VLAN 20)" ping_from "$h1" 10.0.0.3
ip netns exec "$sw" timeout 5 tcpdump -c 2 -eni trunk0 vlan 10 >"$KSW_TMP/trunk.cap" 2>/dev/null &
captrunk=$!
sleep 0.5
expect ok "trunk: h1 (VLAN 10 on br0) pings h5 (VLAN 10 on br1)" ping_from "$h1" 10.0.0.15
wait $captrunk || true
expect ok "trunk: frames on the trunk carry 802.1Q tag 10" grep -q "vlan 10" "$KSW_TMP/trunk.cap"
expect ok "trunk: h3 (VLAN 20 on br0) pings h6 (VLAN 20 on br1)" ping_from "$h3" 10.0.0.16
expect fail "VLAN isolation across the trunk: h1 cannot reach h6" ping_from "$h1" 10.0.0.16
expect fail "VLAN isolation: h1 cannot reach the tap port in VLAN 30" ping_from "$h1" 10.0.0.5
$KSW_CTL fdb/show br0

# 4. Flows installed by ovs-ofctl steer and drop traffic as written.
$KSW_CTL set port v1 tag=[] -- set port v2 tag=[] -- set port v3 tag=[] -- del-port br0 trunk0
expect ok "back to one VLAN: h1 pings h3" ping_from "$h1" 10.0.0.3
$OF add-flow $T "priority=100,icmp,nw_dst=10.0.0.2,actions=drop"
expect fail "drop flow: ICMP to h2 is dropped" ping_from "$h1" 10.0.0.2
expect ok "drop flow: ICMP to h3 still passes" ping_from "$h1" 10.0.0.3
pkts=$($OF dump-flows $T "icmp,nw_dst=10.0.0.2" | grep -o 'n_packets=[0-9]*' | cut -d= -f2)
expect ok "drop flow counted the dropped pings ($pkts)" test "$pkts" -ge 2
$OF del-flows $T "icmp,nw_dst=10.0.0.2"
expect ok "flow deleted: h1 pings h2 again" ping_from "$h1" 10.0.0.2
# Steer: everything h1 sends to h2's MAC goes to h3's port instead, rewritten to h3's MAC and IP.
$OF add-flow $T "priority=200,in_port=1,ip,nw_dst=10.0.0.2,actions=set_field:02:00:00:00:00:13->eth_dst,set_field:10.0.0.3->ip_dst,output:3"
$OF add-flow $T "priority=200,in_port=3,ip,nw_src=10.0.0.3,nw_dst=10.0.0.1,actions=set_field:10.0.0.2->ip_src,output:1"
expect ok "steering flow: pinging 10.0.0.2 is answered by h3 (NAT-like rewrite)" ping_from "$h1" 10.0.0.2
ip -n "$h2" link set eth0 down
expect ok "steering flow: still answered with h2 down" ping_from "$h1" 10.0.0.2
ip -n "$h2" link set eth0 up
$OF del-flows $T "ip,nw_dst=10.0.0.2"
$OF del-flows $T "ip,nw_src=10.0.0.3"
# Multi-table: table 0 sends ICMP to table 1, which drops it.
$OF add-flow $T "table=0,priority=300,icmp,actions=goto_table:1"
$OF add-flow $T "table=1,priority=1,actions=drop"
expect fail "goto_table: ICMP dropped in table 1" ping_from "$h1" 10.0.0.3
$OF add-flow $T "table=1,priority=2,icmp,nw_dst=10.0.0.3,actions=NORMAL"
$OF add-flow $T "table=1,priority=2,icmp,nw_dst=10.0.0.1,actions=NORMAL"
expect ok "goto_table: table 1 lets ICMP to h3 through NORMAL" ping_from "$h1" 10.0.0.3
$OF del-flows $T "table=0,icmp"
# Groups: ALL group replicates to two ports.
$OF add-group $T "group_id=7,type=all,bucket=output:2,bucket=output:3"
$OF add-flow $T "priority=400,in_port=1,udp,tp_dst=9999,actions=group:7"
ip netns exec "$h2" timeout 5 tcpdump -c 1 -ni eth0 udp port 9999 >"$KSW_TMP/h2.cap" 2>/dev/null &
cap2=$!
ip netns exec "$h3" timeout 5 tcpdump -c 1 -ni eth0 udp port 9999 >"$KSW_TMP/h3.cap" 2>/dev/null &
cap3=$!
sleep 1
for _ in 1 2 3; do ip netns exec "$h1" bash -c 'echo hi >/dev/udp/10.0.0.2/9999' || true; sleep 0.2; done
wait $cap2 || true
wait $cap3 || true
expect ok "ALL group: h2 got a copy" grep -q 9999 "$KSW_TMP/h2.cap"
expect ok "ALL group: h3 got a copy" grep -q 9999 "$KSW_TMP/h3.cap"

# PACKET_IN to a controller (ovs-ofctl monitor) and PACKET_OUT from one (ovs-ofctl packet-out).
$OF add-flow $T "priority=500,arp,arp_tpa=10.0.0.77,actions=CONTROLLER:65535"
OVS_RUNDIR=$KSW_TMP ip netns exec "$sw" timeout 4 ovs-ofctl -O OpenFlow13 monitor $T 65534 >"$KSW_TMP/monitor.txt" 2>&1 &
monitor=$!
sleep 1
ip netns exec "$h1" ping -c 1 -W 1 10.0.0.77 >/dev/null 2>&1 || true
$KSW_CTL add-port br0 tap9 -- set interface tap9 type=tap
$KSW_CTL del-port br0 tap9
wait $monitor || true
expect ok "PORT_STATUS: ovs-ofctl monitor saw tap9 added and deleted" \
  bash -c "grep -q 'OFPT_PORT_STATUS.*ADD:.*(tap9)' $KSW_TMP/monitor.txt && grep -q 'OFPT_PORT_STATUS.*DEL:.*(tap9)' $KSW_TMP/monitor.txt"
expect ok "PACKET_IN: ovs-ofctl monitor saw h1's ARP for 10.0.0.77" \
  grep -q "arp_spa=10.0.0.1,arp_tpa=10.0.0.77" "$KSW_TMP/monitor.txt"
ip netns exec "$h2" timeout 5 tcpdump -c 1 -eni eth0 arp and host 10.0.0.99 >"$KSW_TMP/pktout.cap" 2>/dev/null &
cap=$!
sleep 1
$OF packet-out $T CONTROLLER output:2 \
  "ffffffffffff0200000000aa08060001080006040001 0200000000aa 0a000063 000000000000 0a000002" || true
wait $cap || true
expect ok "PACKET_OUT: h2 received the controller's ARP" grep -q "10.0.0.99" "$KSW_TMP/pktout.cap"

# 5. Live port removal and re-adding keep the switch working.
$KSW_CTL del-port br0 v3
expect fail "removed port: h3 unreachable" ping_from "$h1" 10.0.0.3
$KSW_CTL add-port br0 v3
expect ok "re-added port: h3 reachable" ping_from "$h1" 10.0.0.3

$KSW_CTL show
echo "passed: $pass, failed: $fail"
[[ $fail == 0 ]]
