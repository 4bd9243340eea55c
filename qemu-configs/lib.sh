# shellcheck shell=bash
# Helpers shared by the qemu-configs/*.sh scripts. Sourced, never executed.
#
# Sets: QC_DIR (this directory), REPO_DIR, BUILD (cache root, default $REPO_DIR/build),
#       KEYRING, DEBIAN_FRONTEND.

QC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$QC_DIR/.." && pwd)
BUILD=${BUILD:-$REPO_DIR/build}
KEYRING=${KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
export BUILD DEBIAN_FRONTEND=noninteractive
shopt -s inherit_errexit   # set -e also inside $(...)

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { printf '%s: error: %s\n' "${0##*/}" "$*" >&2; exit 1; }

# require_cmds CMD... : fail with a hint if a host tool is missing.
require_cmds() {
  local c missing=()
  for c in "$@"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
  ((${#missing[@]} == 0)) || die "missing host tools: ${missing[*]} (run qemu-configs/provision.sh)"
}

# debian_mirror: prints the Debian archive mirror the machine's apt sources use ($MIRROR overrides).
# Reads deb822 *.sources files (skipping "Enabled: no" stanzas) and one-line *.list files; takes the
# first "deb" URI whose path ends in /debian (so not debian-security, not third-party repositories).
debian_mirror() {
  if [[ -n ${MIRROR:-} ]]; then printf '%s\n' "${MIRROR%/}"; return; fi
  local f uris=()
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -r $f ]] || continue
    mapfile -t -O "${#uris[@]}" uris < <(awk '
      function flush(  n, i, a) {
        if (types ~ /(^|[ \t])deb([ \t]|$)/ && enabled != "no") {
          n = split(uris, a, /[ \t]+/)
          for (i = 1; i <= n; i++) if (a[i] != "") print a[i]
        }
        types = ""; uris = ""; enabled = ""
      }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      { key = tolower($1); val = $0; sub(/^[^:]*:[ \t]*/, "", val) }
      key == "types:"   { types = val }
      key == "uris:"    { uris = val }
      key == "enabled:" { enabled = tolower(val) }
      END { flush() }' "$f")
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -r $f ]] || continue
    mapfile -t -O "${#uris[@]}" uris < <(awk '
      $1 == "deb" { i = 2; if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ } if (i <= NF) print $i }' "$f")
  done
  for f in "${uris[@]}"; do
    if [[ $f =~ ^(https?|ftp)://[^[:space:]]*/debian/?$ ]]; then printf '%s\n' "${f%/}"; return; fi
  done
  log "no Debian mirror in the apt sources; using http://deb.debian.org/debian (set MIRROR to override)"
  echo http://deb.debian.org/debian
}

# apt_private NAME SOURCES_LINE... : a private apt configuration under $BUILD/apt/NAME with its own
# sources, lists, cache and an empty dpkg status (nothing counts as installed). /etc/apt is only read
# (apt.conf.d, e.g. for proxies), never written; no lock is taken, no root is needed.
# Sets APT_DIR and the array APT_O (options for apt-get / apt-cache).
apt_private() {
  APT_DIR=$BUILD/apt/$1; shift
  mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial" "$APT_DIR/empty.d"
  [[ -e $APT_DIR/status ]] || : > "$APT_DIR/status"
  printf '%s\n' "$@" > "$APT_DIR/sources.list.new"
  if ! cmp -s "$APT_DIR/sources.list.new" "$APT_DIR/sources.list"; then
    mv "$APT_DIR/sources.list.new" "$APT_DIR/sources.list"
    rm -f "$APT_DIR/.updated"                  # sources changed: lists must be refreshed
  else
    rm -f "$APT_DIR/sources.list.new"
  fi
  APT_O=(-o Dir::State="$APT_DIR" -o Dir::State::Lists="$APT_DIR/lists"
         -o Dir::State::status="$APT_DIR/status" -o Dir::Cache="$APT_DIR/cache"
         -o Dir::Etc::sourcelist="$APT_DIR/sources.list" -o Dir::Etc::sourceparts="$APT_DIR/empty.d"
         -o Dir::Etc::preferences="$APT_DIR/empty.d/none" -o Dir::Etc::preferencesparts="$APT_DIR/empty.d"
         -o APT::Architecture=amd64 -o APT::Architectures=amd64
         -o APT::Install-Recommends=false -o APT::Install-Suggests=false
         -o Acquire::Languages=none -o Debug::NoLocking=1
         -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
         -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false
         -o Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false
         -o Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false)
}

# apt_private_update: refresh the private lists if missing, older than APT_MAX_AGE_MIN minutes
# (default 360), or REFRESH=1.
apt_private_update() {
  local age=${APT_MAX_AGE_MIN:-360}
  if [[ ${REFRESH:-0} == 1 || ! -e $APT_DIR/.updated ]] ||
     [[ -n $(find "$APT_DIR/.updated" -mmin +"$age" 2>/dev/null) ]]; then
    log "apt-get update ($APT_DIR)"
    apt-get "${APT_O[@]}" -q update >&2
    touch "$APT_DIR/.updated"
  fi
}
