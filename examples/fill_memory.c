/* Fills MiB of memory (argv[1], default 16) with non-zero bytes, then asks for a SAVE; after
 * the restore, checks the pattern is intact. The benchmarks use it to size touched memory. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 16;
    size_t size = mib << 20;
    unsigned char *area = malloc(size);
    if (!area) {
        fprintf(stderr, "cannot allocate %zu MiB\n", mib);
        return 1;
    }
    for (size_t i = 0; i < size; i += 4096)
        memset(area + i, (int)(i >> 12) | 1, 4096);
    syscall(400);
    for (size_t i = 0; i < size; i += 4096)
        if (area[i] != (unsigned char)((i >> 12) | 1) || area[i + 4095] != area[i]) {
            printf("pattern broken at offset %zu\n", i);
            return 1;
        }
    printf("%zu MiB intact after restore\n", mib);
    return 0;
}
