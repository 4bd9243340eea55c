#!/bin/bash
# The demo, from a fresh Debian 12 machine: provisions QEMU and a guest, starts the vfu-i40evf server and an
# unmodified QEMU attached to it, brings the VF's interface up in the guest and prints what the guest sees (its PCI
# devices with iavf bound to 8086:154c, the interface up with the server's MAC).
# Options: --kernel 6.1|6.12 (default 6.12), --ram memfd|plain (default memfd), --mac MAC.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

kernel=6.12 ram=memfd mac=02:00:00:15:4c:01
while [ $# -gt 0 ]; do
  case $1 in
    --kernel) kernel=$2; shift 2 ;;
    --ram) ram=$2; shift 2 ;;
    --mac) mac=$2; shift 2 ;;
    -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

qemu-configs/provision.sh >/dev/null
cargo build --release -q -p server

echo "=== guest (kernel $kernel, $ram RAM) attached to vfu-i40evf"
qemu-configs/launch.sh --kernel "$kernel" --ram "$ram" --script qemu-configs/guest/demo.sh -- --mac "$mac" \
  | tr -d '\r' | sed -n '/GUEST: kernel/,/GUEST: done/p; /=== server log/,$p'
