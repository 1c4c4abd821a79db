/* Recurses without end: the stack overflows into the guard page below it. */
#include <stdio.h>

static int depth(volatile char *previous)
{
    volatile char frame[1024];
    frame[0] = previous ? previous[0] + 1 : 0;
    return depth(frame) + frame[1];
}

int main(void)
{
    printf("recursing\n");
    fflush(stdout);
    return depth(0);
}
