#!/bin/sh
# Guest side of the link acceptance test: the iavf netdev comes up, survives an MTU change (a VF reset) and a
# driver reload. Prints "VFU: <step> ok|FAIL ..." lines for the host to check, then the usual report.

uptime_ms() { awk '{printf "%d\n", $1 * 1000}' /proc/uptime; }

# The iavf netdev's name, waiting up to $1 seconds for it to register.
iavf_dev() {
  end=$(( $(uptime_ms) + $1 * 1000 ))
  while [ "$(uptime_ms)" -lt "$end" ]; do
    for n in /sys/class/net/*; do
      [ "$(basename "$(readlink "$n/device/driver" 2>/dev/null)")" = iavf ] && { basename "$n"; return 0; }
    done
    sleep 0.1
  done
  return 1
}

# Waits up to 5 s for operstate up with carrier; prints the step's result.
wait_up() {
  step=$1 dev=$2 start=$(uptime_ms)
  end=$(( start + 5000 ))
  while [ "$(uptime_ms)" -lt "$end" ]; do
    if [ "$(cat /sys/class/net/"$dev"/operstate)" = up ] && [ "$(cat /sys/class/net/"$dev"/carrier 2>/dev/null)" = 1 ]; then
      echo "VFU: $step ok dev=$dev ms=$(( $(uptime_ms) - start )) addr=$(cat /sys/class/net/"$dev"/address) mtu=$(cat /sys/class/net/"$dev"/mtu)"
      return 0
    fi
    sleep 0.05
  done
  echo "VFU: $step FAIL dev=$dev operstate=$(cat /sys/class/net/"$dev"/operstate) carrier=$(cat /sys/class/net/"$dev"/carrier 2>/dev/null)"
  return 1
}

dev=$(iavf_dev 30) || { echo "VFU: netdev FAIL (no iavf netdev after 30 s)"; vfu-report 0; exit 1; }
echo "VFU: netdev ok dev=$dev"
ip link set "$dev" up
wait_up up "$dev"

ip link set "$dev" mtu 1400
sleep 0.5
wait_up mtu "$dev"

rmmod iavf && echo "VFU: rmmod ok"
insmod /lib/modules/iavf.ko && echo "VFU: insmod ok"
dev=$(iavf_dev 30) || { echo "VFU: reload FAIL (no netdev after insmod)"; vfu-report 0; exit 1; }
ip link set "$dev" up
wait_up reload "$dev"

# Whole words: "change" must not count as "hang".
errors=$(dmesg | grep -i iavf | grep -ciwE 'error|errors|err|fail|failed|failure|timeout|timed|hang|hung|bug|oops')
echo "VFU: dmesg-errors $errors"
vfu-report 0
