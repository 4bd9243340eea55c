#!/bin/sh
# Guest side of an unplug / migrate / re-plug migration (vfu-migtest --flow unplug; qemu-configs/failover-vm.sh
# --variant bond). The VM has a plain virtio-net (no failover) and our VF. The guest keeps its address on an
# active-backup bond: the VF is the primary slave, the virtio-net the backup, so traffic moves to the virtio-net
# when the VF is unplugged and back to the VF once it is re-plugged. Bonding does not enslave a new netdev by
# itself: this script watches for an iavf netdev and enslaves it, which is what a guest's network manager must do.
# Works on kernels whose iavf deadlocks under net_failover (6.1, 6.12): the VF is enslaved after its init, from
# userspace, not from inside its register notifier.
#
# Bond settings: mode active-backup, miimon 100, primary = the VF (reselected whenever it has carrier),
# fail_over_mac active: the bond's MAC is the active slave's own, so no slave's MAC is ever changed (a VF whose MAC
# its PF assigned may not change it) and the VF on the destination may have another MAC than on the source; every
# change of active slave is announced with a gratuitous ARP. all_slaves_active 1: a frame that reaches the backup
# slave (a peer that has not yet seen the announcement) is still delivered instead of dropped.
#
# Kernel command line, console input and output: as in failover.sh (mig.ip is given to bond0), plus
#   console input "release": the guest removes the VF from its PCI tree itself (QEMU keeps the device), and
#   "rescan": a PCI rescan (finds a VF QEMU still has, e.g. after a cancelled migration);
#   MIG: e T active NAME     the bond's active slave changed;   MIG: e T released BDF;   MIG: e T rescan
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }
ip_addr=$(arg mig.ip); peer=$(arg mig.peer)
interval=$(arg mig.interval); interval=${interval:-0.05}
stuck=$(arg mig.stuck); stuck=${stuck:-20}
B=/sys/class/net/bond0/bonding
t() { read -r u _ < /proc/uptime; echo "$u"; }
secs() { read -r u _ < /proc/uptime; echo "${u%.*}"; }
drv() { basename "$(readlink "/sys/class/net/$1/device/driver" 2>/dev/null)" 2>/dev/null; }
dev_of() { for n in /sys/class/net/*; do [ "$(drv "${n##*/}")" = "$1" ] && { echo "${n##*/}"; return; }; done; }
master_of() { basename "$(readlink "/sys/class/net/$1/master" 2>/dev/null)" 2>/dev/null; }
pci_vfs() { grep -l 0x154c /sys/bus/pci/devices/*/device 2>/dev/null | wc -l; }
# The kernel stacks of the tasks in the way: blocked ones (state D) and any inside iavf, failover or bonding code
# (a task spinning on a lock can be running, and sysrq w would miss it). Few processes: this must be quick under TCG.
stacks() {
  echo "MIG: e $(t) stacks"
  echo w > /proc/sysrq-trigger
  pids=$({ grep -l '^State:[[:space:]]*D' /proc/[0-9]*/status; grep -l -E 'iavf|failover|bond_' /proc/[0-9]*/stack; } \
         2>/dev/null | sed 's|^/proc/\([0-9]*\)/.*|\1|' | sort -un)
  for p in $pids; do
    read -r comm < "/proc/$p/comm" 2>/dev/null || continue
    echo "MIG: s $p $comm"
    sed "s/^/MIG: s $p /" "/proc/$p/stack" 2>/dev/null
  done
  echo "MIG: e $(t) stacks-done"
}
enslave() { ip link set "$1" down; echo "+$1" > $B/slaves; echo "$1" > $B/primary; }

ip link set lo up
dmesg -n 1
echo 10 > /proc/sys/kernel/hung_task_timeout_secs 2>/dev/null
# IPv4 only: no IPv6 autoconfiguration chatter in the counters (and no duplicate-address noise on the bond).
for f in all default; do echo 1 > /proc/sys/net/ipv6/conf/$f/disable_ipv6; done 2>/dev/null
( while :; do dmesg -c | sed 's/^/MIG: k /'; sleep 0.5; done ) &

nv=; v=
for _ in $(seq 300); do nv=$(dev_of virtio_net); [ -n "$nv" ] && break; sleep 0.1; done
[ -n "$nv" ] || { echo "MIG: e $(t) setup-failed no virtio_net netdev"; vfu-report 0; exit 1; }
for _ in $(seq 300); do v=$(dev_of iavf); [ -n "$v" ] && break; sleep 0.1; done
[ -d /sys/class/net/bond0 ] || echo +bond0 > /sys/class/net/bonding_masters
ip link set bond0 down
echo active-backup > $B/mode
echo 100 > $B/miimon
echo active > $B/fail_over_mac
echo 1 > $B/all_slaves_active
ip link set "$nv" down
echo "+$nv" > $B/slaves
[ -n "$v" ] && enslave "$v"
ip link set bond0 up
ip addr add "$ip_addr" dev bond0
echo "MIG: up $(t) master=bond0 standby=$nv vf=${v:--}"

# Per-interface counters, every second.
( while :; do
    line="MIG: c $(t)"
    for n in /sys/class/net/*; do
      i=${n##*/}; [ "$i" = lo ] || [ ! -d "$n/statistics" ] && continue
      d=$(drv "$i"); mm=$(master_of "$i")
      read -r tx < "$n/statistics/tx_packets"; read -r rx < "$n/statistics/rx_packets"
      read -r op < "$n/operstate"
      line="$line $i,${d:--},${mm:--},$op,$tx,$rx"
    done
    echo "$line"; sleep 1
  done ) &

# The VF's life: new (enslaved here), enslaved, active (the bond's active slave), gone; stuck if on the bus but not
# active in time. Also every change of the bond's active slave.
( prev=$v; state=new; [ -n "$prev" ] || state=none; since=$(secs); npci=$(pci_vfs); reported=; act=
  while :; do
    v=$(dev_of iavf); n=$(pci_vfs)
    if [ "$n" != "$npci" ]; then
      echo "MIG: e $(t) pci-vf $n"
      [ "$n" -gt "$npci" ] && { since=$(secs); reported=; }
      npci=$n
    fi
    if [ "$v" != "$prev" ]; then
      [ -n "$prev" ] && echo "MIG: e $(t) vf-gone $prev"
      since=$(secs); reported=
      if [ -n "$v" ]; then echo "MIG: e $(t) vf-new $v"; enslave "$v"; fi
      prev=$v; state=new; [ -n "$v" ] || state=none
    fi
    if [ "$state" = new ] && [ "$(master_of "$v")" = bond0 ]; then
      echo "MIG: e $(t) vf-enslaved $v master=bond0"; state=enslaved
    fi
    read -r a < $B/active_slave
    if [ "$a" != "$act" ]; then echo "MIG: e $(t) active ${a:--}"; act=$a; fi
    if [ "$state" = enslaved ] && [ -n "$v" ] && [ "$a" = "$v" ]; then
      echo "MIG: e $(t) vf-active $v"; state=active
    fi
    if [ "$n" -gt 0 ] && [ "$state" != active ] && [ -z "$reported" ] && [ $(($(secs) - since)) -ge "$stuck" ]; then
      echo "MIG: e $(t) vf-stuck ${v:--} secs=$(($(secs) - since))"
      stacks; reported=1
    fi
    sleep 0.2
  done ) &

ping -i "$interval" "$peer" 2>&1 |
  awk '{ getline u < "/proc/uptime"; close("/proc/uptime"); split(u, a, " "); print "MIG: p " a[1] " " $0; fflush() }' &

while read -r cmd; do
  case $cmd in
    stop) break ;;
    dump) stacks ;;
    # The VF leaves without QEMU (the unplug flow on a QEMU whose device_del of vfio-user-pci aborts): the guest
    # forgets the device; QEMU keeps it and migrates without it (it has no migration state).
    release) for d in /sys/bus/pci/devices/*; do
               [ "$(cat "$d/device" 2>/dev/null)" = 0x154c ] || continue
               echo "MIG: e $(t) released ${d##*/}"; echo 1 > "$d/remove"
             done ;;
    rescan) echo "MIG: e $(t) rescan"; echo 1 > /sys/bus/pci/rescan ;;
  esac
done
kill -INT "$(pidof ping)" 2>/dev/null
sleep 1
dmesg -c | sed 's/^/MIG: k /'
echo "MIG: done"
