#!/bin/bash
# build-guest.sh KERNEL   (KERNEL: 6.1 = bookworm's linux-image-amd64,
#                                  6.12 = bookworm-backports' linux-image-amd64,
#                                  7.x = trixie-backports' linux-image-amd64, split into linux-base,
#                                        linux-binary and linux-modules packages)
#
# Builds a tiny x86_64 test guest from Debian packages into $BUILD/guest-KERNEL/:
#   vmlinux            uncompressed ELF kernel for QEMU's PVH direct boot (-kernel vmlinux, fastest)
#   vmlinuz            the same kernel as Debian ships it (bzImage)
#   initramfs.cpio.gz  busybox-static + the iavf module and its dependencies (decompressed),
#                      qemu_fw_cfg and af_packet when they are modules, /init and /bin/vfu-report
#   KVER, modules.txt  kernel release; modules in load order
# The guest's /init: mounts proc/sys/devtmpfs, prints "GUEST: kernel <release>", insmods the modules
# ("GUEST: insmod X ok|FAILED"), then runs the fw_cfg file opt/vfu/script if QEMU was given one
# (-fw_cfg name=opt/vfu/script,file=PATH; run-vm.sh --script) or else /bin/vfu-report, prints
# "GUEST: done" and powers off. Kernel command line: guest.wait=N makes vfu-report wait up to N s
# for a network interface other than lo (iavf registers it only after the virtchnl handshake).
#
# Packages come through a private apt configuration ($BUILD/apt/bookworm: bookworm,
# bookworm-updates, bookworm-backports; $BUILD/apt/trixie for 7.x: trixie, trixie-backports);
# /etc/apt is never modified. busybox-static always comes from bookworm. The .debs are cached in
# $BUILD/debs and reused until REFRESH=1, so the kernel stays fixed even after Debian moves on.
# If the outputs exist and were built by this very script (hash stamp), nothing is done.
#
# Env: BUILD (cache root, default <repo>/build), MIRROR, REFRESH=1 (re-resolve packages, rebuild),
#      GUEST_MODULES (extra required modules, e.g. "virtio_net").
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { echo "usage: ${0##*/} 6.1|6.12|7.x" >&2; exit 2; }
(($# == 1)) || usage
KERNEL=$1
case $KERNEL in
  6.1)  SUITE=bookworm ;;
  6.12) SUITE=bookworm-backports ;;
  7.x)  SUITE=trixie-backports ;;
  *)    usage ;;
esac
REQUIRED_MODULES="iavf ${GUEST_MODULES:-}"
OPTIONAL_MODULES="qemu_fw_cfg af_packet"   # loaded when they are modules; fine when built in
OUT=$BUILD/guest-$KERNEL
WORK=$BUILD/work/guest-$KERNEL
DEBS=$BUILD/debs
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}

SELF_HASH=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)
WANT_STAMP="kernel=$KERNEL script=$SELF_HASH modules=$(echo "$REQUIRED_MODULES" | xargs)"
if [[ ${REFRESH:-0} != 1 && -s $OUT/vmlinux && -s $OUT/vmlinuz && -s $OUT/initramfs.cpio.gz &&
      -s $OUT/KVER && $(cat "$OUT/.stamp" 2>/dev/null) == "$WANT_STAMP" ]]; then
  echo "guest $KERNEL: up to date in $OUT (kernel $(cat "$OUT/KVER"); REFRESH=1 rebuilds)"
  exit 0
fi

require_cmds apt-get apt-cache dpkg dpkg-deb modinfo cpio gzip xz zstd sha256sum
mkdir -p "$DEBS/partial" "$WORK" "$OUT"
rm -f "$OUT/.stamp"

APT_READY=''
apt_ready() {   # apt_ready [bookworm|trixie]: set up (and if stale, update) a private apt configuration
  local dist=${1:-bookworm}
  [[ $APT_READY == "$dist" ]] && return 0
  local mirror; mirror=$(debian_mirror)
  if [[ $dist == trixie ]]; then
    apt_private trixie \
      "deb [signed-by=$KEYRING] $mirror trixie main" \
      "deb [signed-by=$KEYRING] $mirror trixie-backports main"
  else
    apt_private bookworm \
      "deb [signed-by=$KEYRING] $mirror bookworm main" \
      "deb [signed-by=$KEYRING] $mirror bookworm-updates main" \
      "deb [signed-by=$KEYRING] $mirror bookworm-backports main"
  fi
  apt_private_update
  APT_READY=$dist
}

candidate() {   # candidate PKG [TARGET_RELEASE] -> version
  local t=() v
  [[ -n ${2:-} ]] && t=(-t "$2")
  v=$(apt-cache "${APT_O[@]}" "${t[@]}" policy "$1" | awk '/Candidate:/ {print $2}')
  [[ -n $v && $v != "(none)" ]] || die "no candidate for $1${2:+ in $2}"
  echo "$v"
}

download() {   # download PKG VERSION -> path of the cached .deb in $DEBS
  local pkg=$1 ver=$2 f
  f=$(find "$DEBS" -maxdepth 1 -name "${pkg}_${ver//:/%3a}_*.deb" | head -n1)
  if [[ -z $f ]]; then
    log "downloading $pkg $ver"
    rm -f "$DEBS"/partial/*.deb
    # As root, apt would try its _apt sandbox user, which cannot write into this directory.
    local sandbox=(); [[ $(id -u) != 0 ]] || sandbox=(-o APT::Sandbox::User=root)
    (cd "$DEBS/partial" && apt-get "${APT_O[@]}" "${sandbox[@]}" -q download "$pkg=$ver" >&2)
    f=$(find "$DEBS/partial" -maxdepth 1 -name "${pkg}_*.deb" | head -n1)
    [[ -n $f ]] || die "download of $pkg $ver failed"
    mv "$f" "$DEBS/"
    f=$DEBS/${f##*/}
  fi
  echo "$f"
}

# cached_deb LINK RESOLVER [DIST]: the .deb LINK points to, resolved (and downloaded) by RESOLVER
# (with DIST's apt configuration) when the link is missing or REFRESH=1.
cached_deb() {
  local link=$DEBS/$1 deb
  if [[ ${REFRESH:-0} == 1 ]] || ! deb=$(readlink -e "$link"); then
    apt_ready "${3:-bookworm}"
    deb=$("$2")
    ln -sfn "${deb##*/}" "$link"
  fi
  echo "$deb"
}

resolve_kernel() {
  local meta_ver dep pkg ver
  if [[ $KERNEL == 6.1 ]]; then meta_ver=$(candidate linux-image-amd64)
  else meta_ver=$(candidate linux-image-amd64 "$SUITE"); fi
  [[ $meta_ver == "$KERNEL".* ]] || die "$SUITE's linux-image-amd64 is $meta_ver, not $KERNEL.x"
  # "Depends: linux-image-6.12.48+deb12-amd64 (= 6.12.48-1~bpo12+1)" -> package and version
  dep=$(apt-cache "${APT_O[@]}" show "linux-image-amd64=$meta_ver" |
        sed -n '1,/^$/ s/^Depends:.*\(linux-image-[0-9][^ ,]*\)\( (= \([^)]*\))\)\{0,1\}.*/\1 \3/p' | head -n1)
  pkg=${dep%% *}; ver=${dep#* }
  [[ $pkg == linux-image-* ]] || die "cannot find the kernel image package of linux-image-amd64=$meta_ver"
  [[ -n $ver ]] || ver=$(candidate "$pkg")
  log "kernel $KERNEL: $pkg $ver (linux-image-amd64 $meta_ver, $SUITE)"
  download "$pkg" "$ver"
}
resolve_busybox() { download busybox-static "$(candidate busybox-static)"; }

# 7.x: linux-image-amd64 -> linux-image-V (an empty shell) -> linux-base-V (modules.builtin, config),
# linux-binary-V (the image, usr/lib/modules/V/vmlinuz) and linux-modules-V (the modules).
split_part() {   # split_part PART: the linux-PART-V package of trixie-backports' kernel
  local meta_ver img ver
  meta_ver=$(candidate linux-image-amd64 "$SUITE")
  [[ $meta_ver == 7.* ]] || die "$SUITE's linux-image-amd64 is $meta_ver, not 7.x"
  img=$(apt-cache "${APT_O[@]}" show "linux-image-amd64=$meta_ver" |
        sed -n '1,/^$/ s/^Depends:.*\(linux-image-[0-9][^ ,]*\).*/\1/p' | head -n1)
  [[ $img == linux-image-* ]] || die "cannot find the kernel package of linux-image-amd64=$meta_ver"
  ver=$(candidate "$img" "$SUITE")
  log "kernel 7.x: $img $ver (linux-image-amd64 $meta_ver, $SUITE): linux-$1 part"
  download "linux-$1-${img#linux-image-}" "$ver"
}
resolve_base() { split_part base; }
resolve_binary() { split_part binary; }
resolve_modules() { split_part modules; }

if [[ $KERNEL == 7.x ]]; then
  KDEBS=("$(cached_deb kernel-7.x-base.deb resolve_base trixie)"
         "$(cached_deb kernel-7.x-binary.deb resolve_binary trixie)"
         "$(cached_deb kernel-7.x-modules.deb resolve_modules trixie)")
else
  KDEBS=("$(cached_deb "kernel-$KERNEL.deb" resolve_kernel)")
fi
KDEB=${KDEBS[0]}
BBDEB=$(cached_deb busybox-static.deb resolve_busybox)
log "kernel package(s): $(for d in "${KDEBS[@]}"; do printf '%s ' "${d##*/}"; done); busybox: ${BBDEB##*/}"

# Unpack once per set of .debs.
unpack() {   # unpack DIR DEB...
  local dir=$1 from; shift
  from=$(for d in "$@"; do printf '%s ' "${d##*/}"; done)
  if [[ $(cat "$dir/.from" 2>/dev/null) != "$from" ]]; then
    rm -rf "$dir"; mkdir -p "$dir"
    for d in "$@"; do dpkg -x "$d" "$dir"; done
    echo "$from" > "$dir/.from"
  fi
}
unpack "$WORK/kernel" "${KDEBS[@]}"
unpack "$BUILD/work/busybox" "$BBDEB"
MODDIR=
for d in "$WORK"/kernel/lib/modules/* "$WORK"/kernel/usr/lib/modules/*; do
  [[ -e $d/modules.builtin ]] && { MODDIR=$d; break; }
done
[[ -n $MODDIR ]] || die "no modules directory in ${KDEB##*/}"
KVER=${MODDIR##*/}
VMLINUZ=$WORK/kernel/boot/vmlinuz-$KVER
[[ -s $VMLINUZ ]] || VMLINUZ=$MODDIR/vmlinuz
[[ -s $VMLINUZ ]] || die "no boot/vmlinuz-$KVER nor $MODDIR/vmlinuz in ${KDEB##*/}"
BUSYBOX=$(find "$BUILD/work/busybox" -type f -name busybox -path '*bin/busybox' | head -n1)
[[ -x $BUSYBOX ]] || die "no busybox binary in ${BBDEB##*/}"

# --- modules: dependency walk (modinfo -F depends), dependencies first ---------------------
declare -A MODFILE=() BUILTIN=() SEEN=()
while IFS= read -r f; do
  b=${f##*/}; b=${b%%.ko*}; MODFILE[${b//-/_}]=$f
done < <(find "$MODDIR/kernel" -name '*.ko*')
while IFS= read -r f; do
  b=${f##*/}; b=${b%.ko}; BUILTIN[${b//-/_}]=1
done < "$MODDIR/modules.builtin"
ORDER=()
resolve() {   # resolve MODULE required|optional
  local m=${1//-/_} f d deps
  [[ -n ${SEEN[$m]:-} ]] && return 0
  SEEN[$m]=1
  if [[ -n ${BUILTIN[$m]:-} ]]; then log "  $m: built into the kernel"; return 0; fi
  f=${MODFILE[$m]:-}
  if [[ -z $f ]]; then
    [[ $2 == optional ]] || die "module $m not in $KVER"
    log "  $m: not available, skipped"; return 0
  fi
  deps=$(modinfo -F depends "$f" | tr ',' ' ')
  log "  $m: ${f#"$MODDIR"/} depends=[${deps}]"
  for d in $deps; do resolve "$d" required; done
  ORDER+=("$f")
}
log "modules of $KVER:"
for m in $REQUIRED_MODULES; do resolve "$m" required; done
for m in $OPTIONAL_MODULES; do resolve "$m" optional; done

# --- initramfs tree ------------------------------------------------------------------------
R=$WORK/rootfs
rm -rf "$R"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc/vfu,lib/modules}
cp "$BUSYBOX" "$R/bin/busybox"
"$BUSYBOX" --list | grep -qx ip || die "this busybox has no ip applet"
while IFS= read -r a; do
  [[ -e $R/$a || -L $R/$a ]] && continue
  mkdir -p "$R/${a%/*}"; ln -s /bin/busybox "$R/$a"
done < <("$BUSYBOX" --list-full)
: > "$R/etc/vfu/modules"
for f in "${ORDER[@]}"; do
  b=${f##*/}; n=${b%%.ko*}
  case $f in
    *.ko.xz)  xz -dc "$f" > "$R/lib/modules/$n.ko" ;;
    *.ko.zst) zstd -qdc "$f" > "$R/lib/modules/$n.ko" ;;
    *.ko.gz)  gzip -dc "$f" > "$R/lib/modules/$n.ko" ;;
    *)        cp "$f" "$R/lib/modules/$n.ko" ;;
  esac
  echo "$n" >> "$R/etc/vfu/modules"
done

cat > "$R/init" <<'EOF'
#!/bin/sh
# /init of the vfu-i40evf test guest (generated by qemu-configs/build-guest.sh).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "GUEST: kernel $(uname -r)"
while read -r m; do
  if insmod "/lib/modules/$m.ko"; then echo "GUEST: insmod $m ok"; else echo "GUEST: insmod $m FAILED"; fi
done < /etc/vfu/modules
FW=/sys/firmware/qemu_fw_cfg/by_name/opt/vfu/script/raw
if [ -e "$FW" ]; then
  cp "$FW" /tmp/script.sh
  echo "GUEST: running fw_cfg script opt/vfu/script"
  sh /tmp/script.sh
  echo "GUEST: script exit $?"
else
  vfu-report
fi
echo "GUEST: done"
poweroff -f
EOF

cat > "$R/bin/vfu-report" <<'EOF'
#!/bin/sh
# vfu-report [WAIT]: wait up to WAIT seconds (default: guest.wait=N on the kernel command line, else
# 0) for a network interface other than lo, then report PCI devices, network interfaces and the
# kernel's iavf messages.
wait=${1:-}
if [ -z "$wait" ]; then
  wait=0
  for w in $(cat /proc/cmdline); do
    case $w in guest.wait=*) wait=${w#guest.wait=} ;; esac
  done
fi
i=0
while [ "$i" -lt "$((wait * 10))" ] && [ -z "$(ls /sys/class/net | grep -vx lo)" ]; do
  sleep 0.1; i=$((i + 1))
done
echo "=== lspci"
for d in /sys/bus/pci/devices/*; do
  [ -e "$d/class" ] || continue
  drv=none; [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
  c=$(cat "$d/class"); v=$(cat "$d/vendor"); p=$(cat "$d/device")
  echo "${d##*/} [${c#0x}] [${v#0x}:${p#0x}] driver=$drv"
done
echo "=== net"
for n in /sys/class/net/*; do
  [ -e "$n/address" ] || continue
  drv=none; [ -e "$n/device/driver" ] && drv=$(basename "$(readlink "$n/device/driver")")
  car=$(cat "$n/carrier" 2>/dev/null) || car=-
  [ -n "$car" ] || car=-
  echo "${n##*/} driver=$drv addr=$(cat "$n/address") state=$(cat "$n/operstate") carrier=$car"
done
echo "=== dmesg iavf"
dmesg | grep -i iavf
exit 0
EOF
chmod 755 "$R/init" "$R/bin/vfu-report"

# Reproducible archive: fixed mtimes, sorted names, root-owned.
find "$R" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) |
  gzip -9n > "$OUT/initramfs.cpio.gz.tmp"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"

# --- kernel: vmlinuz as shipped, plus the uncompressed ELF vmlinux it carries ----------------
# (PVH direct boot of vmlinux skips the in-guest decompression: ~2 s instead of ~5 s under TCG.)
extract_vmlinux() {   # extract_vmlinux BZIMAGE DEST (like linux/scripts/extract-vmlinux)
  local pair magic cmd off
  for pair in '\xfd7zXZ\x00:xz -dcq --single-stream' '\x28\xb5\x2f\xfd:zstd -dcq' \
              '\x1f\x8b\x08:gzip -dcq' '\x02\x21\x4c\x18:lz4 -dcq'; do
    magic=${pair%%:*}; cmd=${pair#*:}
    for off in $(LC_ALL=C grep -obUaP "$magic" "$1" | cut -d: -f1 | head -n 5); do
      # shellcheck disable=SC2086 # $cmd is a command with its options
      tail -c +$((off + 1)) "$1" | $cmd > "$2.tmp" 2>/dev/null || true
      if [[ $(head -c 4 "$2.tmp" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]]; then
        mv "$2.tmp" "$2"; return 0
      fi
    done
  done
  rm -f "$2.tmp"; return 1
}
if [[ $(cat "$WORK/vmlinux.from" 2>/dev/null) != "$(cat "$WORK/kernel/.from")" || ! -s $WORK/vmlinux ]]; then
  extract_vmlinux "$VMLINUZ" "$WORK/vmlinux" || die "cannot extract vmlinux from $VMLINUZ"
  cat "$WORK/kernel/.from" > "$WORK/vmlinux.from"
fi
cp "$WORK/vmlinux" "$OUT/vmlinux.tmp" && mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
cp "$VMLINUZ" "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
echo "$KVER" > "$OUT/KVER"
cp "$R/etc/vfu/modules" "$OUT/modules.txt"
echo "$WANT_STAMP" > "$OUT/.stamp"

echo "guest $KERNEL: built in $OUT: kernel $KVER ($(cat "$WORK/kernel/.from")), modules: $(xargs < "$OUT/modules.txt")"
