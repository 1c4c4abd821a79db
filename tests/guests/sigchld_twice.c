/* Forks a child that exits and waits (sigsuspend) for its SIGCHLD without reaping it, then
 * forks a second child that exits and waits again: Linux raises SIGCHLD for each. A VMM that
 * misses the second leaves the wait to the alarm. Prints how many came, then reaps both. */
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t chld, rang;

static void on_chld(int sig) { (void)sig; chld++; }
static void on_alarm(int sig) { (void)sig; rang = 1; }

int main(void)
{
    struct sigaction sa = {0};
    sa.sa_handler = on_chld;
    sigaction(SIGCHLD, &sa, 0);
    sa.sa_handler = on_alarm;
    sigaction(SIGALRM, &sa, 0);
    sigset_t blocked, open_mask;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGCHLD);
    sigprocmask(SIG_BLOCK, &blocked, &open_mask);
    alarm(60);                        /* only a VMM that missed a SIGCHLD gets this far */
    for (int n = 1; n <= 2; n++) {
        if (fork() == 0)
            _exit(n);
        while (chld < n && !rang)
            sigsuspend(&open_mask);
    }
    alarm(0);
    printf("SIGCHLD %d times\n", (int)chld);
    int status, statuses = 0;
    while (wait(&status) > 0)
        statuses += WEXITSTATUS(status);
    printf("reaped, statuses %d\n", statuses);
    return 0;
}
