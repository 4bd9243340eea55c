#!/bin/bash
# Starts vfu-i40evf and a VM attached to it; stops the server (by PID) and removes its socket when the VM exits.
#
#   launch.sh [--kernel 6.1|6.12] [--ram memfd|plain] [--kvm] [--script FILE] [--append ARGS] [--mem MiB]
#             [--timeout SEC] [-- SERVER_ARGS...]
#
# TCG by default (--kvm is opt-in: nested KVM fails on Linux guests on some hosts); guest RAM is a shared memfd by
# default (--ram plain: QEMU's ordinary RAM, reached by the server through DMA messages). SERVER_ARGS go to
# vfu-i40evf (e.g. -- --mac 02:00:00:00:00:01 --backend tap:vfu0). Server binary: $VFU_BIN, else
# target/release/vfu-i40evf (built if missing). The server log is kept in $VFU_LOG (default: a temp file, printed).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

vm_args=()
server_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --kernel|--ram|--script|--append|--mem|--timeout) vm_args+=("$1" "$2"); shift 2 ;;
    --kvm) vm_args+=("$1"); shift ;;
    --) shift; server_args=("$@"); break ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "launch.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

bin=${VFU_BIN:-$root/target/release/vfu-i40evf}
if [ ! -x "$bin" ]; then
  (cd "$root" && cargo build --release -q -p server)
fi

dir=$(mktemp -d /tmp/vfu-launch.XXXXXX)
log=${VFU_LOG:-$dir/server.log}
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  [ -z "${VFU_LOG:-}" ] && { echo "=== server log"; cat "$log"; }
  rm -rf "$dir"
}
trap cleanup EXIT

"$bin" --socket "$dir/vf.sock" "${server_args[@]}" 2>"$log" &
server_pid=$!
for _ in $(seq 200); do [ -S "$dir/vf.sock" ] && break; sleep 0.05; done
[ -S "$dir/vf.sock" ] || { cat "$log"; echo "launch.sh: server did not start" >&2; exit 1; }

"$here/run-vm.sh" --socket "$dir/vf.sock" "${vm_args[@]}"
