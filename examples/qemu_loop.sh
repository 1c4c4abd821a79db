#!/usr/bin/env bash
# The QEMU loop end to end with a real QEMU (TCG), printing every command before it runs:
# boot the example guest, save it with stop + migrate "exec:cat > vm.state", inspect and split
# the stream, patch guest memory with gdb, edit the NIC's MAC and a register in hw.xml, join,
# and resume the edited stream in a new QEMU whose serial output shows every edit.
# `make qemu-demo` runs it with vmstate on PATH.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${DEMO_OUT:-$here/../qemu-demo-out}
machine=${MACHINE:-pc}
rm -rf "$out" && mkdir -p "$out" && cd "$out"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
say() { printf '\n\033[1;34m== %s\033[0m\n' "$*"; }

say "1. Boot examples/qemu_guest/kernel.elf in QEMU ($machine, 128 MiB, an RTL8139 NIC); after a few ticks: stop, migrate \"exec:cat > vm.state\""
step python3 "$here/qemu_vm.py" save vm.state --machine "$machine" --serial before.log
step vmstate info vm.state

say "2. Split: every RAM block into vm.core (ELF, for gdb), vCPUs and devices into hw.xml"
step vmstate split vm.state
step gdb -q -batch -nx "$here/qemu_guest/kernel.elf" vm.core -ex 'p message' -ex 'p/x nic_mac' -ex 'p counter'

say "3. Patch guest memory with gdb: the message and the guest's copy of its MAC"
step gdb -q -batch -nx -write "$here/qemu_guest/kernel.elf" vm.core \
    -ex 'set var message = "edited by vmstate"' -ex 'set var nic_mac[5] = 0x99' -ex 'p message'

say "4. Edit hw.xml: the NIC's MAC (device rtl8139, field phys) and RDI (the counter's step)"
step grep -m1 'name="phys"' hw.xml
step sed -i -e 's|\(name="phys" type="buffer" size="6" value="\)525400123456"|\102aabbccddee"|' \
    -e 's|<reg name="rdi" value="0x1"/>|<reg name="rdi" value="0x64"/>|' hw.xml
step grep -m1 'name="phys"' hw.xml

say "5. Join: validate, print what changed, write new.state"
step vmstate join vm.core hw.xml -o new.state --app "$here/qemu_guest/kernel.elf"

say "6. Resume new.state in a new QEMU (-incoming \"exec:cat new.state\"): every edit shows"
step python3 "$here/qemu_vm.py" resume new.state --machine "$machine" --serial after.log --seconds 1
