/* Makes N getpid system calls (argv[1], default 10000): the VMM round-trip benchmark. Prints
 * how many were made and how many answered the first call's pid. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 10000;
    long first = syscall(SYS_getpid), same = 1;
    for (long i = 1; i < n; i++)
        same += syscall(SYS_getpid) == first;
    printf("%ld getpid calls, %ld answered pid %ld\n", n, same, first);
    return 0;
}
