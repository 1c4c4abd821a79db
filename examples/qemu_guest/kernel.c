/* A tiny guest kernel for QEMU (multiboot) used by vmstate's QEMU loop: kernel.elf runs in
 * 32-bit protected mode without paging, kernel64.bin in long mode with paging (higher half).
 * It finds an emulated RTL8139 or e1000 NIC by PCI configuration reads, remembers its MAC
 * address, then forever prints a line on COM1 with a counter, a message and both the MAC it
 * remembered (guest memory: patch it with gdb) and the MAC the device reports now (device
 * state: edit it in hw.xml). The counter grows by the value in EDI (R15 in 64-bit mode).
 * With `-append fill` it first writes every page of RAM above 2 MiB (for benchmarks). */
#include <stdint.h>

#define COM1 0x3f8
#define PCI_ADDRESS 0xcf8
#define PCI_DATA 0xcfc

#ifdef __x86_64__
register uint64_t step asm("r15");     /* set by boot64.S; -ffixed-r15 keeps it ours */
#else
register uint32_t step asm("edi");     /* set by boot.S; -ffixed-edi keeps it ours */
#endif

volatile uint32_t delay_loops = 30000000;
volatile uint32_t counter;
char message[32] = "hello from the guest";
uint8_t nic_mac[6];
const char *nic_name = "none";
uint16_t nic_io;         /* RTL8139: I/O base, the MAC is at ports +0..+5 */
uint32_t nic_mmio;       /* e1000: memory base, the MAC is in receive address 0 (0x5400) */

static inline void outb(uint16_t port, uint8_t value)
{ asm volatile("outb %0, %1" : : "a"(value), "Nd"(port) : "memory"); }
static inline void outl(uint16_t port, uint32_t value)
{ asm volatile("outl %0, %1" : : "a"(value), "Nd"(port) : "memory"); }
static inline uint8_t inb(uint16_t port)
{ uint8_t v; asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline uint32_t inl(uint16_t port)
{ uint32_t v; asm volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }

static void putc(char c)
{
	while (!(inb(COM1 + 5) & 0x20))
		;
	outb(COM1, c);
}

static void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

static void put_hex(uint32_t value, int digits)
{
	while (digits--)
		putc("0123456789abcdef"[(value >> (digits * 4)) & 0xf]);
}

static void put_dec(uint32_t value)
{
	char digits[10];
	int n = 0;
	do
		digits[n++] = '0' + value % 10;
	while ((value /= 10) != 0);
	while (n--)
		putc(digits[n]);
}

static void put_mac(const uint8_t *mac)
{
	for (int i = 0; i < 6; i++) {
		if (i)
			putc(':');
		put_hex(mac[i], 2);
	}
}

static uint32_t pci_read(uint32_t bus, uint32_t slot, uint32_t offset)
{
	outl(PCI_ADDRESS, 0x80000000 | bus << 16 | slot << 11 | (offset & 0xfc));
	return inl(PCI_DATA);
}

static void pci_write(uint32_t bus, uint32_t slot, uint32_t offset, uint32_t value)
{
	outl(PCI_ADDRESS, 0x80000000 | bus << 16 | slot << 11 | (offset & 0xfc));
	outl(PCI_DATA, value);
}

static void device_mac(uint8_t *mac)
{
	if (nic_io) {
		for (int i = 0; i < 6; i++)
			mac[i] = inb(nic_io + i);
	} else if (nic_mmio) {
		volatile uint32_t *ra = (volatile uint32_t *)(uintptr_t)(nic_mmio + 0x5400);
		uint32_t low = ra[0], high = ra[1];
		for (int i = 0; i < 4; i++)
			mac[i] = low >> (8 * i);
		mac[4] = high;
		mac[5] = high >> 8;
	}
}

static void find_nic(void)
{
	for (uint32_t slot = 0; slot < 32; slot++) {
		uint32_t id = pci_read(0, slot, 0);
		uint32_t bar0 = pci_read(0, slot, 0x10);
		if (id == 0x813910ec) {
			nic_name = "rtl8139";
			nic_io = bar0 & 0xfffc;
		} else if (id == 0x100e8086) {
			nic_name = "e1000";
			nic_mmio = bar0 & 0xfffffff0;
		} else {
			continue;
		}
		/* enable I/O and memory decoding, whatever the firmware left */
		pci_write(0, slot, 4, pci_read(0, slot, 4) | 0x3);
		puts("nic ");
		puts(nic_name);
		puts(" at pci slot ");
		put_dec(slot);
		puts("\n");
		return;
	}
	puts("nic none\n");
}

struct multiboot_info {
	uint32_t flags, mem_lower, mem_upper, boot_device, cmdline;
};

static int has_word(const char *text, const char *word)
{
	for (; *text; text++) {
		int i = 0;
		while (word[i] && text[i] == word[i])
			i++;
		if (!word[i])
			return 1;
	}
	return 0;
}

/* Write a distinct word to every 4 KiB of RAM from 2 MiB to the top (mem_upper KiB above 1 MiB). */
static void fill_memory(uint32_t top)
{
	for (uint32_t address = 2 << 20; address + 4096 <= top; address += 4096)
		for (uint32_t offset = 0; offset < 4096; offset += 512)
			*(volatile uint32_t *)(uintptr_t)(address + offset) = address ^ offset ^ 0x5a5a5a5a;
	puts("filled ");
	put_dec((top >> 20) - 2);
	puts(" MiB\n");
}

void kernel_init(const struct multiboot_info *info)
{
	outb(COM1 + 1, 0x00);     /* no interrupts */
	outb(COM1 + 3, 0x03);     /* 8N1 */
	puts("vmstate qemu guest booted\n");
	find_nic();
	device_mac(nic_mac);
	if ((info->flags & 0x5) == 0x5 && has_word((const char *)(uintptr_t)info->cmdline, "fill"))
		fill_memory((info->mem_upper + 1024) << 10);
}

void tick(void)
{
	uint8_t now[6] = {0};
	counter += step;
	device_mac(now);
	puts("tick ");
	put_dec(counter);
	puts(" step ");
	put_dec((uint32_t)step);
	puts(" message '");
	puts(message);
	puts("' mac ");
	put_mac(nic_mac);
	puts(" device-mac ");
	put_mac(now);
	puts("\n");
}
