/* Opens PATH read-write (a FIFO then opens at once) and reads from it once: a guest that
 * blocks in read() until someone writes. Usage: read_once PATH */
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    char buffer[100];
    int fd = argc > 1 ? open(argv[1], O_RDWR) : -1;
    if (fd < 0)
        return 100;
    long n = read(fd, buffer, sizeof buffer);
    printf("read %ld: %.*s\n", n, (int)(n > 0 ? n : 0), buffer);
    return 0;
}
