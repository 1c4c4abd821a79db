/* Para-calls: what a guest running under vmstate's VMM may ask of the VMM itself.
 *
 * They are system calls with numbers Linux does not use; each returns a value in RAX as a
 * system call does (a negative errno on failure). Include this header in a guest program:
 *
 *     #include "vmstate_paracalls.h"
 *     if (vmstate_snapshot("before.sav") == VMSTATE_RESTORED) puts("I am the copy");
 *
 *   400 SAVE                  save the VM (to vmstate's --image) and end it; returns 0 in
 *                             the VM restored from that image
 *   401 DUMP_PROCESSOR_STATE  print the vCPU's registers, flags, segments, control registers,
 *                             EFER, FS/GS base and the next instructions to the VMM's stderr,
 *                             each line tagged [VM name]; returns 0
 *   402 SNAPSHOT(path)        write an image of the VM to path (a path inside the guest's
 *                             root, resolved as open() would) and go on running: returns 0
 *                             here, 1 (VMSTATE_RESTORED) in a VM restored from the image; on
 *                             failure -errno (e.g. -ENOENT) and the VM goes on
 *   403 MIGRATE("host:port")  send the VM to a `vmstate receive` (cold migration): returns 1
 *                             on the destination; on failure -errno here and the VM goes on
 */
#ifndef VMSTATE_PARACALLS_H
#define VMSTATE_PARACALLS_H

#define VMSTATE_SAVE 400
#define VMSTATE_DUMP_PROCESSOR_STATE 401
#define VMSTATE_SNAPSHOT 402
#define VMSTATE_MIGRATE 403
#define VMSTATE_RESTORED 1

/* One syscall instruction in a function of the program's own (noinline: musl's syscall() has
 * no unwind information, so a debugger could not show the caller in a backtrace). */
static __attribute__((noinline)) long vmstate_paracall(long nr, const void *arg)
{
    long result;
    __asm__ volatile("syscall" : "=a"(result) : "a"(nr), "D"(arg) : "rcx", "r11", "memory");
    return result;
}

static inline long vmstate_save(void) { return vmstate_paracall(VMSTATE_SAVE, 0); }
static inline long vmstate_dump_processor_state(void)
{
    return vmstate_paracall(VMSTATE_DUMP_PROCESSOR_STATE, 0);
}
static inline long vmstate_snapshot(const char *path)
{
    return vmstate_paracall(VMSTATE_SNAPSHOT, path);
}
static inline long vmstate_migrate(const char *host_port)
{
    return vmstate_paracall(VMSTATE_MIGRATE, host_port);
}

#endif
