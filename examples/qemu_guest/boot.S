/* Multiboot (v1) entry of the QEMU example guest: QEMU's -kernel loader jumps here in 32-bit
 * protected mode, paging off. We set a stack and run the tick loop forever.
 * EDI holds the counter's step for the whole run (kernel.c is built with -ffixed-edi, so no
 * compiled code touches it): editing the vCPU's RDI in hw.xml changes the step. */
	.set MB_MAGIC, 0x1BADB002
	.set MB_FLAGS, 0
	.section .multiboot, "a"
	.align 4
	.long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

	.text
	.globl _start
_start:
	mov $stack_top, %esp
	push %ebx		/* the multiboot information */
	call kernel_init
	add $4, %esp
	mov $1, %edi
tick_loop:
	call tick
	mov delay_loops, %ecx
spin:	dec %ecx
	jnz spin
	jmp tick_loop

	.bss
	.align 16
	.space 16384
stack_top:

	.section .note.GNU-stack, "", @progbits
