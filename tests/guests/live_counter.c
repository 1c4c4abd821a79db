/* A guest for live migration: STEPS steps, each writing "step timestamp" to sequence.txt and
 * to stdout, recording the step in memory, and dirtying scattered pages of a BUFFER_MIB buffer
 * at DIRTY_MIB MiB/s (-1: as fast as it can); at step SAVE_AT it asks for a SAVE (a live
 * migration starts and the guest runs on). At the end it checks that memory holds every step
 * once and each dirtied page the value last written to it.
 * Usage: live_counter STEPS SAVE_AT DIRTY_MIB BUFFER_MIB [SLEEP_US] */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 5)
        return 2;
    long steps = atol(argv[1]), save_at = atol(argv[2]), rate = atol(argv[3]);
    size_t pages = (size_t)atol(argv[4]) << 8;
    long sleep_us = argc > 5 ? atol(argv[5]) : 1000;
    uint64_t *buffer = malloc(pages << 12), *expected = calloc(pages, 8);
    long *sequence = calloc(steps, sizeof(long));
    if (!buffer || !expected || !sequence)
        return 3;
    memset(buffer, 0, pages << 12);
    int fd = open("sequence.txt", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return 4;
    uint64_t random = 88172645463325252ull, generation = 0, touched = 0, start = now_ns();
    for (long step = 0; step < steps; step++) {
        if (step == save_at)
            syscall(400);
        sequence[step] = step + 1;
        char line[64];
        int n = snprintf(line, sizeof line, "%ld %llu\n", step, (unsigned long long)now_ns());
        if (write(fd, line, n) != n || write(1, line, n) != n)
            return 5;
        uint64_t target = rate < 0 ? touched + pages
                                   : (now_ns() - start) / 1000 * (uint64_t)rate * 256 / 1000000;
        while (touched < target) {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            size_t page = random % pages;
            buffer[page << 9] = ++generation;
            expected[page] = generation;
            touched++;
        }
        if (sleep_us)
            usleep(sleep_us);
    }
    for (long step = 0; step < steps; step++)
        if (sequence[step] != step + 1) {
            printf("step %ld missing from memory\n", step);
            return 1;
        }
    for (size_t page = 0; page < pages; page++)
        if (buffer[page << 9] != expected[page]) {
            printf("page %zu of the buffer holds %llu, expected %llu\n", page,
                   (unsigned long long)buffer[page << 9], (unsigned long long)expected[page]);
            return 1;
        }
    printf("intact: %ld steps, %llu page writes\n", steps, (unsigned long long)touched);
    return 0;
}
