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

dir=$(mktemp -d /tmp/vfu-demo.XXXXXX)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT

./target/release/vfu-i40evf --socket "$dir/vf.sock" --mac "$mac" 2>"$dir/server.log" &
server_pid=$!
for _ in $(seq 100); do [ -S "$dir/vf.sock" ] && break; sleep 0.05; done
[ -S "$dir/vf.sock" ] || { cat "$dir/server.log"; echo "demo.sh: server did not start" >&2; exit 1; }

echo "=== guest (kernel $kernel, $ram RAM) attached to vfu-i40evf at $dir/vf.sock"
qemu-configs/run-vm.sh --socket "$dir/vf.sock" --kernel "$kernel" --ram "$ram" --script qemu-configs/guest/demo.sh \
  | tr -d '\r' | sed -n '/GUEST: kernel/,/GUEST: done/p'
echo "=== server log"
cat "$dir/server.log"
