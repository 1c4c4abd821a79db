/* Dereferences a null pointer: the run must end with a fault report, not hang. */
#include <stdio.h>

int main(void)
{
    volatile int *p = 0;
    printf("about to fault\n");
    fflush(stdout);
    *p = 42;
    return 0;
}
