#!/usr/bin/env bash
# The main job end to end on the bundled examples (`make demo` runs this with vmstate on PATH).
# Every command is printed before it runs, so this doubles as a tutorial.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${DEMO_OUT:-$here/../demo-out}
rm -rf "$out" && mkdir -p "$out" && cd "$out"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
say() { printf '\n\033[1;34m== %s\033[0m\n' "$*"; }

say "1. Run C programs inside a KVM virtual machine driven by vmstate's Python VMM"
step vmstate run "$here/hello" one two
printf 'first line\nsecond line\n' > input.txt
printf '\n\033[1m$ vmstate run %s < input.txt\033[0m\n' "$here/echo_lines"
vmstate run "$here/echo_lines" < input.txt

say "2. The lab application writes a line, then asks for a SAVE with syscall(400)"
step vmstate run --trace "$here/lab_app"
step cat ay_caramba.txt
step vmstate info vm_image.sav

say "3. Split the image: memory as an ELF core for gdb, hardware state as XML"
step vmstate split vm_image.sav
step gdb -q -batch -nx -ex "symbol-file $here/lab_app" -ex "core-file vm.core" -ex bt -ex "p bye"

say "4. Patch memory with gdb (the string the program writes after the restore)"
step gdb -q -batch -nx -write -ex "symbol-file $here/lab_app" -ex "core-file vm.core" \
    -ex 'set var *(char (*)[13]) bye = "Ciao Ciao!!\n"' -ex 'x/s bye'

say "5. Edit the hardware state: send the open file to another path and offset"
printf '0123456789' > other.txt
step sed -i 's|path="ay_caramba.txt" flags="0x8042" mode="0777" offset="16"|path="other.txt" flags="0x8042" mode="0777" offset="4"|' hw.xml
step grep -n 'fd number="3"' hw.xml

say "6. Join core and XML into a new image (the summary says what changed), and restore it"
step vmstate join --app "$here/lab_app" vm.core hw.xml -o new.sav
step vmstate restore new.sav
step cat other.txt
echo
step cat ay_caramba.txt

say "7. A value in an SSE register survives SAVE and RESTORE; an XML edit of RAX is seen"
step vmstate run --image sse.sav "$here/sse_keeper"
step vmstate split --core sse.core --xml sse.xml sse.sav
step sed -i 's|<reg name="rax" value="0x0"/>|<reg name="rax" value="0x2a"/>|' sse.xml
step vmstate join sse.core sse.xml -o sse-edited.sav
step vmstate restore sse-edited.sav

echo; echo "demo finished: everything it made is in $out"
