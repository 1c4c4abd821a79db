/* Computes without making system calls (a host signal must still stop and save it), then
 * prints the result. argv[1]: how many million iterations (default 3000). */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

volatile unsigned long counter;

int main(int argc, char **argv)
{
    unsigned long millions = argc > 1 ? strtoul(argv[1], 0, 10) : 3000;
    write(1, "spinning\n", 9);
    for (unsigned long i = 0; i < millions * 1000000UL; i++)
        counter++;
    printf("counted to %lu\n", counter);
    return 0;
}
