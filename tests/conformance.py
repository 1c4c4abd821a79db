"""Runs everyday commands of Debian's busybox-static natively (chrooted into a scratch root)
and in the VM (`vmstate run --root` the same kind of scratch root), and compares what a user
sees: stdout, the exit status, and the directory tree left behind.

`python -m tests.conformance` prints each case's verdict and the pass rate.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
TIMEOUT = 60


# Programs copied into the scratch root (guest path: host path): other shells, and dietlibc
# builds (Debian's mksh has one; diet_time_io is a test guest built with `diet gcc`).
PROGRAMS = {"/bin/mksh": Path("/bin/mksh-static"), "/bin/sash": Path("/bin/sash"),
            "/bin/mksh-diet": Path("/usr/lib/diet/bin/mksh"),
            "/bin/diet_time_io": Path(__file__).parent / "guests" / "diet_time_io"}


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]            # after the program
    stdin: bytes = b""
    program: str = "/bin/busybox"    # its path in the scratch root


def sh(name: str, script: str, stdin: bytes = b"") -> Case:
    return Case(name, ("sh", "-c", script), stdin)


def mksh(name: str, script: str) -> Case:
    return Case(name, ("-c", script), program="/bin/mksh")


def mksh_diet(name: str, script: str) -> Case:
    return Case(name, ("-c", script), program="/bin/mksh-diet")


def sash(name: str, script: str) -> Case:
    return Case(name, ("-c", script), program="/bin/sash")


def applet(name: str, *argv: str, stdin: bytes = b"") -> Case:
    return Case(name, argv, stdin)


CASES = [
    # files
    applet("cat", "cat", "/data/a.txt", "/data/b.txt"),
    applet("cat-missing", "cat", "/nope"),
    applet("head", "head", "-n", "2", "/data/lines.txt"),
    applet("tail", "tail", "-n", "3", "/data/lines.txt"),
    applet("wc", "wc", "/data/lines.txt", "/data/a.txt"),
    applet("md5sum", "md5sum", "/data/a.txt", "/data/lines.txt"),
    applet("sha256sum", "sha256sum", "/data/lines.txt"),
    applet("cp", "cp", "/data/a.txt", "/data/copy.txt"),
    applet("cp-r", "cp", "-r", "/data", "/data2"),
    applet("mv", "mv", "/data/a.txt", "/data/moved.txt"),
    applet("rm", "rm", "/data/b.txt"),
    applet("rm-rf", "rm", "-rf", "/data/sub"),
    applet("ln-s", "ln", "-s", "/data/a.txt", "/data/link"),
    applet("ln", "ln", "/data/a.txt", "/data/hard"),
    applet("touch", "touch", "/data/new"),
    applet("truncate", "truncate", "-s", "3", "/data/a.txt"),
    applet("dd", "dd", "if=/data/lines.txt", "of=/data/dd.out", "bs=7", "count=3"),
    applet("gzip", "gzip", "-k", "/data/lines.txt"),
    sh("gzip-c-gunzip", "gzip -c /data/lines.txt > /z.gz && gunzip -c /z.gz"),
    sh("tar-c-t", "tar cf /t.tar data && tar tf /t.tar | sort"),
    sh("tar-x", "mkdir /x && cd /x && tar cf - -C / data | tar xf - && find /x | sort"),
    applet("xxd", "xxd", "/data/a.txt"),
    applet("od", "od", "-c", "/data/a.txt"),
    applet("hexdump", "hexdump", "-C", "/data/lines.txt"),
    applet("sort", "sort", "-r", "/data/lines.txt"),
    applet("uniq", "uniq", "-c", "/data/dups.txt"),
    applet("cut", "cut", "-d", " ", "-f", "2", "/data/lines.txt"),
    applet("tr", "tr", "a-z", "A-Z", stdin=b"hello world\n"),
    applet("sed", "sed", "-n", "s/line/LINE/p", "/data/lines.txt"),
    applet("sed-i", "sed", "-i", "s/line/row/", "/data/lines.txt"),
    applet("grep", "grep", "-n", "3", "/data/lines.txt"),
    applet("grep-r", "grep", "-r", "hello", "/data"),
    applet("awk", "awk", "{ s += length($0) } END { print s, NR }", "/data/lines.txt"),
    applet("cmp", "cmp", "/data/a.txt", "/data/b.txt"),
    applet("diff", "diff", "/data/a.txt", "/data/b.txt"),
    applet("tee", "tee", "/data/tee.out", stdin=b"to both\n"),
    applet("stat", "stat", "-c", "%n %s %F %a", "/data/a.txt", "/data/sub"),
    applet("readlink-f", "readlink", "-f", "/data/sub/../a.txt"),
    applet("realpath", "realpath", "/data/./sub/.."),
    applet("split", "split", "-l", "2", "/data/lines.txt", "/data/part."),
    applet("base64", "base64", "/data/lines.txt"),
    applet("chmod", "chmod", "600", "/data/a.txt"),
    # directories
    applet("ls", "ls", "/data"),
    applet("ls-l", "ls", "-ln", "/data/a.txt"),
    applet("ls-R", "ls", "-R", "/data"),
    sh("find", "find / -path /bin -prune -o -print | sort"),
    applet("find-name", "find", "/data", "-name", "*.txt"),
    applet("du", "du", "-s", "/data"),
    applet("mkdir-p", "mkdir", "-p", "/a/b/c"),
    applet("rmdir", "rmdir", "/data/empty"),
    applet("rmdir-nonempty", "rmdir", "/data/sub"),
    sh("cd-pwd", "cd /data/sub && pwd && cd .. && pwd && cd ../../.. && pwd"),
    # descriptors and redirections
    sh("redirect-out", "echo one > /r.txt; echo two >> /r.txt; cat /r.txt"),
    sh("redirect-in", "read x < /data/a.txt; echo \"got $x\""),
    sh("redirect-err", "cat /nope 2>&1; echo status $?"),
    sh("redirect-fd", "exec 3> /fd3.txt; echo via3 >&3; exec 3>&-; cat /fd3.txt"),
    sh("heredoc", "cat <<EOF\nline one\nline $((1+1))\nEOF"),
    sh("noclobber", "set -C; echo a > /data/a.txt; echo $?"),
    # pipes and processes
    sh("pipe", "echo hello | tr a-z A-Z"),
    sh("pipeline-3", "cat /data/dups.txt | sort | uniq -c"),
    sh("seq-wc", "seq 1 1000 | wc -l"),
    sh("yes-head", "yes | head -n 3"),
    sh("subshell", "(cd /data && pwd); pwd"),
    sh("command-subst", "echo \"n=$(wc -l < /data/lines.txt)\""),
    sh("backticks", "echo `echo nested`"),
    sh("exit-status", "sh -c 'exit 3'; echo $?"),
    sh("false", "false; echo $?; true; echo $?"),
    sh("and-or", "false || echo or && echo and"),
    sh("background-wait", "echo bg > /bg.txt & wait; cat /bg.txt"),
    sh("xargs", "echo /data/a.txt /data/b.txt | xargs cat"),
    sh("for-loop", "for i in 1 2 3; do echo $i; done | sort -r"),
    sh("while-read", "while read l; do echo \"[$l]\"; done < /data/lines.txt"),
    sh("functions", "f() { echo \"f $1\"; return 2; }; f x; echo $?"),
    sh("env", "X=1 env | grep ^X="),
    applet("sh-exit", "sh", "-c", "exit 42"),
    applet("echo", "echo", "hello", "world"),
    applet("printf", "printf", "%05d|%s\\n", "42", "x"),
    applet("expr", "expr", "6", "*", "7"),
    applet("test", "test", "-d", "/data"),
    applet("true", "true"),
    applet("false-applet", "false"),
    # signals
    sh("kill-0", "kill -0 $$ && echo alive"),
    sh("trap-exit", "trap 'echo bye' EXIT; echo hi"),
    sh("kill-self", "kill -TERM $$; echo not reached"),
    # time
    applet("sleep", "sleep", "0.2"),
    sh("date-format", "date +%Y >/dev/null && echo ok"),
    applet("date-now", "date"),
    # identity and limits
    applet("id", "id"),
    applet("uname", "uname", "-a"),
    applet("hostname", "hostname"),
    sh("ulimit", "ulimit -n"),
    # memory
    sh("sort-big", "seq 1 20000 | sort -n | tail -n 1"),
    applet("md5sum-big", "md5sum", "/data/big.bin"),
    sh("awk-array", "seq 50000 | awk '{ a[$1] = $1 } END { print length(a) }'"),
    # more files and directories
    sh("mkfifo", "mkfifo /p && ls -l /p | cut -c1"),
    sh("touch-date", "touch -d @1000000000 /data/a.txt && stat -c %Y /data/a.txt"),
    sh("chown", "chown 0:0 /data/a.txt && stat -c %u:%g /data/a.txt"),
    sh("cp-a", "cp -a /data/sub /copy && ls -R /copy"),
    sh("ln-sf-readlink", "ln -sf /data/b.txt /l && readlink /l && cat /l"),
    sh("find-xargs-wc", "find /data -type f -name '*.txt' | sort | xargs wc -c"),
    sh("mv-dir", "mv /data/sub /moved && ls /moved"),
    sh("rm-missing", "rm /nope; echo $?"),
    sh("umask", "umask 077 && touch /private && stat -c %a /private"),
    sh("ls-a", "cd /data && ls -a"),
    # more descriptors and pipes
    sh("read-write-fd", "exec 3<>/rw.txt; echo hello >&3; exec 3>&-; cat /rw.txt"),
    sh("dup-input", "exec 4</data/lines.txt; head -n 2 <&4; exec 4<&-"),
    sh("pipe-big", "cat /data/big.bin | md5sum"),
    sh("yes-head-c", "yes abc | head -c 100000 | wc -c"),
    sh("ls-wc", "ls /data | wc -l"),
    sh("script-file", "printf '#!/bin/sh\necho script $1\n' > /s.sh && chmod +x /s.sh && "
       "/s.sh arg"),
    sh("sh-script", "echo 'echo from file; exit 4' > /t.sh; sh /t.sh; echo $?"),
    sh("nested-subst", "echo $(echo $(echo deep))"),
    sh("case-glob", "cd /data && for f in *.txt; do echo $f; done"),
    # more processes and signals
    sh("trap-usr1", "trap 'echo usr1' USR1; kill -USR1 $$; echo after"),
    sh("kill-child", "sleep 5 & kill $!; wait $!; echo $?"),
    sh("child-exit-status", "(exit 7); echo $?"),
    sh("timeout", "timeout 1 sleep 3; echo $?"),
    sh("pid-differs", "echo $$"),
    # The shell must be in `wait` when the child's TERM comes (else `wait` returns 0): 1 s
    # for it to get there, even on a loaded machine.
    sh("trap-term-from-child", "trap 'echo got term' TERM; (sleep 1; kill $$) & wait; "
       "echo after $?"),
    # The child says when it ignores TERM (a fixed 0.1 s could end before it got there); a
    # TERM that comes after it ended finds a zombie, which kill accepts as well.
    sh("ignored-term-in-child", "(trap '' TERM; : > /ready; sleep 0.5; echo survived) & "
       "until [ -e /ready ]; do sleep 0.01; done; kill $!; wait $!; echo status $?"),
    sh("usr2-from-subshell", "trap 'echo usr2' USR2; (kill -USR2 $$); sleep 0.2; echo end"),
    # more time and identity
    applet("date-epoch", "date", "-u", "-d", "@86400"),
    applet("usleep", "usleep", "100000"),
    applet("id-u", "id", "-u"),
    applet("whoami", "whoami"),
    applet("uname-m", "uname", "-m"),
    applet("nproc", "nproc"),
    sh("ulimit-f", "ulimit -f"),
    # other shells: mksh (klibc static build) and sash
    mksh("mksh-pipeline", "echo hello | tr a-z A-Z; x=$(echo sub); echo $x"),
    mksh("mksh-subshell", "(cd /data && pwd); pwd; for i in 1 2 3; do echo $i; done | sort -r"),
    mksh("mksh-redirect", "echo one > /m.txt; echo two >> /m.txt; cat < /m.txt; print -r $((6*7))"),
    mksh("mksh-files", "mkdir /md && cd /md && echo x > f && ls && rm f && cd / && rmdir /md"),
    # execve of a file without execute permission: EACCES (the shell says so, status 126),
    # a script as much as a program; once chmod +x, it runs
    sh("exec-not-executable-script", "cd /data && printf '#!/bin/sh\\necho ran $0\\n' > notexec "
       "&& ./notexec; echo status $?; chmod +x notexec && ./notexec; echo status $?"),
    sh("exec-not-executable-program", "cat /bin/busybox > /data/bb && /data/bb true; "
       "echo status $?; chmod 755 /data/bb && /data/bb echo ran; echo status $?"),
    # dietlibc builds: time through the vDSO (AT_SYSINFO_EHDR), files, pipelines
    Case("diet-time-io", ("/data/diet.out",), program="/bin/diet_time_io"),
    sh("diet-forked-and-exec", "/bin/diet_time_io /data/d.out | tr a-z A-Z; echo $?"),
    mksh_diet("mksh-diet-pipeline", "echo hello | tr a-z A-Z; x=$(echo sub); echo $x; exit 4"),
    mksh_diet("mksh-diet-time", "[ ${EPOCHREALTIME%.*} -gt 1577836800 ] && echo recent; "
              "t=$SECONDS; sleep 1; echo $((SECONDS - t >= 1)); time true"),
    mksh_diet("mksh-diet-files", "echo one > /m.txt; echo two >> /m.txt; cat < /m.txt; "
              "mkdir /md && cd /md && echo x > f && ls && rm f && cd / && rmdir /md"),
    sash("sash-echo", "echo hello sash"),
    sash("sash-builtins", "-mkdir /sd"),
]

# Cases whose output must differ between the VM and the host, and why.
MUST_DIFFER: dict[str, str] = {
    "ulimit": "the VM caps the guest's descriptors (--max-fds, default 1024) whatever the "
              "host's RLIMIT_NOFILE is",
    "pid-differs": "the guest's first process is pid 1 (its children have their VMM "
                   "process's host pid); natively the shell has a host pid",
    "nproc": "the guest has one vCPU; the host has more",
    "date-now": "the current time: the two runs are not at the same instant",
}
DEVICES = {"null": (1, 3), "zero": (1, 5), "urandom": (1, 9)}


def make_root(root: Path) -> None:
    """The same scratch tree for both runs: busybox at /bin/busybox, some data."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for guest_path, host_path in PROGRAMS.items():
        if host_path.exists():
            shutil.copy2(host_path.resolve(), root / guest_path.lstrip("/"))
    for name in applets():
        if not (root / "bin" / name).exists():
            os.symlink("busybox", root / "bin" / name)
    if os.geteuid() == 0:        # the VM has these built in; a chroot needs the nodes
        (root / "dev").mkdir()
        for name, (major, minor) in DEVICES.items():
            os.mknod(root / "dev" / name, stat.S_IFCHR | 0o666, os.makedev(major, minor))
    data = root / "data"
    (data / "sub" / "deeper").mkdir(parents=True)
    (data / "empty").mkdir()
    (data / "a.txt").write_text("hello a\n")
    (data / "b.txt").write_text("hello b\nsecond\n")
    (data / "lines.txt").write_text("".join(f"line {i}\n" for i in range(1, 8)))
    (data / "dups.txt").write_text("x\ny\nx\nz\ny\nx\n")
    (data / "sub" / "inner.txt").write_text("inner\n")
    (data / "sub" / "deeper" / "leaf").write_text("leaf\n")
    (data / "big.bin").write_bytes(bytes(range(256)) * 4096)
    for path in root.rglob("*"):
        os.utime(path, (1_600_000_000, 1_600_000_000), follow_symlinks=False)


@functools.cache
def applets() -> tuple[str, ...]:
    listing = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, check=True)
    return tuple(listing.stdout.decode().split())


def tree(root: Path) -> list[tuple]:
    """What the command left behind: names, kinds, permissions, contents."""
    out = []
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            out.append((rel, "link", os.readlink(path)))
        elif stat.S_ISDIR(st.st_mode):
            out.append((rel, "dir", oct(st.st_mode & 0o7777)))
        elif not stat.S_ISREG(st.st_mode):
            out.append((rel, "special", oct(st.st_mode)))
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            out.append((rel, "file", oct(st.st_mode & 0o7777), st.st_size, digest, st.st_nlink))
    return out


@dataclass(frozen=True)
class Result:
    stdout: bytes
    status: int
    tree: list[tuple]
    stderr: bytes


def _run(argv: list[str], stdin: bytes, root: Path) -> Result:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=TIMEOUT,
                              env={})
    except subprocess.TimeoutExpired as e:
        return Result(e.stdout or b"", -1, tree(root), b"timed out")
    status = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    return Result(proc.stdout, status, tree(root), proc.stderr)


def native_command(root: Path) -> list[str]:
    if os.geteuid() == 0:
        return [shutil.which("chroot"), str(root)]
    return [shutil.which("unshare"), "--map-root-user", f"--root={root}"]


def run_native(case: Case, root: Path) -> Result:
    make_root(root)
    return _run([*native_command(root), case.program, *case.argv], case.stdin, root)


def run_vm(case: Case, root: Path, vmstate: str, cpu: str = "auto") -> Result:
    make_root(root)
    return _run([vmstate, "run", "--cpu", cpu, "--root", str(root), "--hostname",
                 socket.gethostname(), str(root / case.program.lstrip("/")), *case.argv],
                case.stdin, root)


def native_available() -> str | None:
    """None if commands can be run natively in a scratch root, else why not."""
    missing = [str(p) for p in (BUSYBOX, *PROGRAMS.values()) if not p.exists()]
    if missing:
        return (f"{', '.join(missing)} missing (Debian packages busybox-static, mksh, sash, "
                "dietlibc-dev; `make setup` installs them and builds the test guests)")
    if os.geteuid() != 0 and shutil.which("unshare") is None:
        return "neither root (for chroot) nor unshare is available"
    return None


def compare(native: Result, vm: Result, stdout_may_differ: bool = False) -> list[str]:
    """What differs, in words (empty if the VM behaved like Linux)."""
    problems = []
    if native.stdout != vm.stdout and not stdout_may_differ:
        problems.append(f"stdout {native.stdout[:300]!r} != {vm.stdout[:300]!r}")
    if native.status != vm.status:
        problems.append(f"exit status {native.status} != {vm.status}")
    if native.tree != vm.tree:
        only_native = [e for e in native.tree if e not in vm.tree]
        only_vm = [e for e in vm.tree if e not in native.tree]
        problems.append(f"tree: native only {only_native[:5]}, vm only {only_vm[:5]}")
    if problems and vm.stderr:
        problems.append(f"vm stderr {vm.stderr[-300:]!r}")
    return problems


def main() -> None:
    import tempfile
    vmstate = str(Path(sys.executable).parent / "vmstate")
    passed = 0
    for case in CASES:
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            problems = compare(run_native(case, Path(a) / "r"),
                               run_vm(case, Path(b) / "r", vmstate), case.name in MUST_DIFFER)
        passed += not problems
        label = "PASS" if not problems else "FAIL"
        if case.name in MUST_DIFFER and not problems:
            label = f"PASS (stdout differs by design: {MUST_DIFFER[case.name]})"
        print(f"{label} {case.name}"
              + ("" if not problems else ": " + "; ".join(problems)), flush=True)
    print(f"{passed} of {len(CASES)} commands behave like Linux")


if __name__ == "__main__":
    main()
