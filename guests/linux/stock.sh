#!/usr/bin/env bash
# The stock-kernel attempt (docs/linux.md): Debian's cloud kernel, booted here as far as
# it goes within SECONDS (default 180), with the lane's command line and no initramfs.
# Prints each console line with the host's elapsed time; the last lines say how far it got.
#   guests/linux/stock.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
limit=${1:-180}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pkg=$(apt-cache search --names-only '^linux-image-[0-9.]+-[0-9]+-cloud-amd64$' |
      awk '{print $1}' | sort -V | tail -1)
(cd "$work" && apt-get download -q "$pkg" >/dev/null && dpkg-deb -x ./*.deb root)
kernel=$(ls "$work"/root/boot/vmlinuz-*)
echo "stock: $pkg ($(basename "$kernel")), ${limit}s under pyhyve, 512 MiB, 1 vCPU" >&2
cmdline=$(.venv/bin/python -c 'from pyhyve import linuxguest; print(linuxguest.cmdline(extra="earlyprintk=serial,ttyS0 printk.time=1"))')
PYHYVE_RUNDIR="$work/run" timeout "$limit" .venv/bin/pyhyve run stock -m 512M -k "$kernel" \
  --cmdline "${cmdline/ quiet/}" --console stdio </dev/null |
  while IFS= read -r line; do printf '%7.1f %s\n' "$SECONDS" "$line"; done || true
