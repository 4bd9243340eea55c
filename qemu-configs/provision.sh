#!/bin/bash
# Provision a Debian 12 machine for the QEMU + Linux guest tests of vfu-i40evf:
#   1. installs the missing host tools (kmod cpio xz-utils zstd debian-archive-keyring) with apt
#      (root or sudo; `apt-get update` first, only when something is missing);
#   2. setup-qemu.sh: QEMU 11.1.3 with -device vfio-user-pci in $BUILD/qemu;
#   3. build-guest.sh 6.1, 6.12 and 7.x: test guests in $BUILD/guest-6.1, guest-6.12 and guest-7.x.
# Non-interactive and idempotent; a rerun on a provisioned machine takes about a second.
# Env: BUILD (default <repo>/build), MIRROR, REFRESH=1 (re-download QEMU and the guest packages).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HOST_PKGS=(kmod cpio xz-utils zstd debian-archive-keyring)

missing=()
for p in "${HOST_PKGS[@]}"; do
  [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=()
  if [[ $(id -u) != 0 ]]; then
    command -v sudo >/dev/null || die "need root (or sudo) to install: ${missing[*]}"
    sudo=(sudo)
  fi
  log "installing host packages: ${missing[*]}"
  "${sudo[@]}" apt-get -q update
  "${sudo[@]}" apt-get -q -y --no-install-recommends install "${missing[@]}"
else
  log "host packages present: ${HOST_PKGS[*]}"
fi

"$QC_DIR/setup-qemu.sh"
# virtio_net: a QEMU virtio NIC as the peer VM in two-VM tests and the failover standby (virtio_pci is its PCI
# transport: a module in 6.1, built into 6.12 and 7.x); e1000e: QEMU's own NIC as the throughput baseline; bonding:
# the guest bond that keeps 6.1 and 6.12 guests on the network across unplug.
export GUEST_MODULES=${GUEST_MODULES:-"virtio_net virtio_pci e1000e bonding"}
"$QC_DIR/build-guest.sh" 6.1
"$QC_DIR/build-guest.sh" 6.12
"$QC_DIR/build-guest.sh" 7.x

cat <<EOF

Provisioned (cache: $BUILD):
  QEMU:       $BUILD/qemu/bin/qemu-system-x86_64 ($(cut -d' ' -f2 "$BUILD/qemu/.installed"))
  guest 6.1:  $BUILD/guest-6.1/{vmlinux,initramfs.cpio.gz} (kernel $(cat "$BUILD/guest-6.1/KVER"))
  guest 6.12: $BUILD/guest-6.12/{vmlinux,initramfs.cpio.gz} (kernel $(cat "$BUILD/guest-6.12/KVER"))
  guest 7.x:  $BUILD/guest-7.x/{vmlinux,initramfs.cpio.gz} (kernel $(cat "$BUILD/guest-7.x/KVER"))
  boot:       $QC_DIR/run-vm.sh --socket /path/to/vfio-user.sock [--kernel 6.1|6.12|7.x] (--help)
EOF
