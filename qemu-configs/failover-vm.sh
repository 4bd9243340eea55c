#!/bin/bash
# Boot a test guest set up for live migration with an unmodified QEMU (>= 10.1; 11.1.3 tested): a virtio-net NIC on
# a tap and our VF (vfio-user-pci), either as a virtio-net failover pair or as two plain NICs for a guest bond.
# Start one as the source and one with --incoming as the destination, then drive the migration with
# `vfu-migtest qmp` (see qemu-configs/README.md, "Migrating by hand"). The script ends by exec'ing QEMU: the PID
# you started is QEMU's. See usage() or --help.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<EOF
usage: ${0##*/} --socket PATH --tap IFNAME [options] [-- QEMU_ARGS...]

Variants (--variant):
  failover  virtio-net-pci failover=on (id standby0) + vfio-user-pci failover_pair_id=standby0 (id primary0), both
            with the same MAC. QEMU unplugs the VF when migration starts and the destination plugs its own after
            the switchover. Guest script: guest/failover.sh. Guest kernels: 7.x (6.1 and 6.12 deadlock in iavf
            when net_failover enslaves a re-plugged VF; see docs/migration.md).
  bond      plain virtio-net-pci (id standby0, --standby-mac) + vfio-user-pci (id primary0). The guest keeps its
            address on an active-backup bond (VF primary, virtio-net backup) and enslaves a re-plugged VF itself.
            Guest script: guest/bond.sh. Any guest kernel. The VF leaves before the migration (the guest releases
            it: type "release" on the console; or QMP device_del with a QEMU that has the vfio-user unplug fix) and
            is added on the destination with device_add. A bond destination starts without the VF (--no-vf).

  --socket PATH       the VF's vfio-user server socket (vfu-i40evf --socket PATH); not needed with --no-vf
  --tap IFNAME        an existing tap for the virtio-net (ip tuntap add dev IFNAME mode tap; in a bridge)
  --variant V         failover (default) or bond
  --incoming URI      destination: -incoming URI (e.g. defer, then: vfu-migtest qmp --socket DST_QMP ...
                      or vfu-migtest qmp --socket SRC_QMP migrate --uri URI --dest DST_QMP)
  --no-vf             no vfio-user-pci device at start (bond destination; add it later with device_add)
  --kernel K          guest: 6.1, 6.12 or 7.x (default 7.x)
  --mem MiB           guest RAM (default 256), a shared memfd (the server maps guest memory)
  --mac MAC           the VF's MAC as the server has it (--mac of vfu-i40evf); failover: also the virtio-net's
                      (default 02:00:00:15:4c:01)
  --standby-mac MAC   bond: the virtio-net's MAC (default 02:00:00:15:4c:02)
  --ip ADDR/LEN       the guest's address (default 10.77.0.2/24), on the failover master or bond0
  --peer ADDR         the guest pings it every 50 ms (default 10.77.0.1)
  --qmp PATH          QMP on a UNIX socket (server=on,wait=off)
  --script FILE       guest script instead of guest/failover.sh or guest/bond.sh
  --append "ARGS"     extra kernel command line
  --timeout SEC       kill QEMU after SEC s (default 0: never)
  --kvm               -accel kvm -cpu host (default TCG)
  --dry-run           print the QEMU command line
  -h, --help          this help

The console (serial) is on stdin/stdout (-nographic: Ctrl-A x quits, Ctrl-A c the HMP monitor). The guest scripts
read one word a line from it: "stop" (end the pings, print their totals, power off), "dump" (stacks of blocked
tasks), and in the bond variant "release" (the guest removes the VF itself) and "rescan" (PCI rescan).
Env: QEMU (default \$BUILD/qemu/bin/qemu-system-x86_64), BUILD (default <repo>/build).
EOF
}

SOCKET='' TAP='' VARIANT=failover INCOMING='' NO_VF=0 KERNEL=7.x MEM=256 MAC=02:00:00:15:4c:01
STANDBY_MAC=02:00:00:15:4c:02 IP=10.77.0.2/24 PEER=10.77.0.1 QMP='' SCRIPT='' APPEND='' TIMEOUT=0 KVM=0 DRY_RUN=0
PASS=()
while (($#)); do
  opt=$1 val='' has_val=0
  if [[ $opt == --*=* ]]; then val=${opt#*=}; opt=${opt%%=*}; has_val=1; fi
  case $opt in
    --socket|--tap|--variant|--incoming|--kernel|--mem|--mac|--standby-mac|--ip|--peer|--qmp|--script|--append|--timeout)
      if ((!has_val)); then
        (($# >= 2)) || { echo "${0##*/}: $opt needs a value" >&2; exit 2; }
        val=$2; shift
      fi ;;
  esac
  case $opt in
    --socket) SOCKET=$val ;;
    --tap) TAP=$val ;;
    --variant) VARIANT=$val ;;
    --incoming) INCOMING=$val ;;
    --no-vf) NO_VF=1 ;;
    --kernel) KERNEL=$val ;;
    --mem) MEM=$val ;;
    --mac) MAC=$val ;;
    --standby-mac) STANDBY_MAC=$val ;;
    --ip) IP=$val ;;
    --peer) PEER=$val ;;
    --qmp) QMP=$val ;;
    --script) SCRIPT=$val ;;
    --append) APPEND="$APPEND $val" ;;
    --timeout) TIMEOUT=$val ;;
    --kvm) KVM=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; PASS=("$@"); break ;;
    *) echo "${0##*/}: unknown option $opt (see --help)" >&2; exit 2 ;;
  esac
  shift
done

bad() { echo "${0##*/}: $*" >&2; exit 2; }
[[ $VARIANT == failover || $VARIANT == bond ]] || bad "--variant must be failover or bond"
[[ -n $TAP ]] || bad "--tap IFNAME is required (the virtio-net's tap)"
((NO_VF)) || [[ -n $SOCKET ]] || bad "--socket PATH is required (or --no-vf)"
[[ $MEM =~ ^[1-9][0-9]*$ ]] || bad "--mem must be a number of MiB"
[[ $TIMEOUT =~ ^[0-9]+$ ]] || bad "--timeout must be a number of seconds"
GUEST=$BUILD/guest-$KERNEL
[[ -s $GUEST/initramfs.cpio.gz ]] || bad "no guest $GUEST (--kernel 6.1|6.12|7.x; run qemu-configs/provision.sh)"
KIMAGE=$GUEST/vmlinux
[[ -s $KIMAGE ]] || KIMAGE=$GUEST/vmlinuz
[[ -n $SCRIPT ]] || SCRIPT=$QC_DIR/guest/$VARIANT.sh
[[ -r $SCRIPT ]] || bad "--script $SCRIPT: not readable"
QEMU=${QEMU:-$BUILD/qemu/bin/qemu-system-x86_64}
[[ -x $QEMU ]] || command -v "$QEMU" >/dev/null || bad "no QEMU at $QEMU (run qemu-configs/setup-qemu.sh)"

opt_esc() { printf '%s' "${1//,/,,}"; }                          # QemuOpts value: double commas
json_esc() { local s=${1//\\/\\\\}; printf '%s' "${s//\"/\\\"}"; } # JSON string body

if [[ $VARIANT == failover ]]; then
  standby="{\"driver\":\"virtio-net-pci\",\"netdev\":\"n0\",\"id\":\"standby0\",\"failover\":true,\"mac\":\"$MAC\",\"bus\":\"rp2\",\"romfile\":\"\"}"
  pair=",\"failover_pair_id\":\"standby0\""
else
  standby="{\"driver\":\"virtio-net-pci\",\"netdev\":\"n0\",\"id\":\"standby0\",\"mac\":\"$STANDBY_MAC\",\"bus\":\"rp2\",\"romfile\":\"\"}"
  pair=''
fi

cmd=("$QEMU" -nographic -vga none -no-reboot -nic none)
if ((KVM)); then cmd+=(-accel kvm -cpu host); else cmd+=(-accel tcg -cpu max); fi
cmd+=(-m "${MEM}M" -object "memory-backend-memfd,id=mem,size=${MEM}M,share=on" -machine q35,memory-backend=mem)
cmd+=(-device pcie-root-port,id=rp1,chassis=1,slot=1 -device pcie-root-port,id=rp2,chassis=2,slot=2)
cmd+=(-netdev "tap,id=n0,ifname=$(opt_esc "$TAP"),script=no,downscript=no" -device "$standby")
if ((!NO_VF)); then
  cmd+=(-device "{\"driver\":\"vfio-user-pci\",\"id\":\"primary0\",\"bus\":\"rp1\",\"socket\":{\"path\":\"$(json_esc "$SOCKET")\",\"type\":\"unix\"}$pair}")
fi
cmd+=(-fw_cfg "name=opt/vfu/script,file=$(opt_esc "$SCRIPT")")
if [[ -n $QMP ]]; then
  cmd+=(-chardev "socket,id=qmp,path=$(opt_esc "$QMP"),server=on,wait=off" -object 'monitor-qmp,id=qmp-mon,chardev=qmp')
fi
cmd+=(-kernel "$KIMAGE" -initrd "$GUEST/initramfs.cpio.gz"
      -append "console=ttyS0 quiet panic=-1 mig.ip=$IP mig.peer=$PEER${APPEND}")
[[ -z $INCOMING ]] || cmd+=(-incoming "$INCOMING")
cmd+=("${PASS[@]}")

if ((DRY_RUN)); then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
if ((TIMEOUT > 0)); then
  pid=$$
  ( ( timeout "$TIMEOUT" tail --pid="$pid" -s 0.2 -f /dev/null && exit 0
      kill -TERM "$pid" 2>/dev/null || exit 0
      timeout 5 tail --pid="$pid" -s 0.2 -f /dev/null && exit 0
      kill -KILL "$pid" 2>/dev/null || true ) </dev/null >/dev/null 2>&1 & )
fi
exec "${cmd[@]}"
