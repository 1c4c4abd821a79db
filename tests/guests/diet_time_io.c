/* A dietlibc program (built with `diet gcc`): time(), gettimeofday() and getcpu through the
 * vDSO that AT_SYSINFO_EHDR names (dietlibc faults without one), a sleep measured on the
 * monotonic clock, and file I/O. Prints only what is the same on any Linux; exits 3.
 * `diet_time_io FILE [IMAGE]`: with IMAGE (in the VM), snapshots itself there after the first
 * two lines, so that a restore runs the rest. */
#include <fcntl.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "../../examples/vmstate_paracalls.h"

void *vdso_dlsym(void *vdso, const char *name);     /* dietlibc's own vDSO lookup */

static void say(const char *what, int ok)
{
    write(1, what, strlen(what));
    write(1, ok ? ": yes\n" : ": no\n", ok ? 6 : 5);
}

int main(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : "diet.out";
    struct timeval tv;
    int got = gettimeofday(&tv, 0);
    time_t now = time(0);
    say("gettimeofday", got == 0 && tv.tv_sec > 1577836800 && tv.tv_usec < 1000000);
    say("time agrees", now >= tv.tv_sec && now - tv.tv_sec <= 2);

    if (argc > 2)
        say(vmstate_snapshot(argv[2]) == VMSTATE_RESTORED ? "restored" : "snapshot taken", 1);

    unsigned long vdso = getauxval(AT_SYSINFO_EHDR);
    int (*getcpu)(unsigned *, unsigned *, void *) =
        vdso ? (int (*)(unsigned *, unsigned *, void *))vdso_dlsym((void *)vdso, "__vdso_getcpu") : 0;
    unsigned cpu = ~0u;
    say("vdso getcpu", getcpu && getcpu(&cpu, 0, 0) == 0 && cpu < 4096);

    struct timespec before, after, nap = {0, 50 * 1000 * 1000};
    clock_gettime(CLOCK_MONOTONIC, &before);
    nanosleep(&nap, 0);
    clock_gettime(CLOCK_MONOTONIC, &after);
    long ms = (after.tv_sec - before.tv_sec) * 1000 + (after.tv_nsec - before.tv_nsec) / 1000000;
    say("slept 50 ms", ms >= 50 && ms < 5000);

    static const char text[] = "hello dietlibc\n";
    char back[64] = {0};
    struct stat st;
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0640);
    int ok = fd >= 0 && write(fd, text, sizeof text - 1) == sizeof text - 1
        && lseek(fd, 0, SEEK_SET) == 0 && read(fd, back, sizeof back) == sizeof text - 1
        && fstat(fd, &st) == 0 && st.st_size == sizeof text - 1 && close(fd) == 0;
    say("file written and read back", ok && strcmp(back, text) == 0);
    write(1, back, strlen(back));
    return 3;
}
