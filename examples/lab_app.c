/* The ScratchVM migration lab's application: write a line, ask the VMM to SAVE the VM with
 * system call 400, write another line after the restore, close the file. */
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

#define SYS_vmstate_save 400

const char *hello = "Hello World !!!\n";
const char *bye = "Bye Bye !!!\n";

int main(void)
{
    int fd = open("./ay_caramba.txt", O_RDWR | O_CREAT, 0777);
    if (fd < 0)
        return 1;
    write(fd, hello, strlen(hello));
    syscall(SYS_vmstate_save);
    write(fd, bye, strlen(bye));
    close(fd);
    return 0;
}
