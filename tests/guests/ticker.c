/* Prints LINES lines "tick I", spinning MILLIONS million iterations before each, and exits
 * with STATUS: several of these on one VMM show their slices interleave.
 * Usage: ticker LINES MILLIONS STATUS */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

volatile unsigned long counter;

int main(int argc, char **argv)
{
    if (argc < 4)
        return 100;
    int lines = atoi(argv[1]), status = atoi(argv[3]);
    unsigned long spin = strtoul(argv[2], 0, 10) * 1000000UL;
    char line[64];
    for (int i = 0; i < lines; i++) {
        for (unsigned long j = 0; j < spin; j++)
            counter++;
        int n = snprintf(line, sizeof line, "tick %d\n", i);
        write(1, line, n);
    }
    return status;
}
