/* mprotect is enforced: a write to a read-only page and a read of a PROT_NONE page fault
 * (a SIGSEGV handler reports them); after mprotect back to read-write the write works. */
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

static sigjmp_buf back;
static void on_segv(int sig) { siglongjmp(back, 1); }

static const char *try_write(volatile char *p)
{
    if (sigsetjmp(back, 1))
        return "fault";
    *p = 'x';
    return "ok";
}

static const char *try_read(volatile char *p)
{
    if (sigsetjmp(back, 1))
        return "fault";
    return *p == 'x' ? "ok x" : "ok";
}

int main(void)
{
    signal(SIGSEGV, on_segv);
    char *page = mmap(0, 3 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    printf("rw write %s\n", try_write(page + 4096));
    mprotect(page + 4096, 4096, PROT_READ);
    printf("ro write %s, neighbour write %s, ro read %s\n", try_write(page + 4096),
           try_write(page), try_read(page + 4096));
    mprotect(page + 4096, 4096, PROT_NONE);
    printf("none read %s\n", try_read(page + 4096));
    mprotect(page + 4096, 4096, PROT_READ | PROT_WRITE);
    printf("rw again write %s\n", try_write(page + 4096));
    char *reserved = mmap(0, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    printf("reservation read %s\n", try_read(reserved));
    return 0;
}
