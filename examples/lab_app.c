/* The ScratchVM migration lab's application: write a line, ask the VMM to SAVE the VM with
 * system call 400, write another line after the restore, close the file. */
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#define SYS_vmstate_save 400

/* syscall(400), in a function of the program's own: musl's syscall() has no unwind
 * information, so a debugger could not show main() calling it in a backtrace. */
static __attribute__((noinline)) long vmstate_save(void)
{
    long result;
    __asm__ volatile("syscall" : "=a"(result) : "a"(SYS_vmstate_save) : "rcx", "r11", "memory");
    return result;
}

const char *hello = "Hello World !!!\n";
const char *bye = "Bye Bye !!!\n";

int main(void)
{
    int fd = open("./ay_caramba.txt", O_RDWR | O_CREAT, 0777);
    if (fd < 0)
        return 1;
    write(fd, hello, strlen(hello));
    vmstate_save();
    write(fd, bye, strlen(bye));
    close(fd);
    return 0;
}
