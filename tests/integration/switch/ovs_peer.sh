#!/usr/bin/env bash
# Starts (or stops) a private Open vSwitch (userspace netdev datapath) inside a network namespace,
# for tests and benchmarks that compare keel-switch with it.
#   ovs_peer.sh start DIR NETNS BRIDGE OFPORT   -> bridge BRIDGE listening on ptcp:OFPORT:127.0.0.1 in NETNS
#   ovs_peer.sh stop DIR                        -> kills the daemons by the pids recorded in DIR
#   ovs_peer.sh restart-tso DIR NETNS           -> restarts ovs-vswitchd with userspace TSO enabled
#                                                  (read only at start); bridges and ports persist,
#                                                  OpenFlow flows do not
# All state (database, sockets, pid files, logs) lives in DIR. The daemons are killed by pid only.
set -euo pipefail
cmd=$1 dir=$2
case "$cmd" in
start)
  ns=$3 br=$4 port=$5
  mkdir -p "$dir"
  export OVS_RUNDIR=$dir OVS_LOGDIR=$dir OVS_DBDIR=$dir OVS_SYSCONFDIR=$dir
  rm -f "$dir/conf.db"
  ovsdb-tool create "$dir/conf.db" /usr/share/openvswitch/vswitch.ovsschema
  ip netns exec "$ns" ovsdb-server "$dir/conf.db" --remote="punix:$dir/db.sock" \
    --pidfile="$dir/ovsdb-server.pid" --detach --no-chdir --log-file="$dir/ovsdb-server.log"
  vsctl=(ovs-vsctl --db="unix:$dir/db.sock" --no-wait)
  "${vsctl[@]}" init
  ip netns exec "$ns" ovs-vswitchd "unix:$dir/db.sock" --pidfile="$dir/ovs-vswitchd.pid" --detach \
    --no-chdir --log-file="$dir/ovs-vswitchd.log" --unixctl="$dir/ovs-vswitchd.ctl"
  ovs-vsctl --db="unix:$dir/db.sock" --timeout=20 add-br "$br" -- set bridge "$br" datapath_type=netdev \
    other-config:datapath-id=0000000000000001 other-config:hwaddr=02:00:00:00:00:01 \
    -- set-controller "$br" "ptcp:$port:127.0.0.1" -- set-fail-mode "$br" standalone
  ;;
restart-tso)
  ns=$3
  export OVS_RUNDIR=$dir OVS_LOGDIR=$dir OVS_DBDIR=$dir OVS_SYSCONFDIR=$dir
  ovs-vsctl --db="unix:$dir/db.sock" --no-wait set Open_vSwitch . other_config:userspace-tso-enable=true
  pid=$(cat "$dir/ovs-vswitchd.pid")
  kill "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  ip netns exec "$ns" ovs-vswitchd "unix:$dir/db.sock" --pidfile="$dir/ovs-vswitchd.pid" --detach \
    --no-chdir --log-file="$dir/ovs-vswitchd.log" --unixctl="$dir/ovs-vswitchd.ctl"
  ;;
stop)
  for p in ovs-vswitchd ovsdb-server; do
    if [[ -f "$dir/$p.pid" ]]; then
      pid=$(cat "$dir/$p.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  ;;
esac
