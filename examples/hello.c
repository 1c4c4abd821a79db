/* An ordinary musl program: printf (with a float), malloc small and large, thread-local
 * storage. Its output is checked by the tests. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static _Thread_local int tls_counter = 40;

int main(int argc, char **argv)
{
    char *small = malloc(32);
    size_t large_size = 4 << 20;
    char *large = malloc(large_size);
    if (!small || !large)
        return 1;
    strcpy(small, "small block");
    memset(large, 'x', large_size);
    tls_counter += 2;
    double ratio = 355.0 / 113.0;
    printf("hello from %s\n", argc > 0 ? argv[0] : "?");
    printf("%s, large block ends with '%c'\n", small, large[large_size - 1]);
    printf("tls counter = %d\n", tls_counter);
    printf("pi is about %.6f\n", ratio);
    for (int i = 1; i < argc; i++)
        printf("arg %d: %s\n", i, argv[i]);
    free(large);
    free(small);
    return 0;
}
