/* Multiboot (v1, a.out kludge) entry of the 64-bit QEMU example guest (kernel64.bin, a flat
 * image loaded at 1 MiB). In 32-bit protected mode it builds page tables mapping the first
 * GiB twice, identity and at KERNEL_VMA (2 MiB pages), enters long mode with paging, and runs
 * kernel.c from the higher half. R15 holds the counter's step for the whole run (kernel.c is
 * built with -ffixed-r15): editing the vCPU's R15 in hw.xml changes the step. */
	.set KERNEL_VMA, 0xffffffff80000000
	.set MB_MAGIC, 0x1BADB002
	.set MB_FLAGS, 0x00010002          /* load addresses below; memory info */

	.section .multiboot, "a"
	.code32
	.align 4
multiboot_header:
	.long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
	.long multiboot_header, _load_start, _load_end, _bss_end, _start

	.section .boot, "ax"
	.globl _start
_start:
	mov %ebx, %esi                     /* the multiboot information (physical) */
	mov $boot_stack_top, %esp
	/* PML4[0] and PML4[511] -> PDPTs; PDPT_low[0], PDPT_high[510] -> one PD of 2 MiB pages */
	movl $(pdpt_low + 3), pml4
	movl $(pdpt_high + 3), pml4 + 511 * 8
	movl $(pd + 3), pdpt_low
	movl $(pd + 3), pdpt_high + 510 * 8
	xor %ecx, %ecx
1:	mov %ecx, %eax
	shl $21, %eax
	or $0x83, %eax                     /* present, writable, 2 MiB page */
	mov %eax, pd(, %ecx, 8)
	inc %ecx
	cmp $512, %ecx
	jne 1b
	mov $pml4, %eax
	mov %eax, %cr3
	mov %cr4, %eax
	or $0x20, %eax                     /* PAE */
	mov %eax, %cr4
	mov $0xC0000080, %ecx              /* EFER.LME */
	rdmsr
	or $0x100, %eax
	wrmsr
	mov %cr0, %eax
	or $0x80000001, %eax               /* PG, PE */
	mov %eax, %cr0
	lgdt gdt_pointer
	ljmp $0x08, $long_mode

	.code64
long_mode:
	mov $0x10, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov %ax, %fs
	mov %ax, %gs
	movabs $stack_top, %rsp
	mov %esi, %edi
	movabs $kernel_init, %rax
	call *%rax
	mov $1, %r15
tick_loop:
	movabs $tick, %rax
	call *%rax
	movabs $delay_loops, %rax
	mov (%rax), %ecx
spin:	dec %ecx
	jnz spin
	jmp tick_loop

	.align 8
gdt:	.quad 0, 0x00af9a000000ffff, 0x00cf92000000ffff
gdt_pointer:
	.word gdt_pointer - gdt - 1
	.long gdt

	.align 4096
pml4:	.space 4096
pdpt_low:	.space 4096
pdpt_high:	.space 4096
pd:	.space 4096
	.space 4096
boot_stack_top:

	.bss
	.align 16
	.space 16384
stack_top:

	.section .note.GNU-stack, "", @progbits
