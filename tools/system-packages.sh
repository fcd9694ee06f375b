#!/usr/bin/env bash
# Debian packages the tests need, installed only when one is missing (a fresh machine), so that
# `make install` stays fast when everything is present:
#   docker-compose  validates docker-compose.yml (`docker-compose config`; no Docker engine needed)
#   prometheus      promtool checks deploy/prometheus.yml
# Only the tests use them: where they cannot be installed (no apt, no root or sudo, no network)
# this warns and goes on, so that `make run` still works; the tests that need them then say so.
set -euo pipefail

packages=(docker-compose prometheus)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$package")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

warn() {
  echo "system-packages.sh: $1; the tests that use ${missing[*]} will fail until they are installed" >&2
  exit 0
}
command -v apt-get >/dev/null || warn "not a Debian-like system (no apt-get)"
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || warn "not root and no sudo"
  sudo=(sudo)
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq || warn "apt-get update failed"
# The prometheus package would start its own server where an init system runs; we only need
# promtool, so the service is kept from starting during the install (policy-rc.d exit 101).
policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
  "${sudo[@]}" chmod +x "$policy"
  added_policy=1
fi
status=0
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || status=$?
if [ "$added_policy" -eq 1 ]; then
  "${sudo[@]}" rm -f "$policy"
fi
[ "$status" -eq 0 ] || warn "apt-get install failed ($status)"
