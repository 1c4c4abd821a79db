/* A guest that attacks its VMM: each mode tries one way out of the guest's root or one way
 * to make the VMM use unbounded host resources, and prints what the system calls returned.
 *   hostile escape OUTSIDE   symlink to a host file, then chown/utimensat/linkat through it,
 *                            and open /proc/self/exe for writing
 *   hostile argv             execve with 16 MiB of arguments
 *   hostile forktree         a tree of 8^4 processes, each sleeping a while
 *   hostile writev           1024 iovecs over one 64 MiB buffer (run with --max-file-size)
 *   hostile sigstack         a signal handler on an alternate stack outside memory */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

static void report(const char *what, long result)
{
    printf("%s %ld %s\n", what, result, result < 0 ? strerror(errno) : "ok");
}

static int escape(const char *outside)
{
    struct timespec times[2] = {{1234567890, 0}, {1234567890, 0}};
    report("symlink", symlink(outside, "/link"));
    report("chown", chown("/link", 4321, 4321));
    report("utimensat", utimensat(AT_FDCWD, "/link", times, 0));
    report("linkat", linkat(AT_FDCWD, "/link", AT_FDCWD, "/hard", AT_SYMLINK_FOLLOW));
    report("open exe for writing", open("/proc/self/exe", O_RDWR));
    return 0;
}

static int huge_argv(void)
{
    static char *argv[129];
    char *text = malloc(128 * 1024);
    memset(text, 'a', 128 * 1024 - 1);
    text[128 * 1024 - 1] = 0;
    for (int i = 0; i < 128; i++)
        argv[i] = text;
    report("execve", execve("/proc/self/exe", argv, NULL));
    return 0;
}

static int fork_tree(void)
{
    int made = 0, failed = 0;
    for (int depth = 0; depth < 4; depth++) {
        int child = 0;
        for (int i = 0; i < 8 && !child; i++) {
            pid_t pid = fork();
            if (pid == 0)
                child = 1;
            else if (pid < 0)
                failed++;
            else
                made++;
        }
        if (!child)
            break;
        made = failed = 0;
    }
    sleep(2);
    while (wait(NULL) > 0)
        ;
    if (made || failed)
        printf("made %d failed %d\n", made, failed);
    return 0;
}

static int big_writev(void)
{
    size_t size = 64 << 20;
    static struct iovec iov[1024];
    char *buffer = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < 1024; i++) {
        iov[i].iov_base = buffer;
        iov[i].iov_len = size;
    }
    int fd = open("/written", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    report("writev", writev(fd, iov, 1024));
    return 0;
}

static void handler(int sig) { (void)sig; }

static int bad_signal_stack(void)
{
    stack_t stack = {.ss_sp = (void *)0xdead0000000ULL, .ss_size = 65536};
    struct sigaction action = {.sa_handler = handler, .sa_flags = SA_ONSTACK};
    report("sigaltstack", sigaltstack(&stack, NULL));
    sigaction(SIGUSR1, &action, NULL);
    raise(SIGUSR1);
    puts("handler ran");
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc > 2 && !strcmp(argv[1], "escape"))
        return escape(argv[2]);
    if (argc > 1 && !strcmp(argv[1], "argv"))
        return huge_argv();
    if (argc > 1 && !strcmp(argv[1], "forktree"))
        return fork_tree();
    if (argc > 1 && !strcmp(argv[1], "writev"))
        return big_writev();
    if (argc > 1 && !strcmp(argv[1], "sigstack"))
        return bad_signal_stack();
    fputs("usage: hostile escape OUTSIDE | argv | forktree | writev | sigstack\n", stderr);
    return 2;
}
