/* A SIGSEGV handler runs when the program writes through a null pointer; it reports the
 * faulting address from siginfo and jumps back to main with siglongjmp. */
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

static sigjmp_buf back;
static void *fault_address;

static void on_segv(int sig, siginfo_t *info, void *context)
{
    fault_address = info->si_addr;
    siglongjmp(back, sig);
}

int main(void)
{
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &action, NULL);
    int caught = sigsetjmp(back, 1);
    if (!caught) {
        *(volatile int *)16 = 1;
        printf("not reached\n");
        return 1;
    }
    printf("caught signal %d at address %p\n", caught, fault_address);
    return 0;
}
