/* Moves between CPUs: holds x87 and SSE values in registers across three SAVEs (with MXCSR
 * rounding up and the x87 in 64-bit precision), writes a file between them, and finally
 * reads a line from stdin (a read the test interrupts with a save). Prints what it sees. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

struct held { unsigned long xmm7[2]; long double st0, st1; unsigned mxcsr; unsigned short fcw; };

/* Loads xmm7, st0 and st1, saves, and reads them back from the registers. */
static long through_save(const struct held *in, struct held *out)
{
    long result;
    __asm__ volatile("movdqu %[xmm], %%xmm7\n\t"
                     "ldmxcsr %[mxcsr]\n\t"
                     "fldcw %[fcw]\n\t"
                     "fldt %[st1]\n\t"
                     "fldt %[st0]\n\t"
                     "mov $400, %%eax\n\t"
                     "syscall\n\t"
                     "movdqu %%xmm7, %[oxmm]\n\t"
                     "stmxcsr %[omxcsr]\n\t"
                     "fnstcw %[ofcw]\n\t"
                     "fstpt %[ost0]\n\t"
                     "fstpt %[ost1]"
                     : "=a"(result), [oxmm] "=m"(out->xmm7), [omxcsr] "=m"(out->mxcsr),
                       [ofcw] "=m"(out->fcw), [ost0] "=m"(out->st0), [ost1] "=m"(out->st1)
                     : [xmm] "m"(in->xmm7), [mxcsr] "m"(in->mxcsr), [fcw] "m"(in->fcw),
                       [st0] "m"(in->st0), [st1] "m"(in->st1)
                     : "rcx", "r11", "xmm7", "memory");
    return result;
}

int main(void)
{
    int fd = open("cross.txt", O_RDWR | O_CREAT | O_TRUNC, 0644);
    for (int step = 1; step <= 3; step++) {
        struct held in = { { 0x0123456789abcdefUL * step, 0xfedcba9876543210UL ^ step },
                           1.0L / (3 * step), -2.0L / (7 * step), 0x5f80, 0x027f }, out;
        memset(&out, 0, sizeof out);
        write(fd, "step", 4);
        long saved = through_save(&in, &out);
        int same = memcmp(out.xmm7, in.xmm7, 16) == 0 && out.st0 == in.st0 &&
                   out.st1 == in.st1 && out.mxcsr == in.mxcsr && out.fcw == in.fcw;
        printf("step %d: save returned %ld, registers %s, file offset %ld\n", step, saved,
               same ? "kept" : "LOST", (long)lseek(fd, 0, SEEK_CUR));
        fflush(stdout);
    }
    char line[64] = "";
    ssize_t n = read(0, line, sizeof line - 1);
    printf("read %zd bytes: %s", n, line);
    close(fd);
    return 0;
}
