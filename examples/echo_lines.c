/* Reads lines from standard input and answers each one, until end of input. */
#include <stdio.h>
#include <string.h>

int main(void)
{
    char line[256];
    int count = 0;
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        count++;
        printf("line %d: %s (%zu bytes)\n", count, line, strlen(line));
        fflush(stdout);
    }
    printf("%d lines read\n", count);
    return 0;
}
