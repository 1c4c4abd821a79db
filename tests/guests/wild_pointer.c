/* Hands the VMM pointers that do not point into guest memory; prints each result. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <sys/uio.h>

int main(void)
{
    char *wild = (char *)0xdeadbeef000;
    long r;
    r = syscall(SYS_write, 1, wild, 10);
    printf("write(wild) = %ld\n", r < 0 ? -errno : r);
    r = syscall(SYS_read, 0, (void *)0x1000, 10);
    printf("read(kernel area) = %ld\n", r < 0 ? -errno : r);
    r = syscall(SYS_open, (char *)-4096L, O_RDONLY);
    printf("open(wild path) = %ld\n", r < 0 ? -errno : r);
    struct iovec iov = { wild, 5 };
    r = syscall(SYS_writev, 1, &iov, 1);
    printf("writev(wild iovec) = %ld\n", r < 0 ? -errno : r);
    fflush(stdout);
    r = syscall(SYS_write, 1, "still alive\n", 12L);
    return r == 12 ? 0 : 1;
}
