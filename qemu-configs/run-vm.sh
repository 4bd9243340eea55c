#!/bin/bash
# Boot a test guest (build-guest.sh) in QEMU (setup-qemu.sh) with a vfio-user-pci device attached to
# a vfio-user server socket. See usage() or --help. The script ends by exec'ing QEMU, so the PID the
# caller started is QEMU's (signals, exit status and kill() reach QEMU directly); the --timeout
# watchdog is a small detached process that exits when QEMU does.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<EOF
usage: ${0##*/} --socket PATH [options] [-- QEMU_ARGS...]

Boots \$BUILD/guest-KERNEL/vmlinux + initramfs.cpio.gz (PVH direct boot) on a q35 machine with
-nographic -no-reboot -nic none, a pcie-root-port rp1 and on it the device
  -device '{"driver":"vfio-user-pci","socket":{"path":"PATH","type":"unix"},"bus":"rp1","id":"vf0"}'
The serial console (guest output, "GUEST: ..." lines) goes to stdout; stdin is /dev/null.

  --socket PATH     vfio-user server socket (required unless --no-device)
  --no-device       boot without the vfio-user device (guest/QEMU smoke tests)
  --kernel K        guest kernel: 6.1, 6.12 or 7.x (default 6.12)
  --ram memfd|plain memfd (default): shared memfd RAM (memory-backend-memfd,share=on), which the
                    server needs to map guest memory; plain: ordinary -m RAM (no DMA for the server)
  --mem MiB         guest RAM (default 256)
  --kvm             -accel kvm -cpu host (opt-in; nested KVM fails for Linux guests on our machines)
                    default: -accel tcg -cpu max
  --script FILE     guest shell script, passed as -fw_cfg name=opt/vfu/script,file=FILE; the guest
                    runs it instead of the default report (it can call vfu-report [WAIT] itself)
  --append "ARGS"   extra kernel command line (e.g. "guest.wait=10 loglevel=7"); always present:
                    console=ttyS0 quiet panic=-1
  --qmp PATH        QMP server on unix socket PATH (server=on,wait=off)
  --timeout SEC     kill QEMU after SEC s: SIGTERM, SIGKILL 5 s later (like timeout --kill-after=5)
                    (default 120; 0 = none)
  --extra "ARGS"    extra QEMU arguments, split on whitespace (use -- ARGS... for exact words)
  --dry-run         print the QEMU command line instead of running it
  -h, --help        this help

Env: QEMU (default \$BUILD/qemu/bin/qemu-system-x86_64), BUILD (default <repo>/build).
Exit status: QEMU's (0 after the guest powers off; also 0 when QEMU ends on the watchdog's SIGTERM,
which then prints "run-vm.sh: timeout ..." to stderr).
EOF
}

SOCKET='' NO_DEVICE=0 KERNEL=6.12 RAM=memfd MEM=256 KVM=0 SCRIPT='' APPEND='' QMP='' TIMEOUT=120 EXTRA=''
DRY_RUN=0 PASS=()
while (($#)); do
  opt=$1 val='' has_val=0
  if [[ $opt == --*=* ]]; then val=${opt#*=}; opt=${opt%%=*}; has_val=1; fi
  case $opt in
    --socket|--kernel|--ram|--mem|--script|--append|--qmp|--timeout|--extra)
      if ((!has_val)); then
        (($# >= 2)) || { echo "${0##*/}: $opt needs a value" >&2; exit 2; }
        val=$2; shift
      fi ;;
    --no-device|--kvm|--dry-run|-h|--help)
      ((!has_val)) || { echo "${0##*/}: $opt takes no value" >&2; exit 2; } ;;
  esac
  case $opt in
    --socket) SOCKET=$val ;;
    --no-device) NO_DEVICE=1 ;;
    --kernel) KERNEL=$val ;;
    --ram) RAM=$val ;;
    --mem) MEM=$val ;;
    --kvm) KVM=1 ;;
    --script) SCRIPT=$val ;;
    --append) APPEND="$APPEND $val" ;;
    --qmp) QMP=$val ;;
    --timeout) TIMEOUT=$val ;;
    --extra) EXTRA="$EXTRA $val" ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; PASS=("$@"); break ;;
    *) echo "${0##*/}: unknown option $opt (see --help)" >&2; exit 2 ;;
  esac
  shift
done

bad() { echo "${0##*/}: $*" >&2; exit 2; }
((NO_DEVICE)) || [[ -n $SOCKET ]] || bad "--socket PATH is required (or --no-device)"
[[ $RAM == memfd || $RAM == plain ]] || bad "--ram must be memfd or plain"
[[ $MEM =~ ^[1-9][0-9]*$ ]] || bad "--mem must be a number of MiB"
[[ $TIMEOUT =~ ^[0-9]+$ ]] || bad "--timeout must be a number of seconds"
GUEST=$BUILD/guest-$KERNEL
[[ -s $GUEST/initramfs.cpio.gz ]] ||
  bad "no guest $GUEST (--kernel 6.1|6.12|7.x; build it: qemu-configs/build-guest.sh $KERNEL)"
KIMAGE=$GUEST/vmlinux
[[ -s $KIMAGE ]] || KIMAGE=$GUEST/vmlinuz
[[ -z $SCRIPT || -r $SCRIPT ]] || bad "--script $SCRIPT: not readable"
QEMU=${QEMU:-$BUILD/qemu/bin/qemu-system-x86_64}
[[ -x $QEMU ]] || command -v "$QEMU" >/dev/null || bad "no QEMU at $QEMU (run qemu-configs/setup-qemu.sh)"

opt_esc() { printf '%s' "${1//,/,,}"; }                          # QemuOpts value: double commas
json_esc() { local s=${1//\\/\\\\}; printf '%s' "${s//\"/\\\"}"; } # JSON string body

machine=q35
cmd=("$QEMU" -nographic -vga none -no-reboot -nic none)
if ((KVM)); then cmd+=(-accel kvm -cpu host); else cmd+=(-accel tcg -cpu max); fi
cmd+=(-m "${MEM}M")
if [[ $RAM == memfd ]]; then
  cmd+=(-object "memory-backend-memfd,id=mem,size=${MEM}M,share=on")
  machine+=",memory-backend=mem"
fi
cmd+=(-machine "$machine")
cmd+=(-device 'pcie-root-port,id=rp1,chassis=1,slot=1')
if ((!NO_DEVICE)); then
  cmd+=(-device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$(json_esc "$SOCKET")\",\"type\":\"unix\"},\"bus\":\"rp1\",\"id\":\"vf0\"}")
fi
[[ -z $SCRIPT ]] || cmd+=(-fw_cfg "name=opt/vfu/script,file=$(opt_esc "$SCRIPT")")
if [[ -n $QMP ]]; then
  cmd+=(-chardev "socket,id=qmp,path=$(opt_esc "$QMP"),server=on,wait=off" -object 'monitor-qmp,id=qmp-mon,chardev=qmp')
fi
cmd+=(-kernel "$KIMAGE" -initrd "$GUEST/initramfs.cpio.gz" -append "console=ttyS0 quiet panic=-1${APPEND}")
# shellcheck disable=SC2206 # --extra is documented as whitespace-split
[[ -z ${EXTRA// /} ]] || cmd+=($EXTRA)
cmd+=("${PASS[@]}")

if ((DRY_RUN)); then printf '%q ' "${cmd[@]}"; echo; exit 0; fi

if ((TIMEOUT > 0)); then
  # Watchdog, detached (double fork, all fds closed except via /proc for the message): `tail --pid`
  # ends when QEMU (this PID after exec) does; if it outlives $TIMEOUT, TERM, then KILL after 5 s.
  pid=$$
  (
    (
      timeout "$TIMEOUT" tail --pid="$pid" -s 0.2 -f /dev/null && exit 0
      echo "${0##*/}: timeout after ${TIMEOUT}s: SIGTERM to QEMU (pid $pid)" 2>/dev/null >>"/proc/$pid/fd/2" || true
      kill -TERM "$pid" 2>/dev/null || exit 0
      timeout 5 tail --pid="$pid" -s 0.2 -f /dev/null && exit 0
      echo "${0##*/}: QEMU still alive 5s after SIGTERM: SIGKILL" 2>/dev/null >>"/proc/$pid/fd/2" || true
      kill -KILL "$pid" 2>/dev/null || true
    ) </dev/null >/dev/null 2>&1 &
  )
fi
exec "${cmd[@]}" </dev/null
