#!/usr/bin/env bash
# The main job end to end on the bundled examples (`make demo` runs this with vmstate on PATH).
# Every command is printed before it runs, so this doubles as a tutorial.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${DEMO_OUT:-$here/../demo-out}
rm -rf "$out" && mkdir -p "$out" && cd "$out"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

echo "== 1. Run C programs inside a KVM virtual machine driven by vmstate's Python VMM"
step vmstate run "$here/hello" one two
step vmstate run --trace "$here/lab_app"
step cat ay_caramba.txt
printf 'first line\nsecond line\n' > input.txt
echo; echo "\$ vmstate run $here/echo_lines < input.txt"
vmstate run "$here/echo_lines" < input.txt
echo; echo "demo finished: outputs are in $out"
