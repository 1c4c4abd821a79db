/* Counts as fast as it can for SECONDS seconds of wall-clock time, then prints how far it
 * got: with several busy VMs on one VMM the counts show each one's share of the CPU.
 * Usage: busy SECONDS */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

volatile unsigned long counter;

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 1.0;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    unsigned long chunks = 0;
    do {
        for (int i = 0; i < 100000; i++)
            counter++;
        chunks++;
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
    printf("chunks %lu\n", chunks);
    return 0;
}
