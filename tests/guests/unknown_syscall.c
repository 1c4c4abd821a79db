/* Makes a system call the VMM does not service; it must get ENOSYS and carry on. */
#include <errno.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/syscall.h>

int main(void)
{
    long r = syscall(SYS_acct, 0);
    printf("acct: %s\n", r < 0 && errno == ENOSYS ? "ENOSYS" : "unexpected");
    return 0;
}
