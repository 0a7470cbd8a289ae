#!/usr/bin/env bash
# The main job, shown to a newcomer. Today: what this host offers Caisson and what it will
# use. (The pod-in-a-VM walkthrough on a private containerd replaces this as the shim and
# CRI work lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
printf '\033[1m>> caisson check: what this host offers\033[0m\n'
bin/caisson check
