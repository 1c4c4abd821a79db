/* Shows what survives a save and restore: a value held in an SSE register (xmm7) across the
 * SAVE, a global counter, and the value syscall(400) returns (0 after a restore). */
#include <stdio.h>
#include <string.h>

volatile long counter = 1;
char message[32] = "original message";

/* Keeps `value` in xmm7 across syscall(400) and returns what xmm7 holds afterwards. */
static double through_save(double value, long *save_result)
{
    double after;
    long result;
    __asm__ volatile("movsd %[in], %%xmm7\n\t"
                     "mov $400, %%eax\n\t"
                     "syscall\n\t"
                     "movsd %%xmm7, %[out]"
                     : "=a"(result), [out] "=x"(after)
                     : [in] "x"(value)
                     : "rcx", "r11", "xmm7", "memory");
    *save_result = result;
    return after;
}

int main(void)
{
    double pi = 3.141592653589793;
    long save_result;
    printf("before save: xmm7 = %.15f, counter = %ld\n", pi, counter);
    fflush(stdout);
    double after = through_save(pi, &save_result);
    counter++;
    printf("after restore: xmm7 = %.15f, counter = %ld, save returned %ld, message = \"%s\"\n",
           after, counter, save_result, message);
    return after == pi ? 0 : 1;
}
