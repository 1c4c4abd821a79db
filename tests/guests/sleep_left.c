/* Sleeps MS milliseconds (default 8000) with nanosleep, or with a relative clock_nanosleep
 * given a second argument, and prints how late it woke against its deadline on its own
 * monotonic clock. A save and restore in the middle of the sleep must leave the re-issued
 * call only the time that was left, so it wakes about when it would have, not a whole
 * request later. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int main(int argc, char **argv)
{
    long ms = argc > 1 ? atol(argv[1]) : 8000;
    struct timespec request = {ms / 1000, (ms % 1000) * 1000000};
    long deadline = now_ms() + ms;
    printf("sleeping\n");
    fflush(stdout);
    int result = argc > 2 ? clock_nanosleep(CLOCK_MONOTONIC, 0, &request, 0)
                          : nanosleep(&request, 0);
    printf("slept %d, late %ld ms\n", result, now_ms() - deadline);
    return 0;
}
