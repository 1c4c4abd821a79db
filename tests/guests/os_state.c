/* Builds up OS state of each kind, asks for a SAVE (syscall 400), and checks after the
 * restore that all of it is still there: a pipe with buffered bytes, a directory fd in the
 * middle of a listing, the cwd, the umask, two fds sharing one description, a close-on-exec
 * flag, a signal handler and the blocked mask. Prints one line per check. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static volatile int handled;
static void on_usr2(int sig) { handled = sig; }

static int entries(int fd, char *buf, int size) {
    return syscall(SYS_getdents64, fd, buf, size);
}

int main(void)
{
    int p[2], shared, copy, dir, n, before = 0, after = 0;
    char buf[256];
    sigset_t block;

    pipe(p);
    write(p[1], "buffered", 8);
    chdir("sub");
    umask(027);
    shared = open("data.txt", O_RDWR);
    copy = dup(shared);
    fcntl(copy, F_SETFD, FD_CLOEXEC);
    read(shared, buf, 3);                   /* offset 3, seen through both fds */
    dir = open(".", O_RDONLY | O_DIRECTORY);
    before = entries(dir, buf, 40) > 0;     /* one entry at a time: part of the listing */
    signal(SIGUSR2, on_usr2);
    sigemptyset(&block);
    sigaddset(&block, SIGHUP);
    sigprocmask(SIG_BLOCK, &block, NULL);
    printf("saving\n");
    fflush(stdout);

    long saved = syscall(400);

    n = read(p[0], buf, sizeof buf);
    printf("save %ld pipe %.*s\n", saved, n, buf);
    getcwd(buf, sizeof buf);
    printf("cwd %s umask %03o\n", buf, umask(0));
    n = read(copy, buf, 4);
    printf("shared %.*s offset %ld cloexec %d %d\n", n, buf, (long)lseek(shared, 0, SEEK_CUR),
           fcntl(shared, F_GETFD), fcntl(copy, F_GETFD));
    while ((n = entries(dir, buf, 40)) > 0)
        after++;
    printf("listing went on %d\n", before && after > 0);
    sigprocmask(SIG_BLOCK, NULL, &block);
    raise(SIGUSR2);
    printf("handler %d hup blocked %d\n", handled, sigismember(&block, SIGHUP));
    return 0;
}
