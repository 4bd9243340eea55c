#!/bin/sh
# Guest side of the traffic tests. Parameters on the kernel command line:
#   vfu.ip=ADDR/LEN   address for the iavf interface        vfu.peer=ADDR   the host end
#   vfu.tests=a,b,..  any of: ping, tcp-out (64 MiB guest->host), tcp-in (64 MiB host->guest), queues
# Prints "VFU: <test> ..." lines for the host to check.

arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }
ip_addr=$(arg vfu.ip); peer=$(arg vfu.peer); tests=$(arg vfu.tests | tr ',' ' ')

dev=
for _ in $(seq 300); do
  for n in /sys/class/net/*; do
    [ "$(basename "$(readlink "$n/device/driver" 2>/dev/null)")" = iavf ] && dev=$(basename "$n")
  done
  [ -n "$dev" ] && break
  sleep 0.1
done
[ -n "$dev" ] || { echo "VFU: setup FAIL no iavf netdev"; exit 1; }
ip link set lo up
ip link set "$dev" up
ip addr add "$ip_addr" dev "$dev"
for _ in $(seq 100); do [ "$(cat /sys/class/net/"$dev"/carrier 2>/dev/null)" = 1 ] && break; sleep 0.05; done
echo "VFU: setup ok dev=$dev queues=$(ls -d /sys/class/net/"$dev"/queues/rx-* | wc -l) cpus=$(nproc)"

for t in $tests; do
  case $t in
    ping)
      out=$(ping -c 100 -i 0.02 -W 2 "$peer" 2>&1 | grep 'packets transmitted')
      echo "VFU: ping $out" ;;
    tcp-out)
      dd if=/dev/urandom of=/tmp/out bs=1M count=64 2>/dev/null
      sum=$(sha256sum /tmp/out | cut -d' ' -f1)
      start=$(cut -d' ' -f1 /proc/uptime)
      nc -w 30 "$peer" 5001 < /tmp/out
      echo "VFU: tcp-out sha256=$sum start=$start end=$(cut -d' ' -f1 /proc/uptime)"
      rm -f /tmp/out ;;
    tcp-in)
      timeout 300 nc -l -p 5002 > /tmp/in
      echo "VFU: tcp-in sha256=$(sha256sum /tmp/in | cut -d' ' -f1) bytes=$(wc -c < /tmp/in)"
      rm -f /tmp/in ;;
    queues)
      # One MSI-X vector per queue pair: its interrupt count shows the queue carried traffic.
      grep -i "$dev-TxRx" /proc/interrupts | awk '{s=0; for (i=2; i<=NF-2; i++) if ($i ~ /^[0-9]+$/) s+=$i; print "VFU: queue-irqs " $NF " " s}' ;;
  esac
done
dmesg | grep -i iavf | grep -iwE 'error|errors|fail|failed|timeout|timed|hang|hung' | sed 's/^/VFU: driver-error /'
echo "VFU: done"
