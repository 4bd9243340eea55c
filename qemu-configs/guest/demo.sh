#!/bin/sh
# Guest side of scripts/demo.sh: bring the VF's interface up and show what the guest sees.
for i in $(seq 100); do
  for n in /sys/class/net/*; do
    [ "$(basename "$(readlink "$n/device/driver" 2>/dev/null)")" = iavf ] && dev=$(basename "$n")
  done
  [ -n "$dev" ] && break
  sleep 0.1
done
if [ -z "$dev" ]; then echo "DEMO: no iavf interface appeared"; vfu-report 0; exit 1; fi
ip link set "$dev" up
for i in $(seq 50); do [ "$(cat /sys/class/net/"$dev"/carrier 2>/dev/null)" = 1 ] && break; sleep 0.1; done
echo "=== ip link show $dev"
ip link show "$dev"
echo "=== ethtool-like view: $(cat /sys/class/net/"$dev"/speed 2>/dev/null) Mb/s, carrier $(cat /sys/class/net/"$dev"/carrier)"
vfu-report 0
