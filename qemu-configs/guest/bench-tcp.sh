#!/bin/sh
# Guest side of vfu-netbench's TCP throughput run (bench/src/bin/vfu-netbench.rs), the same for every NIC.
# Kernel command line:
#   bench.driver=NAME   the NIC's driver (iavf, e1000e)    bench.ip=ADDR/LEN   its address
#   bench.peer=ADDR     the host end, listening on 5002 (sends to the guest) and 5001 (receives)
# Host -> guest first: busybox nc reads port 5002 into tmpfs until the host closes; then guest -> host: the same
# bytes go back to port 5001 (the host checks their hash). Each transfer is timed with /proc/uptime around nc.
# Prints "BENCH: ..." lines.

arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }
up() { cut -d' ' -f1 /proc/uptime; }
driver=$(arg bench.driver); ip_addr=$(arg bench.ip); peer=$(arg bench.peer)

dev=
for _ in $(seq 300); do
  for n in /sys/class/net/*; do
    [ "$(basename "$(readlink "$n/device/driver" 2>/dev/null)")" = "$driver" ] && dev=$(basename "$n")
  done
  [ -n "$dev" ] && break
  sleep 0.1
done
[ -n "$dev" ] || { echo "BENCH: setup FAIL no $driver netdev"; echo "BENCH: done"; exit 1; }
ip link set lo up
ip link set "$dev" up
ip addr add "$ip_addr" dev "$dev"
for _ in $(seq 200); do [ "$(cat /sys/class/net/"$dev"/carrier 2>/dev/null)" = 1 ] && break; sleep 0.05; done
# The host's listeners exist before boot; wait until the peer answers (ARP, link settling).
for _ in $(seq 50); do ping -c 1 -W 1 "$peer" >/dev/null 2>&1 && break; done
echo "BENCH: setup ok dev=$dev driver=$driver carrier=$(cat /sys/class/net/"$dev"/carrier 2>/dev/null)" \
  "cpus=$(nproc) kernel=$(uname -r)"

start=$(up)
nc -w 30 "$peer" 5002 < /dev/null > /tmp/in
end=$(up)
echo "BENCH: tcp-in bytes=$(wc -c < /tmp/in) start=$start end=$end"

start=$(up)
nc -w 30 "$peer" 5001 < /tmp/in > /dev/null
end=$(up)
echo "BENCH: tcp-out bytes=$(wc -c < /tmp/in) start=$start end=$end"
rm -f /tmp/in

grep -i "$dev" /proc/interrupts | awk '{s=0; for (i=2; i<=NF; i++) if ($i ~ /^[0-9]+$/) s+=$i; print "BENCH: irqs " $NF " " s}'
dmesg | grep -iE "$driver" | grep -iwE 'error|errors|fail|failed|timeout|timed|hang|hung' | sed 's/^/BENCH: driver-error /'
echo "BENCH: done"
