#!/usr/bin/env bash
# Installs the Debian packages the project needs on a fresh Debian 12 machine (as root):
#   dpkg-dev/apt   download and unpack the guest kernel and busybox (`vmm image build`)
#   xz-utils       decompress kernel modules
#   qemu-system-x86, cpio   the nested KVM rig, on hosts whose /dev/kvm cannot boot a stock guest
# The Rust toolchain (cargo) must already be installed (rustup).
set -euo pipefail
need=()
command -v apt-get >/dev/null || { echo "install-deps: apt-get not found: this script needs Debian or Ubuntu" >&2; exit 1; }
command -v cargo >/dev/null || { echo "install-deps: cargo not found: install Rust with rustup first" >&2; exit 1; }
command -v xz >/dev/null || need+=(xz-utils)
command -v cpio >/dev/null || need+=(cpio)
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
  echo "install-deps: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
else
  # `vmm image build` asks apt for the kernel package: make sure its lists exist.
  [ -n "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ] || apt-get update -qq
fi
