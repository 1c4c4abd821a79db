/* No libc at all: gcc -static -nostdlib, system calls by inline assembly. Exits with 3. */
static long sys3(long nr, long a, long b, long c)
{
    long ret;
    __asm__ volatile ("syscall" : "=a"(ret) : "a"(nr), "D"(a), "S"(b), "d"(c)
                      : "rcx", "r11", "memory");
    return ret;
}

void _start(void)
{
    static const char msg[] = "no libc here\n";
    sys3(1, 1, (long)msg, sizeof msg - 1);
    sys3(60, 3, 0, 0);
    for (;;)
        ;
}
