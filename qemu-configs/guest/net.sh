#!/bin/sh
# Guest side of the traffic tests. Parameters on the kernel command line:
#   vfu.ip=ADDR/LEN   address for the interface                vfu.peer=ADDR   the other end (host or peer VM)
#   vfu.tests=a,b,..  any of: ping, tcp-out (64 MiB guest->host), tcp-in (64 MiB host->guest), queues
#   vfu.driver=DRV    driver of the interface to use (default iavf; e.g. virtio_net for a QEMU NIC)
#   vfu.count=N       echo requests the ping test sends (default 100)
#   vfu.wait=SEC      ping first waits up to SEC s for one reply from the peer (default 0: no wait)
#   vfu.linger=SEC    after the tests, stay up (answering the peer) until it has sent vfu.count + 1
#                     echo requests and been quiet for 2 s, at most SEC s (default 0)
# Prints "VFU: <test> ..." lines for the host to check.

arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }
ip_addr=$(arg vfu.ip); peer=$(arg vfu.peer); tests=$(arg vfu.tests | tr ',' ' ')
driver=$(arg vfu.driver); driver=${driver:-iavf}
count=$(arg vfu.count); count=${count:-100}
wait=$(arg vfu.wait); wait=${wait:-0}
linger=$(arg vfu.linger); linger=${linger:-0}
uptime_s() { cut -d. -f1 /proc/uptime; }
# Echo requests received so far (the InEchos column of the Icmp lines in /proc/net/snmp).
in_echos() {
  awk '/^Icmp:/ { if (!c) { for (i = 1; i <= NF; i++) if ($i == "InEchos") c = i } else { print $c; exit } }' /proc/net/snmp
}

dev=
for _ in $(seq 300); do
  for n in /sys/class/net/*; do
    [ "$(basename "$(readlink "$n/device/driver" 2>/dev/null)")" = "$driver" ] && dev=$(basename "$n")
  done
  [ -n "$dev" ] && break
  sleep 0.1
done
[ -n "$dev" ] || { echo "VFU: setup FAIL no $driver netdev"; exit 1; }
ip link set lo up
ip link set "$dev" up
ip addr add "$ip_addr" dev "$dev"
for _ in $(seq 100); do [ "$(cat /sys/class/net/"$dev"/carrier 2>/dev/null)" = 1 ] && break; sleep 0.05; done
echo "VFU: setup ok dev=$dev queues=$(ls -d /sys/class/net/"$dev"/queues/rx-* | wc -l) cpus=$(nproc)"

for t in $tests; do
  case $t in
    ping)
      if [ "$wait" -gt 0 ]; then
        start=$(uptime_s); up=FAIL
        while [ $(($(uptime_s) - start)) -lt "$wait" ]; do
          ping -c 1 -W 1 "$peer" > /dev/null 2>&1 && { up=ok; break; }
          sleep 0.2
        done
        echo "VFU: peer-up $up after $(($(uptime_s) - start))s"
      fi
      out=$(ping -c "$count" -i 0.02 -W 2 "$peer" 2>&1 | grep 'packets transmitted')
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
if [ "$linger" -gt 0 ]; then
  # The peer may still be pinging us: stay up until its count (+1 for its first, waiting ping) has
  # arrived and it has been quiet for 2 s.
  start=$(uptime_s); last=$(in_echos); quiet=0
  while [ $(($(uptime_s) - start)) -lt "$linger" ]; do
    sleep 0.5
    n=$(in_echos)
    if [ "$n" = "$last" ]; then quiet=$((quiet + 1)); else quiet=0; last=$n; fi
    [ "$n" -gt "$count" ] && [ "$quiet" -ge 4 ] && break
  done
  echo "VFU: linger echoes=$(in_echos) secs=$(($(uptime_s) - start))"
fi
dmesg | grep -i "$driver" | grep -iwE 'error|errors|fail|failed|timeout|timed|hang|hung' | sed 's/^/VFU: driver-error /'
echo "VFU: done"
