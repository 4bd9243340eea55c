#!/bin/sh
# Guest side of the device fault tests (client-tests/tests/faults_qemu.rs, docs/faults.md). Parameters on the
# kernel command line:
#   vfu.fault=NAME    which scenario: link-flap, reset-stuck, reset-slow, tx-hang, aq-error, aq-drop, link-down,
#                     rx-drop, irq-drop, dma-error, bring-up (slow-mmio and its baseline)
#   vfu.ip=ADDR/LEN   address for the interface   vfu.peer=ADDR   the host end
#   vfu.v6=off        (reset-slow) IPv6 off on the interface, so the stack sends nothing while the VF resets
# Some scenarios wait for the host: they print "VFU: <step> ..." and then poll for the device's reaction (the
# host acts through the server's control socket when it reads that line).
# Prints "VFU: <step> ..." lines for the host to check, and "VFU: done" at the end.

arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }
fault=$(arg vfu.fault); ip_addr=$(arg vfu.ip); peer=$(arg vfu.peer); v6=$(arg vfu.v6)
uptime_s() { cut -d. -f1 /proc/uptime; }
# Milliseconds since boot (/proc/uptime has centiseconds).
now_ms() { echo $(( $(sed 's/^\([0-9]*\)\.\([0-9]*\) .*/\1\2/' /proc/uptime) * 10 )); }
# The timestamp of a kernel log line on stdin ("[    6.895311] ..."), in ms.
kmsg_ms() { sed -n 's/^\[ *\([0-9]*\)\.\([0-9][0-9][0-9]\).*/\1\2/p'; }
# A ping summary on one line: "N packets transmitted, M packets received, ... | round-trip ...".
ping_summary() { ping "$@" "$peer" 2>&1 | grep -E 'transmitted|round-trip' | tr '\n' '|'; }

# The iavf netdev's name, waiting up to $1 seconds for it to register.
iavf_dev() {
  end=$(( $(uptime_s) + $1 ))
  while [ "$(uptime_s)" -lt "$end" ]; do
    for n in /sys/class/net/*; do
      [ "$(basename "$(readlink "$n/device/driver" 2>/dev/null)")" = iavf ] && { basename "$n"; return 0; }
    done
    sleep 0.1
  done
  return 1
}

# Waits up to $2 s for the kernel log to match the extended regex $1.
wait_dmesg() {
  end=$(( $(uptime_s) + $2 ))
  while [ "$(uptime_s)" -lt "$end" ]; do
    dmesg | grep -qE "$1" && return 0
    sleep 0.5
  done
  return 1
}

# Pings the peer once a second until it answers, for at most $1 s; prints the seconds it took.
ping_until() {
  start=$(uptime_s)
  while [ $(( $(uptime_s) - start )) -lt "$1" ]; do
    ping -c 1 -W 1 "$peer" > /dev/null 2>&1 && { echo $(( $(uptime_s) - start )); return 0; }
    sleep 0.2
  done
  return 1
}

finish() {
  dmesg | grep -iE 'iavf|NETDEV WATCHDOG|vfu:' | sed 's/^/VFU: dmesg /'
  echo "VFU: done"
  exit 0
}

dev=$(iavf_dev 30) || { echo "VFU: netdev FAIL (no iavf netdev after 30 s)"; finish; }
echo "VFU: netdev ok dev=$dev"
ip link set lo up
up_ms=$(now_ms)
ip link set "$dev" up
[ -n "$ip_addr" ] && ip addr add "$ip_addr" dev "$dev"

case $fault in
  link-flap)
    # The carrier goes down and up on its own: count its changes over 6 s.
    sleep 1
    # The carrier is sampled directly: operstate follows it through linkwatch, which batches changes about once a
    # second, so with a 500 ms period it can read "up" at every sample.
    c0=$(cat /sys/class/net/"$dev"/carrier_changes)
    seen=""
    i=0
    while [ $i -lt 60 ]; do
      seen="$seen$(cat /sys/class/net/"$dev"/carrier)"
      sleep 0.1
      i=$((i + 1))
    done
    c1=$(cat /sys/class/net/"$dev"/carrier_changes)
    echo "VFU: carrier-changes $((c1 - c0)) carrier=$seen"
    ;;
  reset-stuck)
    # An MTU change makes iavf reset the VF; the reset never finishes and iavf gives up.
    for _ in $(seq 50); do [ "$(cat /sys/class/net/"$dev"/operstate)" = up ] && break; sleep 0.1; done
    echo "VFU: up $(cat /sys/class/net/"$dev"/operstate)"
    ip link set "$dev" mtu 1400
    if wait_dmesg 'Reset never finished|Reset task did not complete|VF disabled' 120; then
      echo "VFU: gave-up ok"
    else
      echo "VFU: gave-up FAIL"
    fi
    ;;
  tx-hang)
    # Traffic first; then the host hangs TX: keep sending (the ring fills, the stack's watchdog calls iavf's
    # tx_timeout, iavf resets the VF), and wait for traffic to come back once the host clears the fault.
    t=$(ping_until 30) && echo "VFU: ready ok after ${t}s" || { echo "VFU: ready FAIL"; finish; }
    while ! dmesg | grep -qE 'NETDEV WATCHDOG|tx_timeout|transmit queue [0-9]+ timed out'; do
      [ "$(uptime_s)" -gt 240 ] && break
      # Fill the ring: a burst of datagrams, then a ping (the host is not listening; that is fine).
      dd if=/dev/zero bs=512 count=2000 2>/dev/null | nc -u -w 1 "$peer" 9 > /dev/null 2>&1
      sleep 0.5
    done
    if dmesg | grep -qE 'NETDEV WATCHDOG|transmit queue [0-9]+ timed out'; then echo "VFU: tx-timeout ok"; else echo "VFU: tx-timeout FAIL"; fi
    t=$(ping_until 120) && echo "VFU: recovered ok after ${t}s" || echo "VFU: recovered FAIL"
    out=$(ping -c 20 -i 0.05 -W 2 "$peer" 2>&1 | grep 'packets transmitted')
    echo "VFU: ping $out"
    ;;
  aq-error)
    # The interface comes up although one op is refused, and carries traffic.
    t=$(ping_until 30) && echo "VFU: traffic ok after ${t}s" || echo "VFU: traffic FAIL"
    ;;
  reset-slow)
    # An MTU change resets the VF. iavf's ndo_change_mtu waits for the reset only sometimes (on 6.12 it often
    # returns within ~30 ms), so the reset's length is taken from the kernel log: from a marker written just before
    # the MTU change to iavf's "NIC Link is Up" after the reset. No pings until then; then pings at the new MTU.
    # With IPv6 on, the MTU change makes the stack send MLD/ND frames while the reset is in progress.
    t=$(ping_until 30) && echo "VFU: ready ok after ${t}s" || { echo "VFU: ready FAIL"; finish; }
    [ "$v6" = off ] && echo 1 > /proc/sys/net/ipv6/conf/"$dev"/disable_ipv6
    n0=$(dmesg | grep -c 'NIC Link is Up')
    echo "vfu: mtu change" > /dev/kmsg
    t0=$(now_ms)
    ip link set "$dev" mtu 1400
    echo "VFU: mtu-change returned after $(( $(now_ms) - t0 )) ms"
    end=$(( $(uptime_s) + 30 ))
    while [ "$(dmesg | grep -c 'NIC Link is Up')" -le "$n0" ] && [ "$(uptime_s)" -lt "$end" ]; do sleep 0.1; done
    m=$(dmesg | grep 'vfu: mtu change' | tail -n 1 | kmsg_ms)
    u=$(dmesg | grep 'NIC Link is Up' | tail -n 1 | kmsg_ms)
    if [ "$(dmesg | grep -c 'NIC Link is Up')" -gt "$n0" ]; then echo "VFU: reset ok link up $((u - m)) ms after the MTU change"; else echo "VFU: reset FAIL"; fi
    t=$(ping_until 60) && echo "VFU: traffic ok after ${t}s" || echo "VFU: traffic FAIL"
    echo "VFU: ping $(ping_summary -c 10 -i 0.1 -W 2 -s 1300)"
    ;;
  aq-drop)
    # The 10th virtchnl reply (an ADD_ETH_ADDR or GET_STATS after bring-up) is dropped: iavf keeps waiting for it
    # (one request in flight at a time), so later requests, such as the promiscuous-mode change, are not sent
    # until a VF reset (the MTU change) clears its state. The data path does not need the admin queue.
    t=$(ping_until 30) && echo "VFU: ready ok after ${t}s" || { echo "VFU: ready FAIL"; finish; }
    sleep 4
    ip link set "$dev" promisc on
    sleep 3
    if dmesg | grep -q 'Entering promiscuous mode'; then echo "VFU: promisc-before-reset sent"; else echo "VFU: promisc-before-reset stalled"; fi
    echo "VFU: ping-after $(ping_summary -c 10 -i 0.1 -W 2)"
    ip link set "$dev" mtu 1400
    if wait_dmesg 'Entering promiscuous mode' 20; then echo "VFU: promisc-after-reset ok"; else echo "VFU: promisc-after-reset FAIL"; fi
    t=$(ping_until 60) && echo "VFU: traffic ok after ${t}s" || echo "VFU: traffic FAIL"
    ;;
  link-down)
    # The PF reports the link down: no carrier. The host clears the fault when it reads "VFU: down"; the carrier
    # comes up and traffic flows.
    sleep 2
    car=$(cat /sys/class/net/"$dev"/carrier); op=$(cat /sys/class/net/"$dev"/operstate)
    flags=$(ip link show dev "$dev" | head -n 1)
    if [ "$car" = 0 ]; then echo "VFU: down ok carrier=$car operstate=$op $flags"; else echo "VFU: down FAIL carrier=$car operstate=$op $flags"; fi
    t0=$(now_ms)
    while [ "$(cat /sys/class/net/"$dev"/carrier)" != 1 ] && [ $(( $(now_ms) - t0 )) -lt 30000 ]; do sleep 0.1; done
    if [ "$(cat /sys/class/net/"$dev"/carrier)" = 1 ]; then echo "VFU: carrier-up ok after $(( $(now_ms) - t0 )) ms"; else echo "VFU: carrier-up FAIL"; fi
    t=$(ping_until 30) && echo "VFU: traffic ok after ${t}s" || echo "VFU: traffic FAIL"
    echo "VFU: ping $(ping_summary -c 10 -i 0.1 -W 2)"
    ;;
  rx-drop)
    # Half of what the VF receives is lost: ping replies go missing. Then the host sets rx-drop=0 (on "VFU: lossy")
    # and none are.
    t=$(ping_until 60) && echo "VFU: ready ok after ${t}s" || { echo "VFU: ready FAIL"; finish; }
    echo "VFU: lossy $(ping_summary -c 60 -i 0.05 -W 1)"
    sleep 3
    echo "VFU: rx_dropped $(cat /sys/class/net/"$dev"/statistics/rx_dropped)"
    echo "VFU: clean $(ping_summary -c 40 -i 0.05 -W 1)"
    ;;
  irq-drop)
    # The host sets irq-drop when it reads "VFU: ready": some interrupts are lost from then on. Many echo replies
    # are lost or seconds late (a queue whose interrupt was lost waits for iavf's watchdog or the stack's TX
    # watchdog); the guest still gets answers (progress).
    t=$(ping_until 30) && echo "VFU: ready ok after ${t}s" || { echo "VFU: ready FAIL"; finish; }
    sleep 1
    t0=$(now_ms)
    echo "VFU: ping $(ping_summary -c 20 -i 0.2 -W 3)"
    echo "VFU: took $(( $(now_ms) - t0 )) ms"
    t=$(ping_until 30) && echo "VFU: progress ok after ${t}s" || echo "VFU: progress FAIL"
    ;;
  dma-error)
    # Traffic first; the host then sets dma-error: the device's next guest-memory access fails, the PF resets
    # the VF (RESET_IMPENDING first). Keep pinging until iavf logs the reset, then wait for traffic.
    t=$(ping_until 30) && echo "VFU: ready ok after ${t}s" || { echo "VFU: ready FAIL"; finish; }
    t0=$(now_ms)
    while ! dmesg | grep -qiE 'Reset indication|Reset warning|PF reset'; do
      [ $(( $(now_ms) - t0 )) -gt 60000 ] && break
      ping -c 1 -W 1 "$peer" > /dev/null 2>&1
      sleep 0.2
    done
    if dmesg | grep -qiE 'Reset indication|Reset warning|PF reset'; then echo "VFU: pf-reset ok"; else echo "VFU: pf-reset FAIL"; fi
    t=$(ping_until 90) && echo "VFU: recovered ok after ${t}s" || echo "VFU: recovered FAIL"
    echo "VFU: ping $(ping_summary -c 20 -i 0.05 -W 2)"
    ;;
  slow-mmio)
    # Every trapped BAR access is answered late: bring-up still works. Then the host raises the delay (on
    # "VFU: ping-a") to a few milliseconds: each echo request waits for its TX doorbell write, so the round trip
    # grows by at least that much.
    t=$(ping_until 60) && echo "VFU: traffic ok after ${t}s" || echo "VFU: traffic FAIL"
    echo "VFU: bring-up $(( $(now_ms) - up_ms )) ms"
    echo "VFU: ping-a $(ping_summary -c 10 -i 0.1 -W 2)"
    sleep 2
    echo "VFU: ping-b $(ping_summary -c 10 -i 0.1 -W 2)"
    ;;
  *)
    echo "VFU: unknown scenario '$fault'"
    ;;
esac
finish
