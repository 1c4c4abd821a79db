/* Tries to reach host files outside the guest root; prints what each open returned. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>

static void try(const char *path)
{
    int fd = open(path, O_RDONLY);
    printf("%s: %s\n", path, fd >= 0 ? "OPENED" : strerror(errno));
}

int main(void)
{
    try("../../etc/passwd");
    try("/etc/passwd");
    try("escape_link");          /* a symlink the test points outside the root */
    try("inside.txt");           /* a file that really is inside */
    return 0;
}
