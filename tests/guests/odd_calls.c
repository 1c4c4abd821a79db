/* Legal but unusual system calls that once could crash the VMM; prints each result, keeps a
 * directory open across a SAVE, and after the restore prints what fstat says of it (a
 * directory, or the error) and what fstat says once it is closed (EBADF). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/syscall.h>

static long result(long r) { return r < 0 ? -errno : r; }

int main(void)
{
    char buffer[16];
    printf("read 0 bytes = %ld\n", result(syscall(SYS_read, 0, buffer, 0L)));
    int fd = open("setuid_file", O_CREAT | O_WRONLY, 06755);
    printf("open with mode 06755 = %s\n", fd >= 0 ? "ok" : "failed");
    printf("pread at offset 2^63 = %ld\n",
           result(syscall(SYS_pread64, fd, buffer, 1L, (long)(1UL << 63))));
    printf("lseek whence 2^40 = %ld\n", result(syscall(SYS_lseek, fd, 0L, 1L << 40)));
    printf("open \"\" = %ld\n", result(syscall(SYS_open, "", O_RDONLY)));
    int dir = open(".", O_RDONLY | O_DIRECTORY);
    printf("open . = %s\n", dir >= 0 ? "ok" : "failed");
    fflush(stdout);
    syscall(400);
    struct stat st;
    long r = result(syscall(SYS_fstat, dir, &st));
    printf("restored: fstat of the directory = %ld, %s\n", r,
           r == 0 && S_ISDIR(st.st_mode) ? "a directory" : "not a directory");
    close(dir);
    printf("after close: fstat = %ld\n", result(syscall(SYS_fstat, dir, &st)));
    return 0;
}
