/* Saves twice: each restore continues to the next step (a restored VM can save again). */
#include <stdio.h>
#include <unistd.h>

int main(void)
{
    static char buffer[1 << 20];       /* touched before the first save, checked at the end */
    for (int i = 0; i < (int)sizeof buffer; i += 4096)
        buffer[i] = 'a';
    printf("step one\n");
    fflush(stdout);
    syscall(400);
    buffer[0] = 'b';
    printf("step two\n");
    fflush(stdout);
    syscall(400);
    printf("step three %c%c\n", buffer[0], buffer[4096]);
    return 0;
}
