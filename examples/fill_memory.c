/* Fills MiB of memory (argv[1], default 16) with non-zero bytes, then asks for a SAVE; after
 * the restore, checks the pattern is intact. The benchmarks use it to size touched memory.
 * argv[2] lays the touched pages out: "contiguous" (default: every page of the buffer),
 * "every4" (one page in four) or "random25" (a quarter of the pages, chosen by a fixed
 * pseudo-random sequence). With argv[3] = "exit" the restored guest exits at once. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t state = 0x9E3779B97F4A7C15ull;

static int chosen(const char *layout, size_t page)
{
    if (!strcmp(layout, "every4"))
        return page % 4 == 0;
    if (!strcmp(layout, "random25")) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        return (state & 3) == 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 16;
    const char *layout = argc > 2 ? argv[2] : "contiguous";
    size_t size = mib << 20;
    unsigned char *area = malloc(size);
    if (!area) {
        fprintf(stderr, "cannot allocate %zu MiB\n", mib);
        return 1;
    }
    unsigned char *touched = calloc(size >> 12, 1);
    if (!touched) {
        fprintf(stderr, "cannot allocate the page map\n");
        return 1;
    }
    for (size_t i = 0; i < size; i += 4096)
        if ((touched[i >> 12] = chosen(layout, i >> 12)))
            memset(area + i, (int)(i >> 12) | 1, 4096);
    syscall(400);
    if (argc > 3 && !strcmp(argv[3], "exit"))
        return 0;
    for (size_t i = 0; i < size; i += 4096)
        if (touched[i >> 12] && (area[i] != (unsigned char)((i >> 12) | 1)
                                 || area[i + 4095] != area[i])) {
            printf("pattern broken at offset %zu\n", i);
            return 1;
        }
    printf("%zu MiB intact after restore\n", mib);
    return 0;
}
