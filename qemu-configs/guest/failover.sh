#!/bin/sh
# Guest side of a virtio-net failover migration (vfu-migtest --flow failover|cancel; qemu-configs/failover-vm.sh).
# The VM has a virtio-net standby (failover=on) and our VF as its primary (failover_pair_id): the guest's
# net_failover driver makes a master netdev with the two as lower devices. This script does what a guest's network
# manager must do: put the address on the failover MASTER (never on the VF or the standby), and nothing else: the
# kernel enslaves a re-plugged VF itself.
#
# Kernel command line:
#   mig.ip=ADDR/LEN    address for the failover master          mig.peer=ADDR   pinged every mig.interval s
#   mig.interval=SEC   ping interval (default 0.05)
#   mig.stuck=SEC      a VF (8086:154c) present on the PCI bus but not enslaved and up after SEC s is reported stuck
#                      and the stacks of the blocked tasks are printed (default 20)
# Console input (one word a line): "stop" ends the ping (its totals are printed) and powers off; "dump" prints the
# stacks of the blocked tasks.
# Output, one "MIG: ..." line each (T = guest uptime in seconds):
#   MIG: up T master=M standby=S vf=V|-       network configured, pinging from now on
#   MIG: e T EVENT ARGS                       vf-new V | vf-gone V | vf-enslaved V master=M | vf-active V |
#                                             vf-stuck V secs=N | pci-vf N (VFs on the bus) | stacks | stacks-done
#   MIG: c T NAME,DRIVER,MASTER,OPERSTATE,TX,RX ...    every second, every interface but lo (operstate up = carrier;
#                                             the carrier file is not read: from 6.12 reading it takes rtnl, which
#                                             a deadlocked driver holds)
#   MIG: s PID LINE                           a task's kernel stack (/proc/PID/stack), after vf-stuck or "dump"
#   MIG: p T LINE                             each line busybox ping prints (replies, then its totals)
#   MIG: k LINE                               the kernel log (dmesg), which is kept off the console itself
#   MIG: done
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }
ip_addr=$(arg mig.ip); peer=$(arg mig.peer)
interval=$(arg mig.interval); interval=${interval:-0.05}
stuck=$(arg mig.stuck); stuck=${stuck:-20}
t() { read -r u _ < /proc/uptime; echo "$u"; }
secs() { read -r u _ < /proc/uptime; echo "${u%.*}"; }
drv() { basename "$(readlink "/sys/class/net/$1/device/driver" 2>/dev/null)" 2>/dev/null; }
vf_dev() { for n in /sys/class/net/*; do [ "$(drv "${n##*/}")" = iavf ] && { echo "${n##*/}"; return; }; done; }
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
# The failover master: the netdev with a virtio_net lower device.
failover_master() {
  for n in /sys/class/net/*; do
    for l in "$n"/lower_*; do
      [ -e "$l" ] && [ "$(drv "${l##*/lower_}")" = virtio_net ] && { echo "${n##*/}"; return; }
    done
  done
}

ip link set lo up
dmesg -n 1
echo 10 > /proc/sys/kernel/hung_task_timeout_secs 2>/dev/null
# IPv4 only: no IPv6 autoconfiguration chatter in the counters (and no duplicate-address noise on the bond).
for f in all default; do echo 1 > /proc/sys/net/ipv6/conf/$f/disable_ipv6; done 2>/dev/null
( while :; do dmesg -c | sed 's/^/MIG: k /'; sleep 0.5; done ) &

m=
for _ in $(seq 300); do m=$(failover_master); [ -n "$m" ] && break; sleep 0.1; done
[ -n "$m" ] || { echo "MIG: e $(t) setup-failed no failover master"; vfu-report 0; exit 1; }
# A VF enslaved while the master is up is opened by net_failover from inside its register notifier; 6.1 and 6.12
# deadlock there. At boot the VF is normally enslaved before we bring the master up: wait for it (up to 30 s).
for _ in $(seq 300); do v=$(vf_dev); [ -n "$v" ] && [ "$(master_of "$v")" = "$m" ] && break; sleep 0.1; done
ip link set "$m" up
ip addr add "$ip_addr" dev "$m"
sb=
for l in /sys/class/net/"$m"/lower_*; do [ "$(drv "${l##*/lower_}")" = virtio_net ] && sb=${l##*/lower_}; done
echo "MIG: up $(t) master=$m standby=$sb vf=${v:--}"

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

# The VF's life: new, enslaved by the master, active (operstate up), gone; stuck if on the bus but not active in time.
( prev=$(vf_dev); state=new; [ -n "$prev" ] || state=none; since=$(secs); npci=$(pci_vfs); reported=
  while :; do
    v=$(vf_dev); n=$(pci_vfs)
    if [ "$n" != "$npci" ]; then
      echo "MIG: e $(t) pci-vf $n"
      [ "$n" -gt "$npci" ] && { since=$(secs); reported=; }
      npci=$n
    fi
    if [ "$v" != "$prev" ]; then
      [ -n "$prev" ] && echo "MIG: e $(t) vf-gone $prev"
      since=$(secs); reported=
      [ -n "$v" ] && echo "MIG: e $(t) vf-new $v"
      prev=$v; state=new; [ -n "$v" ] || state=none
    fi
    if [ "$state" = new ] && [ -n "$(master_of "$v")" ]; then
      echo "MIG: e $(t) vf-enslaved $v master=$(master_of "$v")"; state=enslaved
    fi
    op=; read -r op < "/sys/class/net/$v/operstate" 2>/dev/null
    if [ "$state" = enslaved ] && [ "$op" = up ]; then
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
  esac
done
kill -INT "$(pidof ping)" 2>/dev/null
sleep 1
dmesg -c | sed 's/^/MIG: k /'
echo "MIG: done"
