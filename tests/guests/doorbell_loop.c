/* Writes N times (argv[1], default 10000) to the VMM's spare doorbell, a guest-physical
 * address the VMM answers by running the guest on at once: a bare KVM exit round trip, the
 * baseline for the serviced system call of syscall_loop. */
#include <stdlib.h>

#define SPARE_DOORBELL ((volatile unsigned char *)0x1FF008)   /* machine.py DOORBELL_VA + 8 */

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 10000;
    for (long i = 0; i < n; i++)
        *SPARE_DOORBELL = 1;
    return 0;
}
