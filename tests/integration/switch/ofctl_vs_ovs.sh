#!/usr/bin/env bash
# Golden test: the same unchanged ovs-ofctl commands against Open vSwitch (netdev datapath) and against
# keel-switch, each in its own network namespace with the same bridge (datapath id, LOCAL MAC, one veth
# port); their outputs must match once run-dependent numbers (durations, xids, ages) are masked.
# Usage: ofctl_vs_ovs.sh BUILD_BIN_DIR
set -euo pipefail
KSW_BIN=$1
source "$(dirname "$0")/lib.sh"
ksw_init

ns_ovs=ksw-gold-ovs-$$
ns_keel=ksw-gold-keel-$$
ksw_netns "$ns_ovs"
ksw_netns "$ns_keel"
for ns in "$ns_ovs" "$ns_keel"; do
  # No IPv6 autoconfiguration chatter: port counters must depend only on what the test sends.
  ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  ip -n "$ns" link add p1 address 02:00:00:00:01:01 type veth peer name p1peer address 02:00:00:00:01:02
  ip -n "$ns" link set p1 up
  ip -n "$ns" link set p1peer up
done

ksw_start_ovs "$ns_ovs" "$KSW_TMP/ovs" br0 6653
$KSW_OVS_VSCTL add-port br0 p1 -- set interface p1 ofport_request=1
ksw_start_keel "$ns_keel" "$KSW_TMP/keel"
$KSW_CTL add-br br0 -- set bridge br0 other_config:datapath-id=0000000000000001 \
  other_config:hwaddr=02:00:00:00:00:01 -- set-controller br0 ptcp:6653:127.0.0.1 \
  -- add-port br0 p1 -- set interface p1 ofport_request=1
ksw_wait_of "$ns_ovs" 6653
ksw_wait_of "$ns_keel" 6653

# A few hundred rules of many shapes, for both versions.
flows13=$KSW_TMP/flows13.txt
flows10=$KSW_TMP/flows10.txt
: >"$flows13"
: >"$flows10"
for i in $(seq 1 60); do
  p=$((1000 + i))
  echo "priority=$p,in_port=$((i % 8 + 1)),actions=output:$((i % 5 + 1))" >>"$flows10"
  echo "priority=$p,ip,nw_src=10.$i.0.0/16,nw_dst=192.168.$i.$i,actions=mod_nw_tos:8,output:2" >>"$flows10"
  echo "priority=$p,tcp,tp_dst=$((8000 + i)),actions=NORMAL" >>"$flows10"
  echo "priority=$p,udp,nw_dst=172.16.0.$i,tp_src=$((5000 + i)),actions=mod_tp_dst:53,output:3" >>"$flows10"
  echo "priority=$p,dl_vlan=$i,dl_vlan_pcp=$((i % 8)),actions=strip_vlan,output:1" >>"$flows10"
  echo "cookie=0x$i,priority=$p,arp,arp_spa=10.0.$i.1,actions=CONTROLLER:128" >>"$flows10"
  echo "priority=$p,icmp,icmp_type=$((i % 16)),icmp_code=0,actions=drop" >>"$flows10"
  echo "priority=$p,dl_src=02:00:00:00:$(printf %02x $i):01,dl_dst=02:00:00:00:00:$(printf %02x $i),actions=mod_dl_src:02:aa:00:00:00:01,output:4" >>"$flows10"
done
cp "$flows10" "$flows13"
for i in $(seq 1 40); do
  echo "table=$((i % 4 + 1)),priority=$i,ipv6,ipv6_src=2001:db8:$i::/48,actions=dec_ttl,output:2" >>"$flows13"
  echo "table=0,priority=$((2000 + i)),in_port=$((i + 20)),actions=write_metadata:0x$i/0xff,goto_table:$((i % 4 + 1))" >>"$flows13"
  echo "table=$((i % 4 + 1)),priority=$((3000 + i)),metadata=0x$i/0xff,tcp6,tp_src=$i,actions=push_vlan:0x8100,set_field:$((4096 + i))->vlan_vid,output:1" >>"$flows13"
  echo "cookie=0x$((100 + i)),priority=$((4000 + i)),dl_dst=01:00:00:00:00:00/01:00:00:00:00:00,vlan_tci=0x1000/0x1000,actions=group:1" >>"$flows13"
done
echo "priority=7,idle_timeout=300,hard_timeout=600,send_flow_rem,tcp,tp_src=22,actions=output:1" >>"$flows13"

failures=0
# check NAME VERSION ARGS...: runs ovs-ofctl against both switches and compares normalized output.
check() {
  local name=$1 ver=$2
  shift 2
  local out_ovs out_keel rc_ovs=0 rc_keel=0
  out_ovs=$(ip netns exec "$ns_ovs" ovs-ofctl -O "$ver" "$@" 2>&1) || rc_ovs=$?
  out_keel=$(ip netns exec "$ns_keel" ovs-ofctl -O "$ver" "$@" 2>&1) || rc_keel=$?
  normalize() {
    sed -E -e 's/duration=[0-9.]+s/duration=X/g' -e 's/duration:[0-9.]+s/duration:X/g' -e 's/(idle|hard)_age=[0-9]+, ?//g' -e 's/xid=0x[0-9a-f]+/xid=X/g' \
      -e 's/^(NXST|OFPST)_(FLOW|AGGREGATE) reply/\2 reply/' | grep -v 'flags=\[more\]' | sort
  }
  if [[ $rc_ovs != "$rc_keel" ]] || ! diff <(normalize <<<"$out_ovs") <(normalize <<<"$out_keel") >"$KSW_TMP/diff"; then
    echo "MISMATCH: $name ($ver): exit ovs=$rc_ovs keel=$rc_keel"
    cat "$KSW_TMP/diff" | head -40
    failures=$((failures + 1))
  else
    echo "ok: $name ($ver)"
  fi
}

T=tcp:127.0.0.1:6653
for ver in OpenFlow13 OpenFlow10; do
  file=$flows13
  [[ $ver == OpenFlow10 ]] && file=$flows10
  check show $ver show $T
  check dump-flows-initial $ver dump-flows $T
  if [[ $ver == OpenFlow13 ]]; then
    check add-group-all $ver add-group $T "group_id=1,type=all,bucket=output:1,bucket=output:2"
    check add-group-select $ver add-group $T "group_id=2,type=select,bucket=weight:10,output:1,bucket=weight:20,output:2"
    check add-group-ff $ver add-group $T "group_id=3,type=fast_failover,bucket=watch_port:1,output:1,bucket=watch_port:2,output:2"
    check add-group-indirect $ver add-group $T "group_id=4,type=indirect,bucket=set_field:10.0.0.1->ip_dst,output:1"
    check add-group-dup $ver add-group $T "group_id=4,type=indirect,bucket=output:1"
    # An error for a request over 64 bytes echoes all of it (ovs-ofctl decodes it; cut, it says so).
    check add-group-dup-long $ver add-group $T "group_id=1,type=all,bucket=output:1,bucket=output:2,bucket=output:3"
    check dump-groups $ver dump-groups $T
    # Meters (drop bands; OVS's userspace datapath has them too).
    check add-meter-burst $ver add-meter $T "meter=1,kbps,burst,band=type=drop,rate=1000,burst_size=100"
    check add-meter-pktps $ver add-meter $T "meter=2,pktps,band=type=drop,rate=500"
    check add-meter-bands $ver add-meter $T "meter=3,kbps,stats,bands=type=drop,rate=2000,type=drop,rate=4000"
    check add-meter-exists $ver add-meter $T "meter=1,kbps,band=type=drop,rate=300"
    check add-meter-bad-band $ver add-meter $T "meter=4,kbps,band=type=dscp_remark,rate=100,prec_level=1"
    check mod-meter-unknown $ver mod-meter $T "meter=8,kbps,band=type=drop,rate=300"
    check dump-meters $ver dump-meters $T
    check meter-features $ver meter-features $T
    check add-flow-meter $ver add-flow $T "priority=50000,ip,nw_dst=10.99.0.1,actions=meter:1,output:1"
    check add-flow-meter-goto $ver add-flow $T "priority=50001,tcp,nw_dst=10.99.0.2,actions=meter:3,goto_table:2"
    check meter-stats $ver meter-stats $T
    check meter-stats-unknown $ver meter-stats $T meter=77
    check mod-meter $ver mod-meter $T "meter=1,kbps,band=type=drop,rate=300"
    check dump-meters-one $ver dump-meters $T meter=1
    check del-meter-3 $ver del-meters $T meter=3
    check dump-flows-after-del-meter $ver dump-flows $T
  fi
  check add-flows $ver add-flows $T "$file"
  check dump-flows $ver dump-flows $T
  check dump-flows-filtered $ver dump-flows $T "tcp"
  # 1.0 has no cookie masks: ovs-ofctl switches to Nicira's NXM flow format (NXT_SET_FLOW_FORMAT,
  # then NXST_FLOW / NXST_AGGREGATE with the cookie as an NXM field).
  check dump-flows-cookie $ver dump-flows $T "cookie=0x5/-1"
  check dump-flows-cookie-masked $ver dump-flows $T "cookie=0x10/0xf0,ip"
  check dump-aggregate-cookie $ver dump-aggregate $T "cookie=0x5/-1"
  # Flow-mods 1.0 cannot express go as NXT_FLOW_MOD with an NXM match (IPv6, ARP hardware addresses,
  # cookie masks in modify/delete).
  check add-flow-ipv6 $ver add-flow $T "priority=9,ipv6,ipv6_src=2001:db8::/32,actions=output:2"
  check add-flow-arp-sha $ver add-flow $T "priority=10,arp,arp_sha=02:00:00:00:00:01,actions=drop"
  check mod-flows-cookie $ver mod-flows $T "cookie=0x5/-1,actions=output:4"
  check del-flows-cookie $ver del-flows $T "cookie=0x15/0xff"
  check dump-flows-after-cookie-mods $ver dump-flows $T
  check add-flow $ver add-flow $T "priority=65000,in_port=3,actions=output:1"
  check add-flow-replace $ver add-flow $T "priority=65000,in_port=3,actions=output:2"
  check mod-flows $ver mod-flows $T "tcp,actions=output:7"
  check mod-flows-strict $ver mod-flows --strict $T "priority=1001,in_port=2,actions=output:9"
  check dump-flows-after-mod $ver dump-flows $T
  check del-flows-strict $ver del-flows --strict $T "priority=1005,ip,nw_src=10.5.0.0/16,nw_dst=192.168.5.5"
  check del-flows-strict-miss $ver del-flows --strict $T "priority=1,ip,nw_src=10.5.0.0/16,nw_dst=192.168.5.5"
  check del-flows-match $ver del-flows $T "udp"
  check del-flows-outport $ver del-flows $T "out_port=4"
  check dump-flows-after-del $ver dump-flows $T
  check dump-aggregate $ver dump-aggregate $T
  check dump-ports $ver dump-ports $T
  check dump-ports-one $ver dump-ports $T 1
  check dump-ports-desc $ver dump-ports-desc $T
  check dump-tables $ver dump-tables $T
  check packet-out $ver packet-out $T LOCAL output:1 "ffffffffffff020000000102080600010800060400010200000001020a0000010000000000000a000002"
  check del-flows-all $ver del-flows $T
  check dump-flows-empty $ver dump-flows $T
  check add-flow-normal $ver add-flow $T "priority=0,actions=NORMAL"
  if [[ $ver == OpenFlow13 ]]; then
    check del-groups $ver del-groups $T
    check dump-groups-empty $ver dump-groups $T
    check del-meters $ver del-meters $T
    check dump-meters-empty $ver dump-meters $T
  fi
done

echo "failures: $failures"
[[ $failures == 0 ]]
