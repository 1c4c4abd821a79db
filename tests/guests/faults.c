/* Takes the exception named by argv[1], after printing its name: null (write to address 0),
 * kernel (write to the supervisor-only GDT page), fetch (jump to an unmapped address), ud2,
 * hlt and cr0 (privileged in ring 3: #GP), divide (#DE). */
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    const char *what = argc > 1 ? argv[1] : "null";
    printf("%s\n", what);
    fflush(stdout);
    if (!strcmp(what, "null"))
        *(volatile int *)0 = 1;
    else if (!strcmp(what, "kernel"))
        *(volatile int *)0x1000 = 1;
    else if (!strcmp(what, "fetch"))
        ((void (*)(void))0x7fff00000000UL)();
    else if (!strcmp(what, "ud2"))
        __asm__ volatile("ud2");
    else if (!strcmp(what, "hlt"))
        __asm__ volatile("hlt");
    else if (!strcmp(what, "cr0")) {
        unsigned long cr0;
        __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    } else if (!strcmp(what, "divide"))
        __asm__ volatile("xor %%ecx, %%ecx\n\tdiv %%ecx" ::: "eax", "ecx", "edx");
    return 0;
}
