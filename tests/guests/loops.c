/* CPU-bound loops for the CPU benchmarks (no system calls inside the loops):
 *   loops int N     N million steps of a dependent integer chain
 *   loops sieve M R a sieve of Eratosthenes over M MiB, R times (memory-heavy)
 *   loops float N   N million steps mixing x87 (long double) and SSE (double) arithmetic
 * Prints one result line, so that every CPU can be checked to compute the same thing. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned long integer_chain(unsigned long steps)
{
    unsigned long x = 1;
    for (unsigned long i = 0; i < steps; i++)
        x = x * 6364136223846793005UL + (x >> 7) + i;
    return x;
}

static unsigned long sieve(unsigned long bytes, int rounds)
{
    unsigned char *composite = malloc(bytes);
    unsigned long primes = 0;
    for (int r = 0; r < rounds; r++) {
        memset(composite, 0, bytes);
        primes = 0;
        for (unsigned long i = 2; i < bytes; i++) {
            if (composite[i])
                continue;
            primes++;
            for (unsigned long j = i * 2; j < bytes; j += i)
                composite[j] = 1;
        }
    }
    return primes;
}

static double float_mix(unsigned long steps)
{
    long double x87 = 1.0L;
    double sse = 1.0;
    for (unsigned long i = 1; i <= steps; i++) {
        x87 = x87 * 1.0000001L + 1.0L / (long double)i;
        sse = sse * 0.9999999 + 1.0 / (double)i;
    }
    return (double)x87 + sse;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && !strcmp(argv[1], "int"))
        printf("int %lu\n", integer_chain(strtoul(argv[2], 0, 10) * 1000000UL));
    else if (argc >= 4 && !strcmp(argv[1], "sieve"))
        printf("sieve %lu\n", sieve(strtoul(argv[2], 0, 10) << 20, atoi(argv[3])));
    else if (argc >= 3 && !strcmp(argv[1], "float"))
        printf("float %.6f\n", float_mix(strtoul(argv[2], 0, 10) * 1000000UL));
    else {
        fprintf(stderr, "usage: loops int N | sieve MIB ROUNDS | float N\n");
        return 2;
    }
    return 0;
}
